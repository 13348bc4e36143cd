"""Confidence aggregation: M = Σ_i α_i M_i with α = softmax_i(g(a ⊙ mean_i)), g = Linear(d → 1).

Forward is one kernel over (token block, batch): each program recomputes the L gate scores of its sample
(L·d multiply-adds, negligible next to its L·BLOCK_N·d tile of merged features), takes the softmax over
layers and streams the weighted sum, so the (L, B, N, d) product α_i·M_i is never formed. α (L·B floats) is
saved for backward.

Backward is one kernel over the same grid that writes dM_i = α_i·dM and, from the same reads of M_i, the
per-tile partial sums of dα_i = Σ_{n,k} dM ⊙ M_i; every cross-program reduction is written as partials (no
atomics, deterministic). A second, tiny launch (one program per sample, O(L·d) work) folds the partials and
runs the softmax and gate backward: dscore = α ⊙ (dα − Σ α dα), da = w ⊙ Σ_i dscore_i mean_i,
dmean_i = dscore_i a ⊙ w, dw = Σ_{i,b} dscore a ⊙ mean_i, db = Σ dscore.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, check_triton_device, common_float_dtype, interpreting, next_pow2, same_device, tl_dtype


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


def _tiles(d: int):
    bd = next_pow2(d, 1)
    bn = 64 if interpreting() else max(1, min(128, 8192 // bd))
    return bn, bd


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


def validate(anchor, layer_means, merged, gate_weight, gate_bias):
    """Shape checks with a fix in every message; casts everything to one floating dtype."""
    for name, t, layout in (("anchor", anchor, "(B, d)"), ("layer_means", layer_means, "(L, B, d)"),
                            ("merged", merged, "(L, B, N, d)")):
        nd = layout.count(",") + 1
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor {layout}, got shape {tuple(getattr(t, 'shape', ()))}")
    L, B, N, D = merged.shape
    if tuple(anchor.shape) != (B, D):
        raise ValueError(f"anchor must be (B, d) = {(B, D)} to match merged {tuple(merged.shape)}, got "
                         f"{tuple(anchor.shape)}")
    if tuple(layer_means.shape) != (L, B, D):
        raise ValueError(f"layer_means must be (L, B, d) = {(L, B, D)} to match merged {tuple(merged.shape)}, got "
                         f"{tuple(layer_means.shape)}")
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
    return anchor.to(dtype), layer_means.to(dtype), merged.to(dtype), gate_weight.to(dtype), gate_bias.to(dtype)


def confidence_aggregate_triton(anchor, layer_means, merged, gate_weight, gate_bias, block_n: Optional[int] = None):
    args = validate(anchor, layer_means, merged, gate_weight, gate_bias)
    check_triton_device(args[2])
    return ConfidenceAggregateTriton.apply(*args, block_n)


def confidence_aggregate_efficient(anchor, layer_means, merged, gate_weight, gate_bias):
    return ConfidenceAggregateEfficient.apply(*validate(anchor, layer_means, merged, gate_weight, gate_bias))
