"""lora, full and linear_probe under the 2-rank ZeRO-3 engine (CPU, gloo), and QLoRA / UniPT on a quantized base
under ZeRO-2, against one process with the same global batch: the same loss history, and an export that holds
exactly what the method trains.

The subprocess pattern of tests/test_deepspeed.py (deepspeed launcher, DS_ACCELERATOR=cpu, tests/ds_train.py);
5 runs of 8 steps on 2 ranks plus their 5 one-process references. Deselect with `pytest -k "not deepspeed"`.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ds_helpers import HERE, PY, deepspeed, losses, metrics, run, write_keyword_csv
from tiny_models import tiny_bert_dir

pytest.importorskip("deepspeed")

GLOBAL_BATCH = 8
STEPS = 8
# Every parameter partitioned, none kept gathered after its forward: the tiny model is split like a large one.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_model_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                               "stage3_prefetch_bucket_size": 0}}
# Rates that move each method's loss well beyond the tolerance in 8 steps.
LR = {"lora": "3e-3", "full": "1e-3", "linear_probe": "3e-3", "unipt": "3e-3"}
METHODS = ["lora", "full", "linear_probe"]
DIFFS = {}  # max |loss difference| to the one-process run, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _print_diffs():
    yield
    for method, diff in DIFFS.items():
        print(f"\n  {method}: max |loss difference, 2 ranks vs 1 process| = {diff:.3g}", end="")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_methods")
    model = tiny_bert_dir(str(root))
    data = write_keyword_csv(root / "tweets.csv", 200)
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    (root / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.eval_batch_size=32",
              f"train.max_steps={STEPS}", "train.log_every=1", "train.warmup_ratio=0.25", "task.dropout=0.0",
              "train.tensorboard=false", "train.num_threads=1"]
    return {"root": root, "model": model, "common": common}


class Runs:
    """The one-process reference and the 2-rank ZeRO-3 run of a method, each started once on first use."""

    def __init__(self, ws):
        self.ws, self.done = ws, {}

    def __call__(self, method, ranks, quantization="none", config="zero3.json"):
        key = (method, ranks, quantization, config)
        if key not in self.done:
            out = str(self.ws["root"] / f"{method}-{ranks}-{quantization}")
            args = [*self.ws["common"], f"method={method}", f"train.lr={LR[method]}",
                    f"backbone.quantization={quantization}"]
            if ranks == 1:
                run(f"{method}, 1 process", [PY, "-m", "unipt_scale.cli", "train", "--output-dir", out, *args,
                                             f"data.batch_size={GLOBAL_BATCH}"])
            else:
                run(f"{method}, 2 ranks {config}", deepspeed(
                    os.path.join(HERE, "ds_train.py"), f"output_dir={out}", *args,
                    f"data.batch_size={GLOBAL_BATCH // 2}", "deepspeed.enabled=true",
                    f"deepspeed.config={self.ws['root'] / config}"))
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(ws):
    return Runs(ws)


@pytest.mark.parametrize("method", METHODS)
def test_deepspeed_zero3_method_matches_one_process(method, runs, ws):
    ref_out, out = runs(method, 1), runs(method, 2)
    m, ref_m = metrics(out), metrics(ref_out)
    assert m["world_size"] == 2 and m["zero_stage"] == 3 and m["steps"] == STEPS
    assert m["config"]["method"] == ref_m["config"]["method"] == method
    ref, got = losses(ref_out), losses(out)
    assert len(got) == len(ref) == STEPS
    assert ref.max() - ref.min() > 0.01, "a flat loss history would make the comparison weak"
    DIFFS[f"{method}, ZeRO-3"] = (got - ref).abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # ZeRO-3 counts the partitioned parameters in full: the same split as one process
    assert (m["trainable_params"], m["frozen_params"]) == (ref_m["trainable_params"], ref_m["frozen_params"])

    # The gathered export holds exactly what the method trains, the same keys as one process writes.
    weights = load_file(os.path.join(out, "checkpoint", "trained.safetensors"))
    ref_weights = load_file(os.path.join(ref_out, "checkpoint", "trained.safetensors"))
    assert set(weights) == set(ref_weights)
    assert all(weights[k].shape == ref_weights[k].shape and weights[k].numel() > 0 for k in weights)
    head = {"classifier.weight", "classifier.bias"}
    if method == "linear_probe":
        assert set(weights) == head
    elif method == "lora":
        assert head < set(weights) and all(".lora_A." in k or ".lora_B." in k for k in set(weights) - head)
    else:
        backbone = load_file(os.path.join(ws["model"], "model.safetensors"))
        assert set(weights) - head == {f"encoder.backbone.model.{k}" for k in backbone}
    # tiny BERT's state dict has no buffers and no tied weights: every stored element is a trained parameter
    assert sum(w.numel() for w in weights.values()) == m["trainable_params"]


@pytest.mark.parametrize("method, quantization", [("lora", "nf4"), ("unipt", "int8")])
def test_deepspeed_zero2_on_a_quantized_base_matches_one_process(method, quantization, runs):
    """QLoRA and UniPT on an 8/4-bit base under ZeRO-2 (the quantized base replicated, what trains sharded):
    the loss history of one process, and an export of only what the method trains."""
    ref_out = runs(method, 1, quantization)
    out = runs(method, 2, quantization, config="zero2.json")
    m = metrics(out)
    assert m["world_size"] == 2 and m["zero_stage"] == 2 and m["config"]["backbone"]["quantization"] == quantization
    ref, got = losses(ref_out), losses(out)
    assert len(got) == STEPS and ref.max() - ref.min() > 0.01
    DIFFS[f"{method} on {quantization}, ZeRO-2"] = (got - ref).abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    weights = load_file(os.path.join(out, "checkpoint", "trained.safetensors"))
    assert set(weights) == set(load_file(os.path.join(ref_out, "checkpoint", "trained.safetensors")))
    own = ".lora_" if method == "lora" else ".side."
    assert all(k.startswith("classifier.") or own in k for k in weights)
