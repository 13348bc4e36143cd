"""Sweeps and multi-task runs under DeepSpeed (2 ranks on CPU, gloo, ZeRO-2): each variant or task an engine of
its own on one frozen forward per rank and batch, ending bit-identical to the same run trained alone by
`unipt train` on the same ranks.

Four launcher runs (a sweep, a task list of two groups, and one of each alone) on a tiny random-init BERT: about a
minute on 2 cores.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ds_helpers import REPO, deepspeed, ds_env, metrics, run, write_keyword_csv
from tiny_models import tiny_bert_dir
from unipt_scale.config import ConfigError
from unipt_scale.sweep import variant_configs

pytest.importorskip("deepspeed")

ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_sweep")
    model = tiny_bert_dir(str(root))
    data = write_keyword_csv(root / "tweets.csv", 240)
    write_keyword_csv(root / "other.csv", 160)
    (root / "zero2.json").write_text(json.dumps(ZERO2))
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=4",
              "data.eval_batch_size=16", "train.max_steps=6", "train.log_every=1", "train.warmup_ratio=0.25",
              "task.dropout=0.0", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1",
              "train.precision=fp32", "deepspeed.enabled=true", f"deepspeed.config={root / 'zero2.json'}"]
    return {"root": root, "common": common, "other": str(root / "other.csv")}


def _weights(out):
    return load_file(os.path.join(out, "checkpoint", "trained.safetensors"))


def _same(got_dir, want_dir):
    """fp32, the same ranks and the same reduction order: the same bits."""
    got, want = _weights(got_dir), _weights(want_dir)
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)
    a, b = metrics(got_dir), metrics(want_dir)
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"] == 6
    for key in ("train_loss", "val", "test"):
        assert a[key] == b[key], key


def test_two_rank_sweep_variants_equal_their_runs_alone(ws):
    root = ws["root"]
    sweep_dir = str(root / "sweep")
    proc = run("2 ranks, sweep", deepspeed("--module", "unipt_scale.cli", "sweep", "--output-dir", sweep_dir,
                                           "--grid", "train.lr=1e-3,3e-3", *ws["common"]))
    assert proc.stdout.count("chosen on val") == 1  # one rank prints the table
    with open(os.path.join(sweep_dir, "sweep.json")) as fh:
        result = json.load(fh)
    assert [v["status"] for v in result["variants"]] == ["completed", "completed"]
    assert result["chosen"] in ("lr=1e-3", "lr=3e-3")
    alone = str(root / "alone")
    run("2 ranks, one variant alone", deepspeed("--module", "unipt_scale.cli", "train", "--output-dir", alone,
                                                *ws["common"], "train.lr=3e-3"))
    _same(os.path.join(sweep_dir, "lr=3e-3"), alone)
    # the two variants trained apart: their learning rates differ, and so do their weights
    other = _weights(os.path.join(sweep_dir, "lr=1e-3"))
    got = _weights(os.path.join(sweep_dir, "lr=3e-3"))
    assert any(not torch.equal(other[n], got[n]) for n in got)


def test_two_rank_task_list_trains_each_task_as_alone(ws):
    """Two tasks on other data: two lockstep groups one after another on one process group."""
    root = ws["root"]
    config = root / "tasks.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "keywords"},
                                                {"name": "other", "data": {"path": ws["other"]},
                                                 "train": {"lr": 3e-3}}]}))
    out = str(root / "tasks")
    proc = run("2 ranks, two tasks", deepspeed("--module", "unipt_scale.cli", "train", "--config", str(config),
                                               "--output-dir", out, *ws["common"]))
    assert proc.stdout.count("lockstep group(s)") == 1  # one rank prints the summary
    with open(os.path.join(out, "tasks.json")) as fh:
        result = json.load(fh)
    assert result["groups"] == [["keywords"], ["other"]]
    assert [t["status"] for t in result["tasks"]] == ["completed", "completed"]
    alone = str(root / "other-alone")
    run("2 ranks, the second task alone", deepspeed("--module", "unipt_scale.cli", "train", "--output-dir", alone,
                                                    *ws["common"], f"data.path={ws['other']}", "train.lr=3e-3"))
    _same(os.path.join(out, "other"), alone)


def test_zero3_is_refused_in_one_line(ws, tmp_path):
    with pytest.raises(ConfigError, match="ZeRO-3"):
        variant_configs(None, [*ws["common"], "deepspeed.zero_stage=3"], ["train.lr=1e-3,3e-3"], str(tmp_path / "d"))
    proc = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "sweep", "--output-dir", str(tmp_path / "d"),
                           "--grid", "train.lr=1e-3,3e-3", *ws["common"], "deepspeed.zero_stage=3"], cwd=REPO,
                          env=ds_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ZeRO-3" in lines[0] and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "d")
