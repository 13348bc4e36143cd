"""The public names of the causal-LM task, where they have always been imported from; its home is
unipt_scale.tasks.causal_lm."""
from unipt_scale.tasks.causal_lm import (CausalLMModel, chunked_lm_loss, load_lm_head,  # noqa: F401
                                         zero3_partitioned)
