"""The cross attention and the confidence aggregation as one op, against the two ops written plainly.

Inputs are drawn on the CPU from the seeded generator and then moved to the test device, so CPU and CUDA runs
check the same numbers.
"""
import pytest
import torch

from unipt_scale import kernels as K
from unipt_scale.kernels import attention_aggregate as AA
from unipt_scale.kernels.naive import relu_l1_attention_aggregate_reference as reference
from unipt_scale.kernels.naive import relu_l1_attention_reference

from kernel_cases import DEV, DTYPES, assert_close, fp64_grads

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
IMPLS = ["efficient", "grouped", "chunked", "triton"]


def run_impl(impl, q, k, m, alpha, identity, eps=1e-6):
    """One path through the same validation as the public op."""
    q, k, m, alpha = AA.validate(q, k, m, alpha, identity, eps)
    if impl == "efficient":  # every sequence in one product
        return AA.relu_l1_attention_aggregate_efficient(q, k, m, alpha, identity, eps)
    if impl == "grouped":  # two sequences per product: a full group and a partial one (B = 3)
        return AA.ReLUL1AttentionAggregateEfficient.apply(q, k, m, alpha, identity, eps, 2)
    if impl == "chunked":  # one sequence's scores over the budget: the key-chunked attention and the weighted sum
        return AA._weighted(K.cross_attention.relu_l1_attention_efficient(q, k, m, eps, chunk=7), k, alpha, identity)
    if impl == "triton":
        return AA.relu_l1_attention_aggregate_triton(q, k, m, alpha, identity, eps)
    raise AssertionError(impl)


def plain(q, k, m, alpha, identity, eps=1e-6):
    """The two ops as the side network ran them before: every layer's attention, + its keys, weighted sum."""
    merged = relu_l1_attention_reference(q, k, m, eps)
    if identity:
        merged = merged + k
    return (alpha.t()[:, :, None, None] * merged).sum(0)


