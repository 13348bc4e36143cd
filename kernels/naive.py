"""Plain torch references for the three side-network ops.

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


def relu_l1_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """o = l1norm(relu(q kᵀ) with padding keys zeroed) · k, for every layer's keys.

    query (B, Nq, d) is shared by all layers; keys (L, B, Nk, d) are also the values (UniPT uses v = k).
    """
    scores = torch.einsum("bqd,lbkd->lbqk", query, keys)
    if key_mask is not None:
        scores = scores * key_mask[None, :, None, :].to(scores.dtype)
    p = torch.relu(scores)
    z = p.sum(-1, keepdim=True)
    weights = p / z.clamp(min=eps)
    return torch.einsum("lbqk,lbkd->lbqd", weights, keys)


def confidence_aggregate_reference(
    anchor: torch.Tensor,
    layer_means: torch.Tensor,
    merged: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
) -> torch.Tensor:
    """M = Σ_i softmax_i(g(a ⊙ mean_i)) M_i with g = Linear(d→1) shared over layers.

    anchor (B, d), layer_means (L, B, d), merged (L, B, N, d) → (B, N, d).
    """
    scores = F.linear(anchor[None] * layer_means, gate_weight.reshape(1, -1), gate_bias.reshape(1))  # (L, B, 1)
    alpha = torch.softmax(scores.squeeze(-1), dim=0)  # (L, B)
    return (alpha[:, :, None, None] * merged).sum(0)


def confidence_weights_reference(anchor, layer_means, gate_weight, gate_bias) -> torch.Tensor:
    """The per-layer confidences α (B, L), for inspection and logging."""
    scores = F.linear(anchor[None] * layer_means, gate_weight.reshape(1, -1), gate_bias.reshape(1))
    return torch.softmax(scores.squeeze(-1), dim=0).transpose(0, 1)
