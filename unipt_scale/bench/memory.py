"""Peak memory of one training run, measured in a process of its own.

Why a process per run: memory an allocator has once taken is rarely handed back, so in one process a method
measured after another starts from the first one's high-water mark and its own peak hides under it. Every run
here gets a fresh address space: it is forked from a server that has imported the libraries (torch,
transformers, peft, this package) and done nothing else, so no model, tensor or thread pool of another run is
in it, and the import cost (seconds) is paid once instead of once per run.

What is measured, from `PeakMeter.start()` (called after the model, data and optimizer are built: the loaded
baseline) to `stop()` (after the training steps):

- CPU: the resident-set high-water mark above the baseline. Where the kernel lets a process reset its own
  high-water mark (`echo 5 > /proc/self/clear_refs`), VmHWM is reset at the baseline and read at the end; where
  it does not, a thread samples VmRSS every few milliseconds (peaks shorter than that can be missed). Freed heap
  is returned to the system (malloc_trim) before the baseline, so memory freed while loading is not counted as
  room the steps reuse for free. `rss_method` says which way was used. The baseline is taken after a throwaway
  step of a small layer, so torch's one-time runtime costs (~20 MB: autograd threads, the intra-op pool) are in
  it; the first use of the model's own ops at its own sizes (kernel workspaces, lazily imported code) is not,
  and is part of the peak.
- CUDA: torch.cuda.max_memory_allocated with the peak reset at the baseline, and the part above what was
  allocated then.
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Dict, Optional

# What the fork server imports before it forks runs (a module that is not installed is skipped).
PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.bert.modeling_bert",
           "transformers.models.mpnet.modeling_mpnet", "transformers.models.llama.modeling_llama", "peft",
           "peft.tuners.lora", "safetensors.torch", "tqdm.auto", "unipt_scale.tasks", "unipt_scale.trainer",
           "unipt_scale.export", "unipt_scale.preprocessors", "unipt_scale.data", "unipt_scale.data.pipeline",
           "unipt_scale.data.stream", "unipt_scale.bench.memory", "unipt_scale.bench.methods",
           "unipt_scale.bench.quality"]
RSS_HWM = "VmHWM reset by /proc/self/clear_refs at the baseline"
RSS_SAMPLED = "VmRSS sampled every {ms:g} ms by a thread"
RSS_NONE = "unavailable (no /proc/self/status)"
# Where a run's target may live: the benchmarks' own modules, nothing a spec could name at will.
TARGET_PREFIX = "unipt_scale.bench."


class IsolatedRunError(RuntimeError):
    """A run's process died, timed out or failed; the message is one line."""


