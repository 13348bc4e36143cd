"""ReLU-L1 cross attention, plain and causal: Triton kernels and the efficient torch path vs the reference.

Inputs are drawn on the CPU from the seeded generator and then moved to the test device, so CPU and CUDA runs
check the same numbers.
"""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.kernels import cross_attention as CA
from unipt_scale.kernels.naive import causal_visibility
from unipt_scale.kernels.naive import relu_l1_attention_reference as reference

from kernel_cases import CUDA, DEV, DTYPES, assert_close, fp64_grads

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
# small tiles so that 37 queries / 29 keys span several partial blocks
TRITON_SMALL = dict(block_m=16, block_n=16)
IMPLS = ["triton", "efficient", "batched"]


def run_impl(impl, q, k, m, eps=1e-6, causal=False, tiles=None, chunk=7):
    """One backend through the same validation as the public op, with small tiles / chunks."""
    q, k, m = CA.validate(q, k, m, eps, causal)
    if impl == "triton":
        return CA.relu_l1_attention_triton(q, k, m, eps, causal, **(TRITON_SMALL if tiles is None else tiles))
    if impl == "efficient":
        return CA.relu_l1_attention_efficient(q, k, m, eps, causal, chunk=chunk)  # several chunks, last partial
    if impl == "batched":  # whole layers, two per batched product (L = 3: a full group and a partial one)
        return CA.ReLUL1AttentionEfficientBatched.apply(q, k, m, eps, causal, 2)
    if impl == "reference":
        return reference(q, k, m, eps, causal)
    raise AssertionError(impl)


def reference_fp64(q, k, m, do, eps=1e-6, causal=False):
    out, (dq, dk) = fp64_grads(lambda q_, k_: reference(q_, k_, m, eps, causal), [q, k], do)
    return out, dq, dk


