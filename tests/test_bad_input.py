"""Bad input: each case exits 2 with one line that names the problem and the fix, no traceback, before any
backbone weights load, quickly, and leaves nothing behind."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest

from test_resume import _Payload, _write_csv
from tiny_models import tiny_bert_dir, tiny_causal_lm_dir
from unipt_scale.checkpoint import CheckpointError, CheckpointManager, sha256_file, verify
from unipt_scale.cli import main

MAX_SECONDS = 20  # generous for 2 loaded cores; a case that trains first takes far longer
# Not a safetensors file: its first 8 bytes, read as the header length, say 0x0706050403020100 bytes.
GARBAGE = bytes(range(256)) * 16


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
    return {"root": root, "model": model, "common": common, "run": run, "lm": tiny_causal_lm_dir(str(root))}


def _snapshot(root):
    """Every file under `root` with its sha256: what a failed run must leave exactly as it found it."""
    return {os.path.relpath(os.path.join(base, n), root): sha256_file(os.path.join(base, n))
            for base, _dirs, names in os.walk(root) for n in names}


def _model_copy(ws, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(ws["model"], d)
    return d


def _train_on(ws, tmp_path, model, *extra):
    return ["train", "--output-dir", str(tmp_path / "o"), f"backbone.path={model}", *ws["common"][1:], *extra]


def _garbage_weights(ws, tmp_path, *extra):
    d = _model_copy(ws, tmp_path)
    (d / "model.safetensors").write_bytes(GARBAGE)
    return _train_on(ws, tmp_path, d, *extra)


def _garbage_shard(ws, tmp_path):
    from transformers import AutoConfig, AutoModel

    d = tmp_path / "sharded"
    AutoModel.from_config(AutoConfig.from_pretrained(ws["model"])).save_pretrained(d, max_shard_size="30KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ws["model"], name), d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").is_file()
    shards[1].write_bytes(GARBAGE)  # model-00002-of-0000N.safetensors
    return _train_on(ws, tmp_path, d)


def _pickle_only(ws, tmp_path, *extra):
    d = _model_copy(ws, tmp_path)
    os.remove(d / "model.safetensors")
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Payload(str(tmp_path / "pwned")), fh)  # the snapshot check sees the marker if it ever runs
    return _train_on(ws, tmp_path, d, *extra)


def _pickle_named_in_config(ws, tmp_path):
    """config.json's transformers_weights makes transformers read that file instead of model.safetensors."""
    d = _model_copy(ws, tmp_path)
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump(_Payload(str(tmp_path / "pwned")), fh)
    cfg = json.loads((d / "config.json").read_text())
    cfg["transformers_weights"] = "adapter_model.bin"
    (d / "config.json").write_text(json.dumps(cfg))
    return _train_on(ws, tmp_path, d)


LATIN1_LINE = '{"prompt": "caf\xe9 night", "response": "fine"}\n'.encode("latin-1")  # 0xe9: not UTF-8


