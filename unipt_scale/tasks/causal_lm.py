"""task.kind=causal_lm, language modelling on a frozen decoder: the task model, its frozen LM head and its chunked
LM-head loss; eval loss, perplexity and token accuracy (decoding is unipt_scale.generation). Batch fields:
`input_ids`, `attention_mask` and `labels` (IGNORE on the prompt).

The LM head stays frozen: UniPT's causal side network changes the final hidden states (y = h + Up(...)), and the
decoder's own head turns them into logits, so a fresh model (Up = 0) is exactly the frozen LLM. The loss never
holds a B × N × vocab tensor: it runs over chunks of response tokens and recomputes each chunk's logits in
backward (the fused linear + cross-entropy idea), so memory stays flat in vocabulary size.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.data.lm import IGNORE
from unipt_scale.trained import task_trained_keys



# ------------------------------------------------------------------------------------------- the LM head


def _read_weight(path: str, hf_config, names) -> Optional[torch.Tensor]:
    """The first of `names` found in the safetensors files the backbone loads from (no pickle, no full model)."""
    from safetensors import safe_open

    from unipt_scale.backbone import weight_files

    for full in weight_files(path, hf_config):
        with safe_open(full, framework="pt") as fh:
            keys = set(fh.keys())
            for key in names:
                if key in keys:
                    return fh.get_tensor(key)
    return None


def zero3_partitioned(weight: torch.Tensor) -> bool:
    """A parameter ZeRO-3 has partitioned: outside its own module's forward it holds no elements."""
    return hasattr(weight, "ds_id")


def load_lm_head(backbone, path: str) -> Optional[torch.Tensor]:
    """The decoder's LM-head weight, read from its safetensors files: the untied head, or None when the head is tied
    to the input embeddings (then the embedding matrix is the head) — unless ZeRO-3 has partitioned the embeddings,
    whose weight is empty outside the embedding's forward: then the tied matrix is read whole, as the untied head
    is (the head is frozen, so a copy is exact)."""
    model = backbone.model
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        embedding = model.get_input_embeddings().weight
        if not zero3_partitioned(embedding):
            return None
        if embedding.requires_grad:
            raise ConfigError("this decoder's LM head is its input embedding matrix, which method=full trains; under "
                              "ZeRO-3 the head is read whole and would not follow it: use ZeRO stage 1 or 2 "
                              "(launch/ds_zero2.json) for full fine-tuning of a tied decoder")
        name = next(n for n, p in model.named_parameters() if p is embedding)
        head = _read_weight(path, config, (name, f"model.{name}", f"transformer.{name}"))
        if head is None:
            raise ConfigError(f"{path}: the tied embedding {name} is not in its safetensors files; task.kind=causal_lm "
                              "under ZeRO-3 reads the tied LM head from there")
        return head
    head = _read_weight(path, config, ("lm_head.weight", "model.lm_head.weight"))
    if head is None:
        raise ConfigError(f"{path} has no lm_head.weight in safetensors and its head is not tied to the embeddings: "
                          "task.kind=causal_lm needs the checkpoint of a *ForCausalLM model (save_pretrained of it)")
    return head

# The validation metric a sweep chooses its variant by, and whether higher or lower is better.
SELECTION = ("loss", "min")
DATA = {"needs_labels": None}  # prompt/response records: data.source=jsonl | bbc_headlines build their own batches


class _ChunkedLMLoss(torch.autograd.Function):
    """Σ cross_entropy(h W^T, y) over rows, computed `chunk` rows at a time; W is frozen (no gradient).

    The head is frozen and the loss a sum, so dΣ/dh = (softmax(h W^T) − onehot(y)) W is known as soon as a chunk's
    logits are: the forward writes it (when h needs a gradient) and saves only it, and backward scales it by the
    incoming gradient. One pass over the vocabulary instead of a forward and a recomputing backward: two head-sized
    products per row instead of three, and nothing saved besides the gradient (P.D bytes per row, the size of the
    hidden row the recomputation needed)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, need_grad):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # 16-bit logits are summed in fp32
        total = hidden.new_zeros((), dtype=acc)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, hidden.shape[0], chunk):
            rows = slice(s, s + chunk)
            logits = (hidden[rows] @ weight.t()).to(acc)
            picked = logits.gather(1, labels[rows, None])
            top = logits.amax(-1, keepdim=True)
            p = logits.sub_(top).exp_()  # in place: one chunk of fp32 logits is the whole working set
            z = p.sum(-1, keepdim=True)
            total = total + (top + z.log() - picked).sum()  # log-sum-exp minus the label's logit
            if need_grad:
                p.div_(z).scatter_add_(1, labels[rows, None], -torch.ones_like(z))  # softmax − onehot
                grad[rows] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, p  # before the next chunk's logits exist
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of hidden (n, D) through the frozen head weight (V, D) against labels (n,), without an
    n × V logits tensor alive beyond one chunk."""
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    total = _ChunkedLMLoss.apply(hidden, weight.detach(), labels, int(chunk), need_grad)
    return total / max(1, hidden.shape[0]) if reduction == "mean" else total


