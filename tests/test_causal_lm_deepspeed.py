"""task.kind=causal_lm under 2-rank ZeRO-3 (CPU, gloo) against one process with the same global batch: the same
loss history and the same test loss (every rank evaluates in the same number of collective forwards), for causal
UniPT on an untied decoder and LoRA on a tied one (whose head ZeRO-3 partitions with the embeddings: it is read
whole from the safetensors files)."""
import json
import os

import pytest
import torch

from ds_helpers import PY, deepspeed, losses, metrics, run
from tiny_models import tiny_causal_lm_dir

pytest.importorskip("deepspeed")

GLOBAL_BATCH, STEPS = 8, 6
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_model_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                               "stage3_prefetch_bucket_size": 0}}


def _pairs(path, n=90):
    words = ["good", "bad", "movie", "food", "day", "night", "happy", "sad", "fine", "very"]
    with open(path, "w") as fh:
        for i in range(n):
            w = [words[(i * 7 + k * 3) % len(words)] for k in range(2 + i % 3)]
            fh.write(json.dumps({"prompt": " ".join(w), "response": " ".join(reversed(w))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_lm")
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    return {"root": root, "data": _pairs(root / "pairs.jsonl"),
            "untied": tiny_causal_lm_dir(str(root), "llama"), "tied": tiny_causal_lm_dir(str(root), "llama", tie=True)}


@pytest.mark.parametrize("method, head, lr", [("unipt", "untied", "3e-3"), ("lora", "tied", "3e-3")])
def test_causal_lm_under_zero3_matches_one_process(ws, method, head, lr):
    common = [f"backbone.path={ws[head]}", "task.kind=causal_lm", "data.source=jsonl", f"data.path={ws['data']}",
              f"method={method}", f"train.lr={lr}", f"train.max_steps={STEPS}", "train.log_every=1",
              "train.warmup_ratio=0.25", "train.tensorboard=false", "train.num_threads=1", "unipt.mapping_dim=8",
              "data.max_length=24", "data.eval_batch_size=6"]
    ref = str(ws["root"] / f"{method}-1")
    out = str(ws["root"] / f"{method}-2")
    run(f"causal_lm {method}, 1 process", [PY, "-m", "unipt_scale.cli", "train", "--output-dir", ref, *common,
                                           f"data.batch_size={GLOBAL_BATCH}"])
    run(f"causal_lm {method}, 2 ranks ZeRO-3", deepspeed(
        "--module", "unipt_scale.cli", "train", "--output-dir", out, *common, f"data.batch_size={GLOBAL_BATCH // 2}",
        "deepspeed.enabled=true", f"deepspeed.config={ws['root'] / 'zero3.json'}"))
    m, ref_m = metrics(out), metrics(ref)
    assert m["world_size"] == 2 and m["zero_stage"] == 3 and m["steps"] == STEPS
    got, want = losses(out), losses(ref)
    assert want.max() - want.min() > 0.01, "a flat loss history would make the comparison weak"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert m["test"]["num_tokens"] == ref_m["test"]["num_tokens"], "every test token is evaluated once"
    assert m["test"]["loss"] == pytest.approx(ref_m["test"]["loss"], abs=1e-5)
    assert os.path.isfile(os.path.join(out, "checkpoint", "trained.safetensors"))
