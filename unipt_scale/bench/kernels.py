"""`unipt bench kernels`: the side-network kernels against the plain torch equations.

Per (op, shape, dtype, backend) record: forward/backward max abs error against the reference (kernels/src/naive.py,
run in float32 — or the record's dtype if wider — on the same inputs), bytes saved for backward by the fused path
and by the reference (unique storages packed through torch.autograd.graph.saved_tensors_hooks, inputs included),
and an analytic H100 roofline (989 TFLOP/s bf16 dense, 494.5 TFLOP/s tf32 dense, 3.35 TB/s HBM) of fused vs
eager: FLOPs and compulsory HBM bytes per pass, time = Σ_pass max(FLOPs/peak, bytes/bandwidth).
On a GPU the records also carry measured fwd+bwd ms of the fused kernels, eager torch and torch.compile of the
reference (triton.testing.do_bench). Without a GPU this says so: the efficient torch path is measured on the
shapes small enough for CPU, the Triton kernels run in Triton's CPU interpreter on the tiny shape, and every
shape gets the analytic columns.

`attention_aggregate` is the cross attention and the per-sequence aggregation as one op (its CPU path one product
over all layers' keys; on CUDA the fused attention kernels and a weighted sum, so its roofline is the two ops'
added).

Causal ops (decoder LLMs): `cross_attention_causal` (keys j ≤ i only) and `aggregation_causal` (one softmax
over layers per position, prefix-mean gate). Their roofline counts the tiles the causal kernels visit (key
blocks above the diagonal are skipped) and reports causal_flop_ratio = causal / non-causal fused FLOPs; the
eager reference computes the whole N×N scores and masks them, so its FLOPs do not drop. The `dec-*` shapes are
decoder LLM sizes (N = 2048, 4096; d = 64 … 512), analytic only on CPU; `dec-proxy` is the shape CPU measures
them on.

The Triton interpreter: without a GPU, `main()` (this command's entry point) sets TRITON_INTERPRET=1 for its
process before it first imports unipt_scale.kernels (unless the variable is already set), so the kernels also
run on CPU; importing this module changes nothing, and when the kernels were already imported without the
interpreter the run says so and skips them.

Eager traffic model (per element of the L·B·Nq·Nk score tensor, reference code): forward 9 passes (einsum
write, mask multiply r+w, relu r+w, row-sum read, divide r+w, second einsum read); backward 14. The fused
model counts each operand once (k re-reads per query block are assumed to hit L2).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch


def _kernels():
    """unipt_scale.kernels, imported on first use (so importing this module never decides the Triton mode)."""
    import unipt_scale.kernels as K

    return K


def _naive():
    from unipt_scale.kernels import naive

    return naive


def interpreting() -> bool:
    """Whether the kernels, once imported, run in Triton's CPU interpreter."""
    from unipt_scale.kernels._utils import interpreting as _interpreting

    return _interpreting()


def import_kernels_for_this_machine(log=print) -> bool:
    """Import unipt_scale.kernels, built for Triton's CPU interpreter when there is no GPU, and say whether
    they interpret. Without a GPU, and when neither the kernels were imported nor TRITON_INTERPRET was given,
    this sets TRITON_INTERPRET=1 for the rest of the process (Triton also reads it at launch time, so it cannot
    be restored). Called by `main()`, this command's entry point; importing this module never does it."""
    if ("unipt_scale.kernels" not in sys.modules and not torch.cuda.is_available()
            and "TRITON_INTERPRET" not in os.environ):
        os.environ["TRITON_INTERPRET"] = "1"
        log("No GPU: running the Triton kernels in Triton's CPU interpreter (set TRITON_INTERPRET=1 for this run; "
            "export TRITON_INTERPRET=0 to skip them).")
    _kernels()
    return interpreting()


H100_PEAK_16BIT = 989e12
H100_PEAK_TF32 = 494.5e12
H100_HBM = 3.35e12

