"""What every encoder kind shares: the pooling rule of a backbone's tokens."""
from __future__ import annotations

from unipt_scale.backbone import FrozenBackbone


def resolve_pooling(pooling: str, backbone: FrozenBackbone) -> str:
    """auto: decoders pool their last token, ViT-likes and vision-language models (ViLT: the text [CLS] its pooler
    reads) the first, CNN feature maps and text encoders the mean."""
    if pooling != "auto":
        return pooling
    if backbone.is_feature_map:
        return "mean"
    return {"decoder": "last", "vision": "first", "vision_language": "first"}.get(backbone.kind, "mean")
