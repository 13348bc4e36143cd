"""`unipt sweep`: every variant trained on one frozen forward per batch ends with the bits of the same variant trained
alone (weights, losses, validation and test metrics), the frozen forward runs once per batch for all of them, a
variant that goes non-finite stops alone, and what a sweep cannot share is refused in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_resume import _write_csv
from tiny_models import tiny_bert_dir
from unipt_scale.backbone import HFBackbone
from unipt_scale.config import ConfigError, load_config
from unipt_scale.export import CHECKPOINT, METRICS, WEIGHTS
from unipt_scale.sweep import SWEEP_JSON, parse_grid, run_sweep, variant_configs
from unipt_scale.trainer import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv")
    # Dropout on (each variant's RNG streams matter), validation inside the run and at the epoch boundary
    # (128 training rows / batch 16 = 8 steps per epoch), checkpoints every 4 steps, fp32 on one thread.
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=16",
              "data.eval_batch_size=8", "train.max_steps=10", "train.log_every=1", "train.eval_every=3",
              "task.dropout=0.3", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1",
              "train.checkpoint_every=4", "train.precision=fp32"]
    return {"root": root, "common": common}


class _CountForwards:
    def __init__(self, monkeypatch):
        self.n = 0
        real = HFBackbone._forward

        def counted(bb, batch):
            self.n += 1
            return real(bb, batch)

        monkeypatch.setattr(HFBackbone, "_forward", counted)


def _same_run(sweep_dir, alone_dir):
    got, ref = (json.load(open(os.path.join(d, METRICS))) for d in (sweep_dir, alone_dir))
    for key in ("train_loss", "val", "val_history", "test", "steps", "trainable_params", "samples_seen"):
        assert got[key] == ref[key], key
    w, w_ref = (load_file(os.path.join(d, CHECKPOINT, WEIGHTS)) for d in (sweep_dir, alone_dir))
    assert set(w) == set(w_ref) and w
    assert all(torch.equal(w[k], w_ref[k]) for k in w_ref), "trained weights differ"
    listed = [sorted(os.listdir(os.path.join(d, "checkpoints"))) if os.path.isdir(os.path.join(d, "checkpoints"))
              else [] for d in (sweep_dir, alone_dir)]
    assert listed[0] == listed[1]
    steps = listed[0]
    for step in [s for s in steps if s.startswith("step")]:
        a, b = (load_file(os.path.join(d, "checkpoints", step, "rank0.safetensors")) for d in (sweep_dir, alone_dir))
        assert all(torch.equal(a[k], b[k]) for k in b), f"{step}: the checkpointed RNG streams differ"
    return got


def _alone(ws, tmp_path, name, *overrides):
    out = str(tmp_path / f"alone-{name}")
    train(load_config(None, [*ws["common"], *overrides, f"output_dir={out}"]))
    return out


def test_variants_equal_their_runs_alone_on_one_forward_per_batch(ws, tmp_path, monkeypatch):
    counter = _CountForwards(monkeypatch)
    out = tmp_path / "sweep"
    result = run_sweep(None, ws["common"], ["train.lr=3e-3,1e-3", "train.seed=0,1"], str(out))
    sweep_forwards = counter.n
    names = [v["name"] for v in result["variants"]]
    assert names == ["lr=3e-3_seed=0", "lr=3e-3_seed=1", "lr=1e-3_seed=0", "lr=1e-3_seed=1"]
    assert all(v["status"] == "completed" for v in result["variants"])
    assert json.load(open(out / SWEEP_JSON)) == json.loads(json.dumps(result))

    counter.n = 0
    alone = _alone(ws, tmp_path, "b", "train.lr=1e-3", "train.seed=1")
    assert sweep_forwards == counter.n == result["frozen_forwards"], "one frozen forward per batch for 4 variants"
    _same_run(str(out / "lr=1e-3_seed=1"), alone)
    _same_run(str(out / "lr=3e-3_seed=0"), _alone(ws, tmp_path, "a", "train.lr=3e-3", "train.seed=0"))

    # The variant chosen on validation accuracy, from the variants' own metrics.
    vals = {v["name"]: json.load(open(out / v["name"] / METRICS))["val"]["accuracy"] for v in result["variants"]}
    assert result["selection"] == {"split": "val", "metric": "accuracy", "mode": "max"}
    assert vals[result["chosen"]] == max(vals.values())
    # Seeds give different side networks (the RNG streams are the variants' own, not one shared stream).
    w0, w1 = (load_file(str(out / n / CHECKPOINT / WEIGHTS)) for n in ("lr=1e-3_seed=0", "lr=1e-3_seed=1"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_methods_and_tapped_layers_share_the_forward(ws, tmp_path, monkeypatch):
    """UniPT over all layers, over layers 1 and 3, and the linear probe read one forward that taps their union."""
    counter = _CountForwards(monkeypatch)
    out = tmp_path / "sweep"
    common = [*ws["common"], "train.max_steps=5", "train.checkpoint_every=0"]
    result = run_sweep(None, common, ["method=unipt,linear_probe", "unipt.layers=all,[1,3]"], str(out))
    n_sweep = counter.n
    assert [v["name"] for v in result["variants"]] == [
        "method=unipt_layers=all", "method=unipt_layers=1+3", "method=linear_probe_layers=all",
        "method=linear_probe_layers=1+3"]
    ws_short = {"common": common}
    counter.n = 0
    _same_run(str(out / "method=unipt_layers=1+3"), _alone(ws_short, tmp_path, "l13", "unipt.layers=[1,3]"))
    assert n_sweep == counter.n
    _same_run(str(out / "method=linear_probe_layers=all"), _alone(ws_short, tmp_path, "probe", "method=linear_probe"))


def test_a_variant_that_goes_non_finite_stops_alone(ws, tmp_path):
    out = tmp_path / "sweep"
    common = [*ws["common"], "train.max_steps=4", "train.checkpoint_every=0", "train.warmup_ratio=0"]
    result = run_sweep(None, common, ["train.lr=1e-3,1e30"], str(out))
    ok, bad = result["variants"]
    assert ok["status"] == "completed" and bad["status"] == "stopped"
    assert "non-finite" in bad["reason"]
    assert result["chosen"] == ok["name"]
    stopped = json.load(open(out / bad["name"] / METRICS))
    assert stopped["status"] == "stopped" and not os.path.exists(out / bad["name"] / CHECKPOINT)
    assert os.path.isfile(out / ok["name"] / CHECKPOINT / WEIGHTS)


def test_a_stopped_sweep_resumes_every_variant_from_their_newest_common_step(ws, tmp_path, monkeypatch):
    """A crash after step 9 (checkpoints at 4 and 8), with the second variant's step-8 checkpoint lost (a crash
    between two variants' saves): train.resume=auto takes both from step 4 and they end as the runs alone do."""
    from unipt_scale.trainer import Trainer

    out = tmp_path / "sweep"
    grid = ["train.lr=3e-3,1e-3"]
    real = Trainer._stepped

    def crash(trainer):
        real(trainer)
        if trainer.state.step == 9:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(Trainer, "_stepped", crash)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(None, ws["common"], grid, str(out))
    monkeypatch.setattr(Trainer, "_stepped", real)
    second = out / "lr=1e-3" / "checkpoints"
    assert sorted(n for n in os.listdir(second) if n.startswith("step")) == ["step00000004", "step00000008"]
    import shutil

    shutil.rmtree(second / "step00000008")
    result = run_sweep(None, [*ws["common"], "train.resume=auto"], grid, str(out))
    assert result["resumed_from_step"] == 4 and all(v["status"] == "completed" for v in result["variants"])
    for name, lr in (("lr=3e-3", "3e-3"), ("lr=1e-3", "1e-3")):
        got = _same_run(str(out / name), _alone(ws, tmp_path, name, f"train.lr={lr}"))
        assert got["resumed_from_step"] == 4