# name: (L tapped layers, B, N tokens, D backbone width, d side width)
SHAPES: Dict[str, tuple] = {
    "tiny": (3, 2, 64, 96, 32),
    "bert-base": (13, 8, 128, 768, 384),
    "n1024-d64": (12, 2, 1024, 768, 64),
    "vit-l": (25, 4, 257, 1024, 512),
    "llm-n1024": (32, 1, 1024, 4096, 512),
    "llm-n2048": (32, 1, 2048, 4096, 512),
    "llm-n4096": (32, 1, 4096, 4096, 512),
    "llm-n4096-b8": (32, 8, 4096, 4096, 512),
    # decoder LLMs for the causal ops (every:2 taps of a 32-block, 4096-wide model; side width d = 64 … 512)
    "dec-proxy": (4, 2, 320, 256, 64),
    "dec-n2048-d64": (16, 1, 2048, 4096, 64),
    "dec-n2048-d128": (16, 1, 2048, 4096, 128),
    "dec-n2048-d256": (16, 1, 2048, 4096, 256),
    "dec-n2048-d512": (16, 1, 2048, 4096, 512),
    "dec-n4096-d64": (16, 1, 4096, 4096, 64),
    "dec-n4096-d128": (16, 1, 4096, 4096, 128),
    "dec-n4096-d256": (16, 1, 4096, 4096, 256),
    "dec-n4096-d512": (16, 1, 4096, 4096, 512),
}
QUICK_SHAPES = ("tiny", "dec-proxy", "llm-n4096", "dec-n4096-d128")
OPS = ("projection", "projection_relu", "cross_attention", "cross_attention_causal", "aggregation",
       "aggregation_causal", "attention_aggregate")
CAUSAL_OPS = ("cross_attention_causal", "aggregation_causal")
# CPU measures a shape only if its largest reference tensor stays under this many elements.
CPU_MAX_ELEMENTS = 1 << 25
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# --------------------------------------------------------------------------------------------------------------
def saved_tensor_bytes(fn: Callable[[], Any], inputs=()):
    """(fn(), bytes, extra bytes) kept for backward while the result is alive: the distinct storages packed
    through saved_tensors_hooks, and the part of them that is not one of `inputs` (memory the op itself adds;
    inputs such as the backbone's hidden states are held by the caller anyway)."""
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    own = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    return out, sum(storages.values()), sum(v for k, v in storages.items() if k not in own)


# --------------------------------------------------------------------------------------------------------------
# Analytic cost model
# --------------------------------------------------------------------------------------------------------------
def _roof(flops: float, nbytes: float, peak: float) -> float:
    return max(flops / peak, nbytes / H100_HBM) * 1e3


