"""The UniPT side network: parallel interaction + confidence aggregation over a frozen backbone's layers.

Two variants, as in the paper: `UniPTSideNetwork` for token sequences (BERT, MPNet, T5 encoder, ViT, decoders)
and `UniPTFeatureMapSideNetwork` for CNN stages of decreasing resolution. Both read hidden states that carry no
autograd history, so backward never enters the backbone.
"""
from __future__ import annotations

import dataclasses

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale import kernels
from unipt_scale.config import ConfigError, UniPTConfig
from unipt_scale.decode_buffer import SequenceBuffer
from unipt_scale.side_blocks import SideBlocks
from unipt_scale.side_spec import mapping_width as _width
from unipt_scale.side_spec import resolve_layers  # noqa: F401  (its home is side_spec; callers import it here too)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the token axis (-2) of real tokens only; x (..., B, N, d), mask (B, N)."""
    if mask is None:
        return x.mean(-2)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def token_positions(mask: Optional[torch.Tensor], how: str, batch: int, length: int, device) -> torch.Tensor:
    """Index of the first or last real token per row; works for left and right padding alike."""
    if mask is None:
        pos = 0 if how == "first" else length - 1
        return torch.full((batch,), pos, dtype=torch.long, device=device)
    m = mask.bool()
    ar = torch.arange(length, device=device).expand(batch, length)
    if how == "first":
        return torch.where(m, ar, length).min(-1).values.clamp(max=length - 1)
    return torch.where(m, ar, -1).max(-1).values.clamp(min=0)


