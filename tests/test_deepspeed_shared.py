"""Sweeps and multi-task runs under DeepSpeed (2 ranks on CPU, gloo, ZeRO-2): each variant or task an engine of
its own on one frozen forward per rank and batch, ending bit-identical to the same run trained alone by
`unipt train` on the same ranks.

Also the tapped-state cache on 2 ranks: each rank reads, from the second epoch on, the samples the other rank
computed in the first, and training equals the uncached run bit for bit (float32).

Six launcher runs on a tiny random-init BERT: about a minute and a half on 2 cores.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile

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
    write_keyword_csv(root / "small.csv", 80)
    (root / "zero2.json").write_text(json.dumps(ZERO2))
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=4",
              "data.eval_batch_size=16", "train.max_steps=6", "train.log_every=1", "train.warmup_ratio=0.25",
              "task.dropout=0.0", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1",
              "train.precision=fp32", "deepspeed.enabled=true", f"deepspeed.config={root / 'zero2.json'}"]
    return {"root": root, "common": common, "other": str(root / "other.csv"), "small": str(root / "small.csv")}


def _weights(out):
    return load_file(os.path.join(out, "checkpoint", "trained.safetensors"))


def _same(got_dir, want_dir, steps=6):
    """fp32, the same ranks and the same reduction order: the same bits."""
    got, want = _weights(got_dir), _weights(want_dir)
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)
    a, b = metrics(got_dir), metrics(want_dir)
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"] == steps
    for key in ("train_loss", "val", "test"):
        assert a[key] == b[key], key


def test_two_rank_sweep_variants_equal_their_runs_alone(ws):
    root = ws["root"]
    sweep_dir = str(root / "sweep")
    proc = run("2 ranks, sweep", deepspeed("--module", "unipt_scale.cli", "sweep", "--output-dir", sweep_dir,
                                           "--grid", "train.lr=1e-3,3e-3", *ws["common"], "train.checkpoint_every=2"))
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

    # A crash between the two variants' step-6 checkpoints, before the end: the sweep resumes both variants from
    # step 4, the newest both have, on the ranks, and they end as before.
    for name in ("lr=1e-3", "lr=3e-3"):
        shutil.rmtree(os.path.join(sweep_dir, name, "checkpoint"))
        os.unlink(os.path.join(sweep_dir, name, "metrics.json"))
    shutil.rmtree(os.path.join(sweep_dir, "lr=3e-3", "checkpoints", "step00000006"))
    os.unlink(os.path.join(sweep_dir, "sweep.json"))
    run("2 ranks, sweep resumed", deepspeed("--module", "unipt_scale.cli", "sweep", "--output-dir", sweep_dir,
                                            "--grid", "train.lr=1e-3,3e-3", *ws["common"],
                                            "train.checkpoint_every=2", "train.resume=auto"))
    with open(os.path.join(sweep_dir, "sweep.json")) as fh:
        assert json.load(fh)["resumed_from_step"] == 4
    assert metrics(os.path.join(sweep_dir, "lr=3e-3"))["resumed_from_step"] == 4
    _same(os.path.join(sweep_dir, "lr=3e-3"), alone)
    assert all(torch.equal(_weights(os.path.join(sweep_dir, "lr=1e-3"))[n], other[n]) for n in other)


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


def test_two_rank_cache_reads_the_other_ranks_samples_and_trains_as_uncached(ws):
    """Two epochs over a small set: every rank's first-epoch states reach the other rank, so no sample is computed
    (and stored) twice, and float32 states from the cache train as the forward's own."""
    root = ws["root"]
    run_args = [*ws["common"], f"data.path={ws['small']}", "train.max_steps=0", "train.epochs=2"]
    uncached, cached = str(root / "uncached"), str(root / "cached")
    run("2 ranks, no cache", deepspeed("--module", "unipt_scale.cli", "train", "--output-dir", uncached, *run_args))
    run("2 ranks, float32 cache", deepspeed("--module", "unipt_scale.cli", "train", "--output-dir", cached, *run_args,
                                            f"data.feature_cache={root / 'cache'}", "data.feature_cache_dtype=float32"))
    # Samples the first epoch dropped with its last partial batch come up in the second beside cached ones: the
    # backbone then runs on a part of the batch, and its rows may round differently from the whole batch's
    # (float32 states of the backbone's own batch-to-batch rounding: 2e-7 here after 14 steps).
    got, want = _weights(cached), _weights(uncached)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6, msg=name)
    a, b = metrics(cached), metrics(uncached)
    assert a["steps"] == b["steps"] >= 4 and a["world_size"] == 2
    torch.testing.assert_close(torch.tensor([v for _, v in a["train_loss"]]),
                               torch.tensor([v for _, v in b["train_loss"]]), rtol=0, atol=1e-5)
    fc = metrics(cached)["feature_cache"]
    assert fc["hits"] > 0
    stored = []
    for name in os.listdir(fc["dirs"][0]):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(fc["dirs"][0], name)) as tf:
                stored += [m.name for m in tf.getmembers()]
    # Each sample is stored by the rank whose part held it first (without the epoch-end exchange, 41 of them by
    # both here); evaluation reads every world_size-th row per rank, so val and test rows are stored once too.
    stats = a["data"]
    assert len(set(stored)) == stats["train_samples"] + stats["val_samples"] + stats["test_samples"]
    assert len(stored) == len(set(stored)), f"{len(stored) - len(set(stored))} samples computed and stored twice"