def cost_model(op: str, L: int, B: int, N: int, D: int, d: int, elem: int,
               dtype: torch.dtype = torch.bfloat16) -> Dict[str, float]:
    """FLOPs and compulsory HBM bytes of one forward and one backward, fused vs eager (frozen backbone:
    no gradient for the hidden states)."""
    if op.startswith("projection"):
        relu, ln = op == "projection_relu", op == "projection"
        M, G = B * N, B * N * L * D  # rows per layer, elements of all hidden states
        out, w = L * M * d * elem, L * D * d * elem
        f_fwd = 2.0 * G * d
        fused_fwd = G * elem + w + out + (out + 2 * L * M * 4 if ln else 0)
        eager_fwd = (2 * G * elem if relu else 0) + G * elem + w + out + (2 * out if ln else 0) + 2 * out
        fused_bwd = out + (out + 2 * L * M * d * 4 if ln else 0) + G * elem + w
        eager_bwd = (3 * out if ln else out) + G * elem + w
        return dict(flops_fwd_fused=f_fwd, flops_fwd_eager=f_fwd, flops_bwd_fused=f_fwd, flops_bwd_eager=f_fwd,
                    bytes_fwd_fused=fused_fwd, bytes_fwd_eager=eager_fwd,
                    bytes_bwd_fused=fused_bwd, bytes_bwd_eager=eager_bwd)
    if op in ("cross_attention", "cross_attention_causal"):
        n2 = float(L * B * N * N)
        q, k, o, z = B * N * d * elem, L * B * N * d * elem, L * B * N * d * elem, L * B * N * 4
        # fused FLOPs per score element: forward 2 dots (q kᵀ, p k); backward the dq kernel's 2 + 3 dots and
        # the dk kernel's 4. Causal: each pass only over the tiles it visits.
        f_fwd, f_dq, f_dk = 1.0, 1.0, 1.0
        mask_fwd = mask_bwd = 0.0
        if op == "cross_attention_causal":
            frac = causal_fractions(N, d, dtype)
            f_fwd, f_dq, f_dk = frac["fwd"], frac["fwd"], frac["dk"]
            # the reference multiplies the scores by a (B, N, N) mask built per call: bool + cast + read fwd,
            # read again in backward
            mask_fwd, mask_bwd = B * N * N * (1.0 + 2 * elem), B * N * N * float(elem)
        return dict(flops_fwd_fused=4 * n2 * d * f_fwd, flops_fwd_eager=4 * n2 * d,
                    flops_bwd_fused=(10 * f_dq + 8 * f_dk) * n2 * d, flops_bwd_eager=8 * n2 * d,
                    bytes_fwd_fused=q + k + o + z, bytes_fwd_eager=q + 2 * k + o + 9 * n2 * elem + mask_fwd,
                    bytes_bwd_fused=2 * q + 2 * k + 2 * o + 2 * z + 2 * z + q + k,
                    bytes_bwd_eager=2 * q + 2 * k + o + q + k + 14 * n2 * elem + mask_bwd)
    if op == "aggregation":
        X, Y = L * B * N * d * elem, B * N * d * elem
        return dict(flops_fwd_fused=2.0 * X / elem, flops_fwd_eager=2.0 * X / elem,
                    flops_bwd_fused=3.0 * X / elem, flops_bwd_eager=3.0 * X / elem,
                    bytes_fwd_fused=X + Y, bytes_fwd_eager=3 * X + Y,
                    bytes_bwd_fused=2 * X + Y, bytes_bwd_eager=4 * X + Y)
    if op == "attention_aggregate":
        # on CUDA the fused attention kernels and the weighted sum over layers: the two ops' costs added
        attn, agg = (cost_model(o, L, B, N, D, d, elem, dtype) for o in ("cross_attention", "aggregation"))
        return {key: attn[key] + agg[key] for key in attn}
    if op == "aggregation_causal":
        # per position: the gate reads the (L, B, N, d) prefix means as well as the merged features.
        # Fused forward: scores (2 flops/elem) + weighted sum (2); backward: scores twice (4), dα (2), dM (1),
        # Σ dscore μ (2), dμ (1). Bytes: fused reads μ and M once forward; backward μ twice, M once, writes dM
        # and dμ (+ the (L, B, N) dα scratch). Eager materialises a ⊙ μ, α ⊙ M and their gradients.
        X, Y, S = L * B * N * d * elem, B * N * d * elem, L * B * N * 4
        e = X / elem
        return dict(flops_fwd_fused=4.0 * e, flops_fwd_eager=4.0 * e,
                    flops_bwd_fused=10.0 * e, flops_bwd_eager=8.0 * e,
                    bytes_fwd_fused=2 * X + 2 * Y + B * N * 4, bytes_fwd_eager=6 * X + 2 * Y + 2 * S,
                    bytes_bwd_fused=5 * X + 3 * Y + 2 * S, bytes_bwd_eager=11 * X + 3 * Y + 3 * S)
    raise ValueError(f"unknown op {op!r}")


def causal_fractions(N: int, d: int, dtype: torch.dtype = torch.bfloat16) -> Dict[str, float]:
    """Share of the score tiles the compiled causal attention kernels visit at (N, d), with their GPU tiles for
    `dtype`: fwd (forward and dq kernel), dk (dk kernel) and exact (the visible pairs, (N + 1) / 2N)."""
    from unipt_scale.kernels.cross_attention import causal_tile_fraction, tile_sizes

    bm, bn, _, _ = tile_sizes(d, dtype, interpreter=False)
    return causal_tile_fraction(N, N, bm, bn)


