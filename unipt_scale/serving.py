"""Several checkpoints of one frozen backbone served from one forward per batch.

Every checkpoint of a frozen-forward method (unipt, ladder, linear_probe) on the same backbone reads the same
tapped states, so `MultiModel` loads the backbone once, builds each checkpoint's model on a view of it
(unipt_scale.shared_forward) and answers a batch with one frozen forward: every row through every checkpoint, or
each row through the checkpoint it names (rows of one batch may belong to different tasks, as multi-adapter
serving does).

    mm = MultiModel.load({"sentiment": "runs/a/checkpoint", "topic": "runs/b/checkpoint"})
    mm.classify(["great movie", "stocks fell"])                      # every checkpoint on every text
    mm.classify(["great movie", "stocks fell"], ["sentiment", "topic"])  # one checkpoint per text

Causal-LM checkpoints decode together the same way (`generate`): each step runs the backbone once over every
checkpoint's rows, with one KV cache, and each checkpoint's side network over its own rows.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch

from unipt_scale.config import FROZEN_FORWARD_METHODS, ConfigError



def checkpoint_name(path: str) -> str:
    """OUTPUT_DIR's name for OUTPUT_DIR/checkpoint, else the directory's own name."""
    path = os.path.abspath(path).rstrip(os.sep)
    head, base = os.path.split(path)
    return os.path.basename(head) if base == "checkpoint" and head else base


def _same_inputs(cfgs: Dict[str, object]) -> None:
    from unipt_scale.shared_forward import different_backbone

    names = list(cfgs)
    first = cfgs[names[0]]
    for name in names[1:]:
        cfg = cfgs[name]
        field = different_backbone(first, cfg)
        if field:
            raise ConfigError(f"checkpoints {names[0]} and {name} are on different backbones ({field}: "
                              f"{getattr(first, field) and getattr(first, field).path} vs "
                              f"{getattr(cfg, field) and getattr(cfg, field).path}, or another dtype, quantization "
                              "or padding); serve them separately")
        if cfg.data.max_length != first.data.max_length:
            raise ConfigError(f"checkpoints {names[0]} and {name} tokenize differently (data.max_length "
                              f"{first.data.max_length} vs {cfg.data.max_length}); serve them separately")


class MultiModel:
    """Checkpoints of one backbone, built on views of it, answered with one frozen forward per batch."""

    def __init__(self, models: Dict[str, torch.nn.Module], cfgs: Dict[str, object], metas: Dict[str, dict],
                 shared: list, tokenizer, device: torch.device):
        self.models, self.cfgs, self.metas = models, cfgs, metas
        self.shared, self.tokenizer, self.device = shared, tokenizer, device

    @classmethod
    def load(cls, checkpoints: Union[Sequence[str], Dict[str, str]], device: Union[str, torch.device] = "cpu",
             trust_remote_code: bool = False) -> "MultiModel":
        from unipt_scale.export import read_checkpoint
        from unipt_scale.preprocessors import load_tokenizer
        from unipt_scale.shared_forward import share_backbones
        from unipt_scale.tasks import build_model, load_backbones
        from unipt_scale.train_state import preserved_rng
        from unipt_scale.trained import trained_state_keys

        if not isinstance(checkpoints, dict):
            named = [checkpoint_name(p) for p in checkpoints]
            if len(set(named)) != len(named):
                raise ConfigError(f"two checkpoints share a name ({', '.join(named)}); name them: NAME=PATH")
            checkpoints = dict(zip(named, checkpoints))
        if not checkpoints:
            raise ConfigError("give at least one checkpoint")
        read = {}
        for name, path in checkpoints.items():
            cfg, state, meta = read_checkpoint(path)
            if cfg.method not in FROZEN_FORWARD_METHODS:
                raise ConfigError(f"checkpoint {name} ({path}) was trained with method={cfg.method}, which changes "
                                  "the backbone itself, so it cannot share a forward; serve it alone")
            cfg.data.feature_cache = ""
            read[name] = (cfg, state, meta)
        cfgs = {n: r[0] for n, r in read.items()}
        _same_inputs(cfgs)
        first = next(iter(cfgs.values()))
        shared = share_backbones(first, load_backbones(first, trust_remote_code))
        device = torch.device(device)
        models, metas = {}, {}
        for name, (cfg, state, meta) in read.items():
            with preserved_rng():  # loading for use leaves the caller's random streams as they were
                model = build_model(cfg, num_classes=meta.get("num_classes", 0),
                                    trust_remote_code=trust_remote_code,
                                    backbones={n: sb.view() for n, sb in shared.items()})
            expected = set(trained_state_keys(model))
            if expected != set(state):
                raise ConfigError(f"checkpoint {name} does not match its config (trained keys differ); retrain it")
            model.load_state_dict(state, strict=False)
            models[name], metas[name] = model.to(device).eval(), meta
        tokenizer = load_tokenizer(first.backbone, trust_remote_code=trust_remote_code)
        return cls(models, cfgs, metas, list(shared.values()), tokenizer, device)

    @property
    def forwards(self) -> int:
        return sum(sb.forwards for sb in self.shared)

    def _batch(self, texts: List[str]) -> Dict:
        from unipt_scale.data import text_collate

        if self.tokenizer is None:
            raise ConfigError("classify takes texts; this backbone has no tokenizer")
        batch = text_collate(self.tokenizer, next(iter(self.cfgs.values())).data.max_length)(
            [{"text": t} for t in texts])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _labels(self, name: str, probs: torch.Tensor) -> List[dict]:
        names = self.metas[name].get("label_names") or [str(i) for i in range(probs.shape[-1])]
        return [{"label": names[int(p.argmax())], "probability": float(p.max())} for p in probs]

    @torch.no_grad()
    def classify(self, texts: Sequence[str], tasks: Optional[Sequence[str]] = None) -> List[Dict[str, dict]]:
        """Per text, {checkpoint name: {"label", "probability"}}: every classification checkpoint on every text,
        or with `tasks` (a checkpoint name per text) each text through its own. One frozen forward either way."""
        from unipt_scale.shared_forward import shared_batch
        from unipt_scale.tasks.classification import ClassificationModel

        texts = list(texts)
        if tasks is not None:
            tasks = list(tasks)
            if len(tasks) != len(texts):
                raise ValueError(f"{len(tasks)} task names for {len(texts)} texts; give one per text")
            unknown = sorted(set(tasks) - set(self.models))
            if unknown:
                raise ValueError(f"unknown checkpoint name(s) {unknown}; these are loaded: {sorted(self.models)}")
        names = [n for n, m in self.models.items() if isinstance(m, ClassificationModel)]
        if not names:
            raise ConfigError("none of the checkpoints is a classification model")
        out: List[Dict[str, dict]] = [{} for _ in texts]
        if not texts:
            return out
        batch = self._batch(texts)
        with shared_batch(self.shared):
            if tasks is None:
                for name in names:
                    for row, pred in zip(out, self._labels(name, self.models[name](batch).float().softmax(-1))):
                        row[name] = pred
            else:
                groups = {n: torch.tensor([i for i, t in enumerate(tasks) if t == n], dtype=torch.long,
                                          device=self.device) for n in names if n in tasks}
                if any(t not in names for t in tasks):
                    raise ConfigError("a text names a checkpoint that is not a classification model")
                subs = self.shared[0].split(batch, list(groups.values()))
                for (name, rows), sub in zip(groups.items(), subs):
                    preds = self._labels(name, self.models[name](sub).float().softmax(-1))
                    for i, pred in zip(rows.tolist(), preds):
                        out[i][name] = pred
        return out

    @torch.no_grad()
    def generate(self, records: Sequence[dict], options=None, *, batch_size: int = 8,
                 **option_fields) -> List[Dict[str, str]]:
        """Per record ({"prompt"} or {"messages"}), {checkpoint name: completion} of every causal-LM checkpoint,
        decoded on one frozen forward per step (greedy: each checkpoint's own greedy completion; sampling: seeded,
        drawn for all rows from one generator)."""
        from unipt_scale.generation import generate_texts
        from unipt_scale.tasks.causal_lm import CausalLMModel

        names = [n for n, m in self.models.items() if isinstance(m, CausalLMModel)]
        if not names:
            raise ConfigError("none of the checkpoints is a causal language model (task.kind=causal_lm)")
        return generate_texts({n: self.models[n] for n in names}, self.tokenizer, list(records), options,
                              batch_size=batch_size, trained_length=self.cfgs[names[0]].data.max_length,
                              **option_fields)
