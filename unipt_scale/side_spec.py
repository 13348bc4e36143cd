"""The side network's shape rules, in one place and without torch.

Why: the model (unipt_scale.side_network) and the memory planner (unipt_scale.plan, which must run where torch is
not installed) both need which hidden states are tapped, how wide the side network is and how many parameters it
has. Two copies drift; both import these instead, and tests/test_side_spec.py checks the counts against the
built modules.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from unipt_scale.config import ConfigError


def _count(s: str, spec) -> int:
    try:
        return int(s.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"unipt.layers={spec!r}: K in every:K / last:K must be an integer") from None


def resolve_layers(spec, num_hidden_states: int) -> List[int]:
    """Tapped hidden-state indices from `all`, `every:K`, `last:K` or an explicit list (negatives allowed)."""
    n = num_hidden_states
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            idx = list(range(n))
        elif s.startswith("every:"):
            k = _count(s, spec)
            if k < 1:
                raise ConfigError("unipt.layers=every:K needs K >= 1")
            # Count back from the final layer so it is always tapped (it is the anchor).
            idx = sorted(range(n - 1, -1, -k))
        elif s.startswith("last:"):
            idx = list(range(max(0, n - _count(s, spec)), n))
        else:
            raise ConfigError(f"unipt.layers={spec!r}: use all, every:K, last:K or a list of indices")
    elif isinstance(spec, (list, tuple)):
        idx = []
        for i in spec:
            if not isinstance(i, int) or not -n <= i < n:
                raise ConfigError(f"unipt.layers entry {i!r} is out of range for {n} hidden states (0..{n - 1})")
            idx.append(i % n)
        if len(set(idx)) != len(idx):
            raise ConfigError(f"unipt.layers has duplicates: {spec}")
        idx = sorted(idx)
    else:
        raise ConfigError(f"unipt.layers must be a string or a list, got {spec!r}")
    if not idx:
        raise ConfigError(f"unipt.layers={spec!r} selects no layer")
    return idx


def mapping_width(out_dim: int, mapping_dim: Optional[int] = None, reduction_factor: int = 2) -> int:
    """Side-network width d: unipt.mapping_dim, else the output width // unipt.reduction_factor."""
    d = mapping_dim or out_dim // reduction_factor
    if d < 1:
        raise ConfigError(f"side-network width resolves to {d}; set unipt.mapping_dim")
    return d


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def side_block_heads(d: int, heads: int = 0) -> int:
    """Attention heads of a side block at width d: `heads`, or d // 64 (at least 1) when 0; d must divide evenly."""
    h = heads or max(1, d // 64)
    if h < 1 or d % h:
        raise ConfigError(f"unipt.side_heads={heads} does not divide the side-network width d={d}; choose heads "
                          "that divide d (or 0 for d // 64)")
    return h


def side_block_params(d: int, mlp_ratio: int = 2) -> int:
    """One causal side block: LayerNorm, Linear(d -> 3d) for q/k/v, Linear(d -> d) out, LayerNorm, and the MLP
    Linear(d -> r.d), Linear(r.d -> d)."""
    return 2 * d + _linear(d, 3 * d) + _linear(d, d) + 2 * d + _linear(d, mlp_ratio * d) + _linear(mlp_ratio * d, d)


def token_side_params(hidden_sizes: Sequence[int], out_dim: int, mapping_dim: Optional[int] = None,
                      reduction_factor: int = 2, anchor: str = "last_layer", output: str = "project",
                      down_norm: str = "layernorm", side_blocks: int = 0, side_mlp_ratio: int = 2) -> int:
    """Parameters of UniPTSideNetwork as it is built: per tapped layer Linear(D_i -> d) (+ LayerNorm(d)); with
    anchor=separate a Linear(D_out -> d); the gate Linear(d -> 1); with output=project Linear(d -> d) +
    LayerNorm(d); the causal form's side blocks (side_block_params each); the up-projection Linear(d -> D_out)."""
    d = mapping_width(out_dim, mapping_dim, reduction_factor)
    n = sum(_linear(h, d) + (2 * d if down_norm == "layernorm" else 0) for h in hidden_sizes)
    if anchor == "separate":
        n += _linear(out_dim, d)
    n += _linear(d, 1)
    if output == "project":
        n += _linear(d, d) + 2 * d
    n += side_blocks * side_block_params(d, side_mlp_ratio)
    return n + _linear(d, out_dim)


def feature_map_side_params(stage_channels: Sequence[int], mapping_dim: Optional[int] = None,
                            reduction_factor: int = 2, down_norm: str = "batchnorm") -> int:
    """Parameters of UniPTFeatureMapSideNetwork: per stage a 1x1 Conv(C_i -> d) (+ BatchNorm(d)), per earlier
    stage the identity 1x1 Conv(C_last -> C_i), the projection 1x1 Conv(d -> d) (+ BatchNorm), the up 1x1
    Conv(d -> C_last) and the gate Linear(d -> 1). BatchNorm's running statistics are buffers, not counted."""
    c_last = stage_channels[-1]
    d = mapping_width(c_last, mapping_dim, reduction_factor)
    bn = 2 * d if down_norm != "none" else 0
    n = sum(_linear(c, d) + bn for c in stage_channels)
    n += sum(_linear(c_last, c) for c in stage_channels[:-1])
    return n + _linear(d, d) + bn + _linear(d, c_last) + _linear(d, 1)


def side_params(cfg, hidden_sizes: Sequence[int], out_dim: int) -> int:
    """token_side_params from a UniPTConfig (or anything with its fields)."""
    return token_side_params(hidden_sizes, out_dim, cfg.mapping_dim, cfg.reduction_factor, cfg.anchor, cfg.output,
                             cfg.down_norm, getattr(cfg, "side_blocks", 0), getattr(cfg, "side_mlp_ratio", 2))


def ladder_params(num_hidden_states: int, hidden: int, reduction: int = 16, rank: int = 16, mlp_ratio: int = 2,
                  output: str = "blend") -> int:
    """Parameters of the ladder side network (method=ladder) as built: per hidden state the low-rank downsampler
    Linear(D -> rank), Linear(rank -> d); per backbone layer a gate vector (d) and a side block; the final
    LayerNorm(d) and Up Linear(d -> D); with output=blend the output gate (D)."""
    d = hidden // reduction
    n = num_hidden_states
    down = n * (_linear(hidden, rank) + _linear(rank, d))
    blocks = (n - 1) * (d + side_block_params(d, mlp_ratio))
    return down + blocks + 2 * d + _linear(d, hidden) + (hidden if output == "blend" else 0)
