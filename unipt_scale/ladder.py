"""Ladder side tuning (`method=ladder`): the LST / QST baseline of UniPT's own family, written from its equations
(../shared/unipt-equations.md, "Ladder side tuning"). On a quantized base it is QST.

For a decoder with L blocks and width D, at side width d = D // ladder.reduction:
  down_l(h) = Linear(rank -> d)(SiLU(Linear(D -> rank)(h)))          one low-rank downsampler per hidden state
  s = down_0(e);   for l = 0 … L-1:  s = (1 − σ(z_l)) ⊙ down_{l+1}(h_{l+1}) + σ(z_l) ⊙ s;   s = side_l(s)
  blend (QST):    y = σ(z_head) ⊙ Up(LN(s)) + (1 − σ(z_head)) ⊙ h_L     z_l = 0.5, z_head = 1 at the start
  residual:       y = h_L + Up(LN(s)), Up zero-initialised: a fresh model is exactly the frozen LLM
Each side_l is a small causal decoder block at width d (the deep side network's block: rotary self-attention and
an MLP), KV-cached in generation. Nothing of the backbone is kept for backward, as in UniPT; unlike UniPT's one
aggregation step, the side network's attention and MLP run L times.

LadderSideNetwork has the causal side network's interface (forward / step / a cache with select), so the task
model, the trainer, the engines and generation treat it as they treat UniPT's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import ConfigError, LadderConfig
from unipt_scale.decode_buffer import SequenceBuffer
from unipt_scale.side_blocks import CausalSideBlock


class LadderCache:
    """Incremental decoding state: each side block's keys and values, the key mask and the real-token count."""

    def __init__(self, blocks, key_mask: SequenceBuffer, count: torch.Tensor):
        self.blocks, self.key_mask, self.count = blocks, key_mask, count

    def select(self, index: torch.Tensor) -> "LadderCache":
        return LadderCache([c.select(index) for c in self.blocks], self.key_mask.select(index, 0),
                           self.count[index])


class LadderSideNetwork(nn.Module):
    causal = True

    def __init__(self, cfg: LadderConfig, hidden_sizes: Sequence[int], out_dim: int):
        super().__init__()
        if len(set(hidden_sizes)) != 1 or len(hidden_sizes) < 2:
            raise ConfigError("method=ladder reads every hidden state of a decoder of one width (the embedding output "
                              "and each block's)")
        self.cfg = cfg
        self.hidden_sizes = list(hidden_sizes)
        self.out_dim = out_dim
        d = self.mapping_dim = out_dim // cfg.reduction
        if d < 1:
            raise ConfigError(f"ladder.reduction={cfg.reduction} leaves no side width for D={out_dim}")
        n = len(hidden_sizes)
        self.down_in = nn.ModuleList(nn.Linear(h, cfg.rank) for h in hidden_sizes)
        self.down_out = nn.ModuleList(nn.Linear(cfg.rank, d) for _ in hidden_sizes)
        self.gates = nn.Parameter(torch.full((n - 1, d), float(cfg.gate_init)))
        self.side = nn.ModuleList(CausalSideBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(n - 1))
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, out_dim)
        if cfg.output == "blend":
            self.head_gate = nn.Parameter(torch.full((out_dim,), float(cfg.head_gate_init)))
        elif cfg.output == "residual":
            self.head_gate = None
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            raise ConfigError(f"ladder.output={cfg.output!r}: choose blend (QST) or residual")

    def _down(self, i: int, h: torch.Tensor) -> torch.Tensor:
        dtype = self.down_in[i].weight.dtype
        return self.down_out[i](F.silu(self.down_in[i](h.to(dtype))))

    def _run(self, hidden_states, mask, final, cache: Optional[LadderCache], capacity: Optional[int]):
        if len(hidden_states) != len(self.hidden_sizes):
            raise ValueError(f"expected {len(self.hidden_sizes)} hidden states, got {len(hidden_states)}")
        b, n = hidden_states[0].shape[:2]
        new_mask = mask.bool() if mask is not None else torch.ones(b, n, dtype=torch.bool,
                                                                    device=hidden_states[0].device)
        prev = cache.count if cache is not None else torch.zeros(b, 1, device=new_mask.device)
        count = prev + new_mask.to(prev.dtype).cumsum(1)  # (B, n): real tokens up to each position
        positions = (count - 1).clamp(min=0).long()
        if cache is None:
            mask_buffer = SequenceBuffer.start(new_mask, 1, capacity)
        else:
            mask_buffer = cache.key_mask
            mask_buffer.append(new_mask)
        key_mask = mask_buffer.filled
        s = self._down(0, hidden_states[0])
        caches = []
        for i, block in enumerate(self.side):
            z = torch.sigmoid(self.gates[i]).to(s.dtype)
            s = (1 - z) * self._down(i + 1, hidden_states[i + 1]) + z * s
            s, c = block(s, positions, key_mask, cache.blocks[i] if cache is not None else None, capacity)
            caches.append(c)
        side = self.up(self.norm(s))
        if self.head_gate is None:
            y = final.to(side.dtype) + side
        else:
            g = torch.sigmoid(self.head_gate).to(side.dtype)
            y = g * side + (1 - g) * final.to(side.dtype)
        return y, LadderCache(caches, mask_buffer, count[:, -1:].detach())

    def forward(self, hidden_states, mask=None, final=None) -> torch.Tensor:
        return self._run(hidden_states, mask, final, None, None)[0]

    def step(self, hidden_states, mask, final, cache: Optional[LadderCache] = None, capacity: Optional[int] = None):
        """Incremental decoding: the outputs of the new positions and the cache extended by them."""
        return self._run(hidden_states, mask, final, cache, capacity)
