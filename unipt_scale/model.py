"""Encoders (UniPT here, the other methods in unipt_scale.methods) and the task models built on them.

A task model exposes what the trainer uses: `training_loss(batch)`, `eval_step(batch)`, `eval_metrics(outputs)`
and `trained_state_keys()`, the one rule for what a method trains and what its checkpoint holds.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.backbone import FrozenBackbone, load_backbone
from unipt_scale.config import ConfigError, LadderConfig, LoRAConfig, RunConfig, UniPTConfig
from unipt_scale.methods import BackboneEncoder, resolve_pooling, trainable_for
from unipt_scale.side_network import (UniPTFeatureMapSideNetwork, UniPTSideNetwork, pool_tokens,
                                      resolve_layers)


class UniPTEncoder(nn.Module):
    """Backbone (frozen, no-grad) → tapped hidden states → UniPT → per-token features and a pooled vector."""

    def __init__(self, backbone: FrozenBackbone, cfg: UniPTConfig, causal: bool = False):
        super().__init__()
        self.backbone = backbone
        layers = resolve_layers(cfg.layers, backbone.num_hidden_states)
        backbone.tap(layers)
        if backbone.is_feature_map:
            sizes = [backbone.stage_sizes[i] for i in layers]
            self.side = UniPTFeatureMapSideNetwork(cfg, backbone.hidden_sizes, sizes)
        else:
            self.side = UniPTSideNetwork(cfg, backbone.hidden_sizes, backbone.out_dim, causal=causal)
        self.out_dim = backbone.out_dim
        self.pooling = resolve_pooling(cfg.pooling, backbone)

    def forward(self, batch: Dict[str, torch.Tensor]):
        out = self.backbone(batch)
        tokens = self.side(out.hidden_states, out.mask, out.final)
        mask = out.mask if not self.backbone.is_feature_map else None
        return tokens, mask

    def embed(self, batch) -> torch.Tensor:
        tokens, mask = self(batch)
        return pool_tokens(tokens, mask, self.pooling)

    def trained_state_keys(self) -> List[str]:
        """The side network, with its buffers (e.g. BatchNorm statistics); never the frozen backbone."""
        return [k for k in self.state_dict() if k.startswith("side.")]


class LadderEncoder(UniPTEncoder):
    """Backbone (frozen, no-grad) → every hidden state → the ladder side network (method=ladder, LST/QST)."""

    def __init__(self, backbone: FrozenBackbone, cfg: LadderConfig, pooling: str = "auto"):
        nn.Module.__init__(self)
        from unipt_scale.ladder import LadderSideNetwork

        if backbone.kind != "decoder" or backbone.is_feature_map:
            raise ConfigError("method=ladder runs on a decoder backbone (a ladder of causal side blocks)")
        self.backbone = backbone
        backbone.tap(range(backbone.num_hidden_states))
        self.side = LadderSideNetwork(cfg, backbone.hidden_sizes, backbone.out_dim)
        self.out_dim = backbone.out_dim
        self.pooling = resolve_pooling(pooling, backbone)


def build_encoder(backbone: FrozenBackbone, method: str = "unipt", unipt: Optional[UniPTConfig] = None,
                  lora: Optional[LoRAConfig] = None, what: str = "the backbone", causal: bool = False,
                  ladder: Optional[LadderConfig] = None) -> nn.Module:
    """The encoder a method puts on a loaded backbone (any FrozenBackbone, wrap_module's included). `causal`:
    UniPT's causal form (the other methods are as causal as the backbone itself)."""
    unipt = unipt or UniPTConfig()
    if method == "ladder":
        return LadderEncoder(backbone, ladder or LadderConfig(), pooling=unipt.pooling)
    if method == "unipt":
        if causal and backbone.is_feature_map:
            raise ConfigError("the causal side network is for token sequences; unset unipt.causal for a CNN")
        return UniPTEncoder(backbone, unipt, causal=causal)
    return BackboneEncoder(backbone, trainable_for(method), lora, pooling=unipt.pooling, what=what)


def trained_state_keys(model: nn.Module) -> List[str]:
    """State-dict keys of what the model's method trains — exactly what checkpoints hold and reload.

    The task models' rule: each encoder's own trained keys (UniPT: its side network; lora: the adapters; full:
    the whole backbone; linear_probe: nothing) plus everything outside the encoders (the task head)."""
    rule = getattr(model, "trained_state_keys", None)
    if not callable(rule):
        raise TypeError(f"{type(model).__name__} has no trained_state_keys(): a task model says which of its "
                        "state-dict keys its method trains (see ClassificationModel)")
    return list(rule())


def _task_trained_keys(model: nn.Module, encoders: Dict[str, nn.Module]) -> List[str]:
    own = {f"{name}.{k}" for name, enc in encoders.items() for k in enc.trained_state_keys()}
    return [k for k in model.state_dict() if k.split(".", 1)[0] not in encoders or k in own]


def check_trained_rule(model: nn.Module) -> None:
    """The parameters in the trained keys are exactly those that require grad: anything trained is saved, and
    nothing frozen is (a mismatch would give other logits after a reload)."""
    keys = set(trained_state_keys(model))
    named = list(model.named_parameters(remove_duplicate=False))
    saved = {n for n, _ in named if n in keys}
    grads = {n for n, p in named if p.requires_grad}
    if saved != grads:
        raise RuntimeError(f"the trained-state rule disagrees with requires_grad: trained but not saved "
                           f"{sorted(grads - saved)[:3]}, saved but frozen {sorted(saved - grads)[:3]}")


def trained_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What the model's method trains (see trained_state_keys), as the checkpoint holds it."""
    state = model.state_dict()
    return {k: state[k] for k in trained_state_keys(model)}


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a ZeRO-3 partition's full size (ds_numel), a 4-bit weight's unpacked
    shape (bitsandbytes packs two weights a byte), otherwise numel."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Whole-model counts, in logical parameters (see logical_numel), whatever the sharding or quantization."""
    sizes = [(logical_numel(p), p.requires_grad) for p in model.parameters()]
    trainable = sum(n for n, grad in sizes if grad)
    return {"trainable_params": trainable, "frozen_params": sum(n for n, _ in sizes) - trainable}


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
        return _task_trained_keys(self, {"encoder": self.encoder})

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


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> Dict[int, float]:
    """sim (Q, C) scores; positives (Q, C) bool. Recall@k = share of queries with a positive in the top k."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[k] = positives.gather(1, top).any(1).float().mean().item()
    return out


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
        return _task_trained_keys(self, {"image_encoder": self.image_encoder, "text_encoder": self.text_encoder})

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


def build_model(cfg: RunConfig, num_classes: int = 0, trust_remote_code: bool = False) -> nn.Module:
    """The task model a config describes, with its backbones loaded and set up for `cfg.method` (frozen for
    unipt and linear_probe, adapters for lora, trainable for full). Remote code runs only when the person running
    the command asked for it (`--trust-remote-code`), never because a file says so."""
    # The UniPT settings are checked against the backbone only where a side network is built.
    side_cfg = cfg.unipt if cfg.method == "unipt" else None

    causal = cfg.unipt.causal == "true" or cfg.task.kind == "causal_lm"

    def encoder(bb_cfg, what):
        bb = load_backbone(bb_cfg, trust_remote_code, side_cfg)
        return build_encoder(bb, cfg.method, cfg.unipt, cfg.lora, what=f"{what} ({bb_cfg.path})", causal=causal,
                             ladder=cfg.ladder)

    if cfg.task.kind == "causal_lm":
        from unipt_scale.lm import CausalLMModel, load_lm_head

        enc = encoder(cfg.backbone, "the decoder")
        if enc.backbone.kind != "decoder":
            raise ConfigError(f"task.kind=causal_lm needs a decoder backbone; {cfg.backbone.path} is "
                              f"{enc.backbone.kind!r}")
        model = CausalLMModel(enc, load_lm_head(enc.backbone, enc.backbone.name), cfg.task.loss_chunk_tokens,
                              eval_rows=cfg.data.batch_size)
    elif cfg.task.kind == "classification":
        n = cfg.task.num_classes or num_classes
        if n < 2:
            raise ConfigError(f"classification needs at least 2 classes, got {n}; check the data "
                              "(data.source, data.path, data.label_column) or set task.num_classes")
        model = ClassificationModel(encoder(cfg.backbone, "the backbone"), n, cfg.task.dropout)
    elif cfg.task.kind == "retrieval":
        image = encoder(cfg.image_backbone, "the image tower")
        text = encoder(cfg.backbone, "the text tower")
        model = RetrievalModel(image, text, cfg.task.embed_dim, cfg.task.init_temperature)
    else:
        raise ConfigError(f"unknown task.kind {cfg.task.kind!r}")
    check_trained_rule(model)
    return model
