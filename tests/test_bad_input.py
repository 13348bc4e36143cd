"""Bad input: each case exits 2 with one line that names the problem and the fix, no traceback, before any
backbone weights load, quickly, and leaves nothing behind."""
import json
import os
import shutil
import time

import pytest

from test_resume import _write_csv
from tiny_models import tiny_bert_dir
from unipt_scale.cli import main

MAX_SECONDS = 20  # generous for 2 loaded cores; a case that trains first takes far longer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv", n=64)
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=8",
              "train.max_steps=2", "unipt.mapping_dim=8", "train.tensorboard=false"]
    # A finished run, whose checkpoint the eval cases damage in copies.
    run = str(root / "good")
    assert main(["train", "--output-dir", run, *common]) == 0
    return {"root": root, "model": model, "common": common, "run": run}


def _damaged_copy(ws, tmp_path, how):
    ckpt = str(tmp_path / "checkpoint")
    shutil.copytree(os.path.join(ws["run"], "checkpoint"), ckpt)
    weights = os.path.join(ckpt, "trained.safetensors")
    if how == "empty":
        open(weights, "wb").close()
    elif how == "flipped":
        data = bytearray(open(weights, "rb").read())
        for i in range(64):
            data[-(i + 1)] ^= 0xFF  # inside the tensor payload: parses fine, different numbers
        open(weights, "wb").write(bytes(data))
    return ckpt


def _yaml_tag(ws, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    return path


def _shards_without_index(ws, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "train-000000.tar").write_bytes(b"\0" * 1024)
    return ["train", "--output-dir", str(tmp_path / "o"), *ws["common"][:1], "data.source=shards", f"data.path={d}",
            *ws["common"][3:]]


def _non_tar_in_index(ws, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "train-000000.tar").write_text("this is not a tar file, it only has the name of one\n" * 40)
    index = {"format": "unipt_scale.shards/1", "fields": ["text", "label"], "classes": ["a", "b"],
             "shards": {"train-000000.tar": 10},
             "splits": {"train": {"shards": ["train-000000.tar"], "samples": 10}}}
    (d / "sizes.json").write_text(json.dumps(index))
    return ["train", "--output-dir", str(tmp_path / "o"), *ws["common"][:1], "data.source=shards", f"data.path={d}",
            *ws["common"][3:]]


def _glob_of_non_tars(ws, tmp_path):
    (tmp_path / "notes-0.txt").write_text("x")
    return ["train", "--output-dir", str(tmp_path / "o"), *ws["common"][:1], "data.source=shards",
            f"data.train_shards={tmp_path}/notes-*", *ws["common"][3:]]


CASES = {
    "shards without sizes.json": (_shards_without_index, "sizes.json"),
    "a non-tar listed in sizes.json": (_non_tar_in_index, "train-000000.tar"),
    "a glob matching no tar": (_glob_of_non_tars, "data.train_shards"),
    "output dir is a file": (lambda ws, t: (t / "f").write_text("x") and
                             ["train", "--output-dir", str(t / "f"), *ws["common"]], "is a file"),
    "output dir under a file": (lambda ws, t: (t / "f").write_text("x") and
                                ["train", "--output-dir", str(t / "f" / "run"), *ws["common"]], "is a file"),
    "mapping_dim wider than the backbone": (lambda ws, t: ["train", "--output-dir", str(t / "o"), *ws["common"],
                                                           "unipt.mapping_dim=64"], "1..32"),
    "mapping_dim absurd": (lambda ws, t: ["train", "--output-dir", str(t / "o"), *ws["common"],
                                          "unipt.mapping_dim=1000000000000"], "out of range"),
    "layers out of range": (lambda ws, t: ["train", "--output-dir", str(t / "o"), *ws["common"],
                                           "unipt.layers=[0, 9]"], "unipt.layers"),
    "YAML tag in a config": (lambda ws, t: ["train", "--config", str(_yaml_tag(ws, t)), "--output-dir",
                                            str(t / "o")], "not plain YAML"),
    "empty trained.safetensors": (lambda ws, t: ["eval", "--checkpoint", _damaged_copy(ws, t, "empty")], "sha256"),
    "tampered trained.safetensors": (lambda ws, t: ["eval", "--checkpoint", _damaged_copy(ws, t, "flipped")],
                                     "sha256"),
    "not a checkpoint": (lambda ws, t: ["eval", "--checkpoint", str(t)], "not a unipt checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_fast_with_one_line(ws, tmp_path, capsys, monkeypatch, case):
    import unipt_scale.backbone as backbone

    def no_weights(*a, **k):
        raise AssertionError("backbone weights were loaded before the input was checked")

    make, says = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = make(ws, work)
    before = sorted(os.listdir(work))
    if argv[0] == "train":
        monkeypatch.setattr(backbone, "_load_hf", no_weights)
    capsys.readouterr()
    t0 = time.time()
    code = main(argv)
    seconds = time.time() - t0
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unipt:")]
    assert code == 2, err[-2000:]
    assert len(ours) == 1 and says in ours[0], err[-2000:]
    assert "Traceback" not in err
    assert seconds < MAX_SECONDS, f"{case}: {seconds:.1f} s to fail"
    assert sorted(os.listdir(work)) == before, "a failed run leaves nothing behind"


def test_output_dir_not_writable(ws, capsys):
    target = "/sys/unipt-not-writable/run"  # sysfs is read-only, even for root
    if os.access("/sys", os.W_OK) and os.path.isdir("/sys") and not os.path.ismount("/sys"):
        pytest.skip("no read-only directory to test with on this machine")
    code = main(["train", "--output-dir", target, *ws["common"]])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and "Traceback" not in err


def test_failed_run_leaves_no_empty_output_dir(ws, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), *ws["common"], "data.limit_train=1"])
    assert code == 2, capsys.readouterr().err
    assert not out.exists()


def test_remote_code_in_a_checkpoint_never_runs(ws, tmp_path, capsys):
    """A checkpoint whose config asks for remote code, over a backbone that ships code, runs none of it."""
    model = tmp_path / "model"
    shutil.copytree(ws["model"], model)
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    cfg["model_type"] = "unipt-test-custom"  # only its own code could build it
    (model / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(os.path.join(ws["run"], "checkpoint"), ckpt)
    text = (ckpt / "config.yaml").read_text().replace(f"path: {ws['model']}", f"path: {model}")
    text = text.replace("  kind: auto\n", "  kind: auto\n  trust_remote_code: true\n", 1)
    (ckpt / "config.yaml").write_text(text)
    code = main(["eval", "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists()
