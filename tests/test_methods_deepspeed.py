"""lora, full and linear_probe under the 2-rank ZeRO-3 engine (CPU, gloo) against one process with the same global
batch: the same loss history, and an export that holds exactly what the method trains.

The subprocess pattern of tests/test_deepspeed.py (deepspeed launcher, DS_ACCELERATOR=cpu, tests/ds_train.py);
3 runs of 8 steps on 2 ranks plus their 3 one-process references. Deselect with `pytest -k "not deepspeed"`.
"""
import csv
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import WORDS, tiny_bert_dir

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
RUN_TIMEOUT = 420
GLOBAL_BATCH = 8
STEPS = 8
# Every parameter partitioned, none kept gathered after its forward: the tiny model is split like a large one.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_model_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                               "stage3_prefetch_bucket_size": 0}}
# Rates that move each method's loss well beyond the tolerance in 8 steps.
LR = {"lora": "3e-3", "full": "1e-3", "linear_probe": "3e-3"}
METHODS = list(LR)
DIFFS = {}  # max |loss difference| to the one-process run, printed at the end (pytest -s)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([HERE, REPO, env.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "unipt_scale",
                                                        "torch_extensions"))
    return env


def _run(name, cmd):
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or "")[-3000:] + (err.stderr or "")[-3000:]
        pytest.fail(f"{name} did not finish in {RUN_TIMEOUT} s:\n{output}")
    if proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def _losses(out):
    return torch.tensor([v for _, v in _metrics(out)["train_loss"]], dtype=torch.float64)


@pytest.fixture(scope="module", autouse=True)
def _print_diffs():
    yield
    for method, diff in DIFFS.items():
        print(f"\n  {method}: max |loss difference, 2 ranks ZeRO-3 vs 1 process| = {diff:.3g}", end="")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_methods")
    model = tiny_bert_dir(str(root))
    rng = random.Random(0)
    pos, neg = {"good", "great", "happy", "love", "fine"}, {"bad", "awful", "sad", "hate", "not"}
    data = root / "tweets.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(200):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
            score = sum(x in pos for x in words) - sum(x in neg for x in words)
            w.writerow([" ".join(words) + f" n{i}", "pos" if score > 0 else "neg" if score < 0 else "mixed"])
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.eval_batch_size=32",
              f"train.max_steps={STEPS}", "train.log_every=1", "train.warmup_ratio=0.25", "task.dropout=0.0",
              "train.tensorboard=false", "train.num_threads=1"]
    return {"root": root, "model": model, "common": common}


class Runs:
    """The one-process reference and the 2-rank ZeRO-3 run of a method, each started once on first use."""

    def __init__(self, ws):
        self.ws, self.done = ws, {}

    def __call__(self, method, ranks):
        key = (method, ranks)
        if key not in self.done:
            out = str(self.ws["root"] / f"{method}-{ranks}")
            args = [*self.ws["common"], f"method={method}", f"train.lr={LR[method]}"]
            if ranks == 1:
                _run(f"{method}, 1 process", [PY, "-m", "unipt_scale.cli", "train", "--output-dir", out, *args,
                                              f"data.batch_size={GLOBAL_BATCH}"])
            else:
                _run(f"{method}, 2 ranks ZeRO-3", [
                    PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), os.path.join(HERE, "ds_train.py"), f"output_dir={out}",
                    *args, f"data.batch_size={GLOBAL_BATCH // 2}", "deepspeed.enabled=true",
                    f"deepspeed.config={self.ws['root'] / 'zero3.json'}"])
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(ws):
    return Runs(ws)


@pytest.mark.parametrize("method", METHODS)
def test_deepspeed_zero3_method_matches_one_process(method, runs, ws):
    ref_out, out = runs(method, 1), runs(method, 2)
    m, ref_m = _metrics(out), _metrics(ref_out)
    assert m["world_size"] == 2 and m["zero_stage"] == 3 and m["steps"] == STEPS
    assert m["config"]["method"] == ref_m["config"]["method"] == method
    ref, got = _losses(ref_out), _losses(out)
    assert len(got) == len(ref) == STEPS
    assert ref.max() - ref.min() > 0.01, "a flat loss history would make the comparison weak"
    DIFFS[method] = (got - ref).abs().max().item()
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