# --------------------------------------------------------------------------------------------------------------
# Reading this process's memory
# --------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> Optional[int]:
    """Resident set size now (None where /proc is not there)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> Optional[int]:
    """Resident-set high-water mark (since the process started or its last reset)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand free heap pages back to the system, so RSS is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def warm_runtime() -> None:
    """Pay torch's one-time costs (autograd worker threads, the intra-op pool, first-use kernel buffers) before a
    baseline is taken: a throwaway forward, backward and AdamW step of a small linear and conv layer. Without it
    every method's first step would be charged the same ~20 MB the runtime takes once per process."""
    import torch

    with torch.random.fork_rng(devices=[]):  # the run's own random streams are left exactly where they were
        lin, conv = torch.nn.Linear(64, 64), torch.nn.Conv2d(3, 8, 3, padding=1)
        opt = torch.optim.AdamW(list(lin.parameters()) + list(conv.parameters()))
        for _ in range(2):
            loss = lin(torch.randn(32, 64)).square().mean() + conv(torch.randn(2, 3, 16, 16)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        del lin, conv, opt, loss


class PeakMeter:
    """Peak memory between start() (the loaded baseline) and stop(); see the module docstring."""

    def __init__(self, device=None, sample_ms: float = 2.0, force_sampling: bool = False, warm: bool = True):
        self.device = device
        self.warm = warm
        self.sample_ms = sample_ms
        self.force_sampling = force_sampling
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0
        self.baseline: Optional[int] = None
        self.method = RSS_NONE
        self._cuda_loaded: Optional[int] = None

    def _cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", str(self.device)) == "cuda"

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_ms / 1e3):
            now = rss_bytes()
            if now is not None and now > self._sampled:
                self._sampled = now

    def start(self) -> "PeakMeter":
        if self.warm:
            warm_runtime()
        trim_heap()
        if self._cuda():
            import torch

            torch.cuda.synchronize()
            self._cuda_loaded = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.baseline = rss_bytes()
        if self.baseline is None:
            self.method = RSS_NONE
        elif not self.force_sampling and reset_hwm():
            self.method = RSS_HWM
        else:
            self.method = RSS_SAMPLED.format(ms=self.sample_ms)
            self._sampled = self.baseline
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> Dict[str, Optional[int]]:
        """{rss_baseline_bytes, rss_peak_bytes, peak_rss_above_baseline, rss_method, cuda_loaded_allocated,
        cuda_peak_allocated, cuda_peak_above_loaded, peak_memory_bytes} — the last is the device's own figure
        above the baseline (RSS on CPU, allocated memory on CUDA)."""
        if self.method == RSS_HWM:
            peak = hwm_bytes()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            now = rss_bytes() or 0
            peak = max(self._sampled, now)
        else:
            peak = None
        out: Dict[str, Optional[int]] = {
            "rss_method": self.method, "rss_baseline_bytes": self.baseline, "rss_peak_bytes": peak,
            "peak_rss_above_baseline": (max(0, peak - self.baseline) if peak is not None and self.baseline is not None
                                        else None),
            "cuda_loaded_allocated": None, "cuda_peak_allocated": None, "cuda_peak_above_loaded": None}
        if self._cuda():
            import torch

            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated()
            out.update(cuda_loaded_allocated=self._cuda_loaded, cuda_peak_allocated=cuda_peak,
                       cuda_peak_above_loaded=max(0, cuda_peak - (self._cuda_loaded or 0)))
        out["peak_memory_bytes"] = out["cuda_peak_above_loaded"] if self._cuda() else out["peak_rss_above_baseline"]
        return out


# --------------------------------------------------------------------------------------------------------------
# Running a function in a process of its own
# --------------------------------------------------------------------------------------------------------------
def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def is_refusal(err: BaseException) -> bool:
    """The model code's own refusal of a config (a ConfigError, or a quantized backbone this model cannot have:
    unipt_scale.quantization.QuantizationError, also where the backbone loader re-raised it as its own one-line
    BackboneLoadError), as opposed to a run that broke."""
    from unipt_scale.backbone import BackboneLoadError
    from unipt_scale.config import ConfigError
    from unipt_scale.quantization import QuantizationError

    if isinstance(err, (ConfigError, QuantizationError)):
        return True
    return isinstance(err, BackboneLoadError) and isinstance(err.__context__, QuantizationError)


def _resolve(target: str) -> Callable[[dict], dict]:
    module, _, name = target.partition(":")
    if not module.startswith(TARGET_PREFIX) or not name:
        raise ValueError(f"run target {target!r} is not a function of {TARGET_PREFIX}*")
    return getattr(importlib.import_module(module), name)


def _child(target: str, spec: dict, out: str, log_path: Optional[str]) -> None:
    """In the forked process: its output to the run's log (never the server's pipe), the target's result (or
    its error, in one line) to `out`."""
    fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    from unipt_scale.atomic import atomic_write_json

    try:
        result = {"result": _resolve(target)(spec)}
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line, the traceback in the log
        if is_refusal(err):  # the method/config cannot run here: a refusal, said in one line
            result = {"error": {"kind": "refused", "type": type(err).__name__, "message": one_line(err)}}
        else:
            traceback.print_exc()
            result = {"error": {"kind": "failed", "type": type(err).__name__, "message": one_line(err)}}
    sys.stdout.flush()
    sys.stderr.flush()
    atomic_write_json(out, result)


