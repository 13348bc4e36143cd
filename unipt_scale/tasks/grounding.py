"""task.kind=grounding: a referring expression and an image → one box. The expression's tokens and the image
tower's tokens (a CNN feature map or a ViT's patches, each its own encoder of the method) are read together by
the light fusion (tasks/fusion.py); a box head predicts (cx, cy, w, h) in [0, 1]. Loss: L1 on (cx, cy, w, h) plus
generalised IoU (DETR's box loss, weights task.box_l1_weight and task.box_giou_weight). Metric: accuracy at IoU
≥ 0.5 (the RefCOCO protocol; predicted boxes clipped to the image for scoring), mean IoU, and by expression kind
where KEY.json marks it `relational`. Images are resized to the square input without cropping (data.image_size),
so a box in [0, 1] of the image stays the same box.

Batch fields: both towers' inputs; `box` (B, 4): [x0, y0, x1, y1] in [0, 1] of the image; `relational` (-1 where
absent)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import RunConfig
from unipt_scale.tasks.fusion import TokenFusion, by_relational, kept_for_eval
from unipt_scale.trained import task_trained_keys

SELECTION = ("accuracy", "max")
# Images are stretched to the square input, never cropped: a crop would cut the boxes' coordinates loose.
DATA = {"needs_image": True, "needs_labels": False, "meta": {"box": "float[4]", "relational": "long?"},
        "image_resize": "stretch"}


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


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
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))
        self.l1_weight, self.giou_weight = l1_weight, giou_weight

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

    def forward(self, batch) -> torch.Tensor:
        """(B, 4) predicted boxes, xyxy in image units ((cx, cy, w, h) each in [0, 1]; corners may pass the
        image's edge, and are clipped for scoring)."""
        text, text_mask = self.text_encoder(batch)
        image, image_mask = self.image_encoder(batch)
        return cxcywh_to_xyxy(self.head(self.fusion(text, text_mask, image, image_mask)).float().sigmoid())

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
