"""The public names of the task models and encoders, where they have always been imported from. Their homes:
unipt_scale.tasks (one module per task kind, and build_model), unipt_scale.encoders (one module per encoder kind)
and unipt_scale.trained (the trained-state rule)."""
from unipt_scale.encoders import LadderEncoder, UniPTEncoder, build_encoder  # noqa: F401
from unipt_scale.tasks import build_model  # noqa: F401
from unipt_scale.tasks.classification import ClassificationModel  # noqa: F401
from unipt_scale.tasks.retrieval import RetrievalModel, recall_at_k  # noqa: F401
from unipt_scale.trained import (check_trained_rule, count_parameters, logical_numel, trained_state_dict,  # noqa: F401
                                 trained_state_keys)
