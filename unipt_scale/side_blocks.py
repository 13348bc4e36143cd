"""The deep causal side network's blocks (`unipt.side_blocks=K`): light pre-norm transformer blocks at the side
width d — causal rotary self-attention and an MLP — run after UniPT's parallel interaction and confidence
aggregation, before the zero-initialised up-projection (so a fresh model is still exactly the frozen LLM).

The blocks see the side features of every real token so far; positions come from the mask (left padding does not
shift them), as the decoder's own do. In incremental decoding each block keeps its keys and values in a buffer
sized once for the generation (BlockCache), written in place like the side cache.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.decode_buffer import SequenceBuffer
from unipt_scale.side_spec import side_block_heads


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (B, h, N, hd) at positions (B, N): the half-split form Llama uses."""
    hd = x.shape[-1]
    at = torch.promote_types(x.dtype, torch.float32)  # fp32 angles for 16-bit x, fp64 for fp64
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=at) / hd))
    angles = positions.to(at)[:, None, :, None] * inv_freq  # (B, 1, N, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
    half = hd // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class BlockCache:
    """Keys and values (B, h, capacity, hd) of one side block for the positions decoded so far."""

    def __init__(self, keys: SequenceBuffer, values: SequenceBuffer):
        self.keys, self.values = keys, values

    @classmethod
    def start(cls, k: torch.Tensor, v: torch.Tensor, capacity: Optional[int]) -> "BlockCache":
        return cls(SequenceBuffer.start(k, 2, capacity), SequenceBuffer.start(v, 2, capacity))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys.append(k)
        self.values.append(v)

    def filled(self):
        return self.keys.filled, self.values.filled

    def select(self, index: torch.Tensor) -> "BlockCache":
        return BlockCache(self.keys.select(index, 0), self.values.select(index, 0))


class CausalSideBlock(nn.Module):
    def __init__(self, d: int, heads: int = 0, mlp_ratio: int = 2):
        super().__init__()
        self.heads = side_block_heads(d, heads)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                cache: Optional[BlockCache] = None, capacity: Optional[int] = None):
        """x (B, n, d) of the new positions; key_mask (B, t) bool over every position so far (the new ones
        last). Returns (x', the block's cache including the new positions)."""
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, n, hd) each
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is None:
            cache = BlockCache.start(k.detach(), v.detach(), capacity)
            keys, values = k, v
        else:
            cache.append(k.detach(), v.detach())
            keys, values = cache.filled()
        t = keys.shape[2]
        # Query i (the (t − n + i)-th position) sees keys j ≤ t − n + i that are real tokens — and always itself,
        # so a padding row is never left with no key (its output is not used).
        rows = torch.arange(n, device=x.device)[:, None] + (t - n)
        cols = torch.arange(t, device=x.device)[None, :]
        allowed = (cols <= rows)[None] & key_mask[:, None, :]
        allowed = (allowed | (cols == rows)[None])[:, None]  # (B, 1, n, t)
        attn = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x, cache


class SideBlocks(nn.Module):
    """K causal side blocks in sequence."""

    def __init__(self, d: int, count: int, heads: int = 0, mlp_ratio: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(CausalSideBlock(d, heads, mlp_ratio) for _ in range(count))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                caches: Optional[List[BlockCache]] = None, capacity: Optional[int] = None):
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, key_mask, caches[i] if caches else None, capacity)
            new_caches.append(c)
        return x, new_caches
