"""Plain torch references for the side-network ops.

These are the paper's equations written directly (materialising every intermediate); every fused or
memory-efficient path in this package is tested against them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def grouped_projection_reference(
    hidden_states: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    norm_weights: Optional[Sequence[torch.Tensor]] = None,
    norm_biases: Optional[Sequence[torch.Tensor]] = None,
    pre_activation: str = "none",
    norm: str = "layernorm",
    eps: float = 1e-5,
) -> torch.Tensor:
    """T_i = norm(W_i act(h_i) + b_i) for every tapped layer, stacked to (L, B, N, d)."""
    out = []
    for i, h in enumerate(hidden_states):
        x = F.relu(h) if pre_activation == "relu" else h
        t = F.linear(x, weights[i], biases[i])
        if norm == "layernorm":
            t = F.layer_norm(t, t.shape[-1:], norm_weights[i], norm_biases[i], eps)
        elif norm != "none":
            raise ValueError(f"norm must be 'layernorm' or 'none', got {norm!r}")
        out.append(t)
    return torch.stack(out, 0)


def causal_visibility(nq: int, nk: int, device=None) -> torch.Tensor:
    """(Nq, Nk) bool: query row i sees key j when j ≤ i + Nk − Nq (bottom-right aligned; Nq = Nk: j ≤ i)."""
    rows = torch.arange(nq, device=device)[:, None]
    return torch.arange(nk, device=device)[None, :] <= rows + (nk - nq)


def relu_l1_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    causal: bool = False,
) -> torch.Tensor:
    """o = l1norm(relu(q kᵀ) with padding keys zeroed) · k, for every layer's keys.

    query (B, Nq, d) is shared by all layers; keys (L, B, Nk, d) are also the values (UniPT uses v = k).
    causal: query row i reads only keys j ≤ i + Nk − Nq (the L1 normaliser and its eps clamp over those keys).
    """
    scores = torch.einsum("bqd,lbkd->lbqk", query, keys)
    keep = key_mask.bool()[:, None, :] if key_mask is not None else None  # (B, 1, Nk)
    if causal:
        vis = causal_visibility(query.shape[1], keys.shape[2], query.device)[None]
        keep = vis if keep is None else keep & vis
    if keep is not None:
        scores = scores * keep[None].to(scores.dtype)
    p = torch.relu(scores)
    z = p.sum(-1, keepdim=True)
    weights = p / z.clamp(min=eps)
    return torch.einsum("lbqk,lbkd->lbqd", weights, keys)


def relu_l1_attention_aggregate_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    alpha: torch.Tensor,
    identity: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """M = Σ_l α_l (o_l + T_l): the cross attention of every layer (plus its keys with identity=True), weighted
    by the (B, L) layer confidences α and summed over layers → (B, Nq, d)."""
    merged = relu_l1_attention_reference(query, keys, key_mask, eps)
    if identity:
        merged = merged + keys
    return torch.einsum("bl,lbqd->bqd", alpha, merged)


def _gate_softmax(anchor, layer_means, gate_weight, gate_bias) -> torch.Tensor:
    scores = F.linear(anchor[None] * layer_means, gate_weight.reshape(1, -1), gate_bias.reshape(1))
    return torch.softmax(scores.squeeze(-1), dim=0)  # (L, B) per sequence or (L, B, N) per position


def confidence_aggregate_reference(
    anchor: torch.Tensor,
    layer_means: torch.Tensor,
    merged: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> torch.Tensor:
    """M = Σ_i softmax_i(g(a ⊙ mean_i)) M_i with g = Linear(d→1) shared over layers.

    Per sequence: anchor (B, d), layer_means (L, B, d) — one α per sample.
    Per position (the causal form): anchor (B, N, d) and layer_means (L, B, N, d) hold prefix means, and α is
    one softmax over layers per position. merged (L, B, N, d) → (B, N, d) either way.
    """
    alpha = _gate_softmax(anchor, layer_means, gate_weight, gate_bias)
    if alpha.dim() == 2:
        alpha = alpha[:, :, None]
    return (alpha[..., None] * merged).sum(0)


def confidence_weights_reference(anchor, layer_means, gate_weight, gate_bias) -> torch.Tensor:
    """The per-layer confidences α, (B, L) per sequence or (B, N, L) per position, for inspection and logging."""
    return _gate_softmax(anchor, layer_means, gate_weight, gate_bias).movedim(0, -1)


def prefix_mean_reference(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal masked mean over the token axis (-2): out_t = Σ_{s≤t} m_s x_s / max(Σ_{s≤t} m_s, 1).

    x (..., B, N, d), mask (B, N) or None (every token real).
    """
    if mask is None:
        m = torch.ones(x.shape[-2], 1, dtype=x.dtype, device=x.device)
    else:
        m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).cumsum(-2) / m.cumsum(-2).clamp(min=1.0)
