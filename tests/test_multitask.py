"""Several tasks on one frozen backbone in one run (`tasks:` in the config): each task ends as it would trained alone,
tasks on the same data share the frozen forward, tasks on other data run after them over the same loaded backbone,
and a task list that cannot share is refused in one line before anything loads."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_resume import _write_csv
from test_sweep import _CountForwards
from tiny_models import tiny_bert_dir
from unipt_scale.backbone import HFBackbone
from unipt_scale.config import ConfigError, load_config
from unipt_scale.export import CHECKPOINT, METRICS, WEIGHTS
from unipt_scale.multitask import TASKS_JSON, train_tasks
from unipt_scale.trainer import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    model = tiny_bert_dir(str(root))
    data_a = _write_csv(root / "a.csv")
    data_b = _write_csv(root / "b.csv", n=96, seed=5)
    base = {"backbone": {"path": model}, "data": {"source": "csv", "path": data_a, "batch_size": 16},
            "train": {"max_steps": 5, "tensorboard": False, "num_threads": 1, "precision": "fp32", "log_every": 1},
            "unipt": {"mapping_dim": 8}, "task": {"dropout": 0.2}}
    return {"root": root, "base": base, "b": data_b, "model": model}


def _alone(ws, tmp_path, name, overrides):
    out = str(tmp_path / f"alone-{name}")
    flat = [f"backbone.path={ws['model']}", "data.source=csv", f"data.path={ws['base']['data']['path']}",
            "data.batch_size=16", "train.max_steps=5", "train.tensorboard=false", "train.num_threads=1",
            "train.precision=fp32", "train.log_every=1", "unipt.mapping_dim=8", "task.dropout=0.2", *overrides,
            f"output_dir={out}"]
    train(load_config(None, flat))
    return out


def _same(a, b):
    ma, mb = (json.load(open(os.path.join(d, METRICS))) for d in (a, b))
    assert ma["train_loss"] == mb["train_loss"] and ma["test"] == mb["test"] and ma["val"] == mb["val"]
    wa, wb = (load_file(os.path.join(d, CHECKPOINT, WEIGHTS)) for d in (a, b))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wb)


def test_tasks_train_as_they_would_alone(ws, tmp_path, monkeypatch):
    tasks = [{"name": "sentiment"},
             {"name": "probe", "method": "linear_probe"},
             {"name": "other", "data": {"path": ws["b"]}, "unipt": {"layers": [1, 3]}, "train": {"lr": 1e-3}}]
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"], base={**ws["base"], "tasks": tasks})
    loads = []
    real_load = HFBackbone.__init__

    def counted_init(self, *a, **k):
        loads.append(1)
        return real_load(self, *a, **k)

    monkeypatch.setattr(HFBackbone, "__init__", counted_init)
    counter = _CountForwards(monkeypatch)
    result = train_tasks(cfg)
    assert len(loads) == 1, "the backbone loads once for every task"
    assert result["groups"] == [["sentiment", "probe"], ["other"]]
    assert [r["status"] for r in result["tasks"]] == ["completed"] * 3
    assert json.load(open(tmp_path / "run" / TASKS_JSON)) == json.loads(json.dumps(result))
    n_tasks = counter.n
    counter.n = 0
    _same(str(tmp_path / "run" / "sentiment"), _alone(ws, tmp_path, "s", []))
    n_sentiment = counter.n
    _same(str(tmp_path / "run" / "probe"), _alone(ws, tmp_path, "p", ["method=linear_probe"]))
    counter.n = 0
    _same(str(tmp_path / "run" / "other"), _alone(ws, tmp_path, "o", [f"data.path={ws['b']}", "unipt.layers=[1,3]",
                                                                      "train.lr=1e-3"]))
    assert n_tasks == n_sentiment + counter.n, "sentiment and probe read one forward per batch"


@pytest.mark.parametrize("tasks, words", [
    ([{"name": "a"}, {"name": "a"}], "two tasks are named"),
    ([{"data": {"path": "x"}}], "needs a name"),
    ([{"name": "a", "method": "lora"}], "trains inside the backbone"),
    ([{"name": "a"}, {"name": "b", "backbone": {"dtype": "bfloat16"}}], "different backbones"),
    ([{"name": "a", "output_dir": "x"}], "output_dir"),
    ([{"name": "a", "task": {"kind": "nope"}}], r"tasks\[0\] \(a\): task.kind"),
    ([{"name": "a", "train": {"resume": "auto"}}], "starts fresh"),
    ([{"name": "a", "deepspeed": {"enabled": True}}, {"name": "b"}], "differ in deepspeed.enabled"),
    ([{"name": "a", "deepspeed": {"enabled": True, "zero_stage": 3}}], r"task a: ZeRO-3 .* ZeRO stage 0-2"),
    ([{"name": "a", "backbone": {"random_init": True}},
      {"name": "b", "backbone": {"random_init": True}, "train": {"seed": 1}}], "drawn from the seed"),
])
def test_task_lists_that_cannot_share_are_refused_at_load(ws, tmp_path, tasks, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [f"output_dir={tmp_path / 'run'}"], base={**ws["base"], "tasks": tasks})
    assert not os.path.exists(tmp_path / "run")


def test_cli_trains_a_task_list(ws, tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({**ws["base"], "train": {**ws["base"]["train"], "max_steps": 2},
                                    "tasks": [{"name": "x"}, {"name": "y", "train": {"seed": 1}}]}))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "train", "--config", str(path), "--output-dir",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 tasks in 1 lockstep group(s)" in proc.stdout
    for name in ("x", "y"):
        assert os.path.isfile(tmp_path / "out" / name / CHECKPOINT / WEIGHTS)