def mask_of(kind, B, NK):
    if kind is None:
        return None
    pos = torch.arange(NK)[None]
    if kind == "random":
        m = torch.rand(B, NK) > 0.3
        m[-1] = False  # one sample with every key padded
    elif kind == "int":  # right padding as 0/1 integers
        m = (pos < torch.tensor([NK, NK // 2, NK // 3])[:B, None]).long()
    elif kind == "left":  # left padding (decoder batches); the last sample fully padded
        lengths = torch.tensor([NK, NK - 7, 0])[:B]
        m = pos >= (NK - lengths)[:, None]
    else:
        raise AssertionError(kind)
    return m.to(DEV)


def make(L, B, NQ, NK, d, dtype, mask_kind):
    q = torch.randn(B, NQ, d).to(DEV, dtype).requires_grad_()
    k = torch.randn(L, B, NK, d).to(DEV, dtype).requires_grad_()
    return q, k, mask_of(mask_kind, B, NK)


CASES = [  # L, B, NQ, NK, d, mask
    (2, 2, 37, 29, 24, "random"),   # more queries than keys (plain only); nothing a multiple of the tiles
    (2, 2, 37, 37, 24, "random"),   # N not a multiple of the tiles; one batch fully padded
    (1, 2, 5, 40, 16, None),        # fewer queries than one tile (causal: the last 5 positions), no mask
    (3, 2, 16, 16, 8, "int"),       # exact tiles, integer mask, d below the 16-wide dot minimum
    (2, 3, 45, 45, 20, "left"),     # left padding, one row fully padded
]
CAUSAL_CASES = [pytest.param(causal, *case, id=f"{'causal' if causal else 'full'}-{'x'.join(map(str, case[:5]))}"
                             f"-{case[5]}")
                for causal in (False, True) for case in CASES if not (causal and case[2] > case[3])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,L,B,NQ,NK,d,mask_kind", CAUSAL_CASES)
def test_matches_reference(impl, dtype, causal, L, B, NQ, NK, d, mask_kind):
    q, k, m = make(L, B, NQ, NK, d, dtype, mask_kind)
    do = torch.randn(L, B, NQ, d).to(DEV, dtype)
    out = run_impl(impl, q, k, m, causal=causal)
    assert out.dtype == dtype and out.shape == (L, B, NQ, d)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, causal=causal)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    assert_close(dq, r_dq, tol * 4, "dq")
    assert_close(dk, r_dk, tol * 4, "dk")
    if m is not None and not m[-1].any():
        assert (out[:, -1] == 0).all() and (dk[:, -1] == 0).all()


@pytest.mark.parametrize("tiles", [dict(block_m=32, block_n=16), dict(block_m=16, block_n=32)])
def test_causal_triton_with_unequal_tiles(tiles):
    """Query and key tiles of different heights: the diagonal crosses several key (or query) blocks."""
    q, k, m = make(2, 2, 70, 75, 24, torch.float32, "random")
    do = torch.randn(2, 2, 70, 24).to(DEV)
    out = run_impl("triton", q, k, m, causal=True, tiles=tiles)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, causal=True)
    assert_close(out, r_out, 2e-5, "forward")
    assert_close(dq, r_dq, 8e-5, "dq")
    assert_close(dk, r_dk, 8e-5, "dk")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_all_keys_padded_gives_zero_without_nan(impl, causal):
    q = torch.randn(2, 9, 16).to(DEV).requires_grad_()
    k = torch.randn(2, 2, 11, 16).to(DEV).requires_grad_()
    m = torch.zeros(2, 11, dtype=torch.bool, device=DEV)
    out = run_impl(impl, q, k, m, causal=causal)
    dq, dk = torch.autograd.grad(out.sum(), [q, k])
    assert (out == 0).all() and (dq == 0).all() and (dk == 0).all()


def _boundary_problem(causal):
    """Rows whose z is exactly eps, below eps and above eps (powers of two: exact in fp64).

    Plain: three query rows against four keys. Causal (4 positions): row 0 sees key 0 only (z = eps exactly),
    row 1 sees keys 0–1 (z < eps, though key 2 — after it — would lift it above eps), rows 2–3 are above eps;
    key 3 is padding with a large positive score."""
    eps = 2.0 ** -20
    d = 16
    nq = 4 if causal else 3
    q = torch.zeros(1, nq, d, dtype=torch.float64)
    q[0, 0, 0] = 2.0 ** -10      # s = 2^-20 = eps with key 0
    q[0, 1, 0] = 2.0 ** -12      # s = 2^-22 < eps with key 0
    q[0, 2, 0] = 2.0 ** -8       # s = 2^-18 > eps
    if causal:
        q[0, 3, 0] = 2.0 ** -11
    k = torch.zeros(1, 1, 4, d, dtype=torch.float64)
    k[0, 0, 0, 0] = 2.0 ** -10
    k[0, 0, 0, 1:] = 0.25        # values differ from scores: the v = k gradient path matters
    k[0, 0, 1, 0] = -1.0         # negative score: relu clips it
    k[0, 0, 2, 0] = 3.0          # positive score; plain: padded; causal: hidden from rows 0–1
    if causal:
        k[0, 0, 3, 0] = 5.0      # positive score but padded
        m = torch.tensor([[True, True, True, False]])
    else:
        m = torch.tensor([[True, True, False, True]])
    return q.to(DEV).requires_grad_(), k.to(DEV).requires_grad_(), m.to(DEV), eps


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_eps_boundary(impl, causal):
    q, k, m, eps = _boundary_problem(causal)
    do = torch.randn(1, 1, q.shape[1], q.shape[-1], dtype=torch.float64).to(DEV)
    out = run_impl(impl, q, k, m, eps, causal=causal)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, eps, causal=causal)
    torch.testing.assert_close(out, r_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq, r_dq, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dk, r_dk, rtol=1e-10, atol=1e-10)
    # z over the visible keys: the row at z == eps keeps the δ term (clamp passes the gradient at equality),
    # the row below drops it
    s = (q.detach() @ k.detach()[0, 0].T).clamp(min=0) * m[:, None, :]
    if causal:
        s = s * causal_visibility(4, 4, DEV)
    z = s.sum(-1)[0]
    assert z[0].item() == eps and z[1].item() < eps and (z[2:] > eps).all()
    if causal:  # without the causal mask row 1 would see key 2 and sit above eps
        assert (q.detach()[0, 1] @ k.detach()[0, 0, 2]).item() > eps


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(impl, causal):
    q = torch.randn(2, 5, 4, dtype=torch.float64).to(DEV).requires_grad_()
    k = torch.randn(2, 2, 6, 4, dtype=torch.float64).to(DEV).requires_grad_()
    m = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1]], dtype=torch.bool, device=DEV)
    if impl == "triton":
        fn = lambda q, k: CA.relu_l1_attention_triton(q, k, m.view(torch.uint8), 1e-6, causal,  # noqa: E731
                                                      block_m=16, block_n=16)
    elif impl == "batched":
        fn = lambda q, k: CA.ReLUL1AttentionEfficientBatched.apply(q, k, m.view(torch.uint8), 1e-6,  # noqa: E731
                                                                   causal, 1)
    else:
        fn = lambda q, k: CA.relu_l1_attention_efficient(q, k, m.view(torch.uint8), 1e-6, causal,  # noqa: E731
                                                         chunk=4)
    # fast mode (random directional derivatives) keeps the interpreter to a handful of launches
    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-7, fast_mode=impl == "triton")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_only_one_input_needs_grad(impl, causal):
    q, k, m = make(2, 2, 21, 21, 16, torch.float32, "random")
    do = torch.randn(2, 2, 21, 16).to(DEV)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, causal=causal)
    (dk,) = torch.autograd.grad(run_impl(impl, q.detach(), k, m, causal=causal), [k], do)
    (dq,) = torch.autograd.grad(run_impl(impl, q, k.detach(), m, causal=causal), [q], do)
    assert_close(dk, r_dk, 1e-4, "dk")
    assert_close(dq, r_dq, 1e-4, "dq")


