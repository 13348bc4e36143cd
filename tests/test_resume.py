"""Failure and resume on the single-process engine: kill -9 at random steps, crashes inside a checkpoint commit,
torn pointers, damaged and tampered files, non-finite losses. Every run is a tiny random-init BERT on a tiny CSV."""
import csv
import json
import os
import pickle
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import WORDS, tiny_bert_dir
from unipt_scale.checkpoint import CheckpointError, CheckpointManager, verify
from unipt_scale.config import load_config
from unipt_scale.export import CHECKPOINT, META, METRICS, WEIGHTS, commit_outputs, recover_outputs
from unipt_scale.trainer import Callback, NonFiniteError, train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = 12


def _write_csv(path, n=160, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 8))]
            w.writerow([" ".join(words), ("pos", "neg", "mixed")[i % 3]])
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv")
    # Dropout on, an epoch boundary inside the run (128 training rows / batch 16 = 8 steps per epoch), fp32.
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=16",
              "data.eval_batch_size=64", f"train.max_steps={STEPS}", "train.log_every=1", "train.lr=3e-3",
              "task.dropout=0.3", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1",
              "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.precision=fp32"]
    return {"root": root, "common": common}


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([HERE, env.get("PYTHONPATH", "")]))
    return env


def _subprocess(out, *args, ok=True):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "run_train.py"), f"output_dir={out}", *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if ok and proc.returncode != 0:
        pytest.fail(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _metrics(out):
    with open(os.path.join(out, METRICS)) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def uninterrupted(ws):
    out = str(ws["root"] / "uninterrupted")
    _subprocess(out, *ws["common"])
    return out


def test_kill_9_at_random_steps_then_resume_is_bit_identical(ws, uninterrupted):
    ref = _metrics(uninterrupted)
    ref_w = load_file(os.path.join(uninterrupted, CHECKPOINT, WEIGHTS))
    assert len(ref["train_loss"]) == STEPS and ref["epochs_run"] >= 1
    # One random step in each third of the run (fixed seed: the same three every time); the last third resumes
    # across the epoch boundary at step 8.
    rng = random.Random(8)
    kill_steps = [rng.randint(1, 4), rng.randint(5, 8), rng.randint(9, STEPS - 1)]
    for k in kill_steps:
        out = str(ws["root"] / f"killed-{k}")
        dead = _subprocess(out, *ws["common"], f"--kill-after-step={k}", ok=False)
        assert dead.returncode == -9, dead.stderr[-2000:]
        assert not os.path.exists(os.path.join(out, METRICS)), "a killed run commits no outputs"
        _subprocess(out, *ws["common"], "train.resume=auto")
        got = _metrics(out)
        assert got["train_loss"] == ref["train_loss"], f"killed after step {k}"
        w = load_file(os.path.join(out, CHECKPOINT, WEIGHTS))
        assert set(w) == set(ref_w)
        assert all(torch.equal(w[n], ref_w[n]) for n in ref_w), f"killed after step {k}: weights differ"
        assert got["test"] == ref["test"] and got["steps"] == STEPS
        assert got["resumed_from_step"] == (k // 2) * 2, "only the steps after the checkpoint ran again"
        assert got["samples_seen"] == ref["samples_seen"] == STEPS * 16


def test_resume_auto_without_checkpoint_starts_fresh_and_keeps_k(ws, tmp_path):
    out = str(tmp_path / "fresh")
    metrics = train(load_config(None, [*ws["common"], f"output_dir={out}", "train.resume=auto", "train.max_steps=8",
                                       "train.keep_checkpoints=2"]))
    assert metrics["steps"] == 8 and metrics["status"] == "completed"
    names = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step"))
    assert names == ["step00000006", "step00000008"], "the newest K=2 are kept"
    for n in names:
        verify(os.path.join(out, "checkpoints", n))
    assert metrics["resumable_checkpoint"].endswith("step00000008")


class _Manager:
    """A checkpoint manager on a bare directory with a trivial engine state, for commit-level tests."""

    def __init__(self, root, config=None):
        self.m = CheckpointManager(str(root), 0, 1, config or {"a": 1}, keep=5)

    def save(self, step):
        def write(d):
            with open(os.path.join(d, "rank0.json"), "w") as fh:
                json.dump({"step": step}, fh)
            with open(os.path.join(d, "engine.bin"), "wb") as fh:
                fh.write(os.urandom(64))

        return self.m.save(step, write)


def _crash_at_rename(monkeypatch, n):
    """os.replace raises at its n-th call from now on (a crash at that commit point); returns the real one."""
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        if calls["n"] == n:
            raise OSError("simulated crash")
        calls["n"] += 1
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    return real


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_crash_at_each_commit_point_resumes_from_a_complete_checkpoint(tmp_path, monkeypatch, fail_at):
    """The commit renames three times (manifest into the staging dir, the dir into place, `latest`); a crash at
    any of them leaves the previous checkpoint, or the new one if it was already complete, to resume from."""
    mgr = _Manager(tmp_path)
    mgr.save(2)
    real = _crash_at_rename(monkeypatch, fail_at)
    with pytest.raises(OSError, match="simulated crash"):
        mgr.save(4)
    monkeypatch.setattr(os, "replace", real)
    found, notes = mgr.m.find("auto")
    assert os.path.basename(found) == ("step00000004" if fail_at == 2 else "step00000002")
    verify(found)


def test_torn_latest_and_partial_checkpoint_fall_back(tmp_path):
    mgr = _Manager(tmp_path)
    mgr.save(2)
    mgr.save(4)
    root = mgr.m.root
    for content in (b"", b"\x00\xffgarbage", b"step99999999\n"):
        with open(os.path.join(root, "latest"), "wb") as fh:
            fh.write(content)
        found, notes = mgr.m.find("auto")
        assert found.endswith("step00000004") and any("torn" in n for n in notes)
    # A stepN directory without its manifest (copied by hand, or a writer that crashed in another layout).
    os.remove(os.path.join(root, "step00000004", "manifest.json"))
    found, notes = mgr.m.find("auto")
    assert found.endswith("step00000002") and any("incomplete" in n for n in notes)
    # A staging directory from a crashed writer is never a candidate.
    os.makedirs(os.path.join(root, ".tmp-step00000006"))
    assert mgr.m.find("auto")[0].endswith("step00000002")


def test_flipped_bytes_fall_back_or_fail_naming_the_file(tmp_path):
    mgr = _Manager(tmp_path)
    mgr.save(2)
    newest = mgr.save(4)
    path = os.path.join(newest, "engine.bin")
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    found, notes = mgr.m.find("auto")
    assert found.endswith("step00000002")
    assert any("engine.bin" in n and "sha256" in n for n in notes)
    with pytest.raises(CheckpointError, match="engine.bin"):
        mgr.m.find(newest)  # an explicit checkpoint is not silently replaced by another


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    mgr = _Manager(tmp_path)
    only = mgr.save(2)
    with open(os.path.join(only, "rank0.json"), "a") as fh:
        fh.write(" ")
    with pytest.raises(CheckpointError, match="no checkpoint .* is intact"):
        mgr.m.find("auto")


def test_other_config_or_world_size_is_refused(tmp_path):
    mgr = _Manager(tmp_path, config={"train": {"lr": 0.1}, "output_dir": "a"})
    mgr.save(2)
    other = CheckpointManager(str(tmp_path), 0, 1, {"train": {"lr": 0.2}, "output_dir": "b"}, keep=2)
    with pytest.raises(CheckpointError, match="train.lr"):
        other.find("auto")
    moved = CheckpointManager(str(tmp_path), 0, 1, {"train": {"lr": 0.1}, "output_dir": "elsewhere"}, keep=2)
    assert moved.find("auto")[0].endswith("step00000002"), "output_dir may change"
    wider = CheckpointManager(str(tmp_path), 0, 2, {"train": {"lr": 0.1}, "output_dir": "a"}, keep=2)
    with pytest.raises(CheckpointError, match="same world size"):
        wider.find("auto")


class _Payload:
    """Unpickling this creates a marker file: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_place_of_a_state_file_never_runs(ws, tmp_path):
    out = str(tmp_path / "run")
    train(load_config(None, [*ws["common"], f"output_dir={out}", "train.max_steps=2"]))
    ckpt = os.path.join(out, "checkpoints", "step00000002")
    marker = str(tmp_path / "pwned")
    for name in ("rank0.json", "rank0.safetensors", "engine.safetensors", "engine.json"):
        victim = str(tmp_path / f"victim-{name}")
        shutil.copytree(ckpt, victim)
        with open(os.path.join(victim, name), "wb") as fh:
            pickle.dump(_Payload(marker), fh)
        # Even with a manifest that matches the planted file, the state files are read as JSON / safetensors.
        manifest = json.load(open(os.path.join(victim, "manifest.json")))
        from unipt_scale.checkpoint import sha256_file

        manifest["files"][name] = {"sha256": sha256_file(os.path.join(victim, name)),
                                   "bytes": os.path.getsize(os.path.join(victim, name))}
        json.dump(manifest, open(os.path.join(victim, "manifest.json"), "w"))
        with pytest.raises(Exception):
            train(load_config(None, [*ws["common"], f"output_dir={tmp_path / 'r'}", "train.max_steps=4",
                                     f"train.resume={victim}"]))
        assert not os.path.exists(marker), f"a pickle planted as {name} was unpickled"


def test_deepspeed_state_files_are_scanned_before_deepspeed_unpickles_them(tmp_path):
    from unipt_scale.deepspeed_engine import refuse_unsafe_pickles

    marker = str(tmp_path / "pwned")
    d = tmp_path / "state"
    d.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, str(d / "mp_rank_00_model_states.pt"))
    with pytest.raises(ValueError, match="could run code"):
        refuse_unsafe_pickles(str(d))
    assert not os.path.exists(marker)
    (d / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint file"):
        refuse_unsafe_pickles(str(d))
    assert not os.path.exists(marker)


class _PoisonAfter(Callback):
    """Sets a trained weight to NaN after step k: the next loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            with torch.no_grad():
                trainer.engine.model.classifier.weight.fill_(float("nan"))


def test_nan_stops_the_run_and_writes_nothing_non_finite(ws, tmp_path):
    out = str(tmp_path / "nan")
    cfg = load_config(None, [*ws["common"], f"output_dir={out}", "train.log_every=3"])
    with pytest.raises(NonFiniteError) as err:
        train(cfg, callbacks=[_PoisonAfter(5)])
    msg = str(err.value)
    assert "step 6" in msg and "step00000004" in msg, msg  # the first bad step and the last good checkpoint
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step")) == ["step00000002", "step00000004"]
    for n in ("step00000002", "step00000004"):
        verify(os.path.join(ckpts, n))
        for f in ("engine.safetensors", "rank0.safetensors"):
            for k, v in load_file(os.path.join(ckpts, n, f)).items():
                assert not v.is_floating_point() or torch.isfinite(v).all(), (n, f, k)
    assert not os.path.exists(os.path.join(out, CHECKPOINT)), "no export of non-finite weights"

    def refuse(const):
        raise AssertionError(f"metrics.json holds {const}")

    with open(os.path.join(out, METRICS)) as fh:
        metrics = json.loads(fh.read(), parse_constant=refuse)
    assert metrics["status"] == "stopped" and "non-finite" in metrics["reason"]
    assert [s for s, _ in metrics["train_loss"]] == [3]  # the step-6 window was never logged as a number
    # ... and the run resumes from its last good checkpoint.
    resumed = train(load_config(None, [*ws["common"], f"output_dir={out}", "train.log_every=3",
                                       "train.resume=auto"]))
    assert resumed["status"] == "completed" and resumed["steps"] == STEPS


def test_cli_exits_non_zero_on_divergence_with_one_line(ws, tmp_path, capsys):
    from unipt_scale.cli import main

    out = str(tmp_path / "diverge")
    assert main(["train", *ws["common"], f"output_dir={out}", "train.lr=1e10", "train.log_every=4"]) == 3
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unipt:")]
    assert len(ours) == 1 and ours[0].startswith("unipt: non-finite") and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, CHECKPOINT))
    # Stopped inside the loop, before any checkpoint or evaluation closed a timed segment: the rate is still real.
    metrics = _metrics(out)
    assert metrics["status"] == "stopped" and metrics["samples_seen"] > 0
    assert 0 < metrics["train_time_s"] <= metrics["wall_time_s"]
    assert metrics["train_samples_per_second"] == pytest.approx(metrics["samples_seen"] / metrics["train_time_s"])


