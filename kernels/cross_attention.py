"""ReLU-L1 cross attention (UniPT's parallel interaction), streamed over key blocks.

o_i = Σ_j p_ij v_j / max(z_i, eps) with p = relu(q kᵀ) (padding keys → 0), z_i = Σ_j p_ij and v = k.
As in FlashAttention the Nq×Nk weights never exist in memory: the forward keeps a running Σ p·v and z per
query row (no running max is needed, relu scores are non-negative and the normaliser is a plain sum), and
the backward recomputes the scores. Saved for backward: q, k, z (L·B·Nq floats) and the key mask, so the
saved state is O(N·d) per layer instead of the reference's O(N²).

Backward (see shared/unipt-equations.md): c = 1/max(z, eps), δ_i = [z_i ≥ eps]·(do_i·o_i),
ds_ij = [s_ij > 0]·c_i·(do_i·v_j − δ_i), dq = ds k, dk = dsᵀ q + (c⊙p)ᵀ do (the last term because v = k).
o is not saved, so δ_i = [z_i ≥ eps]·c_i Σ_j p_ij (do_i·k_j) is rebuilt by a first pass over the keys.

Three launches: forward over (query block, layer·batch); a dq kernel over (query block, batch) that loops
over the layers (the query is shared, so dq sums over layers in registers) and also writes δ; a dk kernel
over (key block, layer·batch). Nothing is atomic, so the results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, check_triton_device, common_float_dtype, dot_policy, interpreting, next_pow2, same_device


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, m_ptr, o_ptr, z_ptr,
                     B, NQ, NK, D, eps,
                     s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_ol, s_ob, s_on,
                     HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    z = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(CDT)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(m_ptr + b * s_mb + cols, mask=col_ok, other=0) != 0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        p = tl.where(col_ok[None, :] & (s > 0), s, 0.0)
        z += tl.sum(p, axis=1)
        acc = tl.dot(p.to(CDT), k, acc, input_precision=PREC, out_dtype=ACC)
    c = 1.0 / tl.maximum(z, eps)
    o = acc * c[:, None]
    tl.store(o_ptr + l * s_ol + b * s_ob + rows[:, None] * s_on + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(z_ptr + pid_lb.to(tl.int64) * NQ + rows, z, mask=row_ok)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, m_ptr, do_ptr, z_ptr, dq_ptr, delta_ptr,
                        L, B, NQ, NK, D, eps,
                        s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_dol, s_dob, s_don, s_dqb, s_dqn,
                        HAS_MASK: tl.constexpr, COMPUTE_DQ: tl.constexpr,
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
        for start in range(0, NK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < NK
            k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(CDT)
            if HAS_MASK:
                col_ok = col_ok & (tl.load(m_ptr + b * s_mb + cols, mask=col_ok, other=0) != 0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
            dv = tl.dot(do, tl.trans(k), input_precision=PREC, out_dtype=ACC)
            p = tl.where(col_ok[None, :] & (s > 0), s, 0.0)
            dsum += tl.sum(p * dv, axis=1)
        delta = tl.where(z >= eps, c * dsum, 0.0)
        tl.store(delta_ptr + zrow, delta, mask=row_ok)
        # pass 2: dq += ds k with ds_ij = [s_ij > 0] c_i (do_i·k_j − δ_i)
        if COMPUTE_DQ:
            for start in range(0, NK, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < NK
                k = tl.load(k_base + cols[:, None] * s_kn + dims[None, :],
                            mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(CDT)
                if HAS_MASK:
                    col_ok = col_ok & (tl.load(m_ptr + b * s_mb + cols, mask=col_ok, other=0) != 0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
                dv = tl.dot(do, tl.trans(k), input_precision=PREC, out_dtype=ACC)
                ds = tl.where(col_ok[None, :] & (s > 0), c[:, None] * (dv - delta[:, None]), 0.0)
                dq = tl.dot(ds.to(CDT), k, dq, input_precision=PREC, out_dtype=ACC)
        k_base += s_kl
        do_base += s_dol
    if COMPUTE_DQ:
        tl.store(dq_ptr + b * s_dqb + rows[:, None] * s_dqn + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=tile_ok)


@triton.jit
def _attn_bwd_dk_kernel(q_ptr, k_ptr, m_ptr, do_ptr, z_ptr, delta_ptr, dk_ptr,
                        B, NQ, NK, D, eps,
                        s_qb, s_qn, s_kl, s_kb, s_kn, s_mb, s_dol, s_dob, s_don, s_dkl, s_dkb, s_dkn,
                        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_lb = tl.program_id(1)
    l = (pid_lb // B).to(tl.int64)
    b = (pid_lb % B).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < NK
    dim_ok = dims < D
    k = tl.load(k_ptr + l * s_kl + b * s_kb + cols[:, None] * s_kn + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(CDT)
    if HAS_MASK:
        col_ok = col_ok & (tl.load(m_ptr + b * s_mb + cols, mask=col_ok, other=0) != 0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for start in range(0, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qn + dims[None, :], mask=tile_ok, other=0.0).to(CDT)
        do = tl.load(do_ptr + l * s_dol + b * s_dob + rows[:, None] * s_don + dims[None, :],
                     mask=tile_ok, other=0.0).to(CDT)
        zrow = pid_lb.to(tl.int64) * NQ + rows
        c = 1.0 / tl.maximum(tl.load(z_ptr + zrow, mask=row_ok, other=1.0), eps)
        delta = tl.load(delta_ptr + zrow, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC)  # (keys, queries)
        dv_t = tl.dot(k, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        pos = col_ok[:, None] & (s_t > 0)
        cp_t = tl.where(pos, s_t * c[None, :], 0.0)
        ds_t = tl.where(pos, c[None, :] * (dv_t - delta[None, :]), 0.0)
        dk = tl.dot(ds_t.to(CDT), q, dk, input_precision=PREC, out_dtype=ACC)
        dk = tl.dot(cp_t.to(CDT), do, dk, input_precision=PREC, out_dtype=ACC)
    tl.store(dk_ptr + l * s_dkl + b * s_dkb + cols[:, None] * s_dkn + dims[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=(cols < NK)[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _blocks(d: int, block_m: Optional[int], block_n: Optional[int]):
    """Tile sizes: a whole row of d per tile; smaller query/key tiles as d grows (registers hold (M, d) fp32)."""
    bd = next_pow2(d)
    if interpreting():
        bm, bn, warps = 64, 64, 4  # the interpreter pays per program instance: few, large tiles
    elif bd <= 128:
        bm, bn, warps = 64, 64, 4
    elif bd <= 256:
        bm, bn, warps = 64, 32, 8
    else:
        bm, bn, warps = 32, 32, 8
    return (block_m or bm), (block_n or bn), bd, warps


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_forward(q, k, m, eps, block_m=None, block_n=None):
    L, B, NK, D = k.shape
    NQ = q.shape[1]
    bm, bn, bd, warps = _blocks(D, block_m, block_n)
    cdt, acc, prec = dot_policy(q.dtype, half_dots=False)
    o = torch.empty((L, B, NQ, D), dtype=q.dtype, device=q.device)
    z = torch.empty((L, B, NQ), dtype=acc_dtype(q.dtype), device=q.device)
    if o.numel() == 0:
        return o, z.zero_()
    mm = m if m is not None else q
    grid = (triton.cdiv(NQ, bm), L * B)
    _attn_fwd_kernel[grid](
        q, k, mm, o, z, B, NQ, NK, D, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        HAS_MASK=m is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, CDT=cdt, ACC=acc, PREC=prec,
        num_warps=warps)
    return o, z


def _attn_backward(q, k, m, z, do, eps, need_dq, need_dk, block_m=None, block_n=None):
    L, B, NK, D = k.shape
    NQ = q.shape[1]
    bm, bn, bd, warps = _blocks(D, block_m, block_n)
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
        q, k, mm, do, z, dqt, delta, L, B, NQ, NK, D, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
        do.stride(0), do.stride(1), do.stride(2), dqt.stride(0), dqt.stride(1),
        HAS_MASK=m is not None, COMPUTE_DQ=need_dq, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        CDT=cdt, ACC=acc, PREC=prec, num_warps=warps)
    if need_dk:
        _attn_bwd_dk_kernel[(triton.cdiv(NK, bn), L * B)](
            q, k, mm, do, z, delta, dk, B, NQ, NK, D, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mm.stride(0),
            do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            HAS_MASK=m is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, CDT=cdt, ACC=acc, PREC=prec,
            num_warps=warps)
    return dq, dk


class ReLUL1AttentionTriton(torch.autograd.Function):
    """Fused forward/backward; saves q, k, z and the mask only."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, eps, block_m, block_n):
        query, keys = _lastdim_contiguous(query), _lastdim_contiguous(keys)
        o, z = _attn_forward(query, keys, mask_u8, eps, block_m, block_n)
        ctx.save_for_backward(query, keys, z, mask_u8)
        ctx.eps, ctx.blocks = eps, (block_m, block_n)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, z, m = ctx.saved_tensors
        dq, dk = _attn_backward(q, k, m, z, do, ctx.eps, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                *ctx.blocks)
        return dq, dk, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Memory-efficient torch path (CPU): same saved state, key-chunked recomputation
