"""ReLU-L1 cross attention: Triton kernels (CPU interpreter) and the efficient torch path vs the reference."""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.kernels import cross_attention as CA
from unipt_scale.kernels.naive import relu_l1_attention_reference as reference

from kernel_cases import CUDA, DEV, DTYPES

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
# small tiles so that 37 queries / 29 keys span several partial blocks
TRITON_SMALL = dict(block_m=16, block_n=16)


def run_impl(impl, q, k, m, eps=1e-6):
    if impl == "triton":
        return CA.relu_l1_attention_triton(q, k, m, eps, **TRITON_SMALL)
    if impl == "efficient":
        return CA.relu_l1_attention_efficient(q, k, m, eps, chunk=7)  # several chunks, the last one partial
    raise AssertionError(impl)


def reference_fp64(q, k, m, do, eps=1e-6):
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    out = reference(qd, kd, m, eps)
    dq, dk = torch.autograd.grad(out, [qd, kd], do.double())
    return out, dq, dk


def assert_close(actual, expected, tol, what):
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} x {scale:.2f}"


def make(L, B, NQ, NK, d, dtype, mask_kind):
    q = torch.randn(B, NQ, d, device=DEV).to(dtype).requires_grad_()
    k = torch.randn(L, B, NK, d, device=DEV).to(dtype).requires_grad_()
    m = None
    if mask_kind == "random":
        m = torch.rand(B, NK, device=DEV) > 0.3
        m[-1] = False  # one sample with every key padded
    elif mask_kind == "int":
        m = (torch.arange(NK, device=DEV)[None] < torch.tensor([NK, NK // 2], device=DEV)[:B, None]).long()
    return q, k, m


@pytest.mark.parametrize("impl", ["triton", "efficient"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,NQ,NK,d,mask_kind", [
    (2, 2, 37, 29, 24, "random"),   # nothing a multiple of the tiles; one batch fully padded
    (1, 2, 5, 40, 16, None),        # fewer queries than one tile, no mask
    (3, 2, 16, 16, 8, "int"),       # exact tiles, integer mask, d below the 16-wide dot minimum
])
def test_matches_reference(impl, dtype, L, B, NQ, NK, d, mask_kind):
    q, k, m = make(L, B, NQ, NK, d, dtype, mask_kind)
    do = torch.randn(L, B, NQ, d, device=DEV).to(dtype)
    out = run_impl(impl, q, k, m)
    assert out.dtype == dtype and out.shape == (L, B, NQ, d)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    assert_close(dq, r_dq, tol * 4, "dq")
    assert_close(dk, r_dk, tol * 4, "dk")
    if m is not None and not m[-1].any():
        assert (out[:, -1] == 0).all() and (dk[:, -1] == 0).all()


@pytest.mark.parametrize("impl", ["triton", "efficient", "reference"])
def test_all_keys_padded_gives_zero_without_nan(impl):
    q = torch.randn(2, 9, 16, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, requires_grad=True)
    m = torch.zeros(2, 11, dtype=torch.bool)
    out = K.relu_l1_attention(q, k, m, backend=impl) if impl == "reference" else run_impl(impl, q, k, m)
    dq, dk = torch.autograd.grad(out.sum(), [q, k])
    assert (out == 0).all() and (dq == 0).all() and (dk == 0).all()


def _boundary_problem():
    """Three query rows with z exactly eps, below eps and above eps (powers of two: exact in fp64)."""
    eps = 2.0 ** -20
    d = 16
    q = torch.zeros(1, 3, d, dtype=torch.float64)
    q[0, 0, 0] = 2.0 ** -10      # s = 2^-20 = eps with the key below
    q[0, 1, 0] = 2.0 ** -12      # s = 2^-22 < eps
    q[0, 2, 0] = 2.0 ** -8       # s = 2^-18 > eps
    k = torch.zeros(1, 1, 4, d, dtype=torch.float64)
    k[0, 0, 0, 0] = 2.0 ** -10
    k[0, 0, 0, 1:] = 0.25        # values differ from scores: the v = k gradient path matters
    k[0, 0, 1, 0] = -1.0         # negative score: relu clips it
    k[0, 0, 2, 0] = 3.0          # positive score but padded
    m = torch.tensor([[True, True, False, True]])
    return q.requires_grad_(), k.requires_grad_(), m, eps


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_eps_boundary(impl):
    q, k, m, eps = _boundary_problem()
    do = torch.randn(1, 1, 3, q.shape[-1], dtype=torch.float64)
    out = run_impl(impl, q, k, m, eps)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, eps)
    torch.testing.assert_close(out, r_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq, r_dq, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dk, r_dk, rtol=1e-10, atol=1e-10)
    # the row at z == eps keeps the δ term (clamp passes the gradient at equality), the row below drops it
    z = (q.detach() @ k.detach()[0, 0].T).clamp(min=0) * m[:, None, :]
    assert z[0, 0].sum().item() == eps and z[0, 1].sum().item() < eps


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_gradcheck_fp64(impl):
    q = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    if impl == "triton":
        fn = lambda q, k: CA.relu_l1_attention_triton(q, k, m, 1e-6, block_m=16, block_n=16)  # noqa: E731
    else:
        fn = lambda q, k: CA.relu_l1_attention_efficient(q, k, m, 1e-6, chunk=4)  # noqa: E731
    # fast mode (random directional derivatives) keeps the interpreter to a handful of launches
    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-7, fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", ["triton", "efficient"])
def test_only_one_input_needs_grad(impl):
    q, k, m = make(2, 2, 21, 19, 16, torch.float32, "random")
    do = torch.randn(2, 2, 21, 16)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do)
    (dk,) = torch.autograd.grad(run_impl(impl, q.detach(), k, m), [k], do)
    (dq,) = torch.autograd.grad(run_impl(impl, q, k.detach(), m), [q], do)
    assert_close(dk, r_dk, 1e-4, "dk")
    assert_close(dq, r_dq, 1e-4, "dq")


def test_shared_storage_query_and_keys():
    """The side network passes anchor = T[-1] and keys = T[:-1], views of one tensor: gradients add up."""
    t = torch.randn(3, 2, 13, 16, requires_grad=True)
    m = torch.rand(2, 13) > 0.2
    grads = {}
    for impl in ("triton", "efficient", "reference"):
        out = K.relu_l1_attention(t[-1], t[:-1], m, backend=impl)
        (grads[impl],) = torch.autograd.grad((out * out).sum(), [t])
    assert_close(grads["triton"], grads["reference"].double(), 1e-4, "triton")
    assert_close(grads["efficient"], grads["reference"].double(), 1e-4, "efficient")


def _saved(fn, inputs):
    out, total, _ = saved_tensor_bytes(fn, inputs)
    return out, total


def test_saved_state_is_q_k_z_only_triton():
    L, B, N, d = 2, 1, 512, 16
    q, k, m = make(L, B, N, N, d, torch.float32, None)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out_f = CA.relu_l1_attention_triton(q, k, m, 1e-6, block_m=128, block_n=128)
    assert sorted(shapes) == sorted([(B, N, d), (L, B, N, d), (L, B, N)])
    _, fused = _saved(lambda: CA.relu_l1_attention_triton(q, k, m, 1e-6, block_m=128, block_n=128), [q, k])
    _, ref = _saved(lambda: reference(q, k, m), [q, k])
    assert fused == (B * N * d + L * B * N * d + L * B * N) * 4
    assert fused * 20 <= ref, (fused, ref)
    torch.testing.assert_close(out_f, reference(q, k, m), rtol=1e-4, atol=1e-5)


def test_saved_bytes_ratio_at_n1024_efficient():
    """The requirement: at N = 1024 the attention keeps ≤ 1/20 of the reference's saved bytes (d = 64)."""
    L, B, N, d = 2, 1, 1024, 64
    q, k, _ = make(L, B, N, N, d, torch.float32, None)
    m = torch.ones(B, N, dtype=torch.bool)
    m[:, -100:] = False
    out_f, fused = _saved(lambda: K.relu_l1_attention(q, k, m, backend="efficient"), [q, k])
    assert out_f.grad_fn is not None and "Efficient" in type(out_f.grad_fn).__name__
    out_r, ref = _saved(lambda: reference(q, k, m), [q, k])
    assert fused * 20 <= ref, f"fused {fused} B vs reference {ref} B"
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)


