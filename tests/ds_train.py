"""One rank of `unipt train` for tests/test_deepspeed.py, plus checks that need the live engine afterwards.

Usage (under the deepspeed launcher or torchrun): ds_train.py [--local_rank=N] [--kill-after-step=K] KEY=VALUE ...

--kill-after-step=K: every rank SIGKILLs itself right after optimizer step K (a crash, as a scheduler's kill -9
would leave it), so a test can resume the run.

After training, every rank writes OUTPUT_DIR/checks.rank{R}.json with:
* frozen: each backbone parameter (gathered under ZeRO-3) against the weights in the model directory;
* uneven_eval: `evaluate` over per-rank parts of different lengths (one rank with none at all), which under
  ZeRO-3 must keep the collective forwards in step and still gather every real sample once.
"""
import contextlib
import json
import logging
import os
import signal
import sys

import torch
from safetensors.torch import load_file

from unipt_scale import trainer
from unipt_scale.config import load_config


def frozen_check(engine, model_dir):
    reference = load_file(os.path.join(model_dir, "model.safetensors"))
    named = [(n, p) for n, p in engine.task.named_parameters() if ".backbone.model." in f".{n}"]
    params = [p for _, p in named]
    gather = contextlib.nullcontext()
    if engine.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    result = {"checked": 0, "missing": [], "max_abs_diff": 0.0, "bit_identical": True, "grads": 0,
              "requires_grad": 0}
    with gather:
        for name, p in named:
            key = name.split(".backbone.model.", 1)[1]
            if key not in reference:
                result["missing"].append(key)
                continue
            now, ref = p.detach().cpu(), reference[key]
            result["checked"] += 1
            result["bit_identical"] &= bool(now.shape == ref.shape and torch.equal(now, ref))
            if now.shape == ref.shape:
                result["max_abs_diff"] = max(result["max_abs_diff"], (now.float() - ref.float()).abs().max().item())
            result["grads"] += int(p.grad is not None)
            result["requires_grad"] += int(p.requires_grad)
    result["backbone_params"] = len(named)
    return result


def uneven_eval_check(engine, tokenizer, num_classes):
    words = ["good movie", "bad day", "the food was very bad", "happy night", "not fine", "love it", "awful"]
    batches = []
    for i in range(4):
        texts = [words[(i * 3 + j) % len(words)] for j in range(3 + i)]
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batch["labels"] = torch.arange(len(texts)) % num_classes
        batches.append(batch)
    total = sum(len(b["labels"]) for b in batches)
    out = {}
    # rank 0: three batches, rank 1: one; then rank 0: all four, rank 1: none.
    for case, parts in {"short": (batches[:3], batches[3:]), "empty": (batches, [])}.items():
        metrics = trainer.evaluate(engine.model, list(parts[engine.rank]), engine, case)
        out[case] = {"num_samples": metrics["num_samples"], "expected": total, "accuracy": metrics["accuracy"]}
    return out


class KillAfter(trainer.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, tr):
        if tr.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kill = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--kill-after-step=")]
    overrides = [a for a in argv if not a.startswith("--")]
    cfg = load_config(None, overrides)
    tr = trainer.Trainer(cfg, callbacks=[KillAfter(k) for k in kill])
    try:
        tr.setup()
        tr.fit()
        tr.finish()
        engine = tr.engine
        checks = {"frozen": frozen_check(engine, cfg.backbone.path),
                  "uneven_eval": uneven_eval_check(engine, engine.task.encoder.backbone.tokenizer,
                                                   engine.task.num_classes)}
        with open(os.path.join(cfg.output_dir, f"checks.rank{engine.rank}.json"), "w") as fh:
            json.dump(checks, fh, indent=2)
        engine.barrier()
    finally:
        tr.close()


if __name__ == "__main__":
    main(sys.argv[1:])
