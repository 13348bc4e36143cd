"""Confidence aggregation, per sequence and per position (the causal form): Triton kernels and the efficient
torch path vs the reference; prefix means; the causal side-network composition.

Inputs are drawn on the CPU from the seeded generator and then moved to the test device.
"""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.kernels import aggregation as A
from unipt_scale.kernels.naive import confidence_aggregate_reference as reference
from unipt_scale.kernels.naive import prefix_mean_reference

from kernel_cases import CUDA, DEV, DTYPES, assert_close, fp64_grads

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
IMPLS = ["triton", "efficient"]
FORMS = ["sequence", "position"]
NAMES = ["anchor", "layer_means", "merged", "gate_weight", "gate_bias"]


def make(L, B, N, d, dtype, form="sequence", scale=1.0):
    lead = (B, N) if form == "position" else (B,)
    ts = [torch.randn(*lead, d), torch.randn(L, *lead, d), torch.randn(L, B, N, d), torch.randn(1, d) * scale,
          torch.randn(1)]
    return [t.to(DEV, dtype).requires_grad_() for t in ts]


def run_impl(impl, ts, small=True):
    *args, per_position = A.validate(*ts)
    if impl == "triton":
        return A.confidence_aggregate_triton(*args, per_position=per_position, block_n=16 if small else None)
    if impl == "efficient":
        return A.confidence_aggregate_efficient(*args, per_position=per_position)
    return reference(*args)


def reference_fp64(ts, grad):
    return fp64_grads(reference, ts, grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("L,B,N,d,small", [
    (3, 2, 37, 24, True),   # 3 token tiles, the last partial; d not a power of two
    (1, 3, 5, 16, False),   # a single layer: α = 1
    (5, 1, 70, 40, False),  # default tiles, several partial-sum blocks for dα / dw
])
def test_matches_reference(impl, dtype, form, L, B, N, d, small):
    ts = make(L, B, N, d, dtype, form)
    out = run_impl(impl, ts, small)
    assert out.shape == (B, N, d) and out.dtype == dtype
    grad = torch.randn(B, N, d).to(DEV, dtype)
    grads = torch.autograd.grad(out, ts, grad)
    r_out, r_grads = reference_fp64(ts, grad)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    for name, g, r, t in zip(NAMES, grads, r_grads, ts):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, r, tol * 4, name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_saturated_softmax_stays_finite(impl, form):
    """Gate scores in the hundreds: the max-subtracted (per position: online) softmax must not overflow."""
    ts = make(4, 2, 9, 16, torch.float32, form, scale=60.0)
    out = run_impl(impl, ts)
    grads = torch.autograd.grad(out.sum(), ts)
    r_out, r_grads = reference_fp64(ts, torch.ones_like(out))
    assert_close(out, r_out, 1e-5, "forward")
    for name, g, r in zip(NAMES, grads, r_grads):
        assert_close(g, r, 1e-4, name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(impl, form):
    ts = [t.detach().double().requires_grad_() for t in make(3, 2, 5, 4, torch.float32, form)]
    per_position = form == "position"
    if impl == "triton":
        fn = lambda *a: A.confidence_aggregate_triton(*a, per_position=per_position, block_n=16)  # noqa: E731
    else:
        fn = lambda *a: A.confidence_aggregate_efficient(*a, per_position=per_position)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ts), eps=1e-6, atol=1e-7, fast_mode=impl == "triton")


def test_per_position_with_constant_gate_inputs_is_per_sequence():
    """The per-position form with the same anchor and means at every position gives the per-sequence result."""
    L, B, N, d = 3, 2, 21, 16
    seq = make(L, B, N, d, torch.float32)
    pos = [seq[0][:, None].expand(B, N, d), seq[1][:, :, None].expand(L, B, N, d), *seq[2:]]
    for impl in IMPLS:
        assert_close(run_impl(impl, pos), run_impl(impl, seq).double(), 1e-6, impl)


