"""task.kind=grounding: a referring expression and an image → one box. The expression's tokens and the image
tower's tokens (a CNN feature map or a ViT's patches, each its own encoder of the method) are read together by
the light fusion (tasks/fusion.py); a spatial box head (below) reads the image tokens where they lie on their
grid, so the tower's resolution bounds the precision: a CNN tower is tapped at stride 8 or 16 (unipt.image_layers)
rather than 32. Loss: L1 on (cx, cy, w, h) plus generalised IoU (DETR's box loss, weights task.box_l1_weight and
task.box_giou_weight). Metric: accuracy at IoU ≥ 0.5 (the RefCOCO protocol; predicted boxes clipped to the image
for scoring), mean IoU, and by expression kind where KEY.json marks it `relational`. Images are resized to the
square input without cropping (data.image_size), so a box in [0, 1] of the image stays the same box.

Batch fields: both towers' inputs; `box` (B, 4): [x0, y0, x1, y1] in [0, 1] of the image; `relational` (-1 where
absent)."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import RunConfig
from unipt_scale.side_network import masked_mean
from unipt_scale.tasks.fusion import TokenFusion, by_relational, kept_for_eval, token_grid
from unipt_scale.trained import task_trained_keys

SELECTION = ("accuracy", "max")
# Images are stretched to the square input, never cropped: a crop would cut the boxes' coordinates loose.
DATA = {"needs_image": True, "needs_labels": False, "meta": {"box": "float[4]", "relational": "long?"},
        "image_resize": "stretch"}


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor):
    """Element-wise IoU and union of (N, 4) xyxy boxes."""
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU (Rezatofighi et al. 2019): IoU - (enclosing area - union) / enclosing area."""
    iou, union = box_iou(a, b)
    wh = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-9)


class SpatialBoxHead(nn.Module):
    """One box, read where the image tokens lie. Every grid cell proposes the box it sits in as its distances to
    the four edges (FCOS's form: all cells on an object agree on one box) and gets a score; the box is the
    score-softmax average of the proposals. A cell's score is the sum of two matches: the tower's own token against
    the expression's mean token (what is there against what is named: no position code or fusion in between,
    which learns direct expressions within a few hundred steps, and gives the loss a direct path into the image
    tower's side network) and the fused token against the fusion's [CLS] (what the fusion found from the
    expression and the neighbours: relations such as "closest to").

    Why not regress the box from the [CLS] feature alone: that must learn to turn "which token" into coordinates,
    which DETR-style heads learn slowly (on Sort-of-CLEVR, no method had left the average box after 300 steps)."""

    def __init__(self, dim: int, image_dim: int, text_dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.query_from_tower = nn.Linear(text_dim, dim)
        self.key = nn.Linear(dim, dim)
        self.key_from_tower = nn.Sequential(nn.Linear(image_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.edges = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, joint: torch.Tensor, expression: torch.Tensor, image_tokens: torch.Tensor,
                tower_tokens: torch.Tensor) -> torch.Tensor:
        """joint (B, dim): the fusion's [CLS]; expression (B, text_dim): the text tower's mean token;
        image_tokens (B, N, dim): the fused image tokens; tower_tokens (B, N, image_dim): the image tower's →
        (B, 4) boxes, xyxy in image units."""
        extra, rows, cols = token_grid(image_tokens.shape[1])
        cells = image_tokens[:, extra:].float()
        fused_keys, tower_keys = self.key(cells), self.key_from_tower(tower_tokens[:, extra:].float())
        ys, xs = torch.meshgrid(torch.arange(rows, device=cells.device), torch.arange(cols, device=cells.device),
                                indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) / cols, (ys.flatten() + 0.5) / rows], -1)  # (R·C, 2)
        cell_size = torch.tensor([1.0 / cols, 1.0 / rows], device=cells.device).repeat(2)
        edges = F.softplus(self.edges(cells)) * cell_size  # left, top, right, bottom
        proposals = torch.cat([centres - edges[..., :2], centres + edges[..., 2:]], -1)
        scores = ((fused_keys @ self.query(joint.float()).unsqueeze(-1))
                  + (tower_keys @ self.query_from_tower(expression.float()).unsqueeze(-1))).squeeze(-1)
        scores = scores / math.sqrt(cells.shape[-1])
        return (torch.softmax(scores, -1).unsqueeze(-1) * proposals).sum(1)


def check_boxes(box: torch.Tensor) -> None:
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"grounding reads `box` as [x0, y0, x1, y1] per sample, got shape {tuple(box.shape)}")


class GroundingModel(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, dim: int = 256, layers: int = 2,
                 dropout: float = 0.1, l1_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = TokenFusion(text_encoder.out_dim, image_encoder.out_dim, dim, layers, dropout)
        self.head = SpatialBoxHead(dim, image_encoder.out_dim, text_encoder.out_dim)
        self.l1_weight, self.giou_weight = l1_weight, giou_weight

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

    def forward(self, batch) -> torch.Tensor:
        """(B, 4) predicted boxes, xyxy in image units (corners may pass the image's edge, and are clipped for
        scoring)."""
        text, text_mask = self.text_encoder(batch)
        image, image_mask = self.image_encoder(batch)
        fused = self.fusion.sequence(text, text_mask, image, image_mask)
        image_part = fused[:, fused.shape[1] - image.shape[1]:]
        return self.head(fused[:, 0], masked_mean(text.float(), text_mask), image_part, image)

    def training_loss(self, batch):
        check_boxes(batch["box"])
        pred, gt = self(batch), batch["box"].float()
        l1 = F.l1_loss(xyxy_to_cxcywh(pred), xyxy_to_cxcywh(gt))
        giou = (1 - generalized_box_iou(pred, gt)).mean()
        iou, _ = box_iou(pred, gt)
        return self.l1_weight * l1 + self.giou_weight * giou, {"accuracy": (iou >= 0.5).float().mean().detach()}

    @torch.no_grad()
    def eval_step(self, batch):
        check_boxes(batch["box"])
        iou, _ = box_iou(self(batch).clamp(0.0, 1.0), batch["box"].float())
        return kept_for_eval(batch, {"iou": iou.cpu()})

    @staticmethod
    def eval_metrics(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        iou = torch.cat([o["iou"] for o in outputs])
        hit = (iou >= 0.5).float()
        metrics = {"accuracy": hit.mean().item(), "mean_iou": iou.mean().item(), "num_samples": int(iou.numel())}
        metrics.update(by_relational("accuracy", hit, outputs))
        return metrics


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> GroundingModel:
    image = encoder(cfg.image_backbone, "the image tower")
    text = encoder(cfg.backbone, "the expression tower")
    return GroundingModel(image, text, cfg.task.fusion_dim, cfg.task.fusion_layers, cfg.task.dropout,
                          cfg.task.box_l1_weight, cfg.task.box_giou_weight)