def mask_of(kind, B, N):
    pos = torch.arange(N)[None]
    if kind is None:
        return None
    if kind == "right":  # the last sample fully padded
        return (pos < torch.tensor([N, N - 9, 0])[:B, None]).to(DEV)
    if kind == "left":
        return (pos >= torch.tensor([0, 5, N - 1])[:B, None]).to(DEV)
    if kind == "int":
        return (pos < torch.tensor([N, N // 2, 3])[:B, None]).long().to(DEV)
    raise AssertionError(kind)


def make(L, B, N, d, dtype, mask_kind):
    q = torch.randn(B, N, d).to(DEV, dtype).requires_grad_()
    k = torch.randn(L, B, N, d).to(DEV, dtype).requires_grad_()
    alpha = torch.softmax(torch.randn(B, L), -1).to(DEV, dtype).requires_grad_()
    return q, k, mask_of(mask_kind, B, N), alpha


CASES = [  # L, B, N, d, mask
    (3, 3, 37, 24, "right"),   # d < N; one sample with every key padded
    (2, 3, 13, 40, "left"),    # d > N, left padding
    (1, 2, 16, 8, None),       # one layer, no mask
    (4, 3, 20, 16, "int"),     # integer 0/1 mask
]


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,N,d,mask_kind", CASES)
def test_matches_the_two_ops(impl, dtype, L, B, N, d, mask_kind, identity):
    q, k, m, alpha = make(L, B, N, d, dtype, mask_kind)
    dout = torch.randn(B, N, d).to(DEV, dtype)
    out = run_impl(impl, q, k, m, alpha, identity)
    assert out.dtype == dtype and out.shape == (B, N, d)
    grads = torch.autograd.grad(out, [q, k, alpha], dout)
    r_out, r_grads = fp64_grads(lambda *t: plain(*t[:2], m, t[2], identity), [q, k, alpha], dout)
    tol = TOL[dtype]
    assert_close(out, r_out, tol, "forward")
    for what, g, r in zip(("dq", "dk", "dalpha"), grads, r_grads):
        assert_close(g, r, tol * 8, what)


def test_reference_is_the_two_ops():
    q, k, m, alpha = make(3, 3, 11, 6, torch.float64, "right")
    for identity in (True, False):
        torch.testing.assert_close(reference(q, k, m, alpha, identity), plain(q, k, m, alpha, identity))


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("impl", ["efficient", "grouped"])
def test_gradcheck_fp64(impl, identity):
    q, k, m, alpha = (t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t
                      for t in make(2, 3, 6, 4, torch.float32, "right"))
    assert torch.autograd.gradcheck(lambda q_, k_, a_: run_impl(impl, q_, k_, m, a_, identity), (q, k, alpha))


@pytest.mark.parametrize("impl", ["efficient", "grouped"])
def test_only_some_inputs_need_grad(impl):
    q, k, m, alpha = make(2, 3, 9, 5, torch.float32, "left")
    dout = torch.randn(3, 9, 5).to(DEV)
    full = torch.autograd.grad(run_impl(impl, q, k, m, alpha, True), [q, k, alpha], dout)
    for i, name in enumerate(("query", "keys", "alpha")):
        args = [t.detach() for t in (q, k, alpha)]
        args[i].requires_grad_()
        (g,) = torch.autograd.grad(run_impl(impl, args[0], args[1], m, args[2], True), [args[i]], dout)
        torch.testing.assert_close(g, full[i], msg=name)


def test_eps_boundary_rows():
    """Rows whose relu scores sum below eps (every score ≤ 0) take no δ term, as the attention's own."""
    q, k, m, alpha = make(2, 3, 8, 4, torch.float64, None)
    with torch.no_grad():
        q[0, :4] = 0  # exact zero scores: z = 0 < eps on these rows
    dout = torch.randn(3, 8, 4, dtype=torch.float64).to(DEV)
    got = torch.autograd.grad(run_impl("efficient", q, k, m, alpha, True), [q, k, alpha], dout)
    want = torch.autograd.grad(plain(q, k, m, alpha, True), [q, k, alpha], dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("N,d", [(32, 8), (8, 32)])
def test_saves_query_keys_z_alpha_and_mask(N, d):
    """No per-layer outputs and no scores: the query, the keys (the batch-major copy the forward makes, in place
    of the caller's), z, α and the mask."""
    L, B = 3, 2
    q, k, m, alpha = make(L, B, N, d, torch.float32, "right")
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        run_impl("efficient", q, k, m, alpha, True)
    assert sorted(shapes) == sorted([(B, N, d), (B, L * N, d), (B, N, L), (B, L), (B, N)])


def test_groups_stay_within_the_budget():
    assert AA.sequences_per_group(6, 32, 64, 64) == 32
    rows = AA.sequences_per_group(6, 32, 256, 256)
    assert 0 < rows < 32 and rows * 6 * 256 * 256 * 4 <= AA.GROUP_SCORE_BYTES
    assert AA.sequences_per_group(12, 2, 1024, 1024) == 0  # one sequence over the budget: the chunked path


def test_public_op_backends_agree_and_auto_is_efficient_on_cpu():
    q, k, m, alpha = make(3, 3, 10, 6, torch.float32, "right")
    want = K.relu_l1_attention_aggregate(q, k, m, alpha, backend="reference")
    for backend in ("auto", "efficient"):
        assert_close(K.relu_l1_attention_aggregate(q, k, m, alpha, backend=backend), want, 2e-5, backend)


@pytest.mark.parametrize("bad,match", [
    (dict(alpha=torch.ones(3, 2)), "alpha must be the"),
    (dict(identity=1), "identity must be True or False"),
    (dict(query=torch.randn(3, 5, 6)), "Nq must equal Nk"),
])
def test_bad_inputs_name_the_fix(bad, match):
    q, k, m, alpha = make(3, 3, 10, 6, torch.float32, None)
    args = dict(query=q, keys=k, key_mask=m, alpha=alpha, identity=True)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        K.relu_l1_attention_aggregate(**args)
