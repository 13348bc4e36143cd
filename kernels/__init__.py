"""Side-network ops with one dispatch point.

backend: "auto" (fused Triton on CUDA tensors, the memory-efficient torch path elsewhere), "triton" (forces the
Triton kernels; on CPU only under TRITON_INTERPRET=1, set before this package is imported), "efficient"
(torch, chunked recomputation with the fused path's saved-state contract), "reference" (the plain equations
in naive.py). Every backend validates its inputs the same way, so a bad call fails with one ValueError that
names the problem whichever backend runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import aggregation, cross_attention, projection
from .naive import (
    confidence_aggregate_reference,
    confidence_weights_reference,
    grouped_projection_reference,
    relu_l1_attention_reference,
)

BACKENDS = ("auto", "triton", "efficient", "reference")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    return backend


# The attention kernels hold a whole row of d per tile; wider rows go to the chunked torch path under "auto"
# until the kernels loop over d (a tile of 32 x 1024 fp32 accumulators already spills registers).
MAX_FUSED_ATTENTION_DIM = 512


def resolve_backend(backend: str, tensor: torch.Tensor, width: Optional[int] = None) -> str:
    """The implementation a call will use: 'auto' becomes 'triton' for CUDA tensors, else 'efficient'.

    `width` (the attention's d) keeps 'auto' off the fused kernel for rows wider than MAX_FUSED_ATTENTION_DIM.
    """
    _check_backend(backend)
    if backend == "auto":
        if not tensor.is_cuda or (width is not None and width > MAX_FUSED_ATTENTION_DIM):
            return "efficient"
        return "triton"
    return backend


def grouped_projection(hidden_states: Sequence[torch.Tensor], weights, biases, norm_weights=None, norm_biases=None,
                       pre_activation: str = "none", norm: str = "layernorm", eps: float = 1e-5,
                       backend: str = "auto", recompute: bool = False) -> torch.Tensor:
    """T_i = norm(W_i act(h_i) + b_i) for every tapped layer → (L, B, N, d).

    recompute=True (fused/efficient paths) drops the saved pre-norm rows and rebuilds them in backward.
    """
    _check_backend(backend)
    hs, ws, bs, nws, nbs = projection.validate(hidden_states, weights, biases, norm_weights, norm_biases,
                                               pre_activation, norm, eps)
    impl = resolve_backend(backend, hs[0])
    if impl == "reference":
        L = len(hs)
        hs = [h.to(ws[0].dtype) for h in hs]  # the fused paths read mixed dtypes directly
        return grouped_projection_reference(hs, ws, bs, nws or [None] * L, nbs or [None] * L,
                                            pre_activation=pre_activation, norm=norm, eps=eps)
    fn = projection.grouped_projection_triton if impl == "triton" else projection.grouped_projection_efficient
    return fn(hs, ws, bs, nws, nbs, pre_activation=pre_activation, norm=norm, eps=eps, recompute=recompute)


def relu_l1_attention(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                      eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """l1norm(relu(q kᵀ), padding keys zeroed) · k for every layer's keys → (L, B, Nq, d)."""
    _check_backend(backend)
    query, keys, mask = cross_attention.validate(query, keys, key_mask, eps)
    impl = resolve_backend(backend, query, width=query.shape[-1])
    if impl == "reference":
        return relu_l1_attention_reference(query, keys, mask, eps)
    if impl == "triton":
        return cross_attention.relu_l1_attention_triton(query, keys, mask, eps)
    return cross_attention.relu_l1_attention_efficient(query, keys, mask, eps)


def confidence_aggregate(anchor, layer_means, merged, gate_weight, gate_bias, backend: str = "auto") -> torch.Tensor:
    """Σ_i softmax_i(g(a ⊙ mean_i)) M_i → (B, N, d)."""
    _check_backend(backend)
    args = aggregation.validate(anchor, layer_means, merged, gate_weight, gate_bias)
    impl = resolve_backend(backend, args[2])
    if impl == "reference":
        return confidence_aggregate_reference(*args)
    if impl == "triton":
        return aggregation.confidence_aggregate_triton(*args)
    return aggregation.confidence_aggregate_efficient(*args)


confidence_weights = confidence_weights_reference

__all__ = ["BACKENDS", "resolve_backend", "grouped_projection", "relu_l1_attention", "confidence_aggregate",
           "confidence_weights"]
