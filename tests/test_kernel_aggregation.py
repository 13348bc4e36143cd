"""Confidence aggregation: Triton kernels (CPU interpreter) and the efficient torch path vs the reference."""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.kernels import aggregation as A
from unipt_scale.kernels.naive import confidence_aggregate_reference as reference

from kernel_cases import DEV, DTYPES

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make(L, B, N, d, dtype, scale=1.0):
    ts = [torch.randn(B, d), torch.randn(L, B, d), torch.randn(L, B, N, d), torch.randn(1, d) * scale, torch.randn(1)]
    return [t.to(device=DEV, dtype=dtype).requires_grad_() for t in ts]


def run_impl(impl, ts, small=True):
    if impl == "triton":
        return A.confidence_aggregate_triton(*ts, block_n=16 if small else None)
    return A.confidence_aggregate_efficient(*ts)


def reference_fp64(ts, grad):
    td = [t.detach().double().requires_grad_() for t in ts]
    out = reference(*td)
    return out, torch.autograd.grad(out, td, grad.double())


def assert_close(actual, expected, tol, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} x {scale:.2f}"


@pytest.mark.parametrize("impl", ["triton", "efficient"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,N,d,small", [
    (3, 2, 37, 24, True),   # 3 token tiles, the last partial; d not a power of two
    (1, 3, 5, 16, False),   # a single layer: α = 1
    (5, 1, 70, 40, False),  # default tiles, several partial-sum blocks for dα
])
def test_matches_reference(impl, dtype, L, B, N, d, small):
    ts = make(L, B, N, d, dtype)
    out = run_impl(impl, ts, small)
    assert out.shape == (B, N, d) and out.dtype == dtype
    grad = torch.randn(out.shape, device=DEV).to(dtype)
    grads = torch.autograd.grad(out, ts, grad)
    r_out, r_grads = reference_fp64(ts, grad)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    for name, g, r, t in zip(["anchor", "layer_means", "merged", "gate_weight", "gate_bias"], grads, r_grads, ts):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, r, tol * 4, name)


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_saturated_softmax_stays_finite(impl):
    """Gate scores in the hundreds: the max-subtracted softmax must not overflow."""
    ts = make(4, 2, 9, 16, torch.float32, scale=60.0)
    out = run_impl(impl, ts)
    grads = torch.autograd.grad(out.sum(), ts)
    r_out, r_grads = reference_fp64(ts, torch.ones_like(out))
    assert_close(out, r_out, 1e-5, "forward")
    for g, r in zip(grads, r_grads):
        assert_close(g, r, 1e-4, "grad")


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_gradcheck_fp64(impl):
    ts = [t.detach().double().requires_grad_() for t in make(3, 2, 5, 4, torch.float32)]
    if impl == "triton":
        fn = lambda *a: A.confidence_aggregate_triton(*a, block_n=16)  # noqa: E731
    else:
        fn = A.confidence_aggregate_efficient
    assert torch.autograd.gradcheck(fn, tuple(ts), eps=1e-6, atol=1e-7, fast_mode=impl == "triton")


def test_saved_state_has_no_layer_sized_copy():
    ts = make(4, 2, 33, 16, torch.float32)
    for impl in ("triton", "efficient"):
        out, total, extra = saved_tensor_bytes(lambda: run_impl(impl, ts), ts)
        assert extra == 4 * 2 * 4  # α only: (L, B) fp32
    _, ref_total, _ = saved_tensor_bytes(lambda: reference(*ts), ts)
    assert total <= ref_total


def test_auto_on_cpu_is_efficient_and_accepts_flat_gate():
    ts = make(2, 2, 4, 8, torch.float32)
    out = K.confidence_aggregate(ts[0], ts[1], ts[2], ts[3].reshape(-1), ts[4])
    assert "Efficient" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, reference(*ts))


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
@pytest.mark.parametrize("idx,bad,match", [
    (0, torch.randn(3, 8), r"anchor must be \(B, d\) = \(2, 8\)"),
    (1, torch.randn(2, 3, 8), r"layer_means must be \(L, B, d\) = \(3, 2, 8\)"),
    (2, torch.randn(3, 2, 8), r"merged must be a 4-D tensor"),
    (3, torch.randn(1, 7), r"gate_weight must hold d = 8 values"),
    (4, torch.randn(2), r"gate_bias must hold one value"),
])
def test_bad_input_raises_value_error(backend, idx, bad, match):
    ts = [torch.randn(2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 5, 8), torch.randn(1, 8), torch.randn(1)]
    ts[idx] = bad
    with pytest.raises(ValueError, match=match):
        K.confidence_aggregate(*ts, backend=backend)
