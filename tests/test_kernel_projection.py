"""Grouped down-projection: Triton kernels and the efficient torch path vs the reference.

Inputs are drawn on the CPU from the seeded generator and then moved to the test device."""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.kernels import projection as P
from unipt_scale.kernels.naive import grouped_projection_reference as reference

from kernel_cases import DEV, DTYPES, assert_close

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
B, T, d = 2, 19, 24
WIDTHS = [40, 24, 72]  # different D_i per layer, none a multiple of the 16-wide tiles


def make(dtype, widths=WIDTHS, bias="mixed", affine=True, h_grad=False):
    hs = [torch.randn(B, T, w).to(DEV, dtype).requires_grad_(h_grad) for w in widths]
    ws = [(torch.randn(d, w) / w ** 0.5).to(DEV, dtype).requires_grad_() for w in widths]
    if bias == "none":
        bs = [None] * len(widths)
    else:
        bs = [(0.5 * torch.randn(d)).to(DEV, dtype).requires_grad_() for _ in widths]
        if bias == "mixed":
            bs[1] = None
    gs = [(1 + 0.2 * torch.randn(d)).to(DEV, dtype).requires_grad_() for _ in widths] if affine else None
    be = [(0.2 * torch.randn(d)).to(DEV, dtype).requires_grad_() for _ in widths] if affine else None
    return hs, ws, bs, gs, be


def flat(hs, ws, bs, gs, be):
    return [t for t in hs + ws + bs + (gs or []) + (be or []) if t is not None and t.requires_grad]


def reference_fp64(hs, ws, bs, gs, be, act, norm, grad):
    def cast(ts):
        if ts is None:
            return None
        return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]

    h2, w2, b2, g2, e2 = cast(hs), cast(ws), cast(bs), cast(gs), cast(be)
    L = len(hs)
    out = reference(h2, w2, b2, g2 or [None] * L, e2 or [None] * L, act, norm)
    return out, torch.autograd.grad(out, flat(h2, w2, b2, g2, e2), grad.double())


def run_impl(impl, hs, ws, bs, gs, be, act, norm, recompute=False, small=True):
    """One backend through the same validation as the public op."""
    hs, ws, bs, gs, be = P.validate(hs, ws, bs, gs, be, act, norm, 1e-5)
    if impl == "triton":
        blocks = dict(block_m=16, block_n=16, block_k=32) if small else None
        return P.grouped_projection_triton(hs, ws, bs, gs, be, act, norm, recompute=recompute, blocks=blocks)
    return P.grouped_projection_efficient(hs, ws, bs, gs, be, act, norm, recompute=recompute, chunk=7)


def check(impl, dtype, act, norm, recompute=False, small=True, **kw):
    hs, ws, bs, gs, be = make(dtype, **kw)
    if norm == "none":
        gs = be = None
    out = run_impl(impl, hs, ws, bs, gs, be, act, norm, recompute=recompute, small=small)
    assert out.shape == (len(hs), B, T, d) and out.dtype == dtype
    grad = torch.randn(out.shape).to(DEV, dtype)
    params = flat(hs, ws, bs, gs, be)
    grads = torch.autograd.grad(out, params, grad)
    r_out, r_grads = reference_fp64(hs, ws, bs, gs, be, act, norm, grad)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    for i, (g, r) in enumerate(zip(grads, r_grads)):
        assert g.shape == params[i].shape and g.dtype == params[i].dtype
        assert_close(g, r, tol * 4, f"grad {i} {tuple(params[i].shape)}")


@pytest.mark.parametrize("impl", ["triton", "efficient"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,norm", [("none", "layernorm"), ("relu", "none"), ("relu", "layernorm")])
def test_matches_reference(impl, dtype, act, norm):
    check(impl, dtype, act, norm)


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_recompute_and_input_grads(impl):
    """recompute=True rebuilds the pre-norm rows; hidden states that need grad get dh (ReLU-masked)."""
    check(impl, torch.float32, "relu", "layernorm", recompute=True, h_grad=True)


def test_triton_fused_layernorm_epilogue():
    """Default tiles: one tile spans d, so the LayerNorm runs in the GEMM epilogue (the small tiles above
    exercise the separate row-wise LayerNorm launch)."""
    assert P._fwd_blocks(d, None)[1] >= d
    check("triton", torch.float32, "none", "layernorm", small=False, h_grad=True)
    check("triton", torch.float32, "none", "layernorm", small=False, recompute=True)


@pytest.mark.parametrize("impl", ["triton", "efficient", "reference"])
def test_no_bias_no_affine(impl):
    hs, ws, bs, gs, be = make(torch.float32, bias="none", affine=False)
    out = K.grouped_projection(hs, ws, None, None, None, "none", "layernorm", backend=impl)
    r_out = reference(hs, ws, bs, [None] * 3, [None] * 3, "none", "layernorm")
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), ws)
    r_grads = torch.autograd.grad(r_out.square().sum(), ws)
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_gradcheck_fp64(impl):
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEV).requires_grad_()

    hs = [rnd(1, 3, w) for w in (5, 3)]
    ws = [rnd(4, w) for w in (5, 3)]
    bs = [rnd(4), None]
    gs = [rnd(4) for _ in range(2)]
    be = [rnd(4) for _ in range(2)]

    def fn(h0, h1, w0, w1, b0, g0, g1, e0, e1):
        return run_impl(impl, [h0, h1], [w0, w1], [b0, None], [g0, g1], [e0, e1], "relu", "layernorm",
                        recompute=True)

    args = (*hs, *ws, bs[0], *gs, *be)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, fast_mode=impl == "triton")


