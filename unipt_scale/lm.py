"""Language modelling on a frozen decoder: the task model for task.kind=causal_lm, its chunked LM-head loss,
and generation with incremental decoding.

The LM head stays frozen: UniPT's causal side network changes the final hidden states (y = h + Up(...)), and the
decoder's own head turns them into logits, so a fresh model (Up = 0) is exactly the frozen LLM. The loss never
holds a B × N × vocab tensor: it runs over chunks of response tokens and recomputes each chunk's logits in
backward (the fused linear + cross-entropy idea), so memory stays flat in vocabulary size.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unipt_scale.config import ConfigError
from unipt_scale.data.lm import IGNORE


# ------------------------------------------------------------------------------------------- the LM head


def load_lm_head(backbone, path: str) -> Optional[torch.Tensor]:
    """The decoder's untied LM-head weight, read from its safetensors files (no pickle, no full model), or None
    when the head is tied to the input embeddings (then the embedding matrix is the head)."""
    config = backbone.model.config
    if getattr(config, "tie_word_embeddings", False):
        return None
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        with safe_open(full, framework="pt") as fh:
            for key in ("lm_head.weight", "model.lm_head.weight"):
                if key in fh.keys():
                    return fh.get_tensor(key)
    raise ConfigError(f"{path} has no lm_head.weight in safetensors and its head is not tied to the embeddings: "
                      "task.kind=causal_lm needs the checkpoint of a *ForCausalLM model (save_pretrained of it)")


class _ChunkedLMLoss(torch.autograd.Function):
    """Σ cross_entropy(h W^T, y) over rows, computed `chunk` rows at a time; W is frozen (no gradient).
    Saves h, y and one logsumexp per row; each chunk's logits are recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # 16-bit logits are summed in fp32
        total = hidden.new_zeros((), dtype=acc)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).to(acc)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            picked = logits.gather(1, labels[s:s + chunk, None]).squeeze(1)
            total = total + (lse[s:s + chunk] - picked).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], ctx.chunk):
            logits = (hidden[s:s + ctx.chunk] @ weight.t()).to(lse.dtype)
            p = torch.exp(logits - lse[s:s + ctx.chunk, None])
            p.scatter_add_(1, labels[s:s + ctx.chunk, None], -torch.ones_like(p[:, :1]))
            grad[s:s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of hidden (n, D) through the frozen head weight (V, D) against labels (n,), without an
    n × V logits tensor alive beyond one chunk."""
    total = _ChunkedLMLoss.apply(hidden, weight.detach(), labels, int(chunk))
    return total / max(1, hidden.shape[0]) if reduction == "mean" else total


# ------------------------------------------------------------------------------------------- the model


class CausalLMModel(nn.Module):
    """An encoder (causal UniPT, or the backbone itself for LoRA / full fine-tuning) under the decoder's frozen
    LM head. Loss on the labelled (response) tokens only: position t predicts token t + 1."""

    def __init__(self, encoder: nn.Module, head_weight: Optional[torch.Tensor], chunk: int = 1024):
        super().__init__()
        self.encoder = encoder
        self.chunk = chunk
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
        from unipt_scale.model import _task_trained_keys

        return _task_trained_keys(self, {"encoder": self.encoder})

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

    def training_loss(self, batch):
        h, labels, w = self._shifted(batch)
        loss = chunked_lm_loss(h, w, labels, self.chunk)
        return loss, {"tokens": torch.tensor(float(labels.numel()))}

    @torch.no_grad()
    def eval_step(self, batch):
        h, labels, w = self._shifted(batch)
        total, correct = 0.0, 0
        for s in range(0, h.shape[0], self.chunk):  # one chunk of logits at a time, as in training
            logits = F.linear(h[s:s + self.chunk], w).float()
            total += float(F.cross_entropy(logits, labels[s:s + self.chunk], reduction="sum"))
            correct += int((logits.argmax(-1) == labels[s:s + self.chunk]).sum())
        return {"loss_sum": total, "tokens": int(labels.numel()), "correct": correct}

    @staticmethod
    def eval_metrics(outputs: List[Dict]) -> Dict[str, float]:
        tokens = sum(o["tokens"] for o in outputs)
        loss = sum(o["loss_sum"] for o in outputs) / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": sum(o["correct"] for o in outputs) / max(1, tokens), "num_tokens": tokens}


# ------------------------------------------------------------------------------------------- generation


def _pick(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLMModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 32,
             temperature: float = 0.0, eos_token_id: Optional[int] = None, incremental: bool = True,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """New tokens (B, max_new_tokens) after left-padded prompts; rows that produced eos continue with eos.

    incremental=True keeps the backbone's KV cache and the side network's cache (projected states of past tokens
    per tapped layer, prefix sums for the gate): each token costs one position's forward, O(L·t·d) in the side
    network. incremental=False recomputes the whole sequence every step (the reference it must equal)."""
    model.eval()
    enc = model.encoder
    side = getattr(enc, "side", None)
    bb = enc.backbone
    w = model.head_weight()
    ids, mask = input_ids, attention_mask.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out: List[torch.Tensor] = []
    past = cache = None
    step_ids = ids
    for _ in range(max_new_tokens):
        if incremental:
            if side is not None:
                states, past = bb.forward_cached(step_ids, mask, past)
                y, cache = side.step(states.hidden_states, states.mask, states.final, cache)
            else:
                y, past = _backbone_cached(enc, step_ids, mask, past)
            last = y[:, -1]
        else:
            tokens, _ = enc({"input_ids": ids, "attention_mask": mask})
            last = tokens[:, -1]
        nxt = _pick(F.linear(last.to(w.dtype), w), temperature, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step_ids = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.stack(out, 1)


def _backbone_cached(encoder, step_ids, mask, past):
    """The plain decoder (LoRA, full fine-tuning, the frozen model) over new tokens with its KV cache."""
    from unipt_scale.backbone import cache_argument, cache_of

    bb = encoder.backbone
    n = step_ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]
    out = bb.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_argument(bb.model): past})
    return out.last_hidden_state, cache_of(out)


def generate_texts(model: CausalLMModel, tokenizer, prompts: Sequence[dict], max_new_tokens: int = 32,
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                   max_prompt_tokens: Optional[int] = None) -> List[str]:
    """Completions of records ({"prompt"} or {"messages"}), rendered as in training, batched with left padding."""
    from unipt_scale.data.lm import prompt_ids, render_prompt

    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for s in range(0, len(prompts), batch_size):
        if max_prompt_tokens:
            rows = [prompt_ids(tokenizer, r, max_prompt_tokens) for r in prompts[s:s + batch_size]]
        else:
            rows = [tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]
                    for r in prompts[s:s + batch_size]]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
        new = generate(model, ids.to(device), mask.to(device), max_new_tokens, temperature,
                       tokenizer.eos_token_id, generator=gen)
        for row in new.tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
