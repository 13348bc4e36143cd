"""Encoder kinds, one module each: what a method puts on a loaded backbone. Every encoder has one interface —
`forward(batch) -> (tokens, mask)`, `embed(batch)`, `out_dim`, `pooling`, `trained_state_keys()` — so the tasks,
the trainer, the engines and the checkpoints treat every method alike.

- unipt.py: UniPTEncoder (method=unipt), the side network over tapped states of a no-grad backbone;
- ladder.py: LadderEncoder (method=ladder), the LST/QST baseline on a decoder;
- backbone_tuning.py: BackboneEncoder (lora, full, linear_probe), the backbone's own final state, with peft LoRA
  adapters, every weight, or nothing trained.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from unipt_scale.backbone import FrozenBackbone
from unipt_scale.config import ConfigError, LadderConfig, LoRAConfig, UniPTConfig
from unipt_scale.encoders.backbone_tuning import BackboneEncoder, trainable_for
from unipt_scale.encoders.ladder import LadderEncoder
from unipt_scale.encoders.pooling import resolve_pooling
from unipt_scale.encoders.unipt import UniPTEncoder

__all__ = ["BackboneEncoder", "LadderEncoder", "UniPTEncoder", "build_encoder", "resolve_pooling"]


def build_encoder(backbone: FrozenBackbone, method: str = "unipt", unipt: Optional[UniPTConfig] = None,
                  lora: Optional[LoRAConfig] = None, what: str = "the backbone", causal: bool = False,
                  ladder: Optional[LadderConfig] = None) -> nn.Module:
    """The encoder a method puts on a loaded backbone (any FrozenBackbone, wrap_module's included). `causal`:
    UniPT's causal form (the other methods are as causal as the backbone itself)."""
    unipt = unipt or UniPTConfig()
    if method == "ladder":
        return LadderEncoder(backbone, ladder or LadderConfig(), pooling=unipt.pooling)
    if method == "unipt":
        if causal and backbone.is_feature_map:
            raise ConfigError("the causal side network is for token sequences; unset unipt.causal for a CNN")
        return UniPTEncoder(backbone, unipt, causal=causal)
    return BackboneEncoder(backbone, trainable_for(method), lora, pooling=unipt.pooling, what=what)