@pytest.mark.parametrize("causal", [False, True])
def test_shared_storage_query_and_keys(causal):
    """The side network passes anchor = T[-1] and keys = T[:-1], views of one tensor: gradients add up."""
    t = torch.randn(3, 2, 13, 16).to(DEV).requires_grad_()
    m = (torch.rand(2, 13) > 0.2).to(DEV)
    grads = {}
    for impl in ("triton", "efficient", "reference"):
        out = K.relu_l1_attention(t[-1], t[:-1], m, backend=impl, causal=causal)
        (grads[impl],) = torch.autograd.grad((out * out).sum(), [t])
    assert_close(grads["triton"], grads["reference"].double(), 1e-4, "triton")
    assert_close(grads["efficient"], grads["reference"].double(), 1e-4, "efficient")


# ----------------------------------------------------------------------------------------------------------------
# Causality and the skipped blocks
# ----------------------------------------------------------------------------------------------------------------
CAUSALITY_TOL = 0.0 if not CUDA else 1e-6  # CPU: bit-identical; CUDA: within 1e-6 (fp32)


@pytest.mark.parametrize("t", [0, 15, 16, 30])  # the first row, both sides of a 16-tile boundary, mid-tile
@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_causality_later_positions_change_nothing_before(impl, t):
    """Changing queries, keys and padding after position t leaves every output at positions ≤ t unchanged, and
    a loss on positions ≤ t sends no gradient to later queries or keys."""
    L, B, N, d = 2, 2, 45, 24
    q, k, m = make(L, B, N, N, d, torch.float32, "left")
    out = run_impl(impl, q, k, m, causal=True)
    q2, k2, m2 = q.detach().clone(), k.detach().clone(), m.clone()
    q2[:, t + 1:] = torch.randn(B, N - t - 1, d).to(DEV)
    k2[:, :, t + 1:] = 3 * torch.randn(L, B, N - t - 1, d).to(DEV)
    m2[:, t + 1:] = ~m2[:, t + 1:]
    out2 = run_impl(impl, q2, k2, m2, causal=True)
    diff = (out[:, :, :t + 1] - out2[:, :, :t + 1]).abs().max().item()
    assert diff <= CAUSALITY_TOL, f"positions ≤ {t} moved by {diff:.3e}"
    assert (out[:, :, t + 1:] != out2[:, :, t + 1:]).any(), "the change after t must show after t"
    w = torch.randn(L, B, t + 1, d).to(DEV)
    dq, dk = torch.autograd.grad((out[:, :, :t + 1] * w).sum(), [q, k])
    assert (dq[:, t + 1:] == 0).all() and (dk[:, :, t + 1:] == 0).all()
    assert dk[:, :, :t + 1].abs().sum() > 0
    assert t == 0 or dq[:, :t + 1].abs().sum() > 0  # position 0 reads key 0 alone: o_0 = k_0, dq_0 = 0


