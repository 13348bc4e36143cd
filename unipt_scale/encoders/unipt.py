"""The UniPT encoder: the frozen backbone (no grad) → its tapped hidden states → the side network (token, causal or
feature-map form) → per-token features and a pooled vector."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from unipt_scale.backbone import FrozenBackbone
from unipt_scale.config import UniPTConfig
from unipt_scale.encoders.pooling import resolve_pooling
from unipt_scale.side_network import UniPTFeatureMapSideNetwork, UniPTSideNetwork, pool_tokens, resolve_layers


class UniPTEncoder(nn.Module):
    """Backbone (frozen, no-grad) → tapped hidden states → UniPT → per-token features and a pooled vector."""

    def __init__(self, backbone: FrozenBackbone, cfg: UniPTConfig, causal: bool = False):
        super().__init__()
        self.backbone = backbone
        layers = resolve_layers(cfg.layers, backbone.num_hidden_states)
        backbone.tap(layers)
        if backbone.is_feature_map:
            sizes = [backbone.stage_sizes[i] for i in layers]
            self.side = UniPTFeatureMapSideNetwork(cfg, backbone.hidden_sizes, sizes)
        else:
            self.side = UniPTSideNetwork(cfg, backbone.hidden_sizes, backbone.out_dim, causal=causal)
        self.out_dim = self.side.out_dim  # a CNN's: the last tapped stage's channels, not the network's last
        self.pooling = resolve_pooling(cfg.pooling, backbone)

    def forward(self, batch: Dict[str, torch.Tensor]):
        out = self.backbone(batch)
        tokens = self.side(out.hidden_states, out.mask, out.final)
        mask = out.mask if not self.backbone.is_feature_map else None
        return tokens, mask

    def embed(self, batch) -> torch.Tensor:
        if isinstance(self.side, UniPTSideNetwork):  # pooled without the per-token work pooling would drop
            out = self.backbone(batch)
            return self.side.pooled(out.hidden_states, out.mask, out.final, self.pooling)
        tokens, mask = self(batch)
        return pool_tokens(tokens, mask, self.pooling)

    def trained_state_keys(self) -> List[str]:
        """The side network, with its buffers (e.g. BatchNorm statistics); never the frozen backbone."""
        return [k for k in self.state_dict() if k.startswith("side.")]
