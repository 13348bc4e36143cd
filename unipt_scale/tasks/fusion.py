"""What the question-answering and grounding tasks share (not a task of its own): the light fusion — the text
tower's tokens and the image tower's tokens, each projected to one width and marked by type (image tokens also by
their position: a CNN's flattened feature map carries none), read together with a learned [CLS] token by a small
transformer, whose [CLS] output is the joint feature the task's head reads — and the per-kind breakdown of their
metrics where KEY.json marks questions or expressions `relational`."""
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
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        self.types = nn.Embedding(2, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, head_count(dim), 4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], image: torch.Tensor,
                image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b = text.shape[0]
        t = self.text_in(text.float()) + self.types.weight[0]
        v = self.image_in(image.float()) + self.types.weight[1] + sinusoid_positions(image.shape[1], self.dim,
                                                                                     image.device)
        x = torch.cat([self.cls.expand(b, -1, -1), t, v], 1)

        def keep(mask, n):
            return torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()

        padding = ~torch.cat([keep(None, 1), keep(text_mask, t.shape[1]), keep(image_mask, v.shape[1])], 1)
        return self.norm(self.encoder(x, src_key_padding_mask=padding)[:, 0])