@pytest.mark.parametrize("impl", ["triton", "efficient"])  # batched reads whole rows by design
def test_causal_never_reads_blocks_above_the_diagonal(impl):
    """NaN in keys the first query tile cannot see (and in queries no later key tile needs): a kernel that
    visited those blocks would carry NaN into its sums (masked scores are 0, but 0·NaN in p·k is NaN)."""
    L, B, N, d = 2, 2, 48, 16
    q0, k0, _ = make(L, B, N, N, d, torch.float32, None)
    do = torch.randn(L, B, N, d).to(DEV)
    first, late = torch.zeros_like(do), torch.zeros_like(do)
    first[:, :, :16], late[:, :, 16:] = do[:, :, :16], do[:, :, 16:]

    def run(q, k, grad):
        q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        out = run_impl(impl, q, k, None, causal=True, tiles=dict(block_m=16, block_n=16), chunk=16)
        return (out, *torch.autograd.grad(out, [q, k], grad))

    # keys 16.. are never read for query rows 0..15 (forward, δ and dq passes)
    kp = k0.detach().clone()
    kp[:, :, 16:] = float("nan")
    c_out, c_dq, _ = run(q0, k0, first)
    out, dq, _ = run(q0, kp, first)
    assert torch.isfinite(c_out).all() and torch.isfinite(c_dq).all()
    assert torch.equal(out[:, :, :16], c_out[:, :, :16]) and torch.equal(dq[:, :16], c_dq[:, :16])
    # query rows 0..15 are never read for keys 16.. (the dk pass)
    qp = q0.detach().clone()
    qp[:, :16] = float("nan")
    c_out, _, c_dk = run(q0, k0, late)
    out, _, dk = run(qp, k0, late)
    assert torch.equal(out[:, :, 16:], c_out[:, :, 16:])
    assert torch.isfinite(c_dk).all() and torch.equal(dk[:, :, 16:], c_dk[:, :, 16:])


@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_causal_queries_sit_at_the_last_positions(impl):
    """Nq < Nk: query row i is position i + Nk − Nq, so the last rows of the square problem come out; one query
    (the newest token of incremental decoding) reads every key, as the plain op does."""
    q, k, m = make(2, 2, 40, 40, 16, torch.float32, "left")
    full = run_impl(impl, q, k, m, causal=True)
    tail = run_impl(impl, q[:, -9:], k, m, causal=True)
    assert_close(tail, full[:, :, -9:].double(), 1e-6, "last 9 rows")
    one = run_impl(impl, q[:, -1:], k, m, causal=True)
    assert_close(one, run_impl(impl, q[:, -1:], k, m, causal=False).double(), 1e-6, "one query")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_tiles_at_every_fused_width(dtype, d, causal):
    """The tiles the dispatcher picks for each width d ≤ MAX_FUSED_ATTENTION_DIM (on a GPU: they must fit the
    per-program shared memory), forward and backward against the reference."""
    q, k, m = make(1, 2, 70, 70, d, dtype, "left")
    q, k = (t.detach().div(d ** 0.25).requires_grad_() for t in (q, k))  # scores of order 1 at every width
    do = torch.randn(1, 2, 70, d).to(DEV, dtype)
    out = K.relu_l1_attention(q, k, m, backend="triton", causal=causal)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do, causal=causal)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    assert_close(dq, r_dq, tol * 4, "dq")
    assert_close(dk, r_dk, tol * 4, "dk")


def test_causal_tile_fraction_counts_the_visited_tiles():
    """About half of the tiles at large N: Σ_{i<n} (i + 1) / n² for n = N / tile square blocks."""
    f = CA.causal_tile_fraction(2048, 2048, 64, 64)
    assert f["fwd"] == f["dk"] == pytest.approx(32 * 33 / 2 / 32 ** 2)
    assert f["exact"] == pytest.approx(2049 / 4096)
    assert CA.causal_tile_fraction(64, 64, 64, 64)["fwd"] == 1.0
    g = CA.causal_tile_fraction(100, 130, 32, 16)  # Nq < Nk, unequal tiles: count them by brute force
    off, nqb, nkb = 30, 4, 9
    fwd = sum(1 for i in range(nqb) for j in range(nkb) if j * 16 <= min(i * 32 + 31, 99) + off)
    assert g["fwd"] == pytest.approx(fwd / (nqb * nkb))


# ----------------------------------------------------------------------------------------------------------------
# Saved state
# ----------------------------------------------------------------------------------------------------------------
def _saved(fn, inputs):
    out, total, _ = saved_tensor_bytes(fn, inputs)
    return out, total


