"""task.kind=video_retrieval (CLIP4Clip's setup): a clip's T frames go through the image tower as B·T images
(each frame its own UniPT pass), the per-frame embeddings are aggregated over time, and the video embedding is
matched against the text tower's with symmetric InfoNCE. Aggregation (task.temporal): `mean` (CLIP4Clip's
meanP) or `seq_transformer` (its seqTransf: learned frame positions, a small transformer, a residual, then the
mean), the only one of the two that can see frame order.

Metrics: text→video and video→text R@1/5/10, median rank, rsum; and, where the shards pair every clip with its
time-reversed twin (KEY.json `pair`, `order`: moving-fashion), `order_accuracy`: the share of captions scored
higher against their own clip than against the reversed twin (ties count one half; order-blind pooling gets
0.5). Batch fields: `frames` (B, T, C, H, W), the text tower's inputs, `labels` where the shards have them (pairs
with one label are all positives), `pair` and `order` (-1 where absent)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.side_network import masked_mean
from unipt_scale.tasks.fusion import head_count
from unipt_scale.tasks.retrieval import info_nce, logit_scale_value, median_rank, positives_of, two_way_recalls
from unipt_scale.trained import task_trained_keys

SELECTION = ("rsum", "max")
DATA = {"needs_frames": True, "needs_labels": None, "meta": {"pair": "long?", "order": "long?"}}
TEMPORAL = ("mean", "seq_transformer")
_TIE = 1e-5  # scores this close count as a tie in order_accuracy


class TemporalTransformer(nn.Module):
    """CLIP4Clip's seqTransf: frame embeddings plus learned frame positions through a small transformer, added
    back to the frame embeddings, then averaged over time (over the kept positions, given a mask). The text side
    uses the same form over a caption's tokens (task.text_layers).

    The frames are layer-normalised before the positions are added, and the positions start at that unit scale:
    added at 0.02 to features of a tower's own scale (EfficientNet-Lite0's projected frames: std 1.6) they left a
    clip and its reversal at cosine 0.999998 after an epoch, and AdamW at 5e-4 moves them by about 0.1 in 200 steps."""

    def __init__(self, dim: int, max_frames: int, layers: int, heads: int, what: str = "frames per clip",
                 limit_key: str = "data.num_frames"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.positions = nn.Embedding(max_frames, dim)
        nn.init.normal_(self.positions.weight, std=1.0)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.what, self.limit_key = what, limit_key

    def forward(self, frames: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = frames.shape[1]
        if t > self.positions.num_embeddings:
            raise ValueError(f"{t} {self.what}, but the transformer was built for at most "
                             f"{self.positions.num_embeddings} ({self.limit_key})")
        x = self.norm(frames) + self.positions.weight[:t]
        out = frames + self.encoder(x, src_key_padding_mask=None if mask is None else ~mask.bool())
        return masked_mean(out, mask)


class VideoRetrievalModel(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int, temporal: str = "mean",
                 max_frames: int = 8, temporal_layers: int = 2, init_temperature: float = 0.07,
                 text_layers: int = 0, max_tokens: int = 64, reversed_negatives: bool = False):
        super().__init__()
        if temporal not in TEMPORAL:
            raise ConfigError(f"task.temporal={temporal!r}; choose one of {', '.join(TEMPORAL)}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.frame_proj = nn.Linear(image_encoder.out_dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.out_dim, embed_dim)
        self.temporal = TemporalTransformer(embed_dim, max_frames, temporal_layers, head_count(embed_dim)) \
            if temporal == "seq_transformer" else None
        # Order-aware text pooling: a caption's tokens, mixed with their positions before the mean.
        self.text_mixer = TemporalTransformer(embed_dim, max_tokens, text_layers, head_count(embed_dim),
                                              "tokens per caption", "data.max_length") if text_layers else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.reversed_negatives = reversed_negatives

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

    def embed_frames(self, batch) -> torch.Tensor:
        """(B, T, E): each frame through the image tower on its own, as B·T images."""
        frames = batch["frames"]
        if frames.dim() != 5:
            raise ValueError(f"video_retrieval reads `frames` (B, T, C, H, W), got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        per_frame = self.frame_proj(self.image_encoder.embed({"pixel_values": frames.flatten(0, 1)}))
        return per_frame.view(b, t, -1)

    def aggregate(self, per_frame: torch.Tensor) -> torch.Tensor:
        video = per_frame.mean(1) if self.temporal is None else self.temporal(per_frame)
        return F.normalize(video.float(), dim=-1)

    def embed_videos(self, batch) -> torch.Tensor:
        return self.aggregate(self.embed_frames(batch))

    def embed_texts(self, batch) -> torch.Tensor:
        if self.text_mixer is None:
            return F.normalize(self.text_proj(self.text_encoder.embed(batch)).float(), dim=-1)
        tokens, mask = self.text_encoder(batch)
        return F.normalize(self.text_mixer(self.text_proj(tokens), mask).float(), dim=-1)

    def training_loss(self, batch):
        per_frame = self.embed_frames(batch)
        video, text = self.aggregate(per_frame), self.embed_texts(batch)
        # Each frame is embedded on its own, so the clip played backwards is the same frames aggregated in
        # reverse: a negative that differs from the positive in order alone.
        reversed_clip = self.aggregate(per_frame.flip(1)) if self.reversed_negatives else None
        loss = info_nce(video, text, self.logit_scale, batch.get("labels"), hard_negatives=reversed_clip)
        return loss, {"temperature": (1.0 / logit_scale_value(self.logit_scale)).detach()}

    @torch.no_grad()
    def eval_step(self, batch):
        out = {"video": self.embed_videos(batch).cpu(), "text": self.embed_texts(batch).cpu()}
        for key in ("labels", "pair", "order"):
            if key in batch:
                out[key] = batch[key].cpu()
        return out

    @staticmethod
    def eval_metrics(outputs: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        video = torch.cat([o["video"] for o in outputs])
        text = torch.cat([o["text"] for o in outputs])
        labels = torch.cat([o["labels"] for o in outputs]) if "labels" in outputs[0] else None
        pos = positives_of(len(video), labels)
        sim = text @ video.t()  # (captions, clips)
        metrics = two_way_recalls(sim, pos, "t2v", "v2t")
        metrics["t2v_median_rank"] = median_rank(sim, pos)
        metrics["v2t_median_rank"] = median_rank(sim.t(), pos.t())
        metrics["num_samples"] = len(video)
        if "pair" in outputs[0]:
            acc = order_accuracy(sim, torch.cat([o["pair"] for o in outputs]),
                                 torch.cat([o["order"] for o in outputs]))
            if acc is not None:
                metrics["order_accuracy"] = acc
        return metrics


def order_accuracy(sim: torch.Tensor, pair: torch.Tensor, order: torch.Tensor):
    """Share of captions whose own clip outscores its time-reversed twin (ties one half); None without twins."""
    where = {(int(p), int(o)): i for i, (p, o) in enumerate(zip(pair.tolist(), order.tolist())) if p >= 0}
    scores = []
    for (p, o), i in where.items():
        j = where.get((p, 1 - o))
        if j is not None:
            diff = (sim[i, i] - sim[i, j]).item()
            scores.append(0.5 if abs(diff) <= _TIE else float(diff > 0))
    return sum(scores) / len(scores) if scores else None


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> VideoRetrievalModel:
    image = encoder(cfg.image_backbone, "the image tower")
    text = encoder(cfg.backbone, "the text tower")
    return VideoRetrievalModel(image, text, cfg.task.embed_dim, cfg.task.temporal, cfg.data.num_frames,
                               cfg.task.temporal_layers, cfg.task.init_temperature, cfg.task.text_layers,
                               cfg.data.max_length, cfg.task.reversed_negatives)
