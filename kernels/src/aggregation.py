"""Confidence aggregation: M = Σ_i α_i M_i with α = softmax_i(g(a ⊙ mean_i)), g = Linear(d → 1).

Two forms, told apart by the anchor's shape:

* per sequence (the paper): anchor a (B, d), layer means (L, B, d), one α per sample (L, B);
* per position (the causal form, shared/unipt-equations.md "Causal form"): a (B, N, d) and the layer means
  (L, B, N, d) are prefix means, so α_·,t is one softmax over layers per position t (L, B, N).

Per sequence, forward is one kernel over (token block, batch): each program recomputes the L gate scores of
its sample (L·d multiply-adds, negligible next to its L·BLOCK_N·d tile of merged features), takes the softmax
over layers and streams the weighted sum, so the (L, B, N, d) product α_i·M_i is never formed. α (L·B floats)
is saved for backward. Backward is one kernel over the same grid that writes dM_i = α_i·dM and, from the same
reads of M_i, the per-tile partial sums of dα_i = Σ_{n,k} dM ⊙ M_i; every cross-program reduction is written as
partials (no atomics, deterministic). A second, tiny launch (one program per sample, O(L·d) work) folds the
partials and runs the softmax and gate backward: dscore = α ⊙ (dα − Σ α dα), da = w ⊙ Σ_i dscore_i mean_i,
dmean_i = dscore_i a ⊙ w, dw = Σ_{i,b} dscore a ⊙ mean_i, db = Σ dscore.

Per position, the forward is one pass over the layers per (token block, batch) with an online softmax (running
max and sum per row, the accumulator rescaled as in FlashAttention), reading every μ_i and M_i tile once; it
saves the log-sum-exp per position (B·N floats) instead of α. The backward recomputes α_i,t = exp(c_i,t − lse_t)
from the saved inputs in two passes over the layers: the first writes dM_i = α_i·dM and dα_i,t (a transient
(L, B, N) buffer) and sums Σ_i α_i dα_i, the second forms dscore and writes dμ_i, da and per-tile partials of
dw and db (folded in torch: deterministic).

The entry points here take inputs as `validate` returns them; `unipt_scale.kernels.confidence_aggregate` is the
public op, which validates once and picks the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, common_float_dtype, interpreting, next_pow2, same_device, tl_dtype


@triton.jit
def _gate_alpha(a_ptr, mu_ptr, gw_ptr, gb_ptr, b, L, D, s_ab, s_ml, s_mb,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """α_l for one sample b; also returns the loaded operands for the backward."""
    lays = tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    l_ok = lays < L
    d_ok = dims < D
    a = tl.load(a_ptr + b * s_ab + dims, mask=d_ok, other=0.0).to(ACC)
    w = tl.load(gw_ptr + dims, mask=d_ok, other=0.0).to(ACC)
    mu = tl.load(mu_ptr + lays[:, None].to(tl.int64) * s_ml + b * s_mb + dims[None, :],
                 mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    score = tl.sum(mu * (a * w)[None, :], axis=1) + tl.load(gb_ptr).to(ACC)
    score = tl.where(l_ok, score, -float("inf"))
    e = tl.where(l_ok, tl.exp(score - tl.max(score, axis=0)), 0.0)
    return e / tl.sum(e, axis=0), a, w, mu


@triton.jit
def _agg_fwd_kernel(a_ptr, mu_ptr, x_ptr, gw_ptr, gb_ptr, out_ptr, alpha_ptr,
                    L, B, N, D, s_ab, s_ml, s_mb, s_xl, s_xb, s_xn, s_ob, s_on,
                    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    alpha, a, w, mu = _gate_alpha(a_ptr, mu_ptr, gw_ptr, gb_ptr, b, L, D, s_ab, s_ml, s_mb,
                                  BLOCK_L, BLOCK_D, ACC)
    lays = tl.arange(0, BLOCK_L)
    if pid_n == 0:
        tl.store(alpha_ptr + lays * B + b, alpha, mask=lays < L)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (dims < D)[None, :]
    x_ptrs = x_ptr + b * s_xb + rows[:, None] * s_xn + dims[None, :]  # advanced one layer per iteration
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for l in range(0, L):
        al = tl.sum(tl.where(lays == l, alpha, 0.0), axis=0)
        acc += al * tl.load(x_ptrs, mask=ok, other=0.0).to(ACC)
        x_ptrs += s_xl
    tl.store(out_ptr + b * s_ob + rows[:, None] * s_on + dims[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _agg_bwd_kernel(x_ptr, g_ptr, alpha_ptr, dx_ptr, part_ptr,
                    L, B, N, D, NB, s_xl, s_xb, s_xn, s_gb, s_gn, s_dl, s_db, s_dn,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (dims < D)[None, :]
    g = tl.load(g_ptr + b * s_gb + rows[:, None] * s_gn + dims[None, :], mask=ok, other=0.0).to(ACC)
    x_ptrs = x_ptr + b * s_xb + rows[:, None] * s_xn + dims[None, :]  # both advanced one layer per iteration
    dx_ptrs = dx_ptr + b * s_db + rows[:, None] * s_dn + dims[None, :]
    for l in range(0, L):
        al = tl.load(alpha_ptr + l * B + b)
        x = tl.load(x_ptrs, mask=ok, other=0.0).to(ACC)
        tl.store(dx_ptrs, (al * g).to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(part_ptr + (b * NB + pid_n) * L + l, tl.sum(tl.sum(g * x, axis=1), axis=0))
        x_ptrs += s_xl
        dx_ptrs += s_dl


@triton.jit
def _agg_bwd_gate_kernel(part_ptr, alpha_ptr, a_ptr, mu_ptr, gw_ptr, da_ptr, dmu_ptr, dgw_ptr, dgb_ptr,
                         L, B, D, NB, s_ab, s_ml, s_mb, s_dab, s_dml, s_dmb,
                         BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lays = tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    l_ok = lays < L
    d_ok = dims < D
    dal = tl.zeros((BLOCK_L,), dtype=ACC)
    for p0 in range(0, NB, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        t = tl.load(part_ptr + (b * NB + ps)[:, None] * L + lays[None, :],
                    mask=(ps < NB)[:, None] & l_ok[None, :], other=0.0)
        dal += tl.sum(t, axis=0)
    alpha = tl.load(alpha_ptr + lays * B + b, mask=l_ok, other=0.0)
    dscore = alpha * (dal - tl.sum(alpha * dal, axis=0))
    a = tl.load(a_ptr + b * s_ab + dims, mask=d_ok, other=0.0).to(ACC)
    w = tl.load(gw_ptr + dims, mask=d_ok, other=0.0).to(ACC)
    mu = tl.load(mu_ptr + lays[:, None].to(tl.int64) * s_ml + b * s_mb + dims[None, :],
                 mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    g_mu = tl.sum(dscore[:, None] * mu, axis=0)
    tl.store(da_ptr + b * s_dab + dims, (g_mu * w).to(da_ptr.dtype.element_ty), mask=d_ok)
    tl.store(dmu_ptr + lays[:, None].to(tl.int64) * s_dml + b * s_dmb + dims[None, :],
             (dscore[:, None] * (a * w)[None, :]).to(dmu_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])
    tl.store(dgw_ptr + b * D + dims, g_mu * a, mask=d_ok)
    tl.store(dgb_ptr + b, tl.sum(dscore, axis=0))


@triton.jit
def _aggp_fwd_kernel(a_ptr, mu_ptr, x_ptr, gw_ptr, gb_ptr, out_ptr, lse_ptr,
                     L, N, D, s_ab, s_an, s_ml, s_mb, s_mn, s_xl, s_xb, s_xn, s_ob, s_on,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ok = row_ok[:, None] & (dims < D)[None, :]
    a = tl.load(a_ptr + b * s_ab + rows[:, None] * s_an + dims[None, :], mask=ok, other=0.0).to(ACC)
    aw = a * tl.load(gw_ptr + dims, mask=dims < D, other=0.0).to(ACC)[None, :]
    bias = tl.load(gb_ptr).to(ACC)
    mu_ptrs = mu_ptr + b * s_mb + rows[:, None] * s_mn + dims[None, :]  # advanced one layer per iteration
    x_ptrs = x_ptr + b * s_xb + rows[:, None] * s_xn + dims[None, :]
    run_max = tl.full((BLOCK_N,), -float("inf"), dtype=ACC)
    run_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for l in range(0, L):
        score = tl.sum(tl.load(mu_ptrs, mask=ok, other=0.0).to(ACC) * aw, axis=1) + bias
        new_max = tl.maximum(run_max, score)
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(score - new_max)
        run_sum = run_sum * rescale + e
        acc = acc * rescale[:, None] + e[:, None] * tl.load(x_ptrs, mask=ok, other=0.0).to(ACC)
        run_max = new_max
        mu_ptrs += s_ml
        x_ptrs += s_xl
    tl.store(out_ptr + b * s_ob + rows[:, None] * s_on + dims[None, :],
             (acc / run_sum[:, None]).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(lse_ptr + b * N + rows, run_max + tl.log(run_sum), mask=row_ok)


@triton.jit
def _aggp_bwd_kernel(a_ptr, mu_ptr, x_ptr, gw_ptr, gb_ptr, lse_ptr, g_ptr, dal_ptr,
                     dx_ptr, dmu_ptr, da_ptr, dgw_ptr, dgb_ptr,
                     L, B, N, D, NB, s_ab, s_an, s_ml, s_mb, s_mn, s_xl, s_xb, s_xn, s_gb, s_gn,
                     s_dxl, s_dxb, s_dxn, s_dml, s_dmb, s_dmn, s_dab, s_dan,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    ok = row_ok[:, None] & d_ok[None, :]
    a = tl.load(a_ptr + b * s_ab + rows[:, None] * s_an + dims[None, :], mask=ok, other=0.0).to(ACC)
    w = tl.load(gw_ptr + dims, mask=d_ok, other=0.0).to(ACC)
    aw = a * w[None, :]
    bias = tl.load(gb_ptr).to(ACC)
    lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + b * s_gb + rows[:, None] * s_gn + dims[None, :], mask=ok, other=0.0).to(ACC)
    mu_off = b * s_mb + rows[:, None] * s_mn + dims[None, :]
    x_ptrs = x_ptr + b * s_xb + rows[:, None] * s_xn + dims[None, :]
    dx_ptrs = dx_ptr + b * s_dxb + rows[:, None] * s_dxn + dims[None, :]
    dal_ptrs = dal_ptr + b * N + rows  # (L, B, N) scratch, advanced by B·N per layer
    # pass 1: α_i = exp(c_i − lse), dM_i = α_i dM, dα_i = Σ_k dM ⊙ M_i, and Σ_i α_i dα_i
    mu_ptrs = mu_ptr + mu_off
    dot_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    for l in range(0, L):
        alpha = tl.exp(tl.sum(tl.load(mu_ptrs, mask=ok, other=0.0).to(ACC) * aw, axis=1) + bias - lse)
        dal = tl.sum(g * tl.load(x_ptrs, mask=ok, other=0.0).to(ACC), axis=1)
        tl.store(dx_ptrs, (alpha[:, None] * g).to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dal_ptrs, dal, mask=row_ok)
        dot_sum += alpha * dal
        mu_ptrs += s_ml
        x_ptrs += s_xl
        dx_ptrs += s_dxl
        dal_ptrs += B * N
    # pass 2: dscore_i = α_i (dα_i − Σ α dα); dμ_i = dscore_i a ⊙ w; Σ_i dscore_i μ_i for da and dw
    mu_ptrs = mu_ptr + mu_off
    dmu_ptrs = dmu_ptr + b * s_dmb + rows[:, None] * s_dmn + dims[None, :]
    dal_ptrs = dal_ptr + b * N + rows
    g_mu = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for l in range(0, L):
        mu = tl.load(mu_ptrs, mask=ok, other=0.0).to(ACC)
        alpha = tl.exp(tl.sum(mu * aw, axis=1) + bias - lse)
        dscore = tl.where(row_ok, alpha * (tl.load(dal_ptrs, mask=row_ok, other=0.0) - dot_sum), 0.0)
        tl.store(dmu_ptrs, (dscore[:, None] * aw).to(dmu_ptr.dtype.element_ty), mask=ok)
        g_mu += dscore[:, None] * mu
        db += dscore
        mu_ptrs += s_ml
        dmu_ptrs += s_dml
        dal_ptrs += B * N
    tl.store(da_ptr + b * s_dab + rows[:, None] * s_dan + dims[None, :],
             (g_mu * w[None, :]).to(da_ptr.dtype.element_ty), mask=ok)
    part = b * NB + pid_n
    tl.store(dgw_ptr + part * D + dims, tl.sum(g_mu * a, axis=0), mask=d_ok)
    tl.store(dgb_ptr + part, tl.sum(db, axis=0))


def _tiles(d: int, per_position: bool = False):
    """(BLOCK_N, BLOCK_D): a whole row of d per tile. Per position the backward holds five (BLOCK_N, d) fp32
    tiles (a, a⊙w, dM, μ, Σ dscore μ), so its tiles hold 2048 elements (compiled for sm_90 with 4 warps, 4096
    spill registers at d ≤ 128, 2048 do not)."""
    bd = next_pow2(d, 1)
    if interpreting():
        return 64, bd
    return max(1, min(128, (2048 if per_position else 8192) // bd)), bd


class ConfidenceAggregateTriton(torch.autograd.Function):
    """Saves the inputs (merged is held by the caller anyway) and α (L·B floats)."""

    @staticmethod
    def forward(ctx, anchor, means, merged, gate_w, gate_b, block_n):
        L, B, N, D = merged.shape
        at = acc_dtype(merged.dtype)
        bn, bd = _tiles(D)
        bn = block_n or bn
        if merged.stride(-1) != 1:
            merged = merged.contiguous()
        anchor, means = anchor.contiguous(), means.contiguous()
        gw, gb = gate_w.reshape(-1).contiguous(), gate_b.reshape(-1).contiguous()
        out = torch.empty((B, N, D), dtype=merged.dtype, device=merged.device)
        alpha = torch.empty((L, B), dtype=at, device=merged.device)
        if B > 0:
            _agg_fwd_kernel[(max(1, triton.cdiv(N, bn)), B)](
                anchor, means, merged, gw, gb, out, alpha, L, B, N, D,
                anchor.stride(0), means.stride(0), means.stride(1),
                merged.stride(0), merged.stride(1), merged.stride(2), out.stride(0), out.stride(1),
                BLOCK_L=next_pow2(L, 1), BLOCK_N=bn, BLOCK_D=bd, ACC=tl_dtype(at), num_warps=4)
        ctx.save_for_backward(anchor, means, merged, gw, gb, alpha)
        ctx.bn, ctx.gshape = bn, (gate_w.shape, gate_b.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        anchor, means, merged, gw, gb, alpha = ctx.saved_tensors
        L, B, N, D = merged.shape
        at = alpha.dtype
        bn, bd = ctx.bn, next_pow2(D, 1)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        nb = max(1, triton.cdiv(N, bn))
        dmerged = torch.empty_like(merged)
        part = torch.empty((B, nb, L), dtype=at, device=merged.device)
        if N == 0:
            part.zero_()
        danchor = torch.empty_like(anchor)
        dmeans = torch.empty_like(means)
        dgw = torch.empty((B, D), dtype=at, device=merged.device)
        dgb = torch.empty((B,), dtype=at, device=merged.device)
        if B > 0:
            if N > 0:
                _agg_bwd_kernel[(nb, B)](
                    merged, dout, alpha, dmerged, part, L, B, N, D, nb,
                    merged.stride(0), merged.stride(1), merged.stride(2), dout.stride(0), dout.stride(1),
                    dmerged.stride(0), dmerged.stride(1), dmerged.stride(2),
                    BLOCK_N=bn, BLOCK_D=bd, ACC=tl_dtype(at), num_warps=4)
            _agg_bwd_gate_kernel[(B,)](
                part, alpha, anchor, means, gw, danchor, dmeans, dgw, dgb, L, B, D, nb,
                anchor.stride(0), means.stride(0), means.stride(1),
                danchor.stride(0), dmeans.stride(0), dmeans.stride(1),
                BLOCK_L=next_pow2(L, 1), BLOCK_P=min(64, next_pow2(nb, 1)), BLOCK_D=bd, ACC=tl_dtype(at),
                num_warps=4)
        wshape, bshape = ctx.gshape
        return (danchor, dmeans, dmerged, dgw.sum(0).to(gw.dtype).reshape(wshape),
                dgb.sum().to(gb.dtype).reshape(bshape), None)


class ConfidenceAggregateEfficient(torch.autograd.Function):
    """Torch ops, one layer at a time: never forms the (L, B, N, d) product; saves the inputs and α."""

    @staticmethod
    def forward(ctx, anchor, means, merged, gate_w, gate_b):
        at = acc_dtype(merged.dtype)
        w, bias = gate_w.reshape(-1).to(at), gate_b.reshape(-1).to(at)
        scores = (anchor.to(at)[None] * means.to(at)) @ w + bias  # (L, B)
        alpha = torch.softmax(scores, dim=0)
        out = torch.zeros(merged.shape[1:], dtype=at, device=merged.device)
        for l in range(merged.shape[0]):
            out += alpha[l, :, None, None] * merged[l].to(at)
        ctx.save_for_backward(anchor, means, merged, gate_w, gate_b, alpha)
        return out.to(merged.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        anchor, means, merged, gate_w, gate_b, alpha = ctx.saved_tensors
        at = alpha.dtype
        g = dout.to(at)
        dmerged = torch.empty_like(merged)
        dal = torch.empty_like(alpha)
        for l in range(merged.shape[0]):
            dmerged[l] = (alpha[l, :, None, None] * g).to(merged.dtype)
            dal[l] = (g * merged[l].to(at)).sum((1, 2))
        dscore = alpha * (dal - (alpha * dal).sum(0, keepdim=True))  # (L, B)
        a, mu, w = anchor.to(at), means.to(at), gate_w.reshape(-1).to(at)
        g_mu = torch.einsum("lb,lbd->bd", dscore, mu)
        danchor = (g_mu * w).to(anchor.dtype)
        dmeans = (dscore[:, :, None] * (a * w)[None]).to(means.dtype)
        dgw = (g_mu * a).sum(0).to(gate_w.dtype).reshape(gate_w.shape)
        dgb = dscore.sum().to(gate_b.dtype).reshape(gate_b.shape)
        return danchor, dmeans, dmerged, dgw, dgb


class ConfidenceAggregatePositionTriton(torch.autograd.Function):
    """Per-position α: saves the inputs and the log-sum-exp per position (B·N floats); α is recomputed."""

    @staticmethod
    def forward(ctx, anchor, means, merged, gate_w, gate_b, block_n):
        L, B, N, D = merged.shape
        at = acc_dtype(merged.dtype)
        bn, bd = _tiles(D, per_position=True)
        bn = block_n or bn
        merged, anchor, means = (_unit_stride(t) for t in (merged, anchor, means))
        gw, gb = gate_w.reshape(-1).contiguous(), gate_b.reshape(-1).contiguous()
        out = torch.empty((B, N, D), dtype=merged.dtype, device=merged.device)
        lse = torch.empty((B, N), dtype=at, device=merged.device)
        if B > 0 and N > 0:
            _aggp_fwd_kernel[(triton.cdiv(N, bn), B)](
                anchor, means, merged, gw, gb, out, lse, L, N, D,
                anchor.stride(0), anchor.stride(1), means.stride(0), means.stride(1), means.stride(2),
                merged.stride(0), merged.stride(1), merged.stride(2), out.stride(0), out.stride(1),
                BLOCK_N=bn, BLOCK_D=bd, ACC=tl_dtype(at), num_warps=4)
        ctx.save_for_backward(anchor, means, merged, gw, gb, lse)
        ctx.bn, ctx.gshape = bn, (gate_w.shape, gate_b.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        anchor, means, merged, gw, gb, lse = ctx.saved_tensors
        L, B, N, D = merged.shape
        at = lse.dtype
        bn, bd = ctx.bn, next_pow2(D, 1)
        dout = _unit_stride(dout)
        nb = triton.cdiv(N, bn)
        dmerged = torch.empty_like(merged)
        danchor = torch.empty_like(anchor)
        dmeans = torch.empty_like(means)
        dal = torch.empty((L, B, N), dtype=at, device=merged.device)  # transient, not saved
        dgw = torch.zeros((B * nb, D), dtype=at, device=merged.device)
        dgb = torch.zeros((B * nb,), dtype=at, device=merged.device)
        if B > 0 and N > 0:
            _aggp_bwd_kernel[(nb, B)](
                anchor, means, merged, gw, gb, lse, dout, dal, dmerged, dmeans, danchor, dgw, dgb,
                L, B, N, D, nb, anchor.stride(0), anchor.stride(1), means.stride(0), means.stride(1),
                means.stride(2), merged.stride(0), merged.stride(1), merged.stride(2), dout.stride(0),
                dout.stride(1), dmerged.stride(0), dmerged.stride(1), dmerged.stride(2), dmeans.stride(0),
                dmeans.stride(1), dmeans.stride(2), danchor.stride(0), danchor.stride(1),
                BLOCK_N=bn, BLOCK_D=bd, ACC=tl_dtype(at), num_warps=4)
        wshape, bshape = ctx.gshape
        return (danchor, dmeans, dmerged, dgw.sum(0).to(gw.dtype).reshape(wshape),
                dgb.sum().to(gb.dtype).reshape(bshape), None)


def _position_scores(anchor, means, gate_w, gate_b, at):
    """c_i,t = w·(a_t ⊙ μ_i,t) + b → (L, B, N), one layer at a time (no (L, B, N, d) temporary)."""
    aw = anchor.to(at) * gate_w.reshape(-1).to(at)
    bias = gate_b.reshape(()).to(at)
    return torch.stack([(means[l].to(at) * aw).sum(-1) for l in range(means.shape[0])]) + bias, aw


class ConfidenceAggregatePositionEfficient(torch.autograd.Function):
    """Per-position α in torch ops, one layer at a time; saves the inputs and the log-sum-exp (B, N) like the
    fused path (α is recomputed in backward)."""

    @staticmethod
    def forward(ctx, anchor, means, merged, gate_w, gate_b):
        at = acc_dtype(merged.dtype)
        scores, _ = _position_scores(anchor, means, gate_w, gate_b, at)
        lse = torch.logsumexp(scores, dim=0)  # (B, N)
        out = torch.zeros(merged.shape[1:], dtype=at, device=merged.device)
        for l in range(merged.shape[0]):
            out += torch.exp(scores[l] - lse).unsqueeze(-1) * merged[l].to(at)
        ctx.save_for_backward(anchor, means, merged, gate_w, gate_b, lse)
        return out.to(merged.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        anchor, means, merged, gate_w, gate_b, lse = ctx.saved_tensors
        at = lse.dtype
        scores, aw = _position_scores(anchor, means, gate_w, gate_b, at)
        alpha = torch.exp(scores - lse)  # (L, B, N)
        g = dout.to(at)
        dmerged = torch.empty_like(merged)
        dal = torch.empty_like(alpha)
        for l in range(merged.shape[0]):
            dmerged[l] = (alpha[l].unsqueeze(-1) * g).to(merged.dtype)
            dal[l] = (g * merged[l].to(at)).sum(-1)
        dscore = alpha * (dal - (alpha * dal).sum(0, keepdim=True))
        g_mu = torch.zeros_like(aw)
        dmeans = torch.empty_like(means)
        for l in range(means.shape[0]):
            g_mu += dscore[l].unsqueeze(-1) * means[l].to(at)
            dmeans[l] = (dscore[l].unsqueeze(-1) * aw).to(means.dtype)
        w = gate_w.reshape(-1).to(at)
        danchor = (g_mu * w).to(anchor.dtype)
        dgw = (g_mu * anchor.to(at)).sum((0, 1)).to(gate_w.dtype).reshape(gate_w.shape)
        dgb = dscore.sum().to(gate_b.dtype).reshape(gate_b.shape)
        return danchor, dmeans, dmerged, dgw, dgb


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def validate(anchor, layer_means, merged, gate_weight, gate_bias):
    """Shape checks with a fix in every message; casts everything to one floating dtype.

    Returns (anchor, layer_means, merged, gate_weight, gate_bias, per_position): per_position when the anchor
    is (B, N, d) and the layer means (L, B, N, d) — prefix means, one α per position."""
    if not isinstance(merged, torch.Tensor) or merged.dim() != 4:
        raise ValueError(f"merged must be a 4-D tensor (L, B, N, d), got shape {tuple(getattr(merged, 'shape', ()))}")
    L, B, N, D = merged.shape
    if not isinstance(anchor, torch.Tensor) or anchor.dim() not in (2, 3):
        raise ValueError(f"anchor must be a 2-D tensor (B, d) (one gate per sequence) or 3-D (B, N, d) (one per "
                         f"position), got shape {tuple(getattr(anchor, 'shape', ()))}")
    per_position = anchor.dim() == 3
    want_a, want_m = ((B, N, D), (L, B, N, D)) if per_position else ((B, D), (L, B, D))
    form = "(B, N, d)" if per_position else "(B, d)"
    if tuple(anchor.shape) != want_a:
        raise ValueError(f"anchor must be {form} = {want_a} to match merged {tuple(merged.shape)}, got "
                         f"{tuple(anchor.shape)}")
    if not isinstance(layer_means, torch.Tensor) or tuple(layer_means.shape) != want_m:
        mform = "(L, B, N, d)" if per_position else "(L, B, d)"
        hint = (" (per-position weights: the anchor is (B, N, d), so the layer means are prefix means per position)"
                if per_position else "")
        raise ValueError(f"layer_means must be {mform} = {want_m} to match merged {tuple(merged.shape)}, got "
                         f"{tuple(getattr(layer_means, 'shape', ()))}{hint}")
    if not isinstance(gate_weight, torch.Tensor) or gate_weight.numel() != D:
        raise ValueError(f"gate_weight must hold d = {D} values (a Linear(d, 1).weight of shape (1, {D})), got "
                         f"{tuple(getattr(gate_weight, 'shape', ()))}")
    if not isinstance(gate_bias, torch.Tensor) or gate_bias.numel() != 1:
        raise ValueError(f"gate_bias must hold one value (a Linear(d, 1).bias of shape (1,)), got "
                         f"{tuple(getattr(gate_bias, 'shape', ()))}")
    if L == 0:
        raise ValueError("merged has no layers (L = 0); aggregation needs at least one tapped layer")
    same_device([anchor, layer_means, merged, gate_weight, gate_bias], "aggregation inputs")
    dtype = common_float_dtype([anchor, layer_means, merged, gate_weight, gate_bias], "aggregation inputs")
    return (anchor.to(dtype), layer_means.to(dtype), merged.to(dtype), gate_weight.to(dtype), gate_bias.to(dtype),
            per_position)


def confidence_aggregate_triton(anchor, layer_means, merged, gate_weight, gate_bias, per_position: bool = False,
                                block_n: Optional[int] = None):
    """The fused kernels (CUDA tensors, or the CPU interpreter); inputs as `validate` returns them."""
    fn = ConfidenceAggregatePositionTriton if per_position else ConfidenceAggregateTriton
    return fn.apply(anchor, layer_means, merged, gate_weight, gate_bias, block_n)


def confidence_aggregate_efficient(anchor, layer_means, merged, gate_weight, gate_bias, per_position: bool = False):
    """The torch path, one layer at a time; inputs as `validate` returns them."""
    fn = ConfidenceAggregatePositionEfficient if per_position else ConfidenceAggregateEfficient
    return fn.apply(anchor, layer_means, merged, gate_weight, gate_bias)


def validate_prefix_mean(x, mask):
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (..., B, N, d) tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[-3:-1]):
            raise ValueError(f"mask must have shape (B, N) = {tuple(x.shape[-3:-1])}, got "
                             f"{tuple(getattr(mask, 'shape', ()))}; pass the (batch, tokens) padding mask")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"mask must be bool (True = real token) or an integer 0/1 tensor, got {mask.dtype}; "
                             "pass mask.bool()")
        same_device([x, mask], "x and mask")
    return x, mask


def prefix_mean_efficient(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ_{s≤t} m_s x_s / max(Σ_{s≤t} m_s, 1) along the token axis, summed in fp32 for 16-bit inputs (a long
    prefix sum in fp16/bf16 loses the last tokens); O(N·d) like the inputs, nothing (B, N, N)."""
    at = acc_dtype(x.dtype)
    if mask is None:
        count = torch.arange(1, x.shape[-2] + 1, dtype=at, device=x.device).unsqueeze(-1)
        return (x.to(at).cumsum(-2) / count).to(x.dtype)
    m = (mask != 0).to(at).unsqueeze(-1)
    return ((x.to(at) * m).cumsum(-2) / m.cumsum(-2).clamp(min=1.0)).to(x.dtype)
