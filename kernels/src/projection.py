"""Grouped per-layer down-projection: T_i = LayerNorm(W_i act(h_i) + b_i), all tapped layers in one launch.

The layers may have different input widths D_i, so the hidden states are not stacked (that would copy
L·B·N·D elements): each launch reads a table of per-layer base pointers, widths and row strides, and a
program picks its layer from its id (a grouped GEMM). The ReLU pre-activation, bias and LayerNorm run in the
GEMM epilogue when one tile spans the whole output row (d ≤ 256 on GPU); wider rows get a row-wise LayerNorm
launch after the GEMM.

Saved for backward: the hidden states and weights (held by the caller anyway), the stacked bias and LN
weight (L·d), the LN mean/rstd (L·B·N each) and, by default, the pre-norm rows (L·B·N·d, what eager
LayerNorm keeps too). relu(h) is never kept (eager keeps an L·B·N·D copy). With recompute=True the pre-norm
rows are dropped as well and backward rebuilds them with the forward kernel (one more GEMM over h). Then
  1. a row-wise LayerNorm backward writes dy (and per-tile dγ, dβ partials),
  2. a grouped GEMM reduces dW_i = dy_iᵀ act(h_i) over the B·N rows (and db_i),
  3. a grouped GEMM writes dh_i = (dy_i W_i)·[h_i > 0] when the hidden states need gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, dot_policy, interpreting, next_pow2, same_device, tl_dtype


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _proj_fwd_kernel(x_tab, w_tab, k_tab, sx_tab, sw_tab, bias_ptr, gamma_ptr, beta_ptr, y_ptr, pre_ptr,
                     mean_ptr, rstd_ptr, M, N, eps, row_blocks,
                     XDT: tl.constexpr, WDT: tl.constexpr, RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                     FUSE_LN: tl.constexpr, STORE_PRE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = pid // row_blocks
    pid_m = pid % row_blocks
    x_base = tl.load(x_tab + g).to(tl.pointer_type(XDT))
    w_base = tl.load(w_tab + g).to(tl.pointer_type(WDT))
    K = tl.load(k_tab + g)
    sx = tl.load(sx_tab + g)
    sw = tl.load(sw_tab + g)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_base + rows[:, None].to(tl.int64) * sx + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(CDT)
        if RELU:
            x = tl.maximum(x, 0.0)
        w = tl.load(w_base + cols[:, None].to(tl.int64) * sw + kk[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(CDT)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC, out_dtype=ACC)
    gN = g.to(tl.int64) * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + gN + cols, mask=col_ok, other=0.0)[None, :]
    out_rows = g.to(tl.int64) * M + rows
    out_ptrs = y_ptr + out_rows[:, None] * N + cols[None, :]
    if FUSE_LN:
        if STORE_PRE:
            tl.store(pre_ptr + out_rows[:, None] * N + cols[None, :], acc.to(pre_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        mean = tl.sum(tl.where(col_ok[None, :], acc, 0.0), axis=1) / N
        xc = tl.where(col_ok[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        gamma = tl.load(gamma_ptr + gN + cols, mask=col_ok, other=0.0)
        beta = tl.load(beta_ptr + gN + cols, mask=col_ok, other=0.0)
        y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(mean_ptr + out_rows, mean, mask=row_ok)
        tl.store(rstd_ptr + out_rows, rstd, mask=row_ok)
        tl.store(out_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ln_fwd_rows_kernel(pre_ptr, gamma_ptr, beta_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, R, eps,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # rows of the flattened (L·M, N) output
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(ACC)
    mean = tl.sum(pre, axis=1) / N
    xc = tl.where(ok, pre - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    gofs = (rows // M)[:, None] * N + cols[None, :]
    gamma = tl.load(gamma_ptr + gofs, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + gofs, mask=ok, other=0.0)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tl.store(y_ptr + offs, (xc * rstd[:, None] * gamma + beta).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _ln_bwd_rows_kernel(pre_ptr, dout_ptr, gamma_ptr, mean_ptr, rstd_ptr, dy_ptr, dgamma_ptr, dbeta_ptr,
                        M, N, row_blocks, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dy = rstd (γ⊙dT − mean(γ⊙dT) − x̂ mean(γ⊙dT⊙x̂)); per-tile partials of dγ = Σ dT⊙x̂, dβ = Σ dT."""
    pid = tl.program_id(0)
    g = pid // row_blocks
    rb = pid % row_blocks
    local = rb * ROWS + tl.arange(0, ROWS)
    rows = g.to(tl.int64) * M + local
    cols = tl.arange(0, BLOCK_D)
    row_ok = local < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    xhat = tl.where(ok, (pre - mean[:, None]) * rstd[:, None], 0.0)
    dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(ACC)
    gamma = tl.load(gamma_ptr + g.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    gx = dout * gamma[None, :]
    c1 = tl.sum(gx * xhat, axis=1) / N
    c2 = tl.sum(gx, axis=1) / N
    dy = (gx - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=ok)
    part = pid.to(tl.int64) * N + cols
    tl.store(dgamma_ptr + part, tl.sum(dout * xhat, axis=0), mask=col_ok)
    tl.store(dbeta_ptr + part, tl.sum(dout, axis=0), mask=col_ok)


@triton.jit
def _proj_bwd_dw_kernel(x_tab, dw_tab, k_tab, sx_tab, sdw_tab, dy_ptr, db_ptr, M, N, col_blocks,
                        XDT: tl.constexpr, DWDT: tl.constexpr, RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dW_g[n, k] = Σ_rows dy_g[row, n] act(x_g)[row, k], one (n, k) tile per program, reduced over all B·N rows."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = pid // col_blocks
    pid_n = pid % col_blocks
    K = tl.load(k_tab + g)
    k0 = pid_k * BLOCK_K
    if k0 < K:
        x_base = tl.load(x_tab + g).to(tl.pointer_type(XDT))
        dw_base = tl.load(dw_tab + g).to(tl.pointer_type(DWDT))
        sx = tl.load(sx_tab + g)
        sdw = tl.load(sdw_tab + g)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < N
        k_ok = kk < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        dbias = tl.zeros((BLOCK_N,), dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            dy = tl.load(dy_ptr + (g.to(tl.int64) * M + rows)[:, None] * N + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_base + rows[:, None].to(tl.int64) * sx + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(CDT)
            if RELU:
                x = tl.maximum(x, 0.0)
            acc = tl.dot(tl.trans(dy.to(CDT)), x, acc, input_precision=PREC, out_dtype=ACC)
            if HAS_BIAS:
                dbias += tl.sum(dy.to(ACC), axis=0)
        tl.store(dw_base + cols[:, None].to(tl.int64) * sdw + kk[None, :], acc.to(DWDT),
                 mask=col_ok[:, None] & k_ok[None, :])
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(db_ptr + g.to(tl.int64) * N + cols, dbias, mask=col_ok)


@triton.jit
def _proj_bwd_dx_kernel(x_tab, w_tab, dx_tab, k_tab, sx_tab, sw_tab, sdx_tab, dy_ptr, M, N, row_blocks,
                        XDT: tl.constexpr, WDT: tl.constexpr, RELU: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dh_g = (dy_g W_g)·[h_g > 0]; the reduction runs over the output width d."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = pid // row_blocks
    pid_m = pid % row_blocks
    K = tl.load(k_tab + g)
    k0 = pid_k * BLOCK_K
    if k0 < K:
        w_base = tl.load(w_tab + g).to(tl.pointer_type(WDT))
        dx_base = tl.load(dx_tab + g).to(tl.pointer_type(XDT))
        sw = tl.load(sw_tab + g)
        sdx = tl.load(sdx_tab + g)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        kk = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        k_ok = kk < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            dy = tl.load(dy_ptr + (g.to(tl.int64) * M + rows)[:, None] * N + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(CDT)
            w = tl.load(w_base + cols[:, None].to(tl.int64) * sw + kk[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(CDT)
            acc = tl.dot(dy, w, acc, input_precision=PREC, out_dtype=ACC)
        if RELU:
            x_base = tl.load(x_tab + g).to(tl.pointer_type(XDT))
            sx = tl.load(sx_tab + g)
            x = tl.load(x_base + rows[:, None].to(tl.int64) * sx + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.where(x > 0, acc, 0.0)
        tl.store(dx_base + rows[:, None].to(tl.int64) * sdx + kk[None, :], acc.to(XDT),
                 mask=row_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _table(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def _rows(h: torch.Tensor) -> torch.Tensor:
    """(B, N, D) → (B·N, D) with unit stride along D, as a view whenever the layout allows."""
    x = h.reshape(-1, h.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_blocks(n: int, blocks: Optional[dict]):
    blocks = dict(blocks or {})
    bd = next_pow2(n)
    if interpreting():
        bm, bk, fuse_max, warps = 64, 64, 1024, 4
    else:
        bm, bk, fuse_max, warps = 64, 32, 256, (8 if bd >= 256 else 4)
    bn = blocks.get("block_n") or (bd if bd <= fuse_max else 128)
    return blocks.get("block_m") or bm, bn, blocks.get("block_k") or bk, warps


def _bwd_blocks(blocks: Optional[dict]):
    blocks = blocks or {}
    return blocks.get("block_m") or 64, blocks.get("block_n") or 64, blocks.get("block_k") or 64


def _ln_rows(n: int) -> int:
    """Rows per row-wise LayerNorm program: ~4K elements of registers per program on GPU."""
    return 16 if interpreting() else max(1, min(16, 4096 // next_pow2(n)))


def _policy(xdt: torch.dtype, wdt: torch.dtype):
    """Dot operands: 16-bit tensor cores when hidden states and weights share a 16-bit dtype, else fp32/fp64."""
    if torch.float64 in (xdt, wdt):
        return dot_policy(torch.float64)
    return dot_policy(xdt if xdt == wdt else torch.float32)


class _Meta:
    """Non-tensor arguments of one grouped projection call (which optional tensors were given, eps, tiles)."""

    def __init__(self, L, relu, bias_given, layernorm, has_gamma, has_beta, eps, blocks, recompute=False):
        self.L, self.relu, self.bias_given, self.recompute = L, relu, list(bias_given), recompute
        self.has_bias = any(self.bias_given)
        self.layernorm, self.has_gamma, self.has_beta = layernorm, has_gamma, has_beta
        self.eps, self.blocks = float(eps), blocks

    def split(self, tensors):
        """The Function's flat inputs → (hs, ws, biases given, γs, βs)."""
        L = self.L
        hs, ws = list(tensors[:L]), list(tensors[L:2 * L])
        i = 2 * L
        nb = sum(self.bias_given)
        bs = list(tensors[i:i + nb])
        i += nb
        gs = list(tensors[i:i + L]) if self.has_gamma else None
        i += L if self.has_gamma else 0
        betas = list(tensors[i:i + L]) if self.has_beta else None
        return hs, ws, bs, gs, betas

    def stacked(self, bs, gs, betas, N, at, dev):
        """(L, N) bias/γ/β in the accumulation dtype (zeros/ones where a layer has none)."""
        bias = None
        if self.has_bias:
            it = iter(bs)
            bias = torch.stack([next(it).detach().to(at) if g else torch.zeros(N, dtype=at, device=dev)
                                for g in self.bias_given])
        gamma = beta = None
        if self.layernorm:
            gamma = (torch.stack([g.detach().to(at) for g in gs]) if gs is not None
                     else torch.ones((self.L, N), dtype=at, device=dev))
            beta = (torch.stack([b.detach().to(at) for b in betas]) if betas is not None
                    else torch.zeros((self.L, N), dtype=at, device=dev))
        return bias, gamma, beta

    def grads(self, needs, dhs, dws, dbias, dgamma, dbeta, pdt):
        """Gradients in the order of the flat inputs; `needs` is ctx.needs_input_grad without the meta slot."""
        L = self.L
        out = [dhs[i] if dhs is not None and needs[i] else None for i in range(L)]
        out += [dws[i] if dws is not None and needs[L + i] else None for i in range(L)]
        n = 2 * L
        for i, given in enumerate(self.bias_given):
            if given:
                out.append(dbias[i].to(pdt) if needs[n] and dbias is not None else None)
                n += 1
        if self.has_gamma:
            out += [dgamma[i].to(pdt) if needs[n + i] and dgamma is not None else None for i in range(L)]
            n += L
        if self.has_beta:
            out += [dbeta[i].to(pdt) if needs[n + i] and dbeta is not None else None for i in range(L)]
        return out

    def needs(self, needs):
        L = self.L
        nb = sum(self.bias_given)
        need_h = any(needs[:L])
        need_w = any(needs[L:2 * L])
        need_b = any(needs[2 * L:2 * L + nb])
        need_norm = any(needs[2 * L + nb:])
        return need_h, need_w, need_b, need_norm


def _launch_gemm(xs, ws, bias, gamma, beta, out, mean, rstd, meta: _Meta, fuse_ln: bool, tiles, pre=None):
    """Grouped GEMM over all layers: out[g] = act(x_g) W_gᵀ + b_g, with the LayerNorm epilogue if fuse_ln
    (which then also writes the pre-norm rows to `pre` when given)."""
    bm, bn, bk, warps = tiles
    M, N = out.shape[1], out.shape[2]
    dev = out.device
    cdt, acc, prec = _policy(xs[0].dtype, ws[0].dtype)
    row_blocks = triton.cdiv(M, bm)
    dummy = out
    _proj_fwd_kernel[(meta.L * row_blocks, triton.cdiv(N, bn))](
        _table((x.data_ptr() for x in xs), dev), _table((w.data_ptr() for w in ws), dev),
        _table((x.shape[1] for x in xs), dev), _table((x.stride(0) for x in xs), dev),
        _table((w.stride(0) for w in ws), dev),
        bias if bias is not None else dummy, gamma if gamma is not None else dummy,
        beta if beta is not None else dummy, out, pre if pre is not None else dummy,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        M, N, meta.eps, row_blocks,
        XDT=tl_dtype(xs[0].dtype), WDT=tl_dtype(ws[0].dtype), RELU=meta.relu, HAS_BIAS=bias is not None,
        FUSE_LN=fuse_ln, STORE_PRE=pre is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CDT=cdt, ACC=acc,
        PREC=prec, num_warps=warps)


class _Saved:
    """What backward needs, decided in forward from which inputs need gradients.

    h is kept for dW (and for the ReLU mask of dh), W for dh; both, and the bias, only for recompute=True's
    rebuild of the pre-norm rows. With a frozen backbone (no dh) W is not kept at all."""

    def __init__(self, ctx, needs, meta, hs, ws, bias, gamma, mean, rstd, keep, out_dtype):
        need_h, need_w, _, _ = meta.needs(needs)
        recompute = meta.layernorm and keep is None
        keep_x = need_w or recompute or (need_h and meta.relu)
        keep_w = need_h or recompute
        ctx.dims = (hs[0].shape[0], hs[0].shape[1], [h.shape[-1] for h in hs], ws[0].shape[0],
                    hs[0].dtype, ws[0].dtype, out_dtype)
        ctx.save_for_backward(*[h if keep_x else None for h in hs], *[w if keep_w else None for w in ws],
                              bias if recompute else None, gamma, mean, rstd, keep)

    @staticmethod
    def load(ctx, L):
        saved = ctx.saved_tensors
        hs, ws = list(saved[:L]), list(saved[L:2 * L])
        return (hs, ws, *saved[2 * L:], *ctx.dims)


class GroupedProjectionTriton(torch.autograd.Function):
    """Flat inputs: h_0…h_{L-1}, W_0…W_{L-1}, the biases that exist, then γ_i and β_i when given."""

    @staticmethod
    def forward(ctx, meta: _Meta, *tensors):
        L = meta.L
        hs, ws, bs, gs, betas = meta.split(tensors)
        ws = [w if w.stride(-1) == 1 else w.contiguous() for w in ws]
        xs = [_rows(h) for h in hs]
        B, T = hs[0].shape[0], hs[0].shape[1]
        M, N = xs[0].shape[0], ws[0].shape[0]
        out_dtype = torch.promote_types(hs[0].dtype, ws[0].dtype)
        at = acc_dtype(out_dtype)
        dev = hs[0].device
        bias, gamma, beta = meta.stacked(bs, gs, betas, N, at, dev)
        out = torch.empty((L, M, N), dtype=out_dtype, device=dev)
        mean = rstd = keep = None
        if meta.layernorm:
            mean = torch.empty((L, M), dtype=at, device=dev)
            rstd = torch.empty((L, M), dtype=at, device=dev)
            if not meta.recompute:
                keep = torch.empty((L, M, N), dtype=out_dtype, device=dev)
        if M > 0 and N > 0:
            tiles = _fwd_blocks(N, meta.blocks)
            if meta.layernorm:
                fuse = tiles[1] >= N
                if fuse:
                    _launch_gemm(xs, ws, bias, gamma, beta, out, mean, rstd, meta, True, tiles, pre=keep)
                else:
                    pre = keep if keep is not None else (
                        out if out_dtype == at else torch.empty((L, M, N), dtype=at, device=dev))
                    _launch_gemm(xs, ws, bias, None, None, pre, None, None, meta, False, tiles)
                    rows = _ln_rows(N)
                    _ln_fwd_rows_kernel[(triton.cdiv(L * M, rows),)](
                        pre, gamma, beta, out, mean, rstd, M, N, L * M, meta.eps,
                        ROWS=rows, BLOCK_D=next_pow2(N), ACC=tl_dtype(at), num_warps=4)
            else:
                _launch_gemm(xs, ws, bias, None, None, out, None, None, meta, False, tiles)
        elif keep is not None:
            keep.zero_()
        ctx.meta = meta
        _Saved(ctx, ctx.needs_input_grad[1:], meta, hs, ws, bias, gamma, mean, rstd, keep, out_dtype)
        return out.view(L, B, T, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        meta = ctx.meta
        L = meta.L
        hs, ws, bias, gamma, mean, rstd, keep, B, T, widths, N, xdt, wdt, out_dtype = _Saved.load(ctx, L)
        xs = [_rows(h) if h is not None else None for h in hs]
        M = B * T
        dev = dout.device
        at = acc_dtype(out_dtype)
        need_h, need_w, need_b, _ = meta.needs(ctx.needs_input_grad[1:])
        dout = dout.reshape(L, M, N).contiguous()
        empty = M == 0 or N == 0
        dgamma = dbeta = None
        if meta.layernorm:
            dy = torch.empty((L, M, N), dtype=at, device=dev)
            if empty:
                dgamma = dbeta = torch.zeros((L, N), dtype=at, device=dev)
            else:
                pre = keep
                if pre is None:  # recompute the pre-norm rows into dy; the LayerNorm backward then works in place
                    _launch_gemm(xs, ws, bias, None, None, dy, None, None, meta, False, _fwd_blocks(N, meta.blocks))
                    pre = dy
                rows = _ln_rows(N)
                rb = triton.cdiv(M, rows)
                dg = torch.empty((L * rb, N), dtype=at, device=dev)
                dbt = torch.empty((L * rb, N), dtype=at, device=dev)
                _ln_bwd_rows_kernel[(L * rb,)](pre, dout, gamma, mean, rstd, dy, dg, dbt, M, N, rb,
                                               ROWS=rows, BLOCK_D=next_pow2(N), ACC=tl_dtype(at), num_warps=4)
                dgamma, dbeta = dg.view(L, rb, N).sum(1), dbt.view(L, rb, N).sum(1)
        else:
            dy = dout
        cdt, acc, prec = _policy(xdt, wdt)
        bm, bn, bk = _bwd_blocks(meta.blocks)
        kmax = max(widths)
        k_tab = _table(widths, dev)
        dws = dbias = None
        if need_w:
            dws = [torch.empty((N, k), dtype=wdt, device=dev) for k in widths]
            dbias = torch.empty((L, N), dtype=at, device=dev) if meta.has_bias else None
            if empty:
                for t in dws + ([dbias] if dbias is not None else []):
                    t.zero_()
            else:
                col_blocks = triton.cdiv(N, bn)
                _proj_bwd_dw_kernel[(L * col_blocks, triton.cdiv(kmax, bk))](
                    _table((x.data_ptr() for x in xs), dev), _table((t.data_ptr() for t in dws), dev), k_tab,
                    _table((x.stride(0) for x in xs), dev), _table((t.stride(0) for t in dws), dev),
                    dy, dbias if dbias is not None else dy, M, N, col_blocks,
                    XDT=tl_dtype(xdt), DWDT=tl_dtype(wdt), RELU=meta.relu, HAS_BIAS=dbias is not None,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CDT=cdt, ACC=acc, PREC=prec, num_warps=4)
        if need_b and dbias is None:
            dbias = dy.to(at).sum(1)
        dhs = None
        if need_h:
            dxs = [torch.empty((M, k), dtype=xdt, device=dev) for k in widths]
            if empty:
                for t in dxs:
                    t.zero_()
            else:
                row_blocks = triton.cdiv(M, bm)
                w_tab = _table((w.data_ptr() for w in ws), dev)
                sw_tab = _table((w.stride(0) for w in ws), dev)
                relu_src = meta.relu
                _proj_bwd_dx_kernel[(L * row_blocks, triton.cdiv(kmax, bk))](
                    _table((x.data_ptr() for x in xs), dev) if relu_src else w_tab, w_tab,
                    _table((t.data_ptr() for t in dxs), dev), k_tab,
                    _table((x.stride(0) for x in xs), dev) if relu_src else sw_tab, sw_tab,
                    _table((t.stride(0) for t in dxs), dev), dy, M, N, row_blocks,
                    XDT=tl_dtype(xdt), WDT=tl_dtype(wdt), RELU=relu_src,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CDT=cdt, ACC=acc, PREC=prec, num_warps=4)
            dhs = [t.view(B, T, k) for t, k in zip(dxs, widths)]
        return (None, *meta.grads(ctx.needs_input_grad[1:], dhs, dws, dbias, dgamma, dbeta, wdt))


# ----------------------------------------------------------------------------------------------------------------
# Memory-efficient torch path (CPU): same saved state, row-chunked recomputation
# ----------------------------------------------------------------------------------------------------------------
def _row_chunk(width: int, chunk: Optional[int]) -> int:
    return max(1, int(chunk) if chunk else (1 << 21) // max(1, width))


def _pre_norm(x, w, b, relu, at, out=None):
    """act(x) Wᵀ + b in the accumulation dtype for one chunk of rows (into `out` when given)."""
    x = x.to(at)
    if relu:
        x = torch.relu(x)
    w = w.to(at).t()
    if b is None:
        return torch.mm(x, w, out=out)
    return torch.addmm(b, x, w, out=out)


def _write_or_add(into: torch.Tensor, value: torch.Tensor, first: bool) -> None:
    if first:
        into.copy_(value)
    else:
        into.add_(value)


class GroupedProjectionEfficient(torch.autograd.Function):
    """Torch ops, one layer and one chunk of rows at a time; saves what the fused path saves. The GEMM writes the
    pre-norm rows straight into their saved buffer, and LayerNorm runs as torch's one fused op each way."""

    @staticmethod
    def forward(ctx, meta: _Meta, chunk, *tensors):
        L = meta.L
        hs, ws, bs, gs, betas = meta.split(tensors)
        B, T = hs[0].shape[0], hs[0].shape[1]
        M, N = B * T, ws[0].shape[0]
        out_dtype = torch.promote_types(hs[0].dtype, ws[0].dtype)
        at = acc_dtype(out_dtype)
        dev = hs[0].device
        bias, gamma, beta = meta.stacked(bs, gs, betas, N, at, dev)
        out = torch.empty((L, M, N), dtype=out_dtype, device=dev)
        mean = torch.empty((L, M), dtype=at, device=dev) if meta.layernorm else None
        rstd = torch.empty((L, M), dtype=at, device=dev) if meta.layernorm else None
        keep = (torch.empty((L, M, N), dtype=out_dtype, device=dev)
                if meta.layernorm and not meta.recompute else None)
        for g in range(L):
            x = hs[g].reshape(M, -1)
            rc = _row_chunk(max(x.shape[1], N), chunk)
            for r0 in range(0, M, rc):
                r1 = min(M, r0 + rc)
                b = bias[g] if bias is not None else None
                if not meta.layernorm:
                    if out_dtype == at:
                        _pre_norm(x[r0:r1], ws[g], b, meta.relu, at, out=out[g, r0:r1])
                    else:
                        out[g, r0:r1] = _pre_norm(x[r0:r1], ws[g], b, meta.relu, at)
                    continue
                into = keep[g, r0:r1] if keep is not None and out_dtype == at else None
                y = _pre_norm(x[r0:r1], ws[g], b, meta.relu, at, out=into)
                if keep is not None and into is None:
                    keep[g, r0:r1] = y.to(out_dtype)
                if out_dtype == at:  # straight into their buffers
                    torch.ops.aten.native_layer_norm.out(y, (N,), gamma[g], beta[g], meta.eps, out0=out[g, r0:r1],
                                                         out1=mean[g, r0:r1, None], out2=rstd[g, r0:r1, None])
                    continue
                normed, mu, rs = torch.native_layer_norm(y, (N,), gamma[g], beta[g], meta.eps)
                mean[g, r0:r1], rstd[g, r0:r1] = mu.view(-1), rs.view(-1)
                out[g, r0:r1] = normed
        ctx.meta, ctx.chunk = meta, chunk
        _Saved(ctx, ctx.needs_input_grad[2:], meta, hs, ws, bias, gamma, mean, rstd, keep, out_dtype)
        return out.view(L, B, T, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        meta = ctx.meta
        L = meta.L
        hs, ws, bias, gamma, mean, rstd, keep, B, T, widths, N, xdt, wdt, out_dtype = _Saved.load(ctx, L)
        M = B * T
        at = acc_dtype(out_dtype)
        dev = dout.device
        need_h, need_w, need_b, _ = meta.needs(ctx.needs_input_grad[2:])
        dout = dout.reshape(L, M, N)
        # The first chunk of rows writes each gradient, later ones add to it: no zero-filled buffers (with one
        # chunk, the common case, nothing is added at all).
        dws = [torch.empty((N, k), dtype=at, device=dev) for k in widths]
        dbias = torch.empty((L, N), dtype=at, device=dev)
        dgamma = torch.empty((L, N), dtype=at, device=dev)
        dbeta = torch.empty((L, N), dtype=at, device=dev)
        dhs = [torch.empty((B, T, k), dtype=xdt, device=dev) for k in widths] if need_h else None
        for g in range(L):
            x = hs[g].reshape(M, -1) if hs[g] is not None else None
            rc = _row_chunk(max(widths[g], N), ctx.chunk)
            for r0 in range(0, M, rc):
                r1 = min(M, r0 + rc)
                first = r0 == 0
                dt = dout[g, r0:r1].to(at)
                if meta.layernorm:
                    y = (keep[g, r0:r1].to(at) if keep is not None else
                         _pre_norm(x[r0:r1], ws[g], bias[g] if bias is not None else None, meta.relu, at))
                    dy, dg, _ = torch.ops.aten.native_layer_norm_backward(
                        dt, y, (N,), mean[g, r0:r1, None], rstd[g, r0:r1, None], gamma[g], None,
                        [True, True, False])
                    _write_or_add(dgamma[g], dg, first)
                    _write_or_add(dbeta[g], dt.sum(0), first)
                else:
                    dy = dt
                _write_or_add(dbias[g], dy.sum(0), first)
                if need_w:
                    xa = x[r0:r1].to(at)
                    xa = torch.relu(xa) if meta.relu else xa
                    if first:
                        torch.mm(dy.t(), xa, out=dws[g])
                    else:
                        dws[g].addmm_(dy.t(), xa)
                if need_h:
                    dx = dy @ ws[g].to(at)
                    if meta.relu:
                        dx = dx * (x[r0:r1] > 0)
                    dhs[g].view(M, -1)[r0:r1] = dx.to(xdt)
        dws = [d.to(wdt) for d in dws]
        return (None, None, *meta.grads(ctx.needs_input_grad[2:], dhs, dws, dbias, dgamma, dbeta, wdt))


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------
def validate(hidden_states, weights, biases, norm_weights, norm_biases, pre_activation, norm, eps):
    """Checks with a fix in every message; returns normalised lists (biases/norm params may hold None)."""
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:
        hidden_states = list(hidden_states.unbind(0))
    hs = list(hidden_states)
    if not hs:
        raise ValueError("hidden_states is empty; pass one (B, N, D_i) tensor per tapped layer")
    L = len(hs)
    ws = list(weights)
    if len(ws) != L:
        raise ValueError(f"got {L} hidden states but {len(ws)} weights; pass one Linear weight per tapped layer")
    bs = [None] * L if biases is None else list(biases)
    if len(bs) != L:
        raise ValueError(f"got {L} hidden states but {len(bs)} biases; pass one bias (or None) per layer")
    if pre_activation not in ("none", "relu"):
        raise ValueError(f"pre_activation must be 'none' or 'relu', got {pre_activation!r}")
    if norm not in ("layernorm", "none"):
        raise ValueError(f"norm must be 'layernorm' or 'none', got {norm!r}")
    for i, h in enumerate(hs):
        if not isinstance(h, torch.Tensor) or h.dim() != 3:
            raise ValueError(f"hidden_states[{i}] must be (B, N, D_i), got shape {tuple(getattr(h, 'shape', ()))}")
        if h.shape[:2] != hs[0].shape[:2]:
            raise ValueError(f"hidden_states[{i}] has (B, N) = {tuple(h.shape[:2])} but hidden_states[0] has "
                             f"{tuple(hs[0].shape[:2])}; all tapped layers must share batch and token count")
        if h.dtype != hs[0].dtype:
            raise ValueError(f"hidden_states mix dtypes ({hs[0].dtype}, {h.dtype}); cast them to one dtype")
        if not h.is_floating_point():
            raise ValueError(f"hidden_states[{i}] must be floating point, got {h.dtype}")
    d = None
    for i, (h, w) in enumerate(zip(hs, ws)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != h.shape[2]:
            raise ValueError(f"weights[{i}] must be (d, D_i) = (d, {h.shape[2]}) to project hidden_states[{i}], "
                             f"got {tuple(getattr(w, 'shape', ()))}")
        d = w.shape[0] if d is None else d
        if w.shape[0] != d:
            raise ValueError(f"weights[{i}] has output width {w.shape[0]} but weights[0] has {d}; "
                             "all layers project to the same width d")
        if w.dtype != ws[0].dtype:
            raise ValueError(f"weights mix dtypes ({ws[0].dtype}, {w.dtype}); keep the side network in one dtype")
    for what, seq in (("biases", bs),):
        for i, b in enumerate(seq):
            if b is not None and tuple(b.shape) != (d,):
                raise ValueError(f"{what}[{i}] must have shape ({d},), got {tuple(b.shape)}")
    nws = nbs = None
    if norm == "layernorm":
        for what, seq in (("norm_weights", norm_weights), ("norm_biases", norm_biases)):
            if seq is None:
                continue
            seq = list(seq)
            if len(seq) != L or any(t is None or tuple(t.shape) != (d,) for t in seq):
                raise ValueError(f"{what} must hold {L} tensors of shape ({d},) (one LayerNorm per layer), got "
                                 f"{[tuple(t.shape) if t is not None else None for t in seq]}")
        nws = list(norm_weights) if norm_weights is not None else None
        nbs = list(norm_biases) if norm_biases is not None else None
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    same_device(hs + ws + bs + (nws or []) + (nbs or []), "hidden states and projection parameters")
    return hs, ws, bs, nws, nbs


def _flat_inputs(hs, ws, bs, nws, nbs):
    return hs + ws + [b for b in bs if b is not None] + (nws or []) + (nbs or [])


def grouped_projection_triton(hidden_states, weights, biases, norm_weights=None, norm_biases=None,
                              pre_activation: str = "none", norm: str = "layernorm", eps: float = 1e-5,
                              recompute: bool = False, blocks: Optional[dict] = None) -> torch.Tensor:
    """The fused kernels (CUDA tensors, or the CPU interpreter); inputs as `validate` returns them."""
    hs, ws, bs, nws, nbs = hidden_states, weights, biases, norm_weights, norm_biases
    meta = _Meta(len(hs), pre_activation == "relu", [b is not None for b in bs], norm == "layernorm",
                 nws is not None, nbs is not None, eps, blocks, recompute)
    return GroupedProjectionTriton.apply(meta, *_flat_inputs(hs, ws, bs, nws, nbs))


def grouped_projection_efficient(hidden_states, weights, biases, norm_weights=None, norm_biases=None,
                                 pre_activation: str = "none", norm: str = "layernorm", eps: float = 1e-5,
                                 recompute: bool = False, chunk: Optional[int] = None) -> torch.Tensor:
    """The row-chunked torch path; inputs as `validate` returns them."""
    hs, ws, bs, nws, nbs = hidden_states, weights, biases, norm_weights, norm_biases
    meta = _Meta(len(hs), pre_activation == "relu", [b is not None for b in bs], norm == "layernorm",
                 nws is not None, nbs is not None, eps, None, recompute)
    return GroupedProjectionEfficient.apply(meta, chunk, *_flat_inputs(hs, ws, bs, nws, nbs))