def _serve() -> None:
    """The fork server: import PRELOAD, then per request line fork a child that runs it; reply with the
    child's pid, then its exit status. Ends when its stdin closes (its parent is gone)."""
    import json

    from unipt_scale.host_memory import retain_freed_memory

    retain_freed_memory()  # inherited by every forked run
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.collect()
    gc.freeze()  # the imports' objects: never scanned (nor their pages written) by a run's collections
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray prints of the server itself go nowhere, not into the protocol
    os.close(null)
    reply.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(req["target"], req["spec"], req["out"], req.get("log"))
            except BaseException:  # noqa: BLE001 - the child must never return into the server loop
                code = 1
            finally:
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
    reply.flush()
    os._exit(0)  # no interpreter teardown: nothing of the server's is worth finalising, and some bindings complain


class _Server:
    """The parent's handle on its fork server (started on first use, one per parent process)."""

    _instance: Optional["_Server"] = None

    def __init__(self):
        import json

        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the server's imports read it
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["UNIPT_BENCH_SYS_PATH"] = json.dumps([p for p in sys.path if p])
        code = ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop('UNIPT_BENCH_SYS_PATH')); "
                "from unipt_scale.bench.memory import _serve; _serve()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        if self._read(None) != "ready":
            raise IsolatedRunError("the fork server did not start (see its output above)")

    def _read(self, timeout_s: Optional[float]) -> Optional[str]:
        import select

        if timeout_s is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout_s))
            if not ready:
                return None
        line = self.proc.stdout.readline()
        if not line:
            raise IsolatedRunError(f"the fork server ended (exit code {self.proc.poll()})")
        return line.strip()

    @classmethod
    def get(cls) -> "_Server":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def run(self, request: dict, timeout_s: Optional[float]) -> int:
        """Exit code of the child that ran `request`; the child is killed past `timeout_s`."""
        import json
        import signal

        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._read(None))["pid"]
        line = self._read(timeout_s)
        if line is None:
            os.kill(pid, signal.SIGKILL)
            self._read(None)
            raise IsolatedRunError(f"the run ran past {timeout_s:.0f} s and was stopped")
        return json.loads(line)["exit"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a server that does not answer its closed stdin (stopped, hung)
                self.proc.kill()
                self.proc.wait()


def _close_server() -> None:
    if _Server._instance is not None:
        _Server._instance.close()
        _Server._instance = None


atexit.register(_close_server)


def _last_line(path: Optional[str]) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - 4096))
        lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_isolated(target: str, spec: dict, timeout_s: Optional[float] = None,
                 log_path: Optional[str] = None) -> dict:
    """`target` ("unipt_scale.bench.MODULE:FUNCTION") called with `spec` (JSON-able) in a fresh process forked
    from the preloaded server. Returns {"result": ..., "process_wall_s"} or {"error": {"kind":
    refused|failed, "type", "message"}, ...}; raises IsolatedRunError when the process died or ran past
    `timeout_s`."""
    import json

    _resolve(target)  # a bad target fails here, not in the child
    server = _Server.get()
    with tempfile.TemporaryDirectory(prefix="unipt-run-") as tmp:
        out = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        code = server.run({"target": target, "spec": spec, "out": out,
                           "log": os.path.abspath(log_path) if log_path else None}, timeout_s)
        wall = time.perf_counter() - t0
        if not os.path.isfile(out):
            why = f"exit code {code}" + (" (killed: out of memory?)" if code == -9 else "")
            last = _last_line(log_path)
            raise IsolatedRunError(f"the run's process ended without a result ({why})" + (f": {last}" if last else ""))
        with open(out, encoding="utf-8") as fh:
            result = json.load(fh)
    result["process_wall_s"] = wall
    return result


def noop_child(spec: dict) -> dict:
    """A run that does nothing but report its own memory: how much a forked run starts with."""
    return {"rss_bytes": rss_bytes(), "pid": os.getpid(), "echo": spec.get("echo")}


def allocate_child(spec: dict) -> dict:
    """Touch `mib` MiB after the baseline, free it, and report the peak (the meter's own check)."""
    import torch

    meter = PeakMeter(force_sampling=bool(spec.get("force_sampling")))
    meter.start()
    block = torch.ones(int(spec["mib"]) * 2 ** 18)  # float32: 4 bytes each
    time.sleep(0.05)  # held long enough for a sampler to see it
    del block
    return meter.stop()