def _roofline_ms(c: Dict[str, float], peak: float, kind: str) -> float:
    return sum(_roof(c[f"flops_{p}_{kind}"], c[f"bytes_{p}_{kind}"], peak) for p in ("fwd", "bwd"))


def roofline(op: str, L, B, N, D, d, dtype: torch.dtype) -> Dict[str, float]:
    elem = torch.finfo(dtype).bits // 8
    peak = H100_PEAK_TF32 if dtype == torch.float32 else H100_PEAK_16BIT
    c = cost_model(op, L, B, N, D, d, elem, dtype)
    fused, eager = _roofline_ms(c, peak, "fused"), _roofline_ms(c, peak, "eager")
    out = dict(c, roofline_ms_fused=fused, roofline_ms_eager=eager, roofline_speedup=eager / fused,
               roofline_peak_tflops=peak / 1e12)
    if op == "cross_attention_causal":
        full = cost_model("cross_attention", L, B, N, D, d, elem, dtype)
        frac = causal_fractions(N, d, dtype)
        out.update(causal_flop_ratio=(c["flops_fwd_fused"] + c["flops_bwd_fused"])
                   / (full["flops_fwd_fused"] + full["flops_bwd_fused"]),
                   causal_flop_ratio_fwd=frac["fwd"], causal_flop_ratio_dk=frac["dk"],
                   causal_pair_ratio=frac["exact"], roofline_ms_fused_noncausal=_roofline_ms(full, peak, "fused"))
    return out


# --------------------------------------------------------------------------------------------------------------
# Problems: inputs, the call under test and the reference
# --------------------------------------------------------------------------------------------------------------
def _largest_reference_tensor(op, L, B, N, D, d) -> int:
    if op.startswith("cross_attention") or op == "attention_aggregate":
        return L * B * N * N
    if op.startswith("projection"):
        return B * N * L * D
    return L * B * N * d