def _latin1_jsonl(ws, tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = [json.dumps({"prompt": f"good movie {i}", "response": "great"}) + "\n" for i in range(2)]
    path.write_bytes("".join(good).encode() + LATIN1_LINE + "".join(good).encode())
    return ["train", "--output-dir", str(tmp_path / "o"), f"backbone.path={ws['lm']}", "task.kind=causal_lm",
            "data.source=jsonl", f"data.path={path}", "data.batch_size=1", "train.max_steps=1",
            "train.tensorboard=false"]


def _latin1_csv(ws, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\r\ngood movie,pos\r\ncaf\xe9 night,neg\r\n" + b"bad day,neg\r\n" * 20)
    return ["train", "--output-dir", str(tmp_path / "o"), *ws["common"][:1], "data.source=csv",
            f"data.path={path}", *ws["common"][3:]]


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
    "garbage model.safetensors": (_garbage_weights, ("model/model.safetensors is not a readable safetensors file",
                                                     "download the model again")),
    "garbage model.safetensors, nf4": (lambda ws, t: _garbage_weights(ws, t, "backbone.quantization=nf4"),
                                       ("model/model.safetensors is not a readable safetensors", "download")),
    "a garbage shard of a sharded model": (_garbage_shard, ("sharded/model-00002-of-", "download the model again")),
    "only a pytorch_model.bin": (_pickle_only, ("model/pytorch_model.bin is a pickle", "save_pretrained(NEW_DIR)")),
    "only a pytorch_model.bin, nf4": (lambda ws, t: _pickle_only(ws, t, "backbone.quantization=nf4"),
                                      ("model/pytorch_model.bin is a pickle", "model.safetensors")),
    "a pickle named by transformers_weights": (_pickle_named_in_config,
                                               ("transformers_weights names", "model/adapter_model.bin, a pickle",
                                                "remove the key to read model.safetensors")),
    "latin-1 byte in a causal_lm JSONL": (_latin1_jsonl, ("pairs.jsonl:3: byte 0xe9 is not utf-8",
                                                          "re-encode the file as UTF-8")),
    "latin-1 byte in a CSV": (_latin1_csv, ("latin1.csv:3: byte 0xe9 is not utf-8", "re-encode the file as UTF-8")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_fast_with_one_line(ws, tmp_path, capsys, monkeypatch, case):
    import unipt_scale.backbone as backbone

    def no_weights(*a, **k):
        raise AssertionError("backbone weights were loaded before the input was checked")

    make, says = CASES[case]
    says = (says,) if isinstance(says, str) else says
    work = tmp_path / "work"
    work.mkdir()
    argv = make(ws, work)
    before = _snapshot(work)
    if argv[0] == "train":
        monkeypatch.setattr(backbone, "_load_hf", no_weights)
    capsys.readouterr()
    t0 = time.time()
    code = main(argv)
    seconds = time.time() - t0
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unipt:")]
    assert code == 2, err[-2000:]
    assert len(ours) == 1 and all(s in ours[0] for s in says), err[-2000:]
    assert err.strip().splitlines() == ours, "nothing but the one line"
    assert "Traceback" not in err
    assert seconds < MAX_SECONDS, f"{case}: {seconds:.1f} s to fail"
    assert _snapshot(work) == before, "a failed run leaves nothing behind and changes nothing"


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


def test_a_garbage_weight_file_in_the_hub_cache_fails_in_one_line(ws, tmp_path, capsys, monkeypatch):
    """A hub id is read from its cached snapshot: the same header check applies there."""
    import huggingface_hub.constants

    import unipt_scale.backbone as backbone

    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(ws["model"], snapshot)
    (snapshot / "model.safetensors").write_bytes(GARBAGE)
    (tmp_path / "hub" / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(backbone, "_load_hf", lambda *a, **k: pytest.fail("weights loaded before the check"))
    capsys.readouterr()
    code = main(["train", "--output-dir", str(tmp_path / "o"), "backbone.path=someorg/tiny", *ws["common"][1:]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines() == [err.strip()]
    assert f"{snapshot}/model.safetensors is not a readable safetensors file" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_the_line_of_a_byte_that_is_not_utf8_is_counted_as_text_mode_counts(tmp_path, newline):
    from unipt_scale.data.sources import ShardInputError, read_text

    path = tmp_path / "t.jsonl"
    path.write_bytes(newline.join(["{}", "", "{\"a\": \"ok\"}", ""]).encode() + b"{\"a\": \"caf\xe9\"}" + b"\n")
    with pytest.raises(ShardInputError, match=r"t\.jsonl:4: byte 0xe9 is not utf-8 text; re-encode"):
        read_text(path)


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_unipt_shards_names_the_line_of_a_byte_that_is_not_utf8(tmp_path, capsys, source):
    from unipt_scale.data import shards

    path = tmp_path / f"in.{source}"
    if source == "csv":
        path.write_bytes(b"text,label\ngood movie,pos\ncaf\xe9 night,neg\n")
    else:
        path.write_bytes(b'{"text": "good movie", "label": "pos"}\n' + LATIN1_LINE)
    out = tmp_path / "out"
    capsys.readouterr()
    assert shards.main(["--source", source, "--input", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in.{source}:{3 if source == 'csv' else 2}: byte 0xe9" in err, err
    assert "re-encode the file as UTF-8" in err and not out.exists()


# --------------------------------------------------------------------------- resumable checkpoints re-signed
# A state file replaced by other bytes, with manifest.json rewritten to match (sha256 and size), passes the
# integrity check; it must still count as damaged: skipped for the newest intact checkpoint, or one line naming it.


def _resign(checkpoint, rel, content):
    path = os.path.join(checkpoint, rel)
    with open(path, "wb") as fh:
        fh.write(content)
    manifest_path = os.path.join(checkpoint, "manifest.json")
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    return manifest


@pytest.fixture(scope="module")
def resumable(ws):
    """A finished run with a checkpoint after each of its two steps."""
    out = str(ws["root"] / "resumable")
    args = [*ws["common"], "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    assert main(["train", "--output-dir", out, *args]) == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step00000001", "step00000002"]
    return out, args


@pytest.mark.parametrize("rel, says", [("rank0.safetensors", "is not a readable safetensors file"),
                                       ("engine.safetensors", "is not a readable safetensors file"),
                                       ("rank0.json", "is not JSON"), ("engine.json", "is not JSON")])
def test_a_resigned_state_file_is_skipped_for_the_previous_checkpoint(resumable, tmp_path, rel, says):
    out = str(tmp_path / "run")
    shutil.copytree(resumable[0], out)
    newest = os.path.join(out, "checkpoints", "step00000002")
    manifest = _resign(newest, rel, GARBAGE)
    manager = CheckpointManager(out, 0, 1, manifest["config"], keep=2)
    found, notes = manager.find("auto")
    assert found.endswith("step00000001")
    assert any(f"{newest}/{rel} {says}" in n for n in notes), notes
    with pytest.raises(CheckpointError, match=f"{rel} {says}.*set train.resume to another checkpoint"):
        manager.find(newest)  # an explicit checkpoint is not silently replaced by another


def test_resume_with_no_intact_checkpoint_fails_in_one_line_and_changes_nothing(resumable, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(resumable[0], out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step00000001"))
    _resign(os.path.join(out, "checkpoints", "step00000002"), "rank0.safetensors", GARBAGE)
    before = _snapshot(out)
    capsys.readouterr()
    code = main(["train", "--output-dir", out, *resumable[1], "train.resume=auto"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unipt:")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(ours) == 1 and "step00000002/rank0.safetensors is not a readable safetensors file" in ours[0]
    assert "train.resume=''" in ours[0] and err.strip().splitlines() == ours
    assert _snapshot(out) == before, "the failed resume changed the run's outputs or checkpoints"


def test_a_damaged_resume_fails_before_any_weights_or_data_load(resumable, tmp_path, capsys, monkeypatch):
    import unipt_scale.model as model_module

    out = str(tmp_path / "run")
    shutil.copytree(resumable[0], out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step00000001"))
    _resign(os.path.join(out, "checkpoints", "step00000002"), "rank0.safetensors", GARBAGE)

    def too_late(*a, **k):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(model_module, "build_model", too_late)
    capsys.readouterr()
    assert main(["train", "--output-dir", out, *resumable[1], "train.resume=auto"]) == 2
    assert "rank0.safetensors is not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("rel, content, says", [
    ("rank0.json", b'{"rng": {}}', "lacks the trainer state"),
    ("engine.json", b'{"optimizer": {}}', "incomplete or not this run's"),
])
def test_a_parsable_state_file_without_its_keys_fails_in_one_line(resumable, tmp_path, capsys, rel, content, says):
    out = str(tmp_path / "run")
    shutil.copytree(resumable[0], out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step00000001"))
    _resign(os.path.join(out, "checkpoints", "step00000002"), rel, content)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["train", "--output-dir", out, *resumable[1], "train.resume=auto"]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("unipt:")]
    assert "Traceback" not in err and len(ours) == 1 and says in ours[0] and "step00000002" in ours[0], err[-2000:]
    assert _snapshot(out) == before


def test_deepspeed_checkpoint_with_resigned_state_files(ws, tmp_path):
    """One DeepSpeed rank (no launcher): a re-signed rank0.safetensors fails the resume in one line, and a
    re-signed engine pickle counts as damaged before DeepSpeed would unpickle it."""
    pytest.importorskip("deepspeed")
    from ds_helpers import REPO, ds_env

    out = str(tmp_path / "ds")
    args = [*ws["common"], "train.checkpoint_every=2", "deepspeed.enabled=true", "train.num_threads=1"]

    def unipt(*extra):
        return subprocess.run([sys.executable, "-m", "unipt_scale.cli", "train", "--output-dir", out, *args, *extra],
                              cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=600)

    first = unipt()
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = os.path.join(out, "checkpoints", "step00000002")
    engine_file = os.path.join("deepspeed", "state", "mp_rank_00_model_states.pt")
    assert os.path.isfile(os.path.join(checkpoint, engine_file))

    pristine = str(tmp_path / "pristine")
    shutil.copytree(checkpoint, pristine)
    marker = str(tmp_path / "pwned")
    for content, says in ((GARBAGE, "is not a DeepSpeed checkpoint file"),
                          (pickle.dumps(_Payload(marker)), "is not a DeepSpeed checkpoint file")):
        _resign(checkpoint, engine_file, content)
        with pytest.raises(CheckpointError, match=f"mp_rank_00_model_states.pt {says}"):
            verify(checkpoint)
    assert not os.path.exists(marker)
    shutil.rmtree(checkpoint)
    shutil.copytree(pristine, checkpoint)

    _resign(checkpoint, "rank0.safetensors", GARBAGE)
    before = _snapshot(out)
    resumed = unipt("train.resume=auto")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unipt: "), resumed.stderr[-3000:]
    assert "step00000002/rank0.safetensors is not a readable safetensors file" in lines[0]
    assert _snapshot(out) == before
