"""Side-network ops with one dispatch point.

backend: "auto" (fused Triton on CUDA tensors, the memory-efficient torch path elsewhere), "triton" (forces the
Triton kernels; on CPU only under TRITON_INTERPRET=1, set before this package is imported), "efficient"
(torch, chunked recomputation with the fused path's saved-state contract), "reference" (the plain equations
in naive.py). The ops below validate their inputs once, before choosing a backend, so a bad call fails with one
ValueError that names the problem whichever backend would run; the backends take validated inputs.

Nothing here reads or sets TRITON_INTERPRET: whether the Triton kernels were built for the interpreter is
decided by the environment of the process that first imports this package.

Causal form (decoder LLMs, shared/unipt-equations.md): `relu_l1_attention(..., causal=True)` lets query row i
read keys j ≤ i + Nk − Nq only; `prefix_mean` gives the prefix means the causal gate uses; and
`confidence_aggregate` with a (B, N, d) anchor and (L, B, N, d) layer means takes one softmax over layers per
position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import aggregation, attention_aggregate, cross_attention, projection
from ._utils import check_triton_device
from .naive import (
    confidence_aggregate_reference,
    confidence_weights_reference,
    grouped_projection_reference,
    prefix_mean_reference,
    relu_l1_attention_aggregate_reference,
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

    `width` (the attention's d) keeps 'auto' off the fused kernel for rows wider than MAX_FUSED_ATTENTION_DIM
    (MAX_FUSED_FP64_DIM for float64).
    """
    _check_backend(backend)
    if backend == "auto":
        limit = (cross_attention.MAX_FUSED_FP64_DIM if getattr(tensor, "dtype", None) == torch.float64
                 else MAX_FUSED_ATTENTION_DIM)
        if not tensor.is_cuda or (width is not None and width > limit):
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
    if impl == "triton":
        check_triton_device(hs[0])
        fn = projection.grouped_projection_triton
    else:
        fn = projection.grouped_projection_efficient
    return fn(hs, ws, bs, nws, nbs, pre_activation=pre_activation, norm=norm, eps=eps, recompute=recompute)


def relu_l1_attention(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                      eps: float = 1e-6, backend: str = "auto", *, causal: bool = False) -> torch.Tensor:
    """l1norm(relu(q kᵀ), padding keys zeroed) · k for every layer's keys → (L, B, Nq, d).

    query (B, Nq, d), keys (L, B, Nk, d) (also the values), key_mask (B, Nk) bool/0-1 or None.
    causal=True: query row i reads only keys j ≤ i + Nk − Nq (Nq = Nk: j ≤ i), the L1 normaliser and its eps
    clamp over those keys; the fused and chunked paths skip the key blocks above the diagonal.
    """
    _check_backend(backend)
    query, keys, mask = cross_attention.validate(query, keys, key_mask, eps, causal)
    impl = resolve_backend(backend, query, width=query.shape[-1])
    if impl == "reference":
        return relu_l1_attention_reference(query, keys, mask, eps, causal)
    if impl == "triton":
        check_triton_device(query, keys)
        return cross_attention.relu_l1_attention_triton(query, keys, mask, eps, causal)
    return cross_attention.relu_l1_attention_efficient(query, keys, mask, eps, causal)


def relu_l1_attention_aggregate(query: torch.Tensor, keys: torch.Tensor, key_mask: Optional[torch.Tensor],
                                alpha: torch.Tensor, identity: bool = True, eps: float = 1e-6,
                                backend: str = "auto") -> torch.Tensor:
    """Σ_l α_l (relu_l1_attention(query, keys)_l + keys_l) → (B, Nq, d): the cross attention and the confidence
    aggregation of the per-sequence form in one op (the identity term with identity=True).

    alpha (B, L) are the layer confidences (`confidence_weights`), computed before the attention: they depend
    only on pooled means. The CPU path runs every layer's keys in one product per group of sequences and never
    forms the (L, B, Nq, d) per-layer outputs; on CUDA it is the fused cross attention and a weighted sum.
    """
    _check_backend(backend)
    query, keys, mask, alpha = attention_aggregate.validate(query, keys, key_mask, alpha, identity, eps)
    impl = resolve_backend(backend, query, width=query.shape[-1])
    if impl == "reference":
        return relu_l1_attention_aggregate_reference(query, keys, mask, alpha, identity, eps)
    if impl == "triton":
        check_triton_device(query, keys)
        return attention_aggregate.relu_l1_attention_aggregate_triton(query, keys, mask, alpha, identity, eps)
    return attention_aggregate.relu_l1_attention_aggregate_efficient(query, keys, mask, alpha, identity, eps)


def confidence_aggregate(anchor, layer_means, merged, gate_weight, gate_bias, backend: str = "auto") -> torch.Tensor:
    """Σ_i softmax_i(g(a ⊙ mean_i)) M_i → (B, N, d).

    anchor (B, d) with layer_means (L, B, d): one α per sequence (the paper's form).
    anchor (B, N, d) with layer_means (L, B, N, d): one α per position — the causal form, where both are prefix
    means (see `prefix_mean`). merged is (L, B, N, d) either way.
    """
    _check_backend(backend)
    *args, per_position = aggregation.validate(anchor, layer_means, merged, gate_weight, gate_bias)
    impl = resolve_backend(backend, args[2])
    if impl == "reference":
        return confidence_aggregate_reference(*args)
    if impl == "triton":
        check_triton_device(args[2])
        return aggregation.confidence_aggregate_triton(*args, per_position=per_position)
    return aggregation.confidence_aggregate_efficient(*args, per_position=per_position)


def confidence_weights(anchor, layer_means, gate_weight, gate_bias) -> torch.Tensor:
    """The per-layer confidences α: (B, L) for a (B, d) anchor, (B, N, L) per position for a (B, N, d) one."""
    probe = None  # a view standing in for merged in the shared checks (only its shape is read)
    if isinstance(anchor, torch.Tensor) and anchor.dim() in (2, 3):
        L = layer_means.shape[0] if isinstance(layer_means, torch.Tensor) and layer_means.dim() else 1
        lead = anchor.shape[:-1] if anchor.dim() == 3 else (anchor.shape[0], 1)
        probe = anchor.reshape(1, *lead, anchor.shape[-1]).expand(L, *lead, anchor.shape[-1])
    anchor, layer_means, _, gate_weight, gate_bias, _ = aggregation.validate(anchor, layer_means, probe, gate_weight,
                                                                             gate_bias)
    return confidence_weights_reference(anchor, layer_means, gate_weight, gate_bias)


def prefix_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Causal masked mean over the token axis: out_t = Σ_{s≤t} m_s x_s / max(Σ_{s≤t} m_s, 1).

    x (..., B, N, d), mask (B, N) or None. The anchor and layer means of the causal gate (per-position
    `confidence_aggregate`). Non-reference backends sum 16-bit inputs in fp32.
    """
    _check_backend(backend)
    x, mask = aggregation.validate_prefix_mean(x, mask)
    if backend == "reference":
        return prefix_mean_reference(x, mask)
    return aggregation.prefix_mean_efficient(x, mask)


__all__ = ["BACKENDS", "MAX_FUSED_ATTENTION_DIM", "resolve_backend", "grouped_projection", "relu_l1_attention",
           "relu_l1_attention_aggregate", "confidence_aggregate", "confidence_weights", "prefix_mean"]