def _extra_saved(fn, inputs):
    _, _, extra = saved_tensor_bytes(fn, inputs)
    return extra


def test_saved_state():
    """Frozen backbone: neither relu(h) (L·B·N·D) nor W is kept; recompute=True keeps only LN statistics."""
    hs, ws, bs, gs, be = make(torch.float32, bias="all")
    inputs = hs + ws + bs + gs + be
    L, M = len(hs), B * T
    ref_relu = _extra_saved(lambda: reference(hs, ws, bs, [None] * L, [None] * L, "relu", "none"), inputs)
    assert ref_relu >= sum(h.numel() for h in hs) * 4  # the reference keeps relu(h) copies
    for impl in ("triton", "efficient"):
        assert _extra_saved(lambda: run_impl(impl, hs, ws, bs, None, None, "relu", "none"), inputs) == 0
        kept = _extra_saved(lambda: run_impl(impl, hs, ws, bs, gs, be, "none", "layernorm"), inputs)
        recomputed = _extra_saved(lambda: run_impl(impl, hs, ws, bs, gs, be, "none", "layernorm", recompute=True),
                                  inputs)
        stats, gamma = 2 * L * M * 4, L * d * 4
        assert kept == stats + gamma + L * M * d * 4
        assert recomputed == stats + gamma + L * d * 4  # + the stacked bias for the rebuild
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        run_impl("triton", hs, ws, bs, gs, be, "none", "layernorm")
    assert all(s not in shapes for s in [tuple(w.shape) for w in ws])


def test_hidden_states_as_stacked_tensor_and_auto():
    hs, ws, bs, gs, be = make(torch.float32, widths=[24, 24, 24], bias="all")
    stacked = torch.stack(hs)
    out = K.grouped_projection(stacked, ws, bs, gs, be)
    assert ("Triton" if DEV == "cuda" else "Efficient") in type(out.grad_fn).__name__
    torch.testing.assert_close(out, reference(hs, ws, bs, gs, be), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(hs=[a["hs"][0], a["hs"][1][:, :5]]), r"share batch and token count"),
    (lambda a: a.update(ws=a["ws"][:1]), r"got 2 hidden states but 1 weights"),
    (lambda a: a.update(ws=[a["ws"][0], a["ws"][1][:, :3]]), r"weights\[1\] must be \(d, D_i\) = \(d, 8\)"),
    (lambda a: a.update(ws=[a["ws"][0], a["ws"][1][:3]]), r"output width 3 but weights\[0\] has 6"),
    (lambda a: a.update(bs=[a["bs"][0], torch.zeros(5)]), r"biases\[1\] must have shape \(6,\)"),
    (lambda a: a.update(gs=[a["gs"][0]]), r"norm_weights must hold 2 tensors of shape \(6,\)"),
    (lambda a: a.update(norm="batchnorm"), r"norm must be 'layernorm' or 'none'"),
    (lambda a: a.update(act="gelu"), r"pre_activation must be 'none' or 'relu'"),
    (lambda a: a.update(hs=[a["hs"][0], a["hs"][1].double()]), r"mix dtypes"),
    (lambda a: a.update(hs=[]), r"hidden_states is empty"),
])
def test_bad_input_raises_value_error(backend, mutate, match):
    a = dict(hs=[torch.randn(2, 7, 4), torch.randn(2, 7, 8)], ws=[torch.randn(6, 4), torch.randn(6, 8)],
             bs=[torch.zeros(6), torch.zeros(6)], gs=[torch.ones(6), torch.ones(6)],
             be=[torch.zeros(6), torch.zeros(6)], act="none", norm="layernorm")
    mutate(a)
    with pytest.raises(ValueError, match=match):
        K.grouped_projection(a["hs"], a["ws"], a["bs"], a["gs"], a["be"], pre_activation=a["act"], norm=a["norm"],
                             backend=backend)


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_strided_hidden_states(impl):
    """Hidden states that are slices/transposes of bigger tensors (row stride ≠ D, or D not unit-stride)."""
    base = torch.randn(B, T, 80).to(DEV)
    hs = [base[..., 5:45], base[..., ::2][..., :24], torch.randn(T, B, 72).to(DEV).transpose(0, 1)]
    ws = [torch.randn(d, h.shape[-1]).to(DEV).requires_grad_() for h in hs]
    bs = [torch.randn(d).to(DEV).requires_grad_() for _ in hs]
    out = run_impl(impl, hs, ws, bs, None, None, "relu", "none")
    r_out = reference(hs, ws, bs, None, None, "relu", "none")
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out.square().sum(), ws), torch.autograd.grad(r_out.square().sum(), ws)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
def test_inputs_are_validated_once(backend, monkeypatch):
    calls = []
    real = P.validate
    monkeypatch.setattr(P, "validate", lambda *a: calls.append(1) or real(*a))
    hs, ws, bs, gs, be = make(torch.float32, bias="all")
    K.grouped_projection(hs, ws, bs, gs, be, backend=backend).sum().backward()
    assert len(calls) == 1
