"""task.kind=classification: the encoder's pooled feature → dropout → Linear; cross entropy; accuracy and loss.
Batch fields: the backbone's inputs and `labels` (class indices)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.trained import task_trained_keys


# The validation metric a sweep chooses its variant by, and whether higher or lower is better.
SELECTION = ("accuracy", "max")
DATA = {"needs_labels": True}  # the backbone's inputs and the class of each sample


class ClassificationModel(nn.Module):
    """Encoder (any method's) → pooled feature → dropout → Linear."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"classification needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.out_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, batch) -> torch.Tensor:
        return self.classifier(self.dropout(self.encoder.embed(batch)))

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"encoder": self.encoder})

    def training_loss(self, batch):
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean().detach()}

    @torch.no_grad()
    def eval_step(self, batch):
        return {"logits": self(batch).float().cpu(), "labels": batch["labels"].cpu()}

    @staticmethod
    def eval_metrics(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        logits = torch.cat([o["logits"] for o in outputs])
        labels = torch.cat([o["labels"] for o in outputs])
        counts = torch.bincount(labels, minlength=logits.shape[-1])
        return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
                "loss": F.cross_entropy(logits, labels).item(),
                "majority_rate": (counts.max() / counts.sum()).item(),
                "num_samples": int(labels.numel())}


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> ClassificationModel:
    """The task model of `cfg` over `encoder(backbone_config, what)`; `num_classes` counted from the data when
    task.num_classes is unset."""
    n = cfg.task.num_classes or num_classes
    if n < 2:
        raise ConfigError(f"classification needs at least 2 classes, got {n}; check the data "
                          "(data.source, data.path, data.label_column) or set task.num_classes")
    return ClassificationModel(encoder(cfg.backbone, "the backbone"), n, cfg.task.dropout)