def test_auto_backend_on_cpu_is_efficient():
    q, k, m = make(1, 2, 8, 8, 16, torch.float32, None)
    out = K.relu_l1_attention(q, k, m)
    assert "Efficient" in type(out.grad_fn).__name__
    assert K.resolve_backend("auto", q) == ("triton" if q.is_cuda else "efficient")


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 8), torch.ones(2, 5, dtype=torch.bool)),
     r"key_mask must have shape \(B, Nk\)"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 8), torch.ones(2, 6)), r"bool .*mask.bool\(\)"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 3, 6, 8), None), r"batch and feature width"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 4), None), r"batch and feature width"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(2, 6, 8), None), r"keys must be a \(L, B, Nk, d\)"),
    (lambda: (torch.randn(5, 8), torch.randn(3, 2, 6, 8), None), r"query must be a \(B, Nq, d\)"),
])
def test_bad_input_raises_value_error(backend, args, match):
    q, k, m = args()
    with pytest.raises(ValueError, match=match):
        K.relu_l1_attention(q, k, m, backend=backend)


def test_bad_backend_and_eps():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.relu_l1_attention(q, k, backend="cuda")
    with pytest.raises(ValueError, match="eps must be > 0"):
        K.relu_l1_attention(q, k, eps=0.0)


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    from unipt_scale.kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    q, k = torch.randn(1, 4, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*|backend='efficient'"):
        K.relu_l1_attention(q, k, backend="triton")
    if not CUDA:  # auto never picks Triton for CPU tensors
        assert "Efficient" in type(K.relu_l1_attention(q.requires_grad_(), k).grad_fn).__name__


def test_auto_keeps_wide_rows_off_the_fused_kernel():
    from unipt_scale.kernels import MAX_FUSED_ATTENTION_DIM, resolve_backend

    class FakeCuda:
        is_cuda = True

    assert resolve_backend("auto", FakeCuda(), width=64) == "triton"
    assert resolve_backend("auto", FakeCuda(), width=MAX_FUSED_ATTENTION_DIM + 1) == "efficient"
    assert resolve_backend("triton", FakeCuda(), width=4096) == "triton", "an explicit choice is kept"
    assert resolve_backend("auto", torch.zeros(1), width=64) == "efficient"