def test_saved_state_has_no_layer_sized_copy():
    """Per sequence: α (L, B); per position: the log-sum-exp (B, N) — O(N), never an (L, B, N, d) tensor."""
    L, B, N, d = 4, 2, 33, 16
    for form, extra_want in (("sequence", L * B * 4), ("position", B * N * 4)):
        ts = make(L, B, N, d, torch.float32, form)
        _, ref_total, _ = saved_tensor_bytes(lambda: reference(*ts), ts)
        for impl in IMPLS:
            out, total, extra = saved_tensor_bytes(lambda: run_impl(impl, ts), ts)
            assert extra == extra_want, (form, impl, extra)
            assert total <= ref_total


def test_auto_on_cpu_is_efficient_and_accepts_flat_gate():
    for form in FORMS:
        ts = [t.cpu() for t in make(2, 2, 4, 8, torch.float32, form)]
        out = K.confidence_aggregate(ts[0], ts[1], ts[2], ts[3].reshape(-1), ts[4])
        assert "Efficient" in type(out.grad_fn).__name__
        torch.testing.assert_close(out, reference(*ts))


def test_confidence_weights_per_sequence_and_per_position():
    L, B, N, d = 3, 2, 7, 8
    seq, pos = make(L, B, N, d, torch.float32), make(L, B, N, d, torch.float32, "position")
    a = K.confidence_weights(seq[0], seq[1], seq[3], seq[4])
    b = K.confidence_weights(pos[0], pos[1], pos[3], pos[4])
    assert a.shape == (B, L) and b.shape == (B, N, L)
    torch.testing.assert_close(a.sum(-1), torch.ones(B, device=DEV))
    torch.testing.assert_close(b.sum(-1), torch.ones(B, N, device=DEV))
    # the weights are those the aggregation uses: Σ_l α_l M_l
    torch.testing.assert_close((b.permute(2, 0, 1)[..., None] * pos[2]).sum(0), reference(*pos))
    with pytest.raises(ValueError, match=r"layer_means must be \(L, B, N, d\)"):
        K.confidence_weights(pos[0], seq[1], pos[3], pos[4])


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
def test_inputs_are_validated_once(backend, monkeypatch):
    calls = []
    real = A.validate
    monkeypatch.setattr(A, "validate", lambda *a: calls.append(1) or real(*a))
    ts = make(3, 2, 9, 8, torch.float32, "position")
    K.confidence_aggregate(*ts, backend=backend).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
@pytest.mark.parametrize("idx,bad,match", [
    (0, torch.randn(3, 8), r"anchor must be \(B, d\) = \(2, 8\)"),
    (0, torch.randn(2, 4, 8), r"anchor must be \(B, N, d\) = \(2, 5, 8\)"),
    (0, torch.randn(2, 5, 8, 1), r"anchor must be a 2-D tensor \(B, d\).* or 3-D \(B, N, d\)"),
    (1, torch.randn(2, 3, 8), r"layer_means must be \(L, B, d\) = \(3, 2, 8\)"),
    (1, torch.randn(3, 2, 5, 8), r"layer_means must be \(L, B, d\) = \(3, 2, 8\)"),
    (2, torch.randn(3, 2, 8), r"merged must be a 4-D tensor"),
    (3, torch.randn(1, 7), r"gate_weight must hold d = 8 values"),
    (4, torch.randn(2), r"gate_bias must hold one value"),
])
def test_bad_input_raises_value_error(backend, idx, bad, match):
    ts = [torch.randn(2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 5, 8), torch.randn(1, 8), torch.randn(1)]
    ts[idx] = bad
    with pytest.raises(ValueError, match=match):
        K.confidence_aggregate(*ts, backend=backend)


def test_per_position_means_must_be_per_position():
    ts = [torch.randn(2, 5, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 5, 8), torch.randn(1, 8), torch.randn(1)]
    with pytest.raises(ValueError, match=r"layer_means must be \(L, B, N, d\) = \(3, 2, 5, 8\).*prefix means"):
        K.confidence_aggregate(*ts)


# ----------------------------------------------------------------------------------------------------------------
# Prefix means
# ----------------------------------------------------------------------------------------------------------------
def _mask(kind, B, N):
    pos = torch.arange(N)[None]
    if kind is None:
        return None
    if kind == "left":  # left padding; the last row fully padded
        return (pos >= torch.tensor([0, 5, N])[:B, None]).to(DEV)
    return (torch.rand(B, N) > 0.4).long().to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "left", "random"])
