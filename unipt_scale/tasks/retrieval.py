"""task.kind=retrieval: a dual encoder (image tower, text tower, each its own encoder of the method) with linear
projections, trained with symmetric InfoNCE; image→text and text→image recall@1/5/10 and rsum. Batch fields: both
towers' inputs and, where captions are templated, `labels` (pairs with one label are all positives)."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import RunConfig
from unipt_scale.trained import task_trained_keys



def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> Dict[int, float]:
    """sim (Q, C) scores; positives (Q, C) bool. Recall@k = share of queries with a positive in the top k."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[k] = positives.gather(1, top).any(1).float().mean().item()
    return out

def median_rank(sim: torch.Tensor, positives: torch.Tensor) -> float:
    """Median over queries of the rank (1 = first) of the best-ranked positive (the mean of the two middle ranks
    for an even count, as numpy's median and CLIP4Clip's MdR)."""
    order = sim.argsort(dim=1, descending=True)
    first = positives.gather(1, order).float().argmax(1) + 1
    return first.float().quantile(0.5).item()


def positives_of(n: int, labels, device=None) -> torch.Tensor:
    """(n, n) bool: the pair's own match, and every pair with the same label (templated captions repeat)."""
    if labels is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return labels[:, None] == labels[None, :]


def two_way_recalls(sim: torch.Tensor, positives: torch.Tensor, forward: str, backward: str) -> Dict[str, float]:
    """`forward`_r1/5/10 over sim's rows, `backward`_r1/5/10 over its columns, and rsum (their sum)."""
    there, back = recall_at_k(sim, positives), recall_at_k(sim.t(), positives.t())
    metrics = {f"{forward}_r{k}": v for k, v in there.items()}
    metrics.update({f"{backward}_r{k}": v for k, v in back.items()})
    metrics["rsum"] = sum(there.values()) + sum(back.values())
    return metrics


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale), capped at 100 (CLIP's cap): the InfoNCE logits' scale, 1 / temperature."""
    return logit_scale.clamp(max=math.log(100.0)).exp()


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, labels=None,
             hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of normalised embeddings a, b (B, E), every same-label pair a positive.
    `hard_negatives` (B, E), in a's space: row i is one more negative for b_i alone (its own a_i altered, e.g. a
    clip played backwards), so it cannot be a false negative of another row that shares i's label."""
    scale = logit_scale_value(logit_scale)
    logits = scale * a @ b.t()
    pos = positives_of(len(a), labels, a.device).float()
    target = pos / pos.sum(1, keepdim=True)
    b_to_a, target_b = logits.t(), target.t()
    if hard_negatives is not None:
        b_to_a = torch.cat([b_to_a, scale * (b * hard_negatives).sum(-1, keepdim=True)], 1)
        target_b = F.pad(target_b, (0, 1))
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target_b * F.log_softmax(b_to_a, 1), 1).mean())


# The validation metric a sweep chooses its variant by, and whether higher or lower is better.
SELECTION = ("rsum", "max")
# What a batch carries (unipt_scale.data.build_data): both towers' inputs, the labels where the shards have them.
DATA = {"needs_image": True, "needs_labels": None}


class RetrievalModel(nn.Module):
    """Dual encoder (image tower, text tower, each with its own encoder of the method) trained with symmetric
    InfoNCE."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int,
                 init_temperature: float = 0.07):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_proj = nn.Linear(image_encoder.out_dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.out_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

    def embed_images(self, batch):
        return F.normalize(self.image_proj(self.image_encoder.embed(batch)).float(), dim=-1)

    def embed_texts(self, batch):
        return F.normalize(self.text_proj(self.text_encoder.embed(batch)).float(), dim=-1)

    def training_loss(self, batch):
        img, txt = self.embed_images(batch), self.embed_texts(batch)
        loss = info_nce(img, txt, self.logit_scale, batch.get("labels"))
        return loss, {"temperature": (1.0 / logit_scale_value(self.logit_scale)).detach()}

    @torch.no_grad()
    def eval_step(self, batch):
        out = {"image": self.embed_images(batch).cpu(), "text": self.embed_texts(batch).cpu()}
        if "labels" in batch:
            out["labels"] = batch["labels"].cpu()
        return out

    @staticmethod
    def eval_metrics(outputs):
        img = torch.cat([o["image"] for o in outputs])
        txt = torch.cat([o["text"] for o in outputs])
        pos = positives_of(len(img), torch.cat([o["labels"] for o in outputs]) if "labels" in outputs[0] else None)
        metrics = two_way_recalls(img @ txt.t(), pos, "i2t", "t2i")
        metrics["num_samples"] = len(img)
        return metrics


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> RetrievalModel:
    image = encoder(cfg.image_backbone, "the image tower")
    text = encoder(cfg.backbone, "the text tower")
    return RetrievalModel(image, text, cfg.task.embed_dim, cfg.task.init_temperature)
