"""The ladder encoder (method=ladder, LST/QST): the frozen decoder (no grad) → every hidden state → the ladder side
network (unipt_scale.ladder)."""
from __future__ import annotations

import torch.nn as nn

from unipt_scale.backbone import FrozenBackbone
from unipt_scale.config import ConfigError, LadderConfig
from unipt_scale.encoders.pooling import resolve_pooling
from unipt_scale.encoders.unipt import UniPTEncoder
from unipt_scale.ladder import LadderSideNetwork


class LadderEncoder(UniPTEncoder):
    """Backbone (frozen, no-grad) → every hidden state → the ladder side network (method=ladder, LST/QST)."""

    def __init__(self, backbone: FrozenBackbone, cfg: LadderConfig, pooling: str = "auto"):
        nn.Module.__init__(self)
        if backbone.kind != "decoder" or backbone.is_feature_map:
            raise ConfigError("method=ladder runs on a decoder backbone (a ladder of causal side blocks)")
        self.backbone = backbone
        backbone.tap(range(backbone.num_hidden_states))
        self.side = LadderSideNetwork(cfg, backbone.hidden_sizes, backbone.out_dim)
        self.out_dim = backbone.out_dim
        self.pooling = resolve_pooling(pooling, backbone)
