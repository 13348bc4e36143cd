"""Side-network ops with one dispatch point.

backend: "auto" (fused Triton on CUDA, memory-efficient torch elsewhere), "triton", "efficient", "reference".
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

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


def grouped_projection(hidden_states: Sequence[torch.Tensor], weights, biases, norm_weights=None, norm_biases=None,
                       pre_activation: str = "none", norm: str = "layernorm", eps: float = 1e-5,
                       backend: str = "auto") -> torch.Tensor:
    _check_backend(backend)
    return grouped_projection_reference(hidden_states, weights, biases, norm_weights, norm_biases,
                                        pre_activation=pre_activation, norm=norm, eps=eps)


def relu_l1_attention(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                      eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    _check_backend(backend)
    return relu_l1_attention_reference(query, keys, key_mask, eps)


def confidence_aggregate(anchor, layer_means, merged, gate_weight, gate_bias, backend: str = "auto") -> torch.Tensor:
    _check_backend(backend)
    return confidence_aggregate_reference(anchor, layer_means, merged, gate_weight, gate_bias)


confidence_weights = confidence_weights_reference

__all__ = ["BACKENDS", "grouped_projection", "relu_l1_attention", "confidence_aggregate", "confidence_weights"]