# ------------------------------------------------------------------------------------------- the model


class CausalLMModel(nn.Module):
    """An encoder (causal UniPT, or the backbone itself for LoRA / full fine-tuning) under the decoder's frozen
    LM head. Loss on the labelled (response) tokens only: position t predicts token t + 1."""

    def __init__(self, encoder: nn.Module, head_weight: Optional[torch.Tensor], chunk: int = 1024,
                 eval_rows: Optional[int] = None):
        super().__init__()
        self.encoder = encoder
        self.chunk = chunk
        # Evaluation runs at most this many sequences per forward (the training micro batch): a large eval batch
        # of long sequences would otherwise hold every tapped state of all of them at once, above training's peak.
        self.eval_rows = eval_rows
        self.eval_slots: Optional[int] = None  # forwards per eval batch on every rank (ZeRO-3 sets it)
        if head_weight is not None:
            self.register_buffer("lm_head_weight", head_weight.detach().clone(), persistent=False)
        else:
            self.lm_head_weight = None
        self.num_classes = 0

    @property
    def backbone(self):
        return self.encoder.backbone

    def head_weight(self) -> torch.Tensor:
        if self.lm_head_weight is not None:
            return self.lm_head_weight
        return self.backbone.model.get_input_embeddings().weight

    def trained_state_keys(self) -> List[str]:
        return task_trained_keys(self, {"encoder": self.encoder})

    def hidden(self, batch) -> torch.Tensor:
        tokens, _mask = self.encoder(batch)
        return tokens

    def logits(self, batch) -> torch.Tensor:
        """Full logits (B, N, V): for inspection and tests; training never builds them."""
        w = self.head_weight()
        return F.linear(self.hidden(batch).to(w.dtype), w)

    def _shifted(self, batch):
        h = self.hidden(batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        w = self.head_weight()
        return h[keep].to(w.dtype), labels[keep], w

    def loss_count(self, batch) -> torch.Tensor:
        """The labelled tokens the loss averages over (the trainer sums them over ranks: see training_loss)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def training_loss(self, batch):
        """Mean cross entropy over labelled tokens. With `loss_normalizer` in the batch (the trainer's global token
        count over ranks divided by the world size) the sum is divided by it instead of this rank's count, so the
        rank-averaged gradient is the token mean over the whole global batch, as one process computes it."""
        h, labels, w = self._shifted(batch)
        total = chunked_lm_loss(h, w, labels, self.chunk, reduction="sum")
        normalizer = batch.get("loss_normalizer")
        loss = total / (normalizer.to(total.dtype) if normalizer is not None else max(1, labels.numel()))
        return loss, {"tokens": torch.tensor(float(labels.numel()))}

    @torch.no_grad()
    def eval_step(self, batch):
        rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        step = self.eval_rows or rows
        total, tokens, correct = 0.0, 0, 0
        starts = list(range(0, rows, step))
        # Under ZeRO-3 every forward is collective: each rank runs the same number of forwards per batch, a short
        # batch filling its missing slots with a stand-in whose outputs are dropped.
        slots = max(len(starts), self.eval_slots or 0)
        for i in range(slots):
            stand_in = i >= len(starts)
            r = 0 if stand_in else starts[i]
            part = {k: v[r:r + step] if torch.is_tensor(v) else v for k, v in batch.items()}
            h, labels, w = self._shifted(part)
            if stand_in:
                continue
            for s in range(0, h.shape[0], self.chunk):  # one chunk of logits at a time, as in training
                logits = F.linear(h[s:s + self.chunk], w).float()
                total += float(F.cross_entropy(logits, labels[s:s + self.chunk], reduction="sum"))
                correct += int((logits.argmax(-1) == labels[s:s + self.chunk]).sum())
            tokens += int(labels.numel())
        return {"loss_sum": total, "tokens": tokens, "correct": correct}

    @staticmethod
    def eval_metrics(outputs: List[Dict]) -> Dict[str, float]:
        tokens = sum(o["tokens"] for o in outputs)
        loss = sum(o["loss_sum"] for o in outputs) / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": sum(o["correct"] for o in outputs) / max(1, tokens), "num_tokens": tokens}


def build(cfg: RunConfig, encoder, num_classes: int = 0) -> CausalLMModel:
    enc = encoder(cfg.backbone, "the decoder")
    if enc.backbone.kind != "decoder":
        raise ConfigError(f"task.kind=causal_lm needs a decoder backbone; {cfg.backbone.path} is "
                          f"{enc.backbone.kind!r}")
    return CausalLMModel(enc, load_lm_head(enc.backbone, enc.backbone.name), cfg.task.loss_chunk_tokens,
                         eval_rows=cfg.data.batch_size)
