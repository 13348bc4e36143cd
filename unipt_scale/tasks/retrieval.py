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

# The validation metric a sweep chooses its variant by, and whether higher or lower is better.
SELECTION = ("rsum", "max")


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
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * img @ txt.t()
        if "labels" in batch:
            # Templated captions repeat: every pair with the same label is a positive.
            pos = (batch["labels"][:, None] == batch["labels"][None, :]).float()
        else:
            pos = torch.eye(len(img), device=img.device)
        target = pos / pos.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target.t() * F.log_softmax(logits.t(), 1), 1).mean())
        return loss, {"temperature": (1.0 / scale).detach()}

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
        if "labels" in outputs[0]:
            labels = torch.cat([o["labels"] for o in outputs])
            pos = labels[:, None] == labels[None, :]
        else:
            pos = torch.eye(len(img), dtype=torch.bool)
        sim = img @ txt.t()
        i2t, t2i = recall_at_k(sim, pos), recall_at_k(sim.t(), pos.t())
        metrics = {f"i2t_r{k}": v for k, v in i2t.items()}
        metrics.update({f"t2i_r{k}": v for k, v in t2i.items()})
        metrics["rsum"] = sum(i2t.values()) + sum(t2i.values())
        metrics["num_samples"] = len(img)
        return metrics


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> RetrievalModel:
    image = encoder(cfg.image_backbone, "the image tower")
    text = encoder(cfg.backbone, "the text tower")
    return RetrievalModel(image, text, cfg.task.embed_dim, cfg.task.init_temperature)
