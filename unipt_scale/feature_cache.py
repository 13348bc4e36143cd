"""The tapped-state cache: what the frozen forward gave each sample, written once and read instead of running it.

A frozen backbone maps a sample to the same tapped states every epoch and every run, so for small data trained
for several epochs, or a sweep run again, the forward need not run twice. The states are kept per sample (the
batches of a later epoch are other combinations of the same samples), keyed by the sha256 of what the backbone
reads of that sample (its real tokens, or its pixels), under a directory keyed by everything that decides them:
the backbone (path and config.json), its dtype and quantization, the tapped layers and the storage format.

Storage: WebDataset shards (tar; one `KEY.states.safetensors` member per sample, indexed by scanning each shard
with unipt_scale.data.tario and read back by offset; no file is held open), each written atomically once it holds
`shard_samples` samples or `shard_bytes` bytes, or the run ends. Per layer a sample keeps its real positions only
(padding is not stored; it reads back as zeros, which the side network masks), as float32, float16, or int8 with
one float32 scale per position of a token sequence (per channel of a feature map; absmax / 127). A shard that
cannot be read is skipped with a warning; its samples are computed again.

Under DeepSpeed (ZeRO 0-2) every rank writes shards of its own into the directory (their names carry the process
id) and, at each epoch's end, flushes them and indexes the others' (SharedBackbone.sync_cache), so from the second
epoch on a rank reads what another rank computed.

float32 hands back exactly what the backbone computed for the row. That equals the uncached run bit for bit where a
row's states do not depend on which rows share its batch (so on the CPU in the tests); elsewhere the two differ by
the backbone's own batch-to-batch rounding.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from unipt_scale.atomic import atomic_write_json

log = logging.getLogger("unipt_scale")

CACHE_FORMAT = "unipt-tapped-states/1"
CACHE_DTYPES = ("float32", "float16", "int8")
MEMBER = "states.safetensors"


def sample_keys(inputs: torch.Tensor, mask: Optional[torch.Tensor]) -> List[str]:
    """Per row: sha256 of what the backbone reads of it (its real token ids under `mask`, or its pixels)."""
    x = inputs.detach().to("cpu")
    x = x.to(torch.int64) if not x.is_floating_point() else x.to(torch.float32)
    rows = x.unbind(0) if mask is None else [r[m] for r, m in zip(x, mask.cpu())]
    return [hashlib.sha256(r.contiguous().numpy().tobytes()).hexdigest() for r in rows]


def _encode(t: torch.Tensor, dtype: str) -> Dict[str, torch.Tensor]:
    t = t.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return {"x": t}
    if dtype == "float16":
        return {"x": t.to(torch.float16)}
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(t.shape).contiguous(), "scale": scale.contiguous()}


def _decode(parts: Dict[str, torch.Tensor]) -> torch.Tensor:
    if "x" in parts:
        return parts["x"].to(torch.float32)
    q, scale = parts["q"], parts["scale"]
    flat = q.reshape(q.shape[0], -1) if q.dim() > 1 else q.reshape(1, -1)
    return (flat.to(torch.float32) * scale[:, None]).reshape(q.shape)


def backbone_fingerprint(backbone, bb_cfg, seed: int) -> dict:
    """What decides a backbone's states besides its inputs: its path, config.json, weight files (name, size,
    modification time), dtype and quantization; for a random-init backbone, the seed that drew it."""
    from unipt_scale.backbone import _model_directory

    model_config = getattr(getattr(backbone, "model", None), "config", None)
    text = model_config.to_json_string() if hasattr(model_config, "to_json_string") else ""
    weights = []
    directory = _model_directory(bb_cfg.path) if not bb_cfg.path.startswith("builtin:") else None
    if directory and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith((".safetensors", ".bin", ".gguf", ".pt")):
                st = os.stat(os.path.join(directory, name))
                weights.append([name, st.st_size, st.st_mtime_ns])
    return {"path": bb_cfg.path, "config_sha256": hashlib.sha256(text.encode()).hexdigest(), "weights": weights,
            "dtype": bb_cfg.dtype, "quantization": bb_cfg.quantization,
            "random_init_seed": seed if bb_cfg.random_init else None,
            "kind": getattr(backbone, "kind", ""), "class": type(getattr(backbone, "model", backbone)).__name__}


def estimate_bytes(num_samples: int, positions: int, widths: Sequence[int], dtype: str) -> int:
    """Disk bytes of the cache for `num_samples` samples of `positions` real positions (tokens, or H*W of a
    feature map, per layer where widths differ) over layers of `widths`: the planner's figure."""
    per_value = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    scales = 4 * positions * len(widths) if dtype == "int8" else 0
    return int(num_samples * (positions * sum(widths) * per_value + scales + 1024))  # + tar and header bytes