# ----------------------------------------------------------------------------------------------------------------
def _chunk(b: int, nq: int, nk: int, chunk: Optional[int]) -> int:
    """Keys per chunk so one (B, Nq, chunk) score block stays around 4M elements."""
    if chunk is None:
        chunk = max(16, (1 << 22) // max(1, b * nq))
    return max(1, min(int(chunk), max(nk, 1)))


def _scores(qf, kc, keep):
    s = torch.bmm(qf, kc.transpose(1, 2))
    if keep is not None:
        s.masked_fill_(~keep[:, None, :], 0)
    return s.clamp_(min=0)


class ReLUL1AttentionEfficient(torch.autograd.Function):
    """Torch ops only, one layer and one key chunk at a time; saves q, k, z and the mask like the fused path."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, eps, chunk):
        L, B, NK, D = keys.shape
        NQ = query.shape[1]
        at = acc_dtype(query.dtype)
        chunk = _chunk(B, NQ, NK, chunk)
        keep = mask_u8.bool() if mask_u8 is not None else None
        qf = query.to(at)
        out = torch.empty((L, B, NQ, D), dtype=query.dtype, device=query.device)
        z = torch.empty((L, B, NQ), dtype=at, device=query.device)
        for l in range(L):
            kl = keys[l].to(at)
            num = torch.zeros((B, NQ, D), dtype=at, device=query.device)
            zl = torch.zeros((B, NQ), dtype=at, device=query.device)
            for c0 in range(0, NK, chunk):
                kc = kl[:, c0:c0 + chunk]
                p = _scores(qf, kc, keep[:, c0:c0 + chunk] if keep is not None else None)
                zl += p.sum(-1)
                num.baddbmm_(p, kc)
            z[l] = zl
            out[l] = (num / zl.clamp(min=eps).unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, keys, z, mask_u8)
        ctx.eps, ctx.chunk = eps, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, z, m = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        L, B, NK, D = k.shape
        at = z.dtype
        chunk, eps = ctx.chunk, ctx.eps
        keep = m.bool() if m is not None else None
        qf = q.to(at)
        c = 1.0 / z.clamp(min=eps)
        dq = torch.zeros(qf.shape, dtype=at, device=q.device) if need_dq else None
        dk = torch.empty_like(k) if need_dk else None
        for l in range(L):
            kl, dol, cl = k[l].to(at), do[l].to(at), c[l]
            dsum = torch.zeros_like(cl)
            for c0 in range(0, NK, chunk):
                kc = kl[:, c0:c0 + chunk]
                p = _scores(qf, kc, keep[:, c0:c0 + chunk] if keep is not None else None)
                dsum += (p * torch.bmm(dol, kc.transpose(1, 2))).sum(-1)
            delta = torch.where(z[l] >= eps, cl * dsum, torch.zeros_like(dsum))
            for c0 in range(0, NK, chunk):
                kc = kl[:, c0:c0 + chunk]
                p = _scores(qf, kc, keep[:, c0:c0 + chunk] if keep is not None else None)
                dv = torch.bmm(dol, kc.transpose(1, 2))
                ds = torch.where(p > 0, cl.unsqueeze(-1) * (dv - delta.unsqueeze(-1)), torch.zeros_like(p))
                if need_dq:
                    dq.baddbmm_(ds, kc)
                if need_dk:
                    g = torch.bmm(ds.transpose(1, 2), qf).baddbmm_((p * cl.unsqueeze(-1)).transpose(1, 2), dol)
                    dk[l, :, c0:c0 + chunk] = g.to(k.dtype)
        return (dq.to(q.dtype) if need_dq else None), dk, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------
def validate(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor], eps: float):
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


def relu_l1_attention_triton(query, keys, key_mask=None, eps: float = 1e-6, block_m=None, block_n=None):
    query, keys, m = validate(query, keys, key_mask, eps)
    check_triton_device(query, keys)
    return ReLUL1AttentionTriton.apply(query, keys, m, float(eps), block_m, block_n)


def relu_l1_attention_efficient(query, keys, key_mask=None, eps: float = 1e-6, chunk: Optional[int] = None):
    query, keys, m = validate(query, keys, key_mask, eps)
    return ReLUL1AttentionEfficient.apply(query, keys, m, float(eps), chunk)
