"""task.kind=vqa: a question tower and an image tower (each its own encoder of the method), their tokens read together
by a light fusion (tasks/fusion.py), and a classifier over the answer vocabulary (the answers of the training split,
which `unipt shards` writes as the shards' classes). Or, without image_backbone, one vision-language backbone (ViLT)
whose layers read question and image together, its pooled feature into the head. Trained with soft cross entropy
against the distribution of the answers given; metric: VQA accuracy, min(#answers equal to the prediction / min(3,
#given), 1) — the VQAv2 score with ten answers, plain accuracy with one — overall and, where KEY.json marks
questions `relational` (sort-of-clevr), for relational and non-relational questions apart.

Batch fields: both towers' inputs; `answer_ids` (B, A): the given answers' class indices, -1 padded; `num_answers`
(B,): how many answers were given (those outside the vocabulary included); `relational` (-1 where absent)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.tasks.fusion import TokenFusion, by_relational, kept_for_eval
from unipt_scale.trained import task_trained_keys

SELECTION = ("accuracy", "max")
DATA = {"needs_image": True, "needs_labels": False,
        "meta": {"answer_ids": "long[]", "num_answers": "long", "relational": "long?"}}


def answer_targets(answer_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) counts of each class among a question's given answers (padding and unknown answers dropped)."""
    valid = answer_ids >= 0
    if (answer_ids >= num_classes).any():
        raise ValueError(f"answer class {int(answer_ids.max())} is outside the head's {num_classes} classes: "
                         "task.num_classes is smaller than the shards' answer vocabulary; unset it")
    counts = torch.zeros(answer_ids.shape[0], num_classes, device=answer_ids.device)
    return counts.scatter_add_(1, answer_ids.clamp(min=0), valid.float())


def vqa_scores(pred: torch.Tensor, answer_ids: torch.Tensor, num_answers: torch.Tensor) -> torch.Tensor:
    """Per question: min(#given answers equal to the prediction / min(3, #given), 1)."""
    hits = ((answer_ids == pred[:, None]) & (answer_ids >= 0)).sum(1).float()
    return (hits / num_answers.clamp(min=1).clamp(max=3).float()).clamp(max=1.0)


def answer_head(dim: int, num_answers: int, dropout: float) -> nn.Sequential:
    if num_answers < 2:
        raise ConfigError(f"vqa needs an answer vocabulary of at least 2 answers, got {num_answers}; write the "
                          "shards with `unipt shards --source vqa|sort-of-clevr` (their classes are the answers)")
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, num_answers))


class AnswerScoring(nn.Module):
    """Loss, eval step and metrics of a model whose forward gives (B, answers) logits."""

    num_classes: int

    def training_loss(self, batch):
        logits = self(batch).float()
        counts = answer_targets(batch["answer_ids"], self.num_classes)
        answered = counts.sum(1) > 0
        if not answered.any():  # no question of this batch has an answer in the vocabulary
            return logits.sum() * 0.0, {"accuracy": torch.zeros(())}
        target = counts[answered] / counts[answered].sum(1, keepdim=True)
        loss = -(target * torch.log_softmax(logits[answered], -1)).sum(1).mean()
        score = vqa_scores(logits.argmax(-1), batch["answer_ids"], batch["num_answers"]).mean()
        return loss, {"accuracy": score.detach()}

    @torch.no_grad()
    def eval_step(self, batch):
        pred = self(batch).argmax(-1)
        return kept_for_eval(batch, {"score": vqa_scores(pred, batch["answer_ids"], batch["num_answers"]).cpu(),
                                     "pred": pred.cpu(), "answered": (batch["num_answers"] > 0).cpu()})

    @staticmethod
    def eval_metrics(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Over the questions that come with answers (a test split without them is counted, not scored)."""
        answered = torch.cat([o["answered"] for o in outputs])
        score = torch.cat([o["score"] for o in outputs])[answered]
        metrics = {"accuracy": score.mean().item() if score.numel() else float("nan"),
                   "num_samples": int(score.numel()), "unanswered": int((~answered).sum())}
        metrics.update(by_relational("accuracy", score, outputs, answered))
        return metrics


class VQAModel(AnswerScoring):
    """Two towers (question, image) read together by the token fusion."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, num_answers: int, dim: int = 256,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = TokenFusion(text_encoder.out_dim, image_encoder.out_dim, dim, layers, dropout)
        self.head = answer_head(dim, num_answers, dropout)
        self.num_classes = num_answers

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

    def forward(self, batch) -> torch.Tensor:
        text, text_mask = self.text_encoder(batch)
        image, image_mask = self.image_encoder(batch)
        return self.head(self.fusion(text, text_mask, image, image_mask))


class JointVQAModel(AnswerScoring):
    """One vision-language backbone (ViLT), whose every layer already reads question and image together: its
    encoder's pooled feature (the text [CLS], ViLT's own VQA input) straight into the answer head."""

    def __init__(self, encoder: nn.Module, num_answers: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head = answer_head(encoder.out_dim, num_answers, dropout)
        self.num_classes = num_answers

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"encoder": self.encoder})

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.encoder.embed(batch))


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> AnswerScoring:
    if cfg.image_backbone is None:  # a vision-language backbone (trainer.check_backbones has checked it is one)
        return JointVQAModel(encoder(cfg.backbone, "the vision-language backbone"), cfg.task.num_classes or num_classes,
                             cfg.task.dropout)
    image = encoder(cfg.image_backbone, "the image tower")
    text = encoder(cfg.backbone, "the question tower")
    return VQAModel(image, text, cfg.task.num_classes or num_classes, cfg.task.fusion_dim, cfg.task.fusion_layers,
                    cfg.task.dropout)
