"""ReLU-L1 cross attention (UniPT's parallel interaction), streamed over key blocks; optionally causal.

o_i = Σ_j p_ij v_j / max(z_i, eps) with p = relu(q kᵀ) (padding keys → 0), z_i = Σ_j p_ij and v = k.
As in FlashAttention the Nq×Nk weights never exist in memory: the forward keeps a running Σ p·v and z per
query row (no running max is needed, relu scores are non-negative and the normaliser is a plain sum), and
the backward recomputes the scores. Saved for backward: q, k, z (L·B·Nq floats) and the key mask, so the
saved state is O(N·d) per layer instead of the reference's O(N²) — causal or not.

Causal (decoder LLMs, shared/unipt-equations.md "Causal form"): query row i sits at position i + Nk − Nq
(bottom-right aligned as in FlashAttention ≥ 2.1; Nq = Nk is the usual square case, Nq = 1 is the newest token
reading every cached key) and p_ij = 0 for keys j > i + Nk − Nq. z_i and the eps clamp are taken over the
visible keys only. The kernels never visit a key block that lies wholly above the diagonal (about half the
work at large N); blocks wholly below it run unmasked and only the blocks crossing it apply the causal mask.

Backward (see shared/unipt-equations.md): c = 1/max(z, eps), δ_i = [z_i ≥ eps]·(do_i·o_i),
ds_ij = [s_ij > 0]·c_i·(do_i·v_j − δ_i), dq = ds k, dk = dsᵀ q + (c⊙p)ᵀ do (the last term because v = k),
with p (and so ds) zero at masked keys. o is not saved, so δ_i = [z_i ≥ eps]·c_i Σ_j p_ij (do_i·k_j) is rebuilt
by a first pass over the keys.

On the CPU (backend "efficient") two torch paths carry the same saved-state contract: whole layers per batched
product while their scores are small (`ReLUL1AttentionEfficientBatched`, the training shapes of encoders and short
decoders, and decoding), and key chunks of one layer at a time beyond that (`ReLUL1AttentionEfficient`, which
also skips the causal blocks above the diagonal).

Three launches: forward over (query block, layer·batch); a dq kernel over (query block, batch) that loops
over the layers (the query is shared, so dq sums over layers in registers) and also writes δ; a dk kernel
over (key block, layer·batch). Nothing is atomic, so the results are deterministic.

The entry points here take inputs as `validate` returns them; `unipt_scale.kernels.relu_l1_attention` is the
public op, which validates once and picks the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, common_float_dtype, dot_policy, interpreting, next_pow2, same_device


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _key_tile(k_base, m_row, cols, dims, dim_ok, s_kn, NK, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """Keys cols (BLOCK_N, BLOCK_D) and which of them are real tokens inside the sequence."""
    col_ok = cols < NK
    k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0).to(CDT)
    if HAS_MASK:
        col_ok = col_ok & (tl.load(m_row + cols, mask=col_ok, other=0) != 0)
    return k, col_ok


@triton.jit
def _fwd_inner(acc, z, q, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
               HAS_MASK: tl.constexpr, DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
               CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Σ p·k and z over key blocks [lo, hi); DIAG applies the causal mask (blocks crossing the diagonal)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, col_ok = _key_tile(k_base, m_row, cols, dims, dim_ok, s_kn, NK, HAS_MASK, CDT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        keep = col_ok[None, :] & (s > 0)
        if DIAG:
            keep = keep & (cols[None, :] <= rows[:, None] + offset)
        p = tl.where(keep, s, 0.0)
        z += tl.sum(p, axis=1)
        acc = tl.dot(p.to(CDT), k, acc, input_precision=PREC, out_dtype=ACC)
    return acc, z


@triton.jit
def _delta_inner(dsum, q, do, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
                 HAS_MASK: tl.constexpr, DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
                 CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Σ_j p_ij (do_i·k_j) over key blocks [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, col_ok = _key_tile(k_base, m_row, cols, dims, dim_ok, s_kn, NK, HAS_MASK, CDT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        dv = tl.dot(do, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        keep = col_ok[None, :] & (s > 0)
        if DIAG:
            keep = keep & (cols[None, :] <= rows[:, None] + offset)
        dsum += tl.sum(tl.where(keep, s * dv, 0.0), axis=1)
    return dsum


@triton.jit
def _dq_inner(dq, q, do, c, delta, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
              HAS_MASK: tl.constexpr, DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
              CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dq += ds k over key blocks [lo, hi), ds_ij = [s_ij > 0] c_i (do_i·k_j − δ_i)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, col_ok = _key_tile(k_base, m_row, cols, dims, dim_ok, s_kn, NK, HAS_MASK, CDT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        dv = tl.dot(do, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        keep = col_ok[None, :] & (s > 0)
        if DIAG:
            keep = keep & (cols[None, :] <= rows[:, None] + offset)
        ds = tl.where(keep, c[:, None] * (dv - delta[:, None]), 0.0)
        dq = tl.dot(ds.to(CDT), k, dq, input_precision=PREC, out_dtype=ACC)
    return dq


@triton.jit
def _dk_inner(dk, k, col_ok, cols, q_base, do_base, z_base, delta_base, dims, dim_ok, lo, hi, NQ, eps,
              s_qn, s_don, offset, DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
              CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dk += dsᵀ q + (c⊙p)ᵀ do over query blocks [lo, hi) (transposed tiles: keys × queries)."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * s_qn + dims[None, :], mask=tile_ok, other=0.0).to(CDT)
        do = tl.load(do_base + rows[:, None] * s_don + dims[None, :], mask=tile_ok, other=0.0).to(CDT)
        c = 1.0 / tl.maximum(tl.load(z_base + rows, mask=row_ok, other=1.0), eps)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC)  # (keys, queries)
        dv_t = tl.dot(k, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        pos = col_ok[:, None] & (s_t > 0)
        if DIAG:
            pos = pos & (cols[:, None] <= rows[None, :] + offset)
        cp_t = tl.where(pos, s_t * c[None, :], 0.0)
        ds_t = tl.where(pos, c[None, :] * (dv_t - delta[None, :]), 0.0)
        dk = tl.dot(ds_t.to(CDT), q, dk, input_precision=PREC, out_dtype=ACC)
        dk = tl.dot(cp_t.to(CDT), do, dk, input_precision=PREC, out_dtype=ACC)
    return dk


@triton.jit
def _causal_key_range(row0, NK, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [row0, row0 + BLOCK_M): key blocks below `lo` are wholly visible, blocks in [lo, hi)
    cross the diagonal, keys from `hi` on are never read."""
    lo = ((row0 + offset + 1) // BLOCK_N) * BLOCK_N  # ≤ NK: row0 < NQ and offset = NK − NQ
    hi = tl.minimum(row0 + BLOCK_M + offset, NK)
    return lo, hi


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, m_ptr, o_ptr, z_ptr,
                     B, NQ, NK, D, eps, offset,
                     s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_ol, s_ob, s_on,
                     HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_lb = tl.program_id(1)
    l = (pid_lb // B).to(tl.int64)
    b = (pid_lb % B).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    dim_ok = dims < D
    q = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qn + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(CDT)
    k_base = k_ptr + l * s_kl + b * s_kb
    m_row = m_ptr + b * s_mb
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    z = tl.zeros((BLOCK_M,), dtype=ACC)
    if CAUSAL:
        lo, hi = _causal_key_range(pid_m * BLOCK_M, NK, offset, BLOCK_M, BLOCK_N)
        acc, z = _fwd_inner(acc, z, q, k_base, m_row, rows, dims, dim_ok, 0, lo, NK, s_kn, offset,
                            HAS_MASK, False, BLOCK_N, CDT, ACC, PREC)
        acc, z = _fwd_inner(acc, z, q, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
                            HAS_MASK, True, BLOCK_N, CDT, ACC, PREC)
    else:
        acc, z = _fwd_inner(acc, z, q, k_base, m_row, rows, dims, dim_ok, 0, NK, NK, s_kn, offset,
                            HAS_MASK, False, BLOCK_N, CDT, ACC, PREC)
    c = 1.0 / tl.maximum(z, eps)
    o = acc * c[:, None]
    tl.store(o_ptr + l * s_ol + b * s_ob + rows[:, None] * s_on + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(z_ptr + pid_lb.to(tl.int64) * NQ + rows, z, mask=row_ok)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, m_ptr, do_ptr, z_ptr, dq_ptr, delta_ptr,
                        L, B, NQ, NK, D, eps, offset,
                        s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_dol, s_dob, s_don, s_dqb, s_dqn,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE_DQ: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    dim_ok = dims < D
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qn + dims[None, :], mask=tile_ok, other=0.0).to(CDT)
    m_row = m_ptr + b * s_mb
    if CAUSAL:
        lo, hi = _causal_key_range(pid_m * BLOCK_M, NK, offset, BLOCK_M, BLOCK_N)
    else:
        lo = NK
        hi = NK
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    k_base = k_ptr + b * s_kb  # advanced by one layer per iteration: 64-bit pointers, no int32 l·stride product
    do_base = do_ptr + b * s_dob
    for l in range(0, L):
        do = tl.load(do_base + rows[:, None] * s_don + dims[None, :], mask=tile_ok, other=0.0).to(CDT)
        zrow = (l * B + b) * NQ + rows
        z = tl.load(z_ptr + zrow, mask=row_ok, other=1.0)
        c = 1.0 / tl.maximum(z, eps)
        # pass 1: δ_i = [z_i ≥ eps] c_i Σ_j p_ij (do_i·k_j), i.e. do_i·o_i without having saved o
        dsum = tl.zeros((BLOCK_M,), dtype=ACC)
        dsum = _delta_inner(dsum, q, do, k_base, m_row, rows, dims, dim_ok, 0, lo, NK, s_kn, offset,
                            HAS_MASK, False, BLOCK_N, CDT, ACC, PREC)
        if CAUSAL:
            dsum = _delta_inner(dsum, q, do, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
                                HAS_MASK, True, BLOCK_N, CDT, ACC, PREC)
        delta = tl.where(z >= eps, c * dsum, 0.0)
        tl.store(delta_ptr + zrow, delta, mask=row_ok)
        # pass 2: dq += ds k with ds_ij = [s_ij > 0] c_i (do_i·k_j − δ_i)
        if COMPUTE_DQ:
            dq = _dq_inner(dq, q, do, c, delta, k_base, m_row, rows, dims, dim_ok, 0, lo, NK, s_kn, offset,
                           HAS_MASK, False, BLOCK_N, CDT, ACC, PREC)
            if CAUSAL:
                dq = _dq_inner(dq, q, do, c, delta, k_base, m_row, rows, dims, dim_ok, lo, hi, NK, s_kn, offset,
                               HAS_MASK, True, BLOCK_N, CDT, ACC, PREC)
        k_base += s_kl
        do_base += s_dol
    if COMPUTE_DQ:
        tl.store(dq_ptr + b * s_dqb + rows[:, None] * s_dqn + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=tile_ok)


@triton.jit
def _attn_bwd_dk_kernel(q_ptr, k_ptr, m_ptr, do_ptr, z_ptr, delta_ptr, dk_ptr,
                        B, NQ, NK, D, eps, offset,
                        s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_dol, s_dob, s_don, s_dkl, s_dkb, s_dkn,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_lb = tl.program_id(1)
    l = (pid_lb // B).to(tl.int64)
    b = (pid_lb % B).to(tl.int64)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    k, col_ok = _key_tile(k_ptr + l * s_kl + b * s_kb, m_ptr + b * s_mb, cols, dims, dim_ok, s_kn, NK,
                          HAS_MASK, CDT)
    q_base = q_ptr + b * s_qb
    do_base = do_ptr + l * s_dol + b * s_dob
    z_base = z_ptr + pid_lb.to(tl.int64) * NQ
    delta_base = delta_ptr + pid_lb.to(tl.int64) * NQ
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    if CAUSAL:
        # query rows i see key j when j ≤ i + offset: blocks before `lo` see none of these keys (skipped),
        # blocks in [lo, mid) cross the diagonal, blocks from `mid` on see every key of the block
        lo = (tl.maximum(col0 - offset, 0) // BLOCK_M) * BLOCK_M
        mid = ((tl.maximum(col0 + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        dk = _dk_inner(dk, k, col_ok, cols, q_base, do_base, z_base, delta_base, dims, dim_ok, lo,
                       tl.minimum(mid, NQ), NQ, eps, s_qn, s_don, offset, True, BLOCK_M, CDT, ACC, PREC)
        dk = _dk_inner(dk, k, col_ok, cols, q_base, do_base, z_base, delta_base, dims, dim_ok, mid, NQ, NQ, eps,
                       s_qn, s_don, offset, False, BLOCK_M, CDT, ACC, PREC)
    else:
        dk = _dk_inner(dk, k, col_ok, cols, q_base, do_base, z_base, delta_base, dims, dim_ok, 0, NQ, NQ, eps,
                       s_qn, s_don, offset, False, BLOCK_M, CDT, ACC, PREC)
    tl.store(dk_ptr + l * s_dkl + b * s_dkb + cols[:, None] * s_dkn + dims[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=(cols < NK)[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def tile_sizes(d: int, dtype: torch.dtype = torch.bfloat16, interpreter: Optional[bool] = None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for rows of width d: a whole row of d per tile, smaller
    query/key tiles as d and the dot operands grow. `interpreter` defaults to how the kernels were built; the
    bench passes False to count the compiled kernels' tiles.

    The tiles keep every kernel inside sm_90's 227 KiB of shared memory per program with room to spare (sizes
    from compiling the kernels for sm_90: 16-bit operands, d = 512, 32×32 tiles: dk 113 KiB; 32-bit operands —
    fp32, and fp16, which multiplies in fp32/tf32 — d = 128 at 32×32: dk 88 KiB, where 64×64 needs far more;
    d = 512 at 16×16: dk 162 KiB; fp64 d = 128 at 16×16: dk 84 KiB)."""
    bd = next_pow2(d)
    if interpreting() if interpreter is None else interpreter:
        return 64, 64, bd, 4  # the interpreter pays per program instance: few, large tiles
    if dtype == torch.float64:
        bm = 64 if bd <= 16 else (32 if bd <= 64 else 16)
        return bm, bm, bd, 4
    if dtype == torch.bfloat16:  # 16-bit operands (see dot_policy)
        if bd <= 128:
            return 64, 64, bd, 4
        if bd <= 256:
            return 64, 32, bd, 8
        return 32, 32, bd, 8
    if bd <= 64:  # 32-bit operands
        return 64, 64, bd, 4
    if bd <= 128:
        return 32, 32, bd, 4
    return 16, 16, bd, 8


#: fp64 rows wider than this exceed the per-program shared memory even at 16×16 tiles ('auto' avoids them)
MAX_FUSED_FP64_DIM = 128


def _blocks(d: int, dtype: torch.dtype, block_m: Optional[int], block_n: Optional[int]):
    bm, bn, bd, warps = tile_sizes(d, dtype)
    return (block_m or bm), (block_n or bn), bd, warps


def causal_tile_fraction(nq: int, nk: int, block_m: int, block_n: int) -> dict:
    """Share of the (query block, key block) tiles the causal kernels visit, against the non-causal ones:
    'fwd' (forward and the dq kernel: key blocks per query block), 'dk' (query blocks per key block) and
    'exact' (the visible (i, j) pairs themselves). The FLOPs of each pass scale with its share."""
    off = nk - nq
    nqb, nkb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    fwd = sum(triton.cdiv(min(r0 + block_m + off, nk), block_n) for r0 in range(0, nq, block_m))
    dk = sum(nqb - (max(c0 - off, 0) // block_m) for c0 in range(0, nk, block_n))
    pairs = sum(min(i + off + 1, nk) for i in range(nq))
    return dict(fwd=fwd / max(1, nqb * nkb), dk=dk / max(1, nqb * nkb), exact=pairs / max(1, nq * nk))


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_forward(q, k, m, eps, causal, block_m=None, block_n=None):
    L, B, NK, D = k.shape
    NQ = q.shape[1]
    bm, bn, bd, warps = _blocks(D, q.dtype, block_m, block_n)
    cdt, acc, prec = dot_policy(q.dtype, half_dots=False)
    o = torch.empty((L, B, NQ, D), dtype=q.dtype, device=q.device)
    z = torch.empty((L, B, NQ), dtype=acc_dtype(q.dtype), device=q.device)
    if o.numel() == 0:
        return o.zero_(), z.zero_()
    mm = m if m is not None else q
    grid = (triton.cdiv(NQ, bm), L * B)
    _attn_fwd_kernel[grid](
        q, k, mm, o, z, B, NQ, NK, D, eps, NK - NQ,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        HAS_MASK=m is not None, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, CDT=cdt, ACC=acc, PREC=prec,
        num_warps=warps)
    return o, z


def _attn_backward(q, k, m, z, do, eps, causal, need_dq, need_dk, block_m=None, block_n=None):
    L, B, NK, D = k.shape
    NQ = q.shape[1]
    bm, bn, bd, warps = _blocks(D, q.dtype, block_m, block_n)
    cdt, acc, prec = dot_policy(q.dtype, half_dots=False)
    do = _lastdim_contiguous(do)
    mm = m if m is not None else q
    delta = torch.empty_like(z)
    dq = torch.empty_like(q) if need_dq else None
    dk = torch.empty_like(k) if need_dk else None
    if q.numel() == 0 or k.numel() == 0:
        return (dq.zero_() if need_dq else None), (dk.zero_() if need_dk else None)
    dqt = dq if need_dq else q
    _attn_bwd_dq_kernel[(triton.cdiv(NQ, bm), B)](
        q, k, mm, do, z, dqt, delta, L, B, NQ, NK, D, eps, NK - NQ,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
        do.stride(0), do.stride(1), do.stride(2), dqt.stride(0), dqt.stride(1),
        HAS_MASK=m is not None, CAUSAL=causal, COMPUTE_DQ=need_dq, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        CDT=cdt, ACC=acc, PREC=prec, num_warps=warps)
    if need_dk:
        _attn_bwd_dk_kernel[(triton.cdiv(NK, bn), L * B)](
            q, k, mm, do, z, delta, dk, B, NQ, NK, D, eps, NK - NQ,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
            do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            HAS_MASK=m is not None, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, CDT=cdt, ACC=acc,
            PREC=prec, num_warps=warps)
    return dq, dk


class ReLUL1AttentionTriton(torch.autograd.Function):
    """Fused forward/backward; saves q, k, z and the mask only (causal or not)."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, eps, causal, block_m, block_n):
        query, keys = _lastdim_contiguous(query), _lastdim_contiguous(keys)
        o, z = _attn_forward(query, keys, mask_u8, eps, causal, block_m, block_n)
        ctx.save_for_backward(query, keys, z, mask_u8)
        ctx.eps, ctx.causal, ctx.blocks = eps, causal, (block_m, block_n)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, z, m = ctx.saved_tensors
        dq, dk = _attn_backward(q, k, m, z, do, ctx.eps, ctx.causal, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[1], *ctx.blocks)
        return dq, dk, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Memory-efficient torch path (CPU): same saved state, key-chunked recomputation
# ----------------------------------------------------------------------------------------------------------------
def _chunk(b: int, nq: int, nk: int, chunk: Optional[int], causal: bool = False) -> int:
    """Keys per chunk so one (B, Nq, chunk) score block stays around 4M elements; causal: at most Nk/8 keys
    (and at least 128) so that skipping the rows above the diagonal saves about half of the work."""
    if chunk is None:
        chunk = max(16, (1 << 22) // max(1, b * nq))
        if causal:
            chunk = min(chunk, max(128, -(-nk // 8)))
    return max(1, min(int(chunk), max(nk, 1)))


class _Chunks:
    """Key chunks [c0, c1) and, when causal, the first query row r0 that sees any of their keys (rows before it
    are skipped) and the band of rows r0 … r0 + band − 1 that see only part of the chunk (the causal mask is
    applied there only, a (band, chunk) triangle; rows after the band see the whole chunk)."""

    def __init__(self, nq: int, nk: int, chunk: int, causal: bool, keep: Optional[torch.Tensor], device):
        self.nq, self.nk, self.chunk, self.causal, self.keep, self.device = nq, nk, chunk, causal, keep, device

    def __iter__(self):
        off = self.nk - self.nq
        for c0 in range(0, self.nk, self.chunk):
            c1 = min(c0 + self.chunk, self.nk)
            if not self.causal:
                yield c0, c1, 0, None
                continue
            r0 = max(0, c0 - off)
            if r0 >= self.nq:
                break
            band = min(self.nq, c1 - 1 - off) - r0  # rows i with i + off < c1 − 1
            vis = None
            if band > 0:
                rows = torch.arange(r0, r0 + band, device=self.device)
                vis = torch.arange(c0, c1, device=self.device)[None, :] <= rows[:, None] + off
            yield c0, c1, r0, vis

    def scores(self, qf, kc, c0, c1, vis):
        """relu(q kᵀ) for one chunk with padding (and causally hidden) keys zeroed."""
        s = torch.bmm(qf, kc.transpose(1, 2))
        if self.keep is not None:
            s.masked_fill_(~self.keep[:, None, c0:c1], 0)
        if vis is not None:
            s[:, :vis.shape[0]].masked_fill_(~vis[None], 0)
        return s.clamp_(min=0)


class ReLUL1AttentionEfficient(torch.autograd.Function):
    """Torch ops only, one layer and one key chunk at a time; saves q, k, z and the mask like the fused path.
    Causal: each chunk multiplies only the query rows that can see it (about half the work at large N)."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, eps, causal, chunk):
        L, B, NK, D = keys.shape
        NQ = query.shape[1]
        at = acc_dtype(query.dtype)
        chunk = _chunk(B, NQ, NK, chunk, causal)
        chunks = _Chunks(NQ, NK, chunk, causal, mask_u8.bool() if mask_u8 is not None else None, query.device)
        qf = query.to(at)
        out = torch.empty((L, B, NQ, D), dtype=query.dtype, device=query.device)
        z = torch.empty((L, B, NQ), dtype=at, device=query.device)
        for l in range(L):
            kl = keys[l].to(at)
            num = torch.zeros((B, NQ, D), dtype=at, device=query.device)
            zl = torch.zeros((B, NQ), dtype=at, device=query.device)
            for c0, c1, r0, vis in chunks:
                kc = kl[:, c0:c1]
                p = chunks.scores(qf[:, r0:], kc, c0, c1, vis)
                zl[:, r0:] += p.sum(-1)
                num[:, r0:].baddbmm_(p, kc)
            z[l] = zl
            out[l] = (num / zl.clamp(min=eps).unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, keys, z, mask_u8)
        ctx.eps, ctx.causal, ctx.chunk = eps, causal, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, z, m = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        L, B, NK, D = k.shape
        NQ = q.shape[1]
        at = z.dtype
        eps = ctx.eps
        chunks = _Chunks(NQ, NK, ctx.chunk, ctx.causal, m.bool() if m is not None else None, q.device)
        qf = q.to(at)
        c = 1.0 / z.clamp(min=eps)
        dq = torch.zeros(qf.shape, dtype=at, device=q.device) if need_dq else None
        dk = torch.zeros_like(k) if need_dk else None  # causal: keys no query sees keep a zero gradient
        for l in range(L):
            kl, dol, cl = k[l].to(at), do[l].to(at), c[l]
            dsum = torch.zeros_like(cl)
            for c0, c1, r0, vis in chunks:
                kc = kl[:, c0:c1]
                p = chunks.scores(qf[:, r0:], kc, c0, c1, vis)
                dsum[:, r0:] += (p * torch.bmm(dol[:, r0:], kc.transpose(1, 2))).sum(-1)
            delta = torch.where(z[l] >= eps, cl * dsum, torch.zeros_like(dsum))
            for c0, c1, r0, vis in chunks:
                kc, qs, ds_, cs = kl[:, c0:c1], qf[:, r0:], dol[:, r0:], cl[:, r0:]
                p = chunks.scores(qs, kc, c0, c1, vis)
                dv = torch.bmm(ds_, kc.transpose(1, 2))
                ds = torch.where(p > 0, cs.unsqueeze(-1) * (dv - delta[:, r0:].unsqueeze(-1)), torch.zeros_like(p))
                if need_dq:
                    dq[:, r0:].baddbmm_(ds, kc)
                if need_dk:
                    g = torch.bmm(ds.transpose(1, 2), qs).baddbmm_((p * cs.unsqueeze(-1)).transpose(1, 2), ds_)
                    dk[l, :, c0:c1] = g.to(k.dtype)
        return (dq.to(q.dtype) if need_dq else None), dk, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Entry points (inputs as `validate` returns them; the public op in unipt_scale.kernels validates once)
# ----------------------------------------------------------------------------------------------------------------
def validate(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor], eps: float,
             causal: bool = False):
    """Shape/dtype checks with a fix in every message; returns (query, keys, mask as uint8 or None)."""
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        raise ValueError(f"query must be a (B, Nq, d) tensor, got shape {tuple(getattr(query, 'shape', ()))}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        raise ValueError(f"keys must be a (L, B, Nk, d) tensor (one slice per tapped layer), got shape "
                         f"{tuple(getattr(keys, 'shape', ()))}; stack the layers with torch.stack(..., 0)")
    B, NQ, D = query.shape
    if keys.shape[1] != B or keys.shape[3] != D:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)}: expected "
                         f"(L, {B}, Nk, {D}) — batch and feature width must agree")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if causal and NQ > keys.shape[2]:
        raise ValueError(f"causal attention needs Nq <= Nk (query row i sits at position i + Nk - Nq), got "
                         f"Nq = {NQ} queries for Nk = {keys.shape[2]} keys; pass the keys of every position up to "
                         "the last query")
    same_device([query, keys, key_mask], "query, keys and key_mask")
    dtype = common_float_dtype([query, keys], "query and keys")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it bounds 1/Σ relu(s)), got {eps}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != (B, keys.shape[2]):
            raise ValueError(f"key_mask must have shape (B, Nk) = {(B, keys.shape[2])}, got "
                             f"{tuple(getattr(key_mask, 'shape', ()))}; pass the (batch, tokens) padding mask")
        if key_mask.is_floating_point() or key_mask.is_complex():
            raise ValueError(f"key_mask must be bool (True = real token) or an integer 0/1 tensor, got "
                             f"{key_mask.dtype}; pass mask.bool()")
        key_mask = (key_mask if key_mask.dtype == torch.bool else key_mask != 0).contiguous().view(torch.uint8)
    return query.to(dtype), keys.to(dtype), key_mask


def relu_l1_attention_triton(query, keys, mask_u8=None, eps: float = 1e-6, causal: bool = False,
                             block_m: Optional[int] = None, block_n: Optional[int] = None):
    """The fused kernels (CUDA tensors, or the CPU interpreter); inputs as `validate` returns them."""
    return ReLUL1AttentionTriton.apply(query, keys, mask_u8, float(eps), bool(causal), block_m, block_n)


# Where one layer's (B, Nq, Nk) scores are this small, whole layers run at once, as many per batched product as
# fit: a few large products instead of a loop of small ones over layers and key chunks, which on the CPU cost
# more in per-op overhead and memory traffic than in arithmetic (MiniLM, 64 tokens: 6 layers of 32 x 64 x 64).
AT_ONCE_SCORE_BYTES = 32 << 20


def layers_per_group(L: int, B: int, nq: int, nk: int, element_bytes: int = 4) -> int:
    """How many layers' scores one batched product holds within AT_ONCE_SCORE_BYTES; 0 when one layer's
    scores alone are larger (then the key-chunked path runs)."""
    return min(L, AT_ONCE_SCORE_BYTES // max(1, B * nq * nk * element_bytes))


class _Visibility:
    """Which keys each query row reads, applied the cheaper way: padding keys are zeroed in the keys themselves
    when the keys are smaller than the scores (d < Nq; a zero key scores 0, so relu gives it no weight and no
    gradient), else the scores are masked; the causal triangle is always masked in the scores."""

    def __init__(self, nq: int, nk: int, d: int, mask_u8, causal: bool, device, dtype):
        self.pad = ~mask_u8.bool() if mask_u8 is not None else None  # (B, Nk) True = padding
        self.pad_in_keys = self.pad is not None and d < nq
        hidden = None  # (1 or B, Nq or 1, Nk) True = not read, applied to the scores
        if self.pad is not None and not self.pad_in_keys:
            hidden = self.pad[:, None, :]
        if causal:
            rows = torch.arange(nq, device=device)[:, None] + (nk - nq)
            later = (torch.arange(nk, device=device)[None, :] > rows)[None]
            hidden = later if hidden is None else hidden | later
        # applied as a multiply by 0/1: one streaming pass, where a broadcast masked_fill_ took ten times as long
        self.read = (~hidden).to(dtype) if hidden is not None else None

    def keys(self, kg: torch.Tensor) -> torch.Tensor:
        return kg.masked_fill(self.pad[None, :, :, None], 0) if self.pad_in_keys else kg

    def scores(self, qf: torch.Tensor, kg: torch.Tensor) -> torch.Tensor:
        """relu(q kᵀ) for a group of layers, (G, B, Nq, Nk), with `kg` from keys(); hidden keys score 0."""
        s = torch.matmul(qf.unsqueeze(0), kg.transpose(-1, -2)).clamp_(min=0)
        if self.read is not None:
            s.mul_(self.read)
        return s


# The batched path multiplies whole rows, the hidden triangle of a causal problem included, which the key-chunked
# path skips. Measured on this project's 2-core CPU, forward + backward of 10 layers x 4 sequences, d = 288:
# batched 79 ms against chunked 95 ms at N = 192, 464 against 446 at N = 512, 1648 against 1216 at N = 1024.
CAUSAL_BATCHED_KEYS = 256


def batched_causal_pays(nq: int, nk: int) -> bool:
    """Causal: whole rows where the keys are few, or where the hidden triangle is at most a quarter of the scores
    (nq ≤ nk/2: decoding and chunked prefill, a few query rows against a long cache)."""
    return nk <= CAUSAL_BATCHED_KEYS or 2 * (nq - 1) <= nk


def _layer_groups(L: int, group: int):
    for g0 in range(0, L, group):
        yield g0, min(L, g0 + group)


class ReLUL1AttentionEfficientBatched(torch.autograd.Function):
    """Torch ops, whole layers per batched product (`group` layers at a time); saves q, k, z and the mask like the
    key-chunked path and the fused kernels, and recomputes the scores in backward.

    Few passes over the (G, B, Nq, Nk) scores, which at long sequences cost as much as the products: with whole
    rows at hand δ needs no first pass over the keys; c = 1/max(z, eps) is folded into do (do' = c·do gives
    dv' = do' kᵀ = c·(do kᵀ) and (c⊙p)ᵀ do = pᵀ do'), so ds = dv' − c·δ' with δ' = Σ p·dv' is one subtraction,
    and the relu mask is one threshold_backward."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, eps, causal, group):
        L, B, NK, D = keys.shape
        NQ = query.shape[1]
        at = acc_dtype(query.dtype)
        vis = _Visibility(NQ, NK, D, mask_u8, causal, query.device, at)
        qf = query.to(at)
        out = torch.empty((L, B, NQ, D), dtype=query.dtype, device=query.device)
        z = torch.empty((L, B, NQ), dtype=at, device=query.device)
        for g0, g1 in _layer_groups(L, group):
            kg = vis.keys(keys[g0:g1].to(at))
            p = vis.scores(qf, kg)
            z[g0:g1] = zg = p.sum(-1)
            out[g0:g1] = torch.matmul(p, kg).div_(zg.clamp(min=eps).unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, keys, z, mask_u8)
        ctx.eps, ctx.causal, ctx.group = eps, causal, group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, z, m = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        L, B, NK, D = k.shape
        NQ = q.shape[1]
        at = z.dtype
        vis = _Visibility(NQ, NK, D, m, ctx.causal, q.device, at)
        qf = q.to(at)
        dq = torch.zeros(qf.shape, dtype=at, device=q.device) if need_dq else None
        dk = torch.empty_like(k) if need_dk else None
        for g0, g1 in _layer_groups(L, ctx.group):
            kg, zg = vis.keys(k[g0:g1].to(at)), z[g0:g1]
            c = (1.0 / zg.clamp(min=ctx.eps)).unsqueeze(-1)  # (G, B, Nq, 1)
            do_c = do[g0:g1].to(at) * c
            p = vis.scores(qf, kg)
            ds = torch.matmul(do_c, kg.transpose(-1, -2))  # dv' = c·(do kᵀ)
            delta = (p * ds).sum(-1, keepdim=True).masked_fill_((zg < ctx.eps).unsqueeze(-1), 0)  # δ = c·δ'
            ds = torch.ops.aten.threshold_backward(ds.sub_(delta.mul_(c)), p, 0)  # zero where p = relu(s) = 0
            if need_dq:
                dq += torch.matmul(ds, kg).sum(0)
            if need_dk:
                g = torch.matmul(ds.transpose(-1, -2), qf.unsqueeze(0))
                g += torch.matmul(p.transpose(-1, -2), do_c)
                if vis.pad_in_keys:  # a zeroed key's own gradient: its scores were 0, so nothing came back
                    g.masked_fill_(vis.pad[None, :, :, None], 0)
                dk[g0:g1] = g.to(k.dtype)
        return (dq.to(q.dtype) if need_dq else None), dk, None, None, None, None


def relu_l1_attention_efficient(query, keys, mask_u8=None, eps: float = 1e-6, causal: bool = False,
                                chunk: Optional[int] = None):
    """The torch path; inputs as `validate` returns them. Whole layers per batched product where their scores are
    small (`layers_per_group`), key chunks of one layer at a time otherwise (or when `chunk` is given)."""
    L, B, NK, _ = keys.shape
    NQ = query.shape[1]
    group = layers_per_group(L, B, NQ, NK, acc_dtype(query.dtype).itemsize)
    if chunk is None and group > 0 and (not causal or batched_causal_pays(NQ, NK)):
        return ReLUL1AttentionEfficientBatched.apply(query, keys, mask_u8, float(eps), bool(causal), group)
    return ReLUL1AttentionEfficient.apply(query, keys, mask_u8, float(eps), bool(causal), chunk)