def test_prefix_mean_matches_reference(dtype, mask_kind):
    x = torch.randn(2, 3, 300, 8).to(DEV, dtype).requires_grad_()
    m = _mask(mask_kind, 3, 300)
    out = K.prefix_mean(x, m)
    assert out.dtype == dtype and out.shape == x.shape
    grad = torch.randn(x.shape).to(DEV, dtype)
    (dx,) = torch.autograd.grad(out, [x], grad)
    r_out, (r_dx,) = fp64_grads(lambda x_: prefix_mean_reference(x_, m), [x], grad)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    assert_close(dx, r_dx, tol * 4, "dx")
    if mask_kind == "left":
        assert (out[:, 2] == 0).all() and (out[:, 1, :5] == 0).all()  # no real token yet: 0, not NaN
        torch.testing.assert_close(out[:, 1, 5].float(), x[:, 1, 5].float())  # the first real token


def test_prefix_mean_bad_input():
    with pytest.raises(ValueError, match=r"mask must have shape \(B, N\) = \(2, 5\)"):
        K.prefix_mean(torch.randn(2, 5, 4), torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be bool"):
        K.prefix_mean(torch.randn(2, 5, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"x must be a floating \(\.\.\., B, N, d\) tensor"):
        K.prefix_mean(torch.ones(2, 5, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# The causal side network's interaction + gate, composed from the kernels
# ----------------------------------------------------------------------------------------------------------------
def causal_fuse(targets, anchor, mask, gate_w, gate_b, backend):
    """M_t = Σ_i α_i,t (causal l1norm(relu(A Tᵢᵀ)) + I) Tᵢ with α from prefix means (shared/unipt-equations.md)."""
    merged = K.relu_l1_attention(anchor, targets, mask, backend=backend, causal=True) + targets
    return K.confidence_aggregate(K.prefix_mean(anchor, mask, backend=backend),
                                  K.prefix_mean(targets, mask, backend=backend), merged, gate_w, gate_b,
                                  backend=backend)


@pytest.mark.parametrize("t", [0, 20, 39])
@pytest.mark.parametrize("backend", ["triton", "efficient", "reference"])
def test_causal_composition_is_causal(backend, t):
    """Changing the projected states (and padding) after position t leaves the fused features at positions
    ≤ t unchanged, and every backend agrees with the reference."""
    L, B, N, d = 3, 3, 40, 16
    targets = torch.randn(L, B, N, d).to(DEV).requires_grad_()
    anchor = torch.randn(B, N, d).to(DEV).requires_grad_()
    gate_w, gate_b = (0.5 * torch.randn(1, d)).to(DEV), torch.randn(1).to(DEV)
    mask = _mask("left", B, N)
    out = causal_fuse(targets, anchor, mask, gate_w, gate_b, backend)
    with torch.no_grad():
        t2, a2, m2 = targets.clone(), anchor.clone(), mask.clone()
        t2[:, :, t + 1:] = 2 * torch.randn(L, B, N - t - 1, d).to(DEV)
        a2[:, t + 1:] = torch.randn(B, N - t - 1, d).to(DEV)
        m2[:, t + 1:] = ~m2[:, t + 1:]
        out2 = causal_fuse(t2, a2, m2, gate_w, gate_b, backend)
    diff = (out[:, :t + 1] - out2[:, :t + 1]).abs().max().item()
    assert diff <= (1e-6 if CUDA else 0.0), f"positions ≤ {t} moved by {diff:.3e}"
    if t + 1 < N:
        assert (out[:, t + 1:] != out2[:, t + 1:]).any()
    ref = causal_fuse(targets, anchor, mask, gate_w, gate_b, "reference")
    assert_close(out, ref.double(), 1e-5, "vs reference")
    w = torch.randn(B, t + 1, d).to(DEV)
    g_t, g_a = torch.autograd.grad((out[:, :t + 1] * w).sum(), [targets, anchor])
    assert (g_t[:, :, t + 1:] == 0).all() and (g_a[:, t + 1:] == 0).all()
