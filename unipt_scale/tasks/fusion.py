"""What the question-answering and grounding tasks share (not a task of its own): the light fusion — the text
tower's tokens and the image tower's tokens, each projected to one width and marked by type (image tokens also by
their column and row on the token grid: a CNN's flattened feature map carries none), read together with a learned
[CLS] token by a small transformer, whose [CLS] output is the joint feature the task's head reads — and the
per-kind breakdown of their metrics where KEY.json marks questions or expressions `relational`."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn


def sinusoid_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """(n, dim) fixed sine/cosine codes of positions 0..n-1 (no parameters: any image size works)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


def token_grid(n: int):
    """(extra, rows, cols) of N image tokens: the largest square grid that fits, row-major, after `extra` leading
    tokens that lie nowhere (a ViT's [CLS] and register tokens come first; a CNN's flattened map has none).
    Images reach the towers square, so their token grids are square too."""
    side = max(1, math.isqrt(n))
    return n - side * side, side, side


def grid_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """(n, dim) position codes of N image tokens: half the width codes the column, half the row (sinusoids of
    each), so attention can compare where tokens lie in both directions; leading tokens off the grid get none."""
    extra, rows, cols = token_grid(n)
    half = dim // 2
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    by_x = sinusoid_positions(cols, half, device)[xs.flatten()]
    by_y = sinusoid_positions(rows, dim - half, device)[ys.flatten()]
    return torch.cat([torch.zeros(extra, dim, device=device), torch.cat([by_x, by_y], -1)], 0)


def kept_for_eval(batch, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An eval step's outputs with the batch's `relational` marks, where it has them."""
    if "relational" in batch:
        out["relational"] = batch["relational"].cpu()
    return out


def by_relational(metric: str, values: torch.Tensor, outputs: List[Dict[str, torch.Tensor]],
                  keep: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """`metric`_relational / _nonrelational: the mean of per-sample `values` over each kind (absent kinds left
    out); `keep` selects the samples `values` was taken from."""
    if "relational" not in outputs[0]:
        return {}
    rel = torch.cat([o["relational"] for o in outputs])
    rel = rel[keep] if keep is not None else rel
    return {f"{metric}_{name}": values[rel == value].float().mean().item()
            for name, value in (("relational", 1), ("nonrelational", 0)) if (rel == value).any()}


def head_count(dim: int) -> int:
    """Attention heads of width about 64 that divide `dim` (any width builds)."""
    return max(h for h in range(1, max(1, dim // 64) + 1) if dim % h == 0)


class TokenFusion(nn.Module):
    def __init__(self, text_dim: int, image_dim: int, dim: int = 256, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        # Each stream is projected and normalised to unit scale, so the content, the type marks (small, as BERT's
        # embeddings start) and the position codes enter the fusion at comparable sizes whatever the towers' scales.
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim))
        self.image_in = nn.Sequential(nn.Linear(image_dim, dim), nn.LayerNorm(dim))
        self.types = nn.Embedding(2, dim)
        nn.init.normal_(self.types.weight, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, head_count(dim), 4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], image: torch.Tensor,
                image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, dim): the [CLS] output, the joint feature."""
        return self.sequence(text, text_mask, image, image_mask)[:, 0]

    def sequence(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], image: torch.Tensor,
                 image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, 1 + T + N, dim): every output, [CLS] first, then the T text and the N image tokens in input order
        (a head that reads the image positions, such as grounding's, slices the last N)."""
        b = text.shape[0]
        t = self.text_in(text.float()) + self.types.weight[0]
        v = self.image_in(image.float()) + self.types.weight[1] + grid_positions(image.shape[1], self.dim,
                                                                                 image.device)
        x = torch.cat([self.cls.expand(b, -1, -1), t, v], 1)

        def keep(mask, n):
            return torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()

        padding = ~torch.cat([keep(None, 1), keep(text_mask, t.shape[1]), keep(image_mask, v.shape[1])], 1)
        return self.norm(self.encoder(x, src_key_padding_mask=padding))