def pool_tokens(x: torch.Tensor, mask: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """Pool (..., B, N, d) → (..., B, d) by masked mean, first or last real token."""
    if how == "mean":
        return masked_mean(x, mask)
    b, n = x.shape[-3], x.shape[-2]
    pos = token_positions(mask, how, b, n, x.device)
    return x[..., torch.arange(b, device=x.device), pos, :]


def sequence_confidences(gate: nn.Linear, anchor_vec: torch.Tensor, targets: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-sequence layer confidences α (B, L'): the gate over the pooled anchor and each layer's masked mean."""
    return kernels.confidence_weights(anchor_vec, masked_mean(targets, mask), gate.weight, gate.bias)


def interact_and_aggregate(cfg: UniPTConfig, gate: nn.Linear, anchor_tokens: torch.Tensor, anchor_vec: torch.Tensor,
                           targets: torch.Tensor, mask: Optional[torch.Tensor],
                           rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Parallel interaction and confidence aggregation of the per-sequence form → M (B, N, d), or (B, 1, d) for
    the one query row per sequence at positions `rows` (B,).

    α reads only pooled means, so it comes first and the attention sums over layers as it goes
    (kernels.relu_l1_attention_aggregate) instead of keeping every layer's output for a second op."""
    alpha = sequence_confidences(gate, anchor_vec, targets, mask)
    query, identity_in_op = anchor_tokens, cfg.add_identity
    if rows is not None:
        batch = torch.arange(anchor_tokens.shape[0], device=anchor_tokens.device)
        query, identity_in_op = anchor_tokens[batch, rows].unsqueeze(1), False
    fused = kernels.relu_l1_attention_aggregate(query, targets, mask, alpha, identity=identity_in_op, eps=cfg.eps,
                                                backend=cfg.kernels)
    added = []  # (L', B, d) terms that every query row gets, weighted by α
    if cfg.add_identity and rows is not None:
        added.append(targets[:, batch, rows])
    if cfg.add_target_token:
        added.append(pool_tokens(targets, mask, "last" if cfg.anchor_pooling == "last" else "first"))
    for term in added:
        fused = fused + torch.einsum("bl,lbd->bd", alpha, term).unsqueeze(-2)
    return fused


def mapping_width(cfg: UniPTConfig, out_dim: int) -> int:
    return _width(out_dim, cfg.mapping_dim, cfg.reduction_factor)


class SideCache:
    """What incremental decoding keeps of the past for the causal side network: the projected states of every
    interacting layer (the keys and values), the key mask, and the prefix sums the gate's means are made of.

    Keys and mask are SequenceBuffers sized once for the whole generation (prompt + new tokens): each step writes
    its positions in place instead of concatenating the past again. `targets` and `mask` are the filled parts."""

    def __init__(self, keys: SequenceBuffer, key_mask: SequenceBuffer, anchor_sum: torch.Tensor,
                 target_sum: torch.Tensor, count: torch.Tensor, blocks=None):
        self.keys = keys  # (L', B, capacity, d) along dim 2
        self.key_mask = key_mask  # (B, capacity) bool along dim 1
        self.anchor_sum = anchor_sum  # (B, d): Σ m·A
        self.target_sum = target_sum  # (L', B, d): Σ m·T_i
        self.count = count  # (B, 1): Σ m
        self.blocks = blocks  # the side blocks' key/value caches (unipt.side_blocks), or None

    @classmethod
    def start(cls, targets: torch.Tensor, mask: torch.Tensor, capacity: Optional[int] = None, blocks=None,
              **sums) -> "SideCache":
        """A cache holding `targets` (L', B, n, d); with room for `capacity` positions when that is larger."""
        return cls(SequenceBuffer.start(targets, 2, capacity), SequenceBuffer.start(mask, 1, capacity),
                   blocks=blocks, **sums)

    @property
    def targets(self) -> torch.Tensor:  # (L', B, t, d)
        return self.keys.filled

    @property
    def mask(self) -> torch.Tensor:  # (B, t) bool: real tokens so far
        return self.key_mask.filled

    def append(self, targets: torch.Tensor, mask: torch.Tensor) -> None:
        self.keys.append(targets)
        self.key_mask.append(mask)

    def select(self, index: torch.Tensor) -> "SideCache":
        """The rows `index` of the batch (beam/sequence bookkeeping)."""
        return SideCache(self.keys.select(index, 1), self.key_mask.select(index, 0), self.anchor_sum[index],
                         self.target_sum[:, index], self.count[index],
                         [c.select(index) for c in self.blocks] if self.blocks is not None else None)


class UniPTSideNetwork(nn.Module):
    """Token-sequence UniPT.

    forward(hidden_states, mask, final) → per-token output (B, N, out_dim); hidden_states are the tapped layers'
    (B, N, D_i), mask (B, N) marks real tokens, final is the backbone's output that the residual adds to.

    causal=True is the form for language modelling on a decoder: position t reads only positions ≤ t. The
    cross attention of the anchor row t goes to keys j ≤ t only (padding keys masked, the identity term kept),
    and the confidence gate reads prefix means of the anchor and of each layer up to t, so the weights over
    layers are one softmax per position instead of one per sequence. Nothing else changes; with the
    up-projection zero-initialised a fresh model returns the backbone's own final states, so its LM logits are
    the frozen model's. `step` runs the same computation for new positions only, against a SideCache of the past.
    """

    def __init__(self, cfg: UniPTConfig, hidden_sizes: Sequence[int], out_dim: int, causal: bool = False):
        super().__init__()
        if cfg.down_norm == "batchnorm":
            raise ConfigError("unipt.down_norm=batchnorm is for CNN stages; use layernorm or none for token sequences")
        if causal and (cfg.anchor != "last_layer" or cfg.add_target_token):
            raise ConfigError("the causal side network takes the last tapped layer as its anchor and adds no target "
                              "token; unset unipt.anchor / unipt.add_target_token for unipt.causal=true")
        self.causal = causal
        self.cfg = cfg
        self.hidden_sizes = list(hidden_sizes)
        self.out_dim = out_dim
        self.num_interacting = len(self.hidden_sizes) - (1 if cfg.anchor == "last_layer" else 0)
        if self.num_interacting < 1:
            raise ConfigError("UniPT with anchor=last_layer needs at least 2 tapped layers (the last is the anchor); "
                              "tap more layers or use unipt.anchor=separate")
        d = self.mapping_dim = mapping_width(cfg, out_dim)
        self.down = nn.ModuleList(nn.Linear(h, d) for h in self.hidden_sizes)
        self.down_norms = nn.ModuleList(nn.LayerNorm(d) for _ in self.hidden_sizes) if cfg.down_norm == "layernorm" else None
        self.anchor_proj = nn.Linear(out_dim, d) if cfg.anchor == "separate" else None
        self.gate = nn.Linear(d, 1)
        if cfg.output == "project":
            self.proj = nn.Linear(d, d)
            self.proj_norm = nn.LayerNorm(d)
        self.blocks = None
        if cfg.side_blocks:
            if not causal:
                raise ConfigError("unipt.side_blocks is the deep form of the causal side network (task.kind=causal_lm "
                                  "or unipt.causal=true); set unipt.side_blocks=0 here")
            if cfg.output != "project":
                raise ConfigError("unipt.side_blocks runs after the output projection; keep unipt.output=project")
            self.blocks = SideBlocks(d, cfg.side_blocks, cfg.side_heads, cfg.side_mlp_ratio)
        self.up = nn.Linear(d, out_dim)
        if cfg.zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def project_layers(self, hidden_states: Sequence[torch.Tensor], layers: slice = slice(None)) -> torch.Tensor:
        """T_i (L, B, N, d) of the tapped layers `layers` selects; hidden_states are those layers' states."""
        norms = self.down_norms[layers] if self.down_norms is not None else None
        down = self.down[layers]
        return kernels.grouped_projection(
            hidden_states, [m.weight for m in down], [m.bias for m in down],
            [n.weight for n in norms] if norms is not None else None,
            [n.bias for n in norms] if norms is not None else None,
            pre_activation=self.cfg.down_activation, norm=self.cfg.down_norm,
            eps=norms[0].eps if norms is not None else 1e-5, backend=self.cfg.kernels)

    def _anchor_and_targets(self, hidden_states, final):
        """The anchor tokens A (B, N, d) and the stacked targets T_i (L', B, N, d)."""
        if len(hidden_states) != len(self.hidden_sizes):
            raise ValueError(f"expected {len(self.hidden_sizes)} tapped hidden states, got {len(hidden_states)}")
        if self.cfg.anchor == "last_layer":
            # two projections, not one split in two: the split's backward concatenated the two gradients into an
            # (L, B, N, d) copy (2.5 ms of a 60 ms side network at 64 tokens); each projection reads its own
            targets = self.project_layers(hidden_states[:-1], slice(0, -1))
            return self.project_layers(hidden_states[-1:], slice(-1, None)).squeeze(0), targets
        t = self.project_layers(hidden_states)  # (L, B, N, d)
        if final is None:
            raise ValueError("unipt.anchor=separate needs the backbone's final output")
        x = final.to(t.dtype)
        return self.anchor_proj(F.relu(x) if self.cfg.down_activation == "relu" else x), t

    def _output(self, anchor_tokens, fused, final):
        return self._up(self._project(anchor_tokens, fused), final)

    def _project(self, anchor_tokens, fused):
        if self.cfg.output == "project":
            fused = anchor_tokens + self.proj_norm(self.proj(fused))
        return fused

    def _up(self, x, final):
        y = self.up(F.relu(x))
        if self.cfg.residual:
            if final is None:
                raise ValueError("unipt.residual=true needs the backbone's final output")
            y = y + final.to(y.dtype)
        return y

    def _causal_forward(self, hidden_states, mask, final, cache: Optional[SideCache] = None,
                        capacity: Optional[int] = None):
        """The causal form over new positions (all of them without a cache); returns (output, updated cache).
        `capacity` sizes a new cache for the positions still to come (incremental decoding)."""
        cfg = self.cfg
        anchor_tokens, targets = self._anchor_and_targets(hidden_states, final)  # (B, n, d), (L', B, n, d)
        b, n = anchor_tokens.shape[:2]
        new_mask = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=anchor_tokens.device)
        if cache is None:
            keys, key_mask = targets, new_mask
            prev_a = torch.zeros_like(anchor_tokens[:, 0])
            prev_t = torch.zeros_like(targets[:, :, 0])
            prev_c = torch.zeros(b, 1, dtype=anchor_tokens.dtype, device=anchor_tokens.device)
        else:
            prev_a, prev_t, prev_c = cache.anchor_sum, cache.target_sum, cache.count
            cache.append(targets.detach(), new_mask)
            keys, key_mask = cache.targets.to(targets.dtype), cache.mask
        # The query rows are the last n positions; the kernel's causal mask is aligned to the bottom right.
        merged = kernels.relu_l1_attention(anchor_tokens, keys, key_mask, eps=cfg.eps, backend=cfg.kernels,
                                           causal=True)
        if cfg.add_identity:
            merged = merged + targets
        m = new_mask.to(anchor_tokens.dtype).unsqueeze(-1)  # (B, n, 1)
        count = prev_c[:, None] + m.cumsum(1)  # (B, n, 1)
        a_sum = prev_a[:, None] + (anchor_tokens * m).cumsum(1)
        t_sum = prev_t[:, :, None] + (targets * m).cumsum(2)
        anchor_mean = a_sum / count.clamp(min=1.0)
        target_mean = t_sum / count.clamp(min=1.0)
        fused = kernels.confidence_aggregate(anchor_mean, target_mean, merged, self.gate.weight, self.gate.bias,
                                             backend=cfg.kernels)
        x = self._project(anchor_tokens, fused)
        block_caches = None
        if self.blocks is not None:
            positions = (count.squeeze(-1) - 1).clamp(min=0).long()  # from the mask, as the decoder's own
            x, block_caches = self.blocks(x, positions, key_mask, cache.blocks if cache is not None else None,
                                          capacity)
        y = self._up(x, final)
        sums = dict(anchor_sum=a_sum[:, -1].detach(), target_sum=t_sum[:, :, -1].detach(),
                    count=count[:, -1].detach())
        if cache is None:
            return y, SideCache.start(keys.detach(), key_mask, capacity, blocks=block_caches, **sums)
        cache.anchor_sum, cache.target_sum, cache.count = sums["anchor_sum"], sums["target_sum"], sums["count"]
        return y, cache

    def step(self, hidden_states: Sequence[torch.Tensor], mask: Optional[torch.Tensor], final: torch.Tensor,
             cache: Optional[SideCache] = None, capacity: Optional[int] = None):
        """Incremental decoding: the outputs of new positions (B, n, out_dim) given the past's cache, and the
        cache extended by them (in place). Each new token costs one query row against t keys per layer:
        O(L·t·d). `capacity`, on the first step, is the number of positions the cache will hold in the end."""
        if not self.causal:
            raise ValueError("incremental decoding needs the causal side network (unipt.causal=true)")
        if mask is not None:
            mask = mask.bool()
        return self._causal_forward(hidden_states, mask, final, cache, capacity)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None,
                final: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.causal:
            return self._causal_forward(hidden_states, mask.bool() if mask is not None else None, final)[0]
        mask, anchor_tokens, targets, anchor_vec = self._sequence_inputs(hidden_states, mask, final)
        fused = interact_and_aggregate(self.cfg, self.gate, anchor_tokens, anchor_vec, targets, mask)
        return self._output(anchor_tokens, fused, final).to(self.gate.weight.dtype)

    def _sequence_inputs(self, hidden_states, mask, final):
        """The per-sequence form's inputs: (bool mask, anchor tokens A, targets T_i, pooled anchor a (B, d)).

        No up-front cast of the tapped states: the projection reads a bf16 backbone's states as they are (L fp32
        copies of every hidden state would cost more than the side network itself)."""
        if mask is not None:
            mask = mask.bool()
        anchor_tokens, targets = self._anchor_and_targets(hidden_states, final)
        return mask, anchor_tokens, targets, pool_tokens(anchor_tokens, mask, self.cfg.anchor_pooling)

    def pooled(self, hidden_states: Sequence[torch.Tensor], mask: Optional[torch.Tensor], final: Optional[torch.Tensor],
               how: str) -> torch.Tensor:
        """pool_tokens(forward(...), mask, how) → (B, out_dim), computed without the tokens pooling drops.

        Everything after the aggregation is per token and the up-projection and residual are affine, so the mean
        of the outputs is the up-projection of the mean of relu(out) (plus the mean of the residual), and the
        first or last token's output needs only that token's query row of the cross attention."""
        if self.causal or how not in ("mean", "first", "last"):
            return pool_tokens(self(hidden_states, mask, final), mask, how)
        cfg = self.cfg
        dtype = self.gate.weight.dtype
        mask, anchor_tokens, targets, anchor_vec = self._sequence_inputs(hidden_states, mask, final)
        if how != "mean":
            b, n = anchor_tokens.shape[:2]
            rows = token_positions(mask, how, b, n, anchor_tokens.device)
            fused = interact_and_aggregate(cfg, self.gate, anchor_tokens, anchor_vec, targets, mask, rows)
            batch = torch.arange(b, device=anchor_tokens.device)
            row_final = final[batch, rows].unsqueeze(1) if final is not None else None
            return self._output(anchor_tokens[batch, rows].unsqueeze(1), fused, row_final).squeeze(1).to(dtype)
        fused = interact_and_aggregate(cfg, self.gate, anchor_tokens, anchor_vec, targets, mask)
        x = masked_mean(F.relu(self._project(anchor_tokens, fused)), mask)  # (B, d)
        # the bias counts once per sequence with a real token (masked_mean of no tokens is 0)
        real = mask.any(-1, keepdim=True).to(x.dtype) if mask is not None else 1.0
        y = F.linear(x, self.up.weight) + self.up.bias * real
        if cfg.residual:
            if final is None:
                raise ValueError("unipt.residual=true needs the backbone's final output")
            y = y + masked_mean(final.to(y.dtype), mask)
        return y.to(dtype)

    @torch.no_grad()
    def layer_confidences(self, hidden_states, mask=None, final=None) -> torch.Tensor:
        """α (B, L') per sample — (B, N, L') per position for the causal form: how much each tapped layer
        contributes (for inspection)."""
        if mask is not None:
            mask = mask.bool()
        anchor_tokens, targets = self._anchor_and_targets(hidden_states, final)
        if self.causal:
            a = kernels.prefix_mean(anchor_tokens, mask, backend=self.cfg.kernels)
            mu = kernels.prefix_mean(targets, mask, backend=self.cfg.kernels)
            return kernels.confidence_weights(a, mu, self.gate.weight, self.gate.bias)
        return sequence_confidences(self.gate, pool_tokens(anchor_tokens, mask, self.cfg.anchor_pooling), targets,
                                    mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) → (B, H·W, C)


def _roll(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class UniPTFeatureMapSideNetwork(nn.Module):
    """Feature-map UniPT for CNN stages (the paper's CNN adapter).

    Each earlier stage is first reduced to the last stage's resolution by an anchor-guided, per-patch
    L1-normalised weighting; then the token-sequence interaction and aggregation run on H_last·W_last tokens.
    forward(stages) → tokens (B, H_last·W_last, C_last).
    """

    def __init__(self, cfg: UniPTConfig, stage_channels: Sequence[int], stage_sizes: Sequence[Sequence[int]]):
        super().__init__()
        if len(stage_channels) < 2:
            raise ConfigError("the feature-map UniPT needs at least 2 stages")
        unsupported = {k: v for k, v in (("anchor", "last_layer"), ("output", "project"), ("add_target_token", False),
                                         ("down_activation", "none"), ("anchor_pooling", "mean"))
                       if getattr(cfg, k) != v}
        if unsupported:
            raise ConfigError(f"the feature-map (CNN) UniPT has one form (the paper's CNN adapter); "
                              f"unset {', '.join(f'unipt.{k}' for k in unsupported)} for this backbone")
        if cfg.down_norm == "layernorm":
            cfg = dataclasses.replace(cfg, down_norm="batchnorm")  # the CNN adapter's norm is BatchNorm
        self.cfg = cfg
        self.stage_channels = list(stage_channels)
        self.stage_sizes = [tuple(s) for s in stage_sizes]
        hl, wl = self.stage_sizes[-1]
        self.ratios = []
        for (h, w) in self.stage_sizes[:-1]:
            if h % hl or w % wl or h // hl != w // wl:
                raise ConfigError(f"stage size {(h, w)} is not an integer multiple of the last stage {(hl, wl)}; "
                                  "tap stages whose resolutions divide evenly (e.g. the last block of each resolution)")
            self.ratios.append(h // hl)
        c_last = self.out_dim = self.stage_channels[-1]
        d = self.mapping_dim = mapping_width(cfg, c_last)

        def norm():
            return nn.BatchNorm2d(d) if cfg.down_norm != "none" else nn.Identity()

        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, 1), norm()) for c in self.stage_channels)
        self.identity = nn.ModuleList(nn.Sequential(nn.Conv2d(c_last, c, 1), nn.ReLU())
                                      for c in self.stage_channels[:-1])
        self.proj = nn.Sequential(nn.Conv2d(d, d, 1), norm())
        self.up = nn.Conv2d(d, c_last, 1)
        self.gate = nn.Linear(d, 1)
        if cfg.zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def select_target(self, i: int, stage: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Reduce stage i to the last stage's resolution, weighting positions inside each r×r patch."""
        r = self.ratios[i]
        h, w = stage.shape[-2:]
        if h != r * last.shape[-2] or w != r * last.shape[-1]:
            raise ValueError(f"stage {i} is {h}x{w} but the last stage is {tuple(last.shape[-2:])}: the image size "
                             f"must keep the stage ratio {r} (use a multiple of the network's total stride)")
        guide = F.interpolate(self.identity[i](last), size=(h, w), mode="nearest") * stage
        scores = F.unfold(guide.sum(1, keepdim=True), kernel_size=r, stride=r)  # (B, r², P)
        p = torch.relu(scores)
        weights = p / p.sum(1, keepdim=True).clamp(min=1e-6) + 1.0 / (r * r)
        weights = F.fold(weights, output_size=(h, w), kernel_size=r, stride=r)
        return F.avg_pool2d(weights * stage, r, stride=r, divisor_override=1)

    def forward(self, stages: Sequence[torch.Tensor], mask=None, final=None) -> torch.Tensor:
        cfg = self.cfg
        if len(stages) != len(self.stage_channels):
            raise ValueError(f"expected {len(self.stage_channels)} stages, got {len(stages)}")
        dtype = self.gate.weight.dtype
        stages = [s.to(dtype) for s in stages]
        last = stages[-1]
        hl, wl = last.shape[-2:]
        anchor_map = self.down[-1](last)
        anchor_tokens = _flat(anchor_map)
        anchor_vec = anchor_tokens.mean(1)
        targets = torch.stack([_flat(self.down[i](self.select_target(i, s, last)))
                               for i, s in enumerate(stages[:-1])], 0)  # (L', B, HW, d)
        fused = interact_and_aggregate(cfg, self.gate, anchor_tokens, anchor_vec, targets, None)
        out = anchor_map + self.proj(_roll(fused, hl, wl))
        y = _flat(self.up(F.relu(out)))
        if cfg.residual:
            y = y + _flat(last)
        return y
