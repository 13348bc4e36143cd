"""The public names of the backbone-tuning methods (lora, full, linear_probe), where they have always been imported
from; their home is unipt_scale.encoders.backbone_tuning."""
from unipt_scale.encoders.backbone_tuning import (LORA_TARGET_CANDIDATES, TRAINABLE, BackboneEncoder,  # noqa: F401
                                                  inject_lora, is_lora_key, prepare_quantized_base,
                                                  resolve_lora_targets, trainable_for)
from unipt_scale.encoders.pooling import resolve_pooling  # noqa: F401