def make_problem(op: str, L, B, N, D, d, dtype, device, seed: int = 0):
    """(inputs requiring grad, call(backend, tensors), reference(tensors), grad_out, all inputs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if op.startswith("projection"):
        K, naive = _kernels(), _naive()
        relu, ln = op == "projection_relu", op == "projection"
        Ds = [D] * L
        hs = [rnd(B, N, Di, grad=False) for Di in Ds]  # frozen backbone
        ws = [rnd(d, Di, scale=Di ** -0.5) for Di in Ds]
        bs = [rnd(d, scale=0.1) for _ in Ds]
        gs = [rnd(d, scale=0.1).detach().add_(1).requires_grad_() for _ in Ds] if ln else None
        be = [rnd(d, scale=0.1) for _ in Ds] if ln else None
        params = ws + bs + (gs or []) + (be or [])
        act, norm = ("relu" if relu else "none"), ("layernorm" if ln else "none")

        def unpack(ts):
            ws_, bs_ = ts[:L], ts[L:2 * L]
            gs_ = ts[2 * L:3 * L] if ln else None
            be_ = ts[3 * L:4 * L] if ln else None
            return ws_, bs_, gs_, be_

        def call(backend, ts, hs_=hs):
            ws_, bs_, gs_, be_ = unpack(ts)
            return K.grouped_projection(hs_, ws_, bs_, gs_, be_, pre_activation=act, norm=norm, backend=backend)

        def ref(ts):
            ws_, bs_, gs_, be_ = unpack(ts)
            hs_ = [h.to(ts[0].dtype) for h in hs]
            return naive.grouped_projection_reference(hs_, ws_, bs_, gs_, be_, pre_activation=act, norm=norm)

        grad = torch.randn(L, B, N, d, generator=g).to(device=device, dtype=dtype)
        return params, call, ref, grad, hs + params
    if op in ("cross_attention", "cross_attention_causal"):
        K, naive = _kernels(), _naive()
        causal = op == "cross_attention_causal"
        q, k = rnd(B, N, d), rnd(L, B, N, d)
        lengths = torch.randint(max(1, N // 2), N + 1, (B,), generator=g)
        pos = torch.arange(N)[None, :]
        if causal:  # decoders pad on the left
            mask = (pos >= (N - lengths)[:, None]).to(device)
        else:
            mask = (pos < lengths[:, None]).to(device)

        def call(backend, ts):
            return K.relu_l1_attention(ts[0], ts[1], mask, backend=backend, causal=causal)

        def ref(ts):
            return naive.relu_l1_attention_reference(ts[0], ts[1], mask, causal=causal)

        return [q, k], call, ref, torch.randn(L, B, N, d, generator=g).to(device=device, dtype=dtype), [q, k, mask]
    if op == "attention_aggregate":
        K, naive = _kernels(), _naive()
        q, k = rnd(B, N, d), rnd(L, B, N, d)
        alpha = torch.softmax(torch.randn(B, L, generator=g), -1).to(device=device, dtype=dtype).requires_grad_()
        lengths = torch.randint(max(1, N // 2), N + 1, (B,), generator=g)
        mask = (torch.arange(N)[None, :] < lengths[:, None]).to(device)

        def call(backend, ts):
            return K.relu_l1_attention_aggregate(ts[0], ts[1], mask, ts[2], backend=backend)

        def ref(ts):
            return naive.relu_l1_attention_aggregate_reference(ts[0], ts[1], mask, ts[2])

        ts = [q, k, alpha]
        return ts, call, ref, torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype), ts + [mask]
    if op in ("aggregation", "aggregation_causal"):
        K, naive = _kernels(), _naive()
        if op == "aggregation":
            ts = [rnd(B, d), rnd(L, B, d)]
        else:  # prefix means per position
            ts = [rnd(B, N, d), rnd(L, B, N, d)]
        ts += [rnd(L, B, N, d), rnd(1, d, scale=d ** -0.5), rnd(1, scale=0.1)]

        def call(backend, ts):
            return K.confidence_aggregate(*ts, backend=backend)

        def ref(ts):
            return naive.confidence_aggregate_reference(*ts)

        return ts, call, ref, torch.randn(B, N, d, generator=g).to(device=device, dtype=dtype), ts
    raise ValueError(f"unknown op {op!r}")


def _grads(out, params, grad):
    return torch.autograd.grad(out, params, grad, allow_unused=True)


def measure(op, shape_name, dtype, backend, device) -> Dict[str, Any]:
    """Errors and saved bytes of `backend` against the reference on one shape."""
    L, B, N, D, d = SHAPES[shape_name]
    params, call, ref, grad, inputs = make_problem(op, L, B, N, D, d, dtype, device)
    ref_dtype = torch.promote_types(dtype, torch.float32)
    rparams = [p.detach().to(ref_dtype).requires_grad_() for p in params]
    if dtype == ref_dtype:
        out_r, saved_ref, extra_ref = saved_tensor_bytes(lambda: ref(params), inputs)
        rparams = params
    else:  # saved bytes of the reference in the record's own dtype, errors against float32
        _, saved_ref, extra_ref = saved_tensor_bytes(lambda: ref(params), inputs)
        out_r = ref(rparams)
    g_r = _grads(out_r, rparams, grad.to(ref_dtype))
    out_f, saved_fused, extra_fused = saved_tensor_bytes(lambda: call(backend, params), inputs)
    g_f = _grads(out_f, params, grad)
    fwd = (out_f.to(ref_dtype) - out_r).abs().max().item()
    bwd = max((a.to(ref_dtype) - b).abs().max().item() for a, b in zip(g_f, g_r) if b is not None)
    g_scale = max(b.abs().max().item() for b in g_r if b is not None)
    bwd_rel = bwd / max(g_scale, 1e-30)  # relative to the largest reference gradient entry
    return dict(fwd_max_abs_err=fwd, bwd_max_abs_err=bwd, bwd_max_rel_err=bwd_rel,
                fwd_ref_max_abs=out_r.abs().max().item(), bwd_ref_max_abs=g_scale, saved_bytes_fused=saved_fused,
                saved_bytes_reference=saved_ref, saved_ratio=saved_fused / max(saved_ref, 1),
                saved_extra_bytes_fused=extra_fused, saved_extra_bytes_reference=extra_ref)


def time_gpu(op, shape_name, dtype, device="cuda", compile: bool = True) -> Dict[str, Optional[float]]:
    """fwd+bwd milliseconds of the fused kernels, eager torch and (compile=True) torch.compile of the reference."""
    import triton.testing

    L, B, N, D, d = SHAPES[shape_name]
    params, call, ref, grad, _ = make_problem(op, L, B, N, D, d, dtype, device)
    res: Dict[str, Optional[float]] = {}
    runs = {"ms_fused": lambda: _grads(call("triton", params), params, grad),
            "ms_eager": lambda: _grads(ref(params), params, grad)}
    if compile:
        try:
            compiled = torch.compile(ref)
            runs["ms_compile"] = lambda: _grads(compiled(params), params, grad)
        except Exception as e:  # noqa: BLE001 - report, don't abort the sweep
            res["ms_compile"], res["compile_error"] = None, repr(e)[:200]
    for key, fn in runs.items():
        try:
            res[key] = float(triton.testing.do_bench(fn, warmup=10, rep=50))
        except torch.cuda.OutOfMemoryError:
            res[key] = None
            res["note"] = res.get("note", "") + f"{key}: out of memory; "
        except Exception as e:  # noqa: BLE001 - one failing column must not lose the others
            res[key] = None
            res["note"] = res.get("note", "") + f"{key}: {repr(e)[:160]}; "
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------------------
TIMINGS = ("full", "no-compile", "off")


def run(shapes, ops, dtypes, cuda: bool, max_elements: int, log=print, timing: str = "full") -> List[Dict[str, Any]]:
    records = []
    device = "cuda" if cuda else "cpu"
    for name in shapes:
        L, B, N, D, d = SHAPES[name]
        for op in ops:
            for dt_name in dtypes:
                dtype = DTYPES[dt_name]
                backends = []
                if cuda:
                    backends.append("triton")
                else:
                    if dtype == torch.float32 and _largest_reference_tensor(op, L, B, N, D, d) <= max_elements:
                        backends.append("efficient")
                    if interpreting() and name == "tiny" and dtype != torch.bfloat16:
                        backends.append("triton")
                base = dict(op=op, shape=dict(L=L, B=B, N=N, D=D, d=d), shape_name=name, dtype=dt_name,
                            device=device, **roofline(op, L, B, N, D, d, dtype))
                if not backends:
                    records.append(dict(base, backend=None, measured=False, fwd_max_abs_err=None,
                                        bwd_max_abs_err=None, saved_bytes_fused=None, saved_bytes_reference=None,
                                        note="analytic only (too large for CPU)" if not cuda else ""))
                    continue
                for backend in backends:
                    t0 = time.perf_counter()
                    rec = dict(base, backend=backend + ("-interpreter" if backend == "triton" and not cuda else ""),
                               measured=True)
                    try:
                        rec.update(measure(op, name, dtype, backend, device))
                    except torch.cuda.OutOfMemoryError:  # the reference's N×N tensors at the largest shapes
                        rec.update(fwd_max_abs_err=None, bwd_max_abs_err=None, saved_bytes_fused=None,
                                   saved_bytes_reference=None, note="errors/saved bytes: out of memory; ")
                        torch.cuda.empty_cache()
                    if cuda and timing != "off":
                        times = time_gpu(op, name, dtype, compile=timing == "full")
                        rec["note"] = rec.get("note", "") + times.pop("note", "")
                        rec.update(times)
                    rec["bench_s"] = time.perf_counter() - t0
                    records.append(rec)
                    log(_row(rec))
    return records


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _mib(v):
    if v is None:
        return "-"
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v}B"


HEADER = (f"{'op':22} {'shape':14} {'dtype':8} {'backend':21} {'fwd_err':>8} {'bwd_err':>8} {'saved':>10} "
          f"{'ref saved':>9} {'ratio':>7} {'+own':>7} {'ref+own':>7} {'roof fused ms':>13} {'roof eager ms':>13} "
          f"{'x':>5} {'causal/full flops':>17} {'ms fused':>8} {'ms eager':>8} {'ms compile':>10}")


def _row(r) -> str:
    return (f"{r['op']:22} {r['shape_name']:14} {r['dtype']:8} {str(r.get('backend')):21} "
            f"{_fmt(r.get('fwd_max_abs_err'), '8.1e')} {_fmt(r.get('bwd_max_abs_err'), '8.1e')} "
            f"{_mib(r.get('saved_bytes_fused')):>10} {_mib(r.get('saved_bytes_reference')):>9} "
            f"{_fmt(r.get('saved_ratio'), '7.3f')} {_mib(r.get('saved_extra_bytes_fused')):>7} "
            f"{_mib(r.get('saved_extra_bytes_reference')):>7} {r['roofline_ms_fused']:13.3f} "
            f"{r['roofline_ms_eager']:13.3f} "
            f"{r['roofline_speedup']:5.2f} {_fmt(r.get('causal_flop_ratio'), '17.3f')} "
            f"{_fmt(r.get('ms_fused'), '8.3f')} {_fmt(r.get('ms_eager'), '8.3f')} "
            f"{_fmt(r.get('ms_compile'), '10.3f')}")


def table(records) -> str:
    return "\n".join([HEADER] + [_row(r) for r in records])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="unipt bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the records (a JSON list) here")
    p.add_argument("--quick", action="store_true", help=f"only the shapes {', '.join(QUICK_SHAPES)}")
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (float32, bfloat16, float16); default bfloat16,float32 on GPU, "
                        "float32,bfloat16 on CPU (bf16 there gets the analytic columns only)")
    p.add_argument("--timing", choices=TIMINGS, default="full",
                   help="GPU: full = fused, eager and torch.compile times; no-compile = fused and eager; off = errors, "
                        "saved bytes and roofline only")
    p.add_argument("--max-elements", type=int, default=CPU_MAX_ELEMENTS,
                   help="CPU: measure a shape only if its largest reference tensor has at most this many elements")
    args = p.parse_args(argv)
    interp = import_kernels_for_this_machine()
    shapes = list(QUICK_SHAPES) if args.quick else (args.shapes.split(",") if args.shapes else list(SHAPES))
    ops = args.ops.split(",")
    cuda = torch.cuda.is_available()
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16", "float32"] if cuda else ["float32", "bfloat16"])
    for what, given, known in (("shape", shapes, SHAPES), ("op", ops, OPS), ("dtype", dtypes, DTYPES)):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {list(known)}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name()} — "
              + ("no timings (--timing off)" if args.timing == "off" else
                 "timings by triton.testing.do_bench (fwd+bwd)"
                 + (", without torch.compile" if args.timing == "no-compile" else "")))
        if interp:
            print("warning: TRITON_INTERPRET is set, so the Triton kernels run in the CPU interpreter and their "
                  "times mean nothing; run with TRITON_INTERPRET unset (or 0) for the compiled kernels")
    else:
        print("No GPU: no timings. Measured: errors and saved bytes of the efficient torch path on shapes small "
              "enough for CPU" + (", and of the Triton kernels in the CPU interpreter on 'tiny'" if interp else
                                  " (the Triton kernels are not run: unipt_scale.kernels was imported without "
                                  "TRITON_INTERPRET=1 before this command; set it in the environment to run them)")
              + "; every shape gets the analytic H100 roofline (fused vs eager; causal ops: visited tiles only).")
    print(HEADER)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    records = run(shapes, ops, dtypes, cuda, args.max_elements, timing=args.timing)
    for r in records:
        if not r["measured"]:
            print(_row(r))
    print(f"# {len(records)} records in {time.perf_counter() - t0:.1f}s on {platform.node() or 'host'} "
          f"(torch {torch.__version__}, {'cuda' if cuda else 'cpu'})")
    if args.json:
        from unipt_scale.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(records, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