class _NanLossOnce(Callback):
    """Makes the micro batch after step k return a NaN loss (a bad batch), once."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step != self.step:
            return
        model = trainer.engine.model
        original = model.training_loss

        def once(batch):
            model.training_loss = original
            loss, stats = original(batch)
            return loss * float("nan"), stats

        model.training_loss = once


def test_skip_drops_the_bad_step_and_finishes(ws, tmp_path):
    out = str(tmp_path / "skip")
    cfg = load_config(None, [*ws["common"], f"output_dir={out}", "train.on_nonfinite=skip"])
    metrics = train(cfg, callbacks=[_NanLossOnce(3)])
    assert metrics["status"] == "completed" and metrics["skipped_steps"] == 1 and metrics["steps"] == STEPS
    assert all(v is not None for _, v in metrics["train_loss"])
    for v in load_file(os.path.join(out, CHECKPOINT, WEIGHTS)).values():
        assert torch.isfinite(v).all()
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps"):
        train(load_config(None, [*ws["common"], f"output_dir={tmp_path / 'skip2'}", "train.on_nonfinite=skip",
                                 "train.max_nonfinite_steps=2"]), callbacks=[_PoisonAfter(3)])


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3, 4])
def test_outputs_commit_as_a_pair(tmp_path, monkeypatch, fail_at):
    """A crash at any rename of the output commit leaves metrics.json and checkpoint/ of the same run."""
    cfg = load_config()
    out = str(tmp_path)
    commit_outputs(out, {"run": "old"}, {"w": torch.zeros(3)}, cfg, {"num_classes": 2})
    real = _crash_at_rename(monkeypatch, fail_at)
    try:
        commit_outputs(out, {"run": "new"}, {"w": torch.ones(3)}, cfg, {"num_classes": 2})
        crashed = False
    except OSError:
        crashed = True
    monkeypatch.setattr(os, "replace", real)
    recover_outputs(out)  # what the next reader does first
    metrics = _metrics(out)
    meta = json.load(open(os.path.join(out, CHECKPOINT, META)))
    weights = load_file(os.path.join(out, CHECKPOINT, WEIGHTS))["w"]
    assert metrics["checkpoint_sha256"] == meta["weights_sha256"]
    assert (metrics["run"] == "new") == bool(weights[0] == 1)
    assert crashed or metrics["run"] == "new"
    assert sorted(os.listdir(out)) == [CHECKPOINT, METRICS], "no staging directory is left"