@pytest.mark.parametrize("impl", IMPLS)
def test_saved_state_is_q_k_z_and_mask_causal_or_not(impl):
    L, B, N, d = 2, 1, 512, 16
    q, k, m = make(L, B, N, N, d, torch.float32, "left")
    want = (B * N * d + L * B * N * d + L * B * N) * 4 + B * N  # q, k, fp32 z and the uint8 view of the mask
    saved = {}
    for causal in (False, True):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = run_impl(impl, q, k, m, causal=causal, tiles={}, chunk=128)  # the default tiles
        assert sorted(shapes) == sorted([(B, N, d), (L, B, N, d), (L, B, N), (B, N)])
        _, saved[causal] = _saved(lambda: run_impl(impl, q, k, m, causal=causal, tiles={}, chunk=128), [q, k])
        torch.testing.assert_close(out, reference(q, k, m, causal=causal), rtol=1e-4, atol=1e-5)
    assert saved[False] == saved[True] == want
    _, ref = _saved(lambda: reference(q, k, m, causal=True), [q, k])
    assert want * 20 <= ref, (want, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_saved_bytes_ratio_at_n1024_efficient(causal):
    """The requirement: at N = 1024 the attention keeps ≤ 1/20 of the reference's saved bytes (d = 64)."""
    L, B, N, d = 2, 1, 1024, 64
    q, k, _ = make(L, B, N, N, d, torch.float32, None)
    m = torch.ones(B, N, dtype=torch.bool, device=DEV)
    m[:, :100] = False
    out_f, fused = _saved(lambda: K.relu_l1_attention(q, k, m, backend="efficient", causal=causal), [q, k])
    assert out_f.grad_fn is not None and "Efficient" in type(out_f.grad_fn).__name__
    out_r, ref = _saved(lambda: reference(q, k, m, causal=causal), [q, k])
    assert fused * 20 <= ref, f"fused {fused} B vs reference {ref} B"
    assert fused == (B * N * d + L * B * N * d + L * B * N) * 4 + B * N
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch and input checks
# ----------------------------------------------------------------------------------------------------------------
def test_auto_backend_on_cpu_is_efficient():
    q, k, m = make(1, 2, 8, 8, 16, torch.float32, None)
    out = K.relu_l1_attention(q.cpu(), k.cpu(), None, causal=True)
    assert "Efficient" in type(out.grad_fn).__name__
    assert K.resolve_backend("auto", q) == ("triton" if q.is_cuda else "efficient")


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
def test_inputs_are_validated_once(backend, monkeypatch):
    calls = []
    real = CA.validate
    monkeypatch.setattr(CA, "validate", lambda *a: calls.append(1) or real(*a))
    q, k, m = make(2, 2, 9, 9, 16, torch.float32, "random")
    K.relu_l1_attention(q, k, m, backend=backend, causal=True).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["auto", "triton", "efficient", "reference"])
@pytest.mark.parametrize("args,causal,match", [
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 8), torch.ones(2, 5, dtype=torch.bool)), False,
     r"key_mask must have shape \(B, Nk\)"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 8), torch.ones(2, 6)), False, r"bool .*mask.bool\(\)"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 3, 6, 8), None), False, r"batch and feature width"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 4), None), False, r"batch and feature width"),
    (lambda: (torch.randn(2, 6, 8), torch.randn(2, 6, 8), None), False, r"keys must be a \(L, B, Nk, d\)"),
    (lambda: (torch.randn(5, 8), torch.randn(3, 2, 6, 8), None), False, r"query must be a \(B, Nq, d\)"),
    (lambda: (torch.randn(2, 7, 8), torch.randn(3, 2, 6, 8), None), True, r"causal attention needs Nq <= Nk"),
    (lambda: (torch.randn(2, 5, 8), torch.randn(3, 2, 6, 8), None), 1, r"causal must be True or False"),
])
def test_bad_input_raises_value_error(backend, args, causal, match):
    q, k, m = args()
    with pytest.raises(ValueError, match=match):
        K.relu_l1_attention(q, k, m, backend=backend, causal=causal)