@pytest.mark.parametrize("grid, overrides, words", [
    (["data.batch_size=8,16"], [], "differ only in what is trained"),
    (["train.lr=1e-3,3e-3"], ["method=lora"], "trains inside the backbone"),
    (["method=unipt,full"], [], "trains inside the backbone"),
    (["train.lr=1e-3"], ["train.on_nonfinite=skip"], "lockstep"),
    (["train.lr=1e-3"], ["train.resume=/some/checkpoint"], "resumes with train.resume=auto"),
    (["train.seed=0,1"], ["backbone.random_init=true"], "random_init"),
    (["train.lr"], [], "key=v1,v2"),
    (["train.lr=1e-3,"], [], "empty"),
    (["train.lr=1e-3,1e-3"], [], "twice"),
    (["train.lr=1e-3", "train.lr=3e-3"], [], "twice"),
    (["train.lr=1e-3"], ["output_dir=x"], "drop output_dir"),
    (["unipt.layers=[1,2],[1, 2]"], [], "both name a variant"),
])
def test_what_cannot_share_the_forward_is_refused(ws, tmp_path, grid, overrides, words):
    with pytest.raises(ConfigError, match=words):
        variant_configs(None, [*ws["common"], *overrides], grid, str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d")


def test_grid_values_keep_their_brackets():
    assert parse_grid(["unipt.layers=[1,2],all,every:2"]) == [("unipt.layers", ["[1,2]", "all", "every:2"])]


def test_cli_refusal_is_one_line(ws, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "sweep", "--output-dir", str(tmp_path / "d"),
                           "--grid", "data.max_length=32,64", *ws["common"]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.max_length" in lines[0] and "Traceback" not in proc.stderr
