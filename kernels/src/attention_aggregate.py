"""The cross attention and the confidence aggregation as one op: M = Σ_l α_l (attn_l + T_l).

attn_l = l1norm(relu(A T_lᵀ), padding keys zeroed) · T_l as in cross_attention.py (v = k = T), α (B, L) the
per-sequence layer confidences, and the identity term T_l optional. α depends only on pooled means, never on the
attention, so it is computed first (`confidence_weights`) and handed in; the per-layer outputs then never need
to exist: with c_l,i = 1/max(z_l,i, eps) and P_l = relu(S_l),

    M_b = [α_0 (c_0 ⊙ P_0 + I), …, α_{L-1} (c_{L-1} ⊙ P_{L-1} + I)]_b · [T_0; …; T_{L-1}]_b,

one batched product per group of sequences over all layers' keys at once, the sum over layers and the identity
term (I, when asked for) inside it.

Backward, with G_l = dM T_lᵀ (the same product as the forward scores, dM in place of A):
e_l,i = c_l,i Σ_j P_l,ij G_l,ij (= dM_i · attn_l,i), dα_l = Σ_i e_l,i (+ Σ_i G_l,ii for the identity),
ds_l,ij = [S_l,ij > 0] α_l c_l,i (G_l,ij − [z_l,i ≥ eps] e_l,i), dA = Σ_l ds_l T_l (one product over all layers),
dT_l = ds_lᵀ A + (α_l (c_l ⊙ P_l + I))ᵀ dM.
Saved for backward: A, the keys (their batch-major copy, which the forward makes anyway, in place of the caller's
layer-major ones), z and α, and none of the (L, B, N, d) per-layer outputs that attention + aggregation as two
ops keep between them. The scores are computed again in backward: keeping them (B·Nq·L·Nk fp32) cut a 64- or
128-token side network by 2-7 % for 6-13 % more saved bytes, and no step-level gain showed above the noise.

On the CPU this replaces 2 + 5 products per layer group (each (B·L) small ones against a query broadcast over
the layers) by the same FLOPs in a few products L times wider, and drops the per-layer outputs and their passes.
Where one sequence's scores over all layers exceed the budget, and on CUDA, the op is the cross attention
(key-chunked torch or the fused Triton kernels) followed by the weighted sum.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, common_float_dtype
from .cross_attention import relu_l1_attention_efficient, relu_l1_attention_triton
from .cross_attention import validate as validate_attention


def validate(query, keys, key_mask, alpha, identity, eps):
    """The cross attention's checks, then α's; returns (query, keys, mask as uint8 or None, alpha)."""
    query, keys, mask = validate_attention(query, keys, key_mask, eps, False)
    L, B = keys.shape[0], keys.shape[1]
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (B, L):
        raise ValueError(f"alpha must be the (B, L) = {(B, L)} layer confidences (kernels.confidence_weights), "
                         f"got shape {tuple(getattr(alpha, 'shape', ()))}")
    if alpha.device != query.device:
        raise ValueError(f"alpha is on {alpha.device} but query is on {query.device}; move them to one device")
    if not isinstance(identity, bool):
        raise ValueError(f"identity must be True or False, got {identity!r}")
    if identity and query.shape[1] != keys.shape[2]:
        raise ValueError(f"identity=True adds each query row's own keys, so Nq must equal Nk; got Nq = "
                         f"{query.shape[1]}, Nk = {keys.shape[2]} (pass identity=False)")
    common_float_dtype([query, alpha], "query and alpha")
    return query, keys, mask, alpha


# One group's scores over all layers: below glibc's 32 MiB mmap cap (host_memory), so the three score-sized buffers
# of the backward come from reused pages. 32 MiB groups took 0.32 of the frozen forward at 256 tokens, 16 MiB 0.30.
GROUP_SCORE_BYTES = 16 << 20


def sequences_per_group(L: int, B: int, nq: int, nk: int, element_bytes: int = 4) -> int:
    """How many sequences' scores over all layers one product holds within the budget; 0 when one alone is larger."""
    return min(B, GROUP_SCORE_BYTES // max(1, L * nq * nk * element_bytes))


def _groups(B: int, rows: int):
    for b0 in range(0, B, rows):
        yield b0, min(B, b0 + rows)


def _scores(q: torch.Tensor, kb: torch.Tensor, keep: Optional[torch.Tensor], L: int) -> torch.Tensor:
    """relu(A Tᵀ) over all layers' keys, (G, Nq, L·Nk), padding keys scored 0 (`keep` (G, Nk) is 1 at real keys:
    a multiply by it is one streaming pass, where a broadcast masked_fill_ took ten times as long)."""
    s = torch.bmm(q, kb.transpose(1, 2)).clamp_(min=0)
    if keep is not None:
        s.view(s.shape[0], s.shape[1], L, -1).mul_(keep[:, None, None, :])
    return s


class ReLUL1AttentionAggregateEfficient(torch.autograd.Function):
    """Torch ops, whole sequences per batched product (`rows` at a time), every layer's keys in one product."""

    @staticmethod
    def forward(ctx, query, keys, mask_u8, alpha, identity, eps, rows):
        L, B, NK, D = keys.shape
        NQ = query.shape[1]
        at = acc_dtype(query.dtype)
        kb = keys.permute(1, 0, 2, 3).reshape(B, L * NK, D)  # batch-major: one sequence's keys of every layer
        keep = mask_u8.to(at) if mask_u8 is not None else None
        al = alpha.to(at)
        qf = query.to(at)
        out = torch.empty((B, NQ, D), dtype=at, device=query.device)
        z = torch.empty((B, NQ, L), dtype=at, device=query.device)
        for b0, b1 in _groups(B, rows):
            kg = kb[b0:b1].to(at)
            s = _scores(qf[b0:b1], kg, keep[b0:b1] if keep is not None else None, L)
            s4 = s.view(b1 - b0, NQ, L, NK)
            z[b0:b1] = zg = s4.sum(-1)
            s4.mul_((al[b0:b1, None, :] / zg.clamp(min=eps)).unsqueeze(-1))  # α_l c_l,i P_l,ij
            if identity:  # + α_l on the diagonal: Σ_l α_l T_l,i comes out of the same product
                s4.diagonal(dim1=1, dim2=3).add_(al[b0:b1, :, None])
            torch.bmm(s, kg, out=out[b0:b1])
        ctx.save_for_backward(query, kb, z, alpha, mask_u8)
        ctx.eps, ctx.identity, ctx.rows, ctx.L = eps, identity, rows, L
        return out.to(query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, kb, z, alpha, m = ctx.saved_tensors
        need_dq, need_dk, need_da = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        L, eps = ctx.L, ctx.eps
        B, NQ, D = q.shape
        NK = kb.shape[1] // L
        at = z.dtype
        keep = m.to(at) if m is not None else None
        al = alpha.to(at)
        dm = dout.to(at)
        dq = torch.empty((B, NQ, D), dtype=at, device=q.device) if need_dq else None
        dkb = torch.empty((B, L * NK, D), dtype=at, device=q.device) if need_dk else None
        dal = torch.empty((B, L), dtype=at, device=q.device) if need_da else None
        for b0, b1 in _groups(B, ctx.rows):
            n = b1 - b0
            kg, qg, dmg = kb[b0:b1].to(at), q[b0:b1].to(at), dm[b0:b1]
            p = _scores(qg, kg, keep[b0:b1] if keep is not None else None, L)
            g = torch.bmm(dmg, kg.transpose(1, 2))  # dM_i · T_l,j
            p4, g4 = p.view(n, NQ, L, NK), g.view(n, NQ, L, NK)
            zg = z[b0:b1]
            c = 1.0 / zg.clamp(min=eps)
            e = (p4 * g4).sum(-1).mul_(c)  # (n, Nq, L): dM_i · attn_l,i (mul + sum: twice linalg.vecdot's speed)
            w = al[b0:b1, None, :] * c  # α_l c_l,i
            if need_da:
                dal[b0:b1] = e.sum(1)
                if ctx.identity:  # Σ_i dM_i · T_l,i: the diagonal of G_l
                    dal[b0:b1] += g4.diagonal(dim1=1, dim2=3).sum(-1)
            if not (need_dq or need_dk):
                continue
            g4.sub_(e.masked_fill_(zg < eps, 0).unsqueeze(-1)).mul_(w.unsqueeze(-1))
            ds = torch.ops.aten.threshold_backward(g, p, 0)  # zero where relu(s) = 0 (and at padding keys)
            if need_dq:
                torch.bmm(ds, kg, out=dq[b0:b1])
            if need_dk:
                p4.mul_(w.unsqueeze(-1))
                if ctx.identity:  # the forward's weights, diagonal included: α_l dM_i reaches T_l,i
                    p4.diagonal(dim1=1, dim2=3).add_(al[b0:b1, :, None])
                torch.bmm(ds.transpose(1, 2), qg, out=dkb[b0:b1]).baddbmm_(p.transpose(1, 2), dmg)
        # layer-major and contiguous: the other gradients of the keys (their means' for the gate) add to it fast
        dkeys = dkb.view(B, L, NK, D).transpose(0, 1).to(kb.dtype, memory_format=torch.contiguous_format) \
            if need_dk else None
        return ((dq.to(q.dtype) if need_dq else None), dkeys, None,
                (dal.to(alpha.dtype) if need_da else None), None, None, None)


def _weighted(attn: torch.Tensor, keys: torch.Tensor, alpha: torch.Tensor, identity: bool) -> torch.Tensor:
    merged = attn + keys if identity else attn
    return torch.einsum("bl,lbnd->bnd", alpha.to(merged.dtype), merged)


def relu_l1_attention_aggregate_efficient(query, keys, mask_u8, alpha, identity: bool, eps: float = 1e-6):
    """The torch path; inputs as `validate` returns them. All layers per product where one sequence's scores over
    them fit the budget; otherwise the key-chunked cross attention and the weighted sum."""
    L, B, NK, _ = keys.shape
    rows = sequences_per_group(L, B, query.shape[1], NK, acc_dtype(query.dtype).itemsize)
    if rows > 0:
        return ReLUL1AttentionAggregateEfficient.apply(query, keys, mask_u8, alpha, bool(identity), float(eps),
                                                       rows)
    return _weighted(relu_l1_attention_efficient(query, keys, mask_u8, eps), keys, alpha, identity)


def relu_l1_attention_aggregate_triton(query, keys, mask_u8, alpha, identity: bool, eps: float = 1e-6):
    """The fused cross-attention kernels, then the weighted sum over layers."""
    return _weighted(relu_l1_attention_triton(query, keys, mask_u8, eps), keys, alpha, identity)