def test_bad_backend_and_eps():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.relu_l1_attention(q, k, backend="cuda")
    with pytest.raises(ValueError, match="eps must be > 0"):
        K.relu_l1_attention(q, k, eps=0.0, causal=True)


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    from unipt_scale.kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    q, k = torch.randn(1, 4, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*|backend='efficient'"):
        K.relu_l1_attention(q, k, backend="triton", causal=True)
    # auto never picks Triton for CPU tensors
    assert "Efficient" in type(K.relu_l1_attention(q.requires_grad_(), k).grad_fn).__name__


def test_auto_keeps_wide_rows_off_the_fused_kernel():
    from unipt_scale.kernels import MAX_FUSED_ATTENTION_DIM, resolve_backend

    class FakeCuda:
        is_cuda = True
        dtype = torch.float32

    class FakeCuda64(FakeCuda):
        dtype = torch.float64

    assert resolve_backend("auto", FakeCuda64(), width=128) == "triton"
    assert resolve_backend("auto", FakeCuda64(), width=256) == "efficient", "fp64 tiles outgrow shared memory"
    assert resolve_backend("auto", FakeCuda(), width=64) == "triton"
    assert resolve_backend("auto", FakeCuda(), width=MAX_FUSED_ATTENTION_DIM + 1) == "efficient"
    assert resolve_backend("triton", FakeCuda(), width=4096) == "triton", "an explicit choice is kept"
    assert resolve_backend("auto", torch.zeros(1), width=64) == "efficient"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "random", "left"])
@pytest.mark.parametrize("NQ, NK", [(1, 29), (5, 29), (29, 29)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_no_grad_all_layers_path_is_the_reference(NQ, NK, mask_kind, causal, dtype):
    """Without autograd (decoding) the efficient path runs every layer in one batched product."""
    torch.manual_seed(0)
    q = torch.randn(3, NQ, 16).to(DEV, dtype)
    k = torch.randn(4, 3, NK, 16).to(DEV, dtype)
    m = mask_of(mask_kind, 3, NK)
    qv, kv, mv = CA.validate(q, k, m, 1e-6, causal)
    with torch.no_grad():
        got = CA.relu_l1_attention_efficient(qv, kv, mv, 1e-6, causal)
        chunked = CA.ReLUL1AttentionEfficient.apply(qv, kv, mv, 1e-6, causal, 7)
    assert_close(got, reference(qv, kv, mv, 1e-6, causal), TOL[dtype], "all layers at once")
    assert_close(got, chunked, TOL[dtype], "all layers at once vs chunked")


@pytest.mark.parametrize("causal, NQ, NK, budget, want", [
    (False, 64, 64, None, "Batched"),                  # the encoder's training shapes: whole layers at once
    (True, 192, 192, None, "Batched"),                 # a short decoder sequence: little of the triangle to skip
    (True, 300, 300, None, "Efficient"),               # a long causal square: the chunks skip the triangle
    (True, 2, 300, None, "Batched"),                   # decoding against a long cache: no triangle to speak of
    (False, 64, 64, 64 * 64 * 4 - 1, "Efficient"),     # one layer's scores over the budget: key chunks
])
def test_the_efficient_path_picks_whole_layers_where_they_pay(causal, NQ, NK, budget, want, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(CA, "AT_ONCE_SCORE_BYTES", budget)
    q = torch.randn(1, NQ, 8, requires_grad=True)
    k = torch.randn(2, 1, NK, 8, requires_grad=True)
    out = CA.relu_l1_attention_efficient(*CA.validate(q, k, None, 1e-6, causal), 1e-6, causal)
    name = type(out.grad_fn).__name__
    assert name.startswith("ReLUL1AttentionEfficient") and ("Batched" in name) == (want == "Batched"), name
    torch.testing.assert_close(out, reference(q, k, None, 1e-6, causal), rtol=1e-4, atol=1e-5)


def test_batched_groups_cover_every_layer(monkeypatch):
    """A budget of two layers' scores splits five layers into groups of 2, 2 and 1; the result is the reference's."""
    L, B, N, d = 5, 2, 9, 8
    monkeypatch.setattr(CA, "AT_ONCE_SCORE_BYTES", 2 * B * N * N * 4)
    assert CA.layers_per_group(L, B, N, N) == 2
    q, k, m = make(L, B, N, N, d, torch.float32, "random")
    do = torch.randn(L, B, N, d).to(DEV)
    out = CA.relu_l1_attention_efficient(*CA.validate(q, k, m, 1e-6, False), 1e-6, False)
    dq, dk = torch.autograd.grad(out, [q, k], do)
    r_out, r_dq, r_dk = reference_fp64(q, k, m, do)
    assert_close(out, r_out, 2e-5, "forward")
    assert_close(dq, r_dq, 8e-5, "dq")
    assert_close(dk, r_dk, 8e-5, "dk")