class TappedStateCache:
    """Per-sample tapped states of one backbone configuration (see the module docstring)."""

    def __init__(self, root: str, identity: dict, dtype: str = "float16", shard_samples: int = 256,
                 shard_bytes: int = 256 << 20):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
        self.identity = {"format": CACHE_FORMAT, "dtype": dtype, **identity}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(root)), digest)
        self.dtype, self.shard_samples, self.shard_bytes = dtype, shard_samples, shard_bytes
        os.makedirs(self.dir, exist_ok=True)
        ident = os.path.join(self.dir, "identity.json")
        if not os.path.isfile(ident):
            atomic_write_json(ident, self.identity)
        self._index: Dict[str, tuple] = {}  # key -> (shard path, member offset, size); no file is held open
        self._shards: set = set()  # the shard files indexed so far
        self._pending: Dict[str, bytes] = {}
        self._pending_bytes = 0
        self.hits = self.misses = 0
        self.state_dtype = torch.float32  # the dtype states are handed on in (the backbone's)
        self._load_index()

    def _index_shard(self, path: str) -> None:
        from unipt_scale.data.tario import ShardReader

        self._shards.add(path)
        reader = ShardReader(path)
        try:
            if reader.scan.problems:
                log.warning("feature cache: %s is damaged (%s); its samples are computed again",
                            os.path.basename(path), reader.scan.problems[0])
            for s in reader.scan.samples:
                if MEMBER in s.members:
                    self._index.setdefault(s.key, (path, *s.members[MEMBER]))
        finally:
            reader.close()

    def _load_index(self) -> None:
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tar") and not name.startswith(".") and path not in self._shards:
                self._index_shard(path)

    def refresh(self) -> None:
        """Index the shards other processes wrote since (the other ranks of a DeepSpeed run, after they flushed):
        a rank then reads the samples another rank computed instead of computing them again."""
        self._load_index()

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def get(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The sample's tensors (layer states, decoded to float32), or None when it is not cached (or unreadable)."""
        data = self._pending.get(key)
        if data is None:
            where = self._index.get(key)
            if where is None:
                return None
            path, offset, size = where
            try:
                with open(path, "rb") as fh:
                    data = os.pread(fh.fileno(), size, offset)
                if len(data) != size:
                    raise OSError(f"{path} cut short")
            except OSError as err:
                log.warning("feature cache: sample %s unreadable (%s); computed again", key[:12], err)
                self._index.pop(key, None)
                return None
        try:
            raw = load_tensors(data)
        except Exception as err:  # a damaged member: recompute rather than train on garbage
            log.warning("feature cache: sample %s undecodable (%s); computed again", key[:12], err)
            self._index.pop(key, None)
            return None
        names = sorted({k.rsplit(".", 1)[0] for k in raw})
        return {n: _decode({k.rsplit(".", 1)[1]: v for k, v in raw.items() if k.rsplit(".", 1)[0] == n})
                for n in names}

    def put(self, key: str, tensors: Dict[str, torch.Tensor]) -> None:
        if key in self._index or key in self._pending:
            return
        flat = {f"{name}.{part}": v for name, t in tensors.items() for part, v in _encode(t, self.dtype).items()}
        data = save_tensors(flat)
        self._pending[key] = data
        self._pending_bytes += len(data)
        if len(self._pending) >= self.shard_samples or self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending samples as one shard: streamed to a hidden temporary file, then renamed into place
        (a crash leaves no partial shard under a shard's name)."""
        if not self._pending:
            return
        from unipt_scale.atomic import fsync_dir

        name = f"shard-{time.time_ns():x}-{os.getpid()}.tar"
        path = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, f".{name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                    for key, data in self._pending.items():
                        info = tarfile.TarInfo(f"{key}.{MEMBER}")
                        info.size, info.mtime = len(data), 0
                        tf.addfile(info, io.BytesIO(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(self.dir)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._index_shard(path)
        self._pending, self._pending_bytes = {}, 0

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, n)) for n in os.listdir(self.dir) if n.endswith(".tar"))

    def close(self) -> None:
        self.flush()
