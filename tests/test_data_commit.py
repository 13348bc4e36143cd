"""The shard writer's commit: killed at any file-system step, OUT is the complete old output or the complete new
one, readable by the loader; the next run clears what the killed one left."""
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from unipt_scale.data import shards
from unipt_scale.data.stream import make_loader


class Killed(BaseException):
    """Not an Exception: cleanup code written for errors must not get to run, as after a real kill."""


STEPS = [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "link"), (os, "unlink"), (os, "remove"),
         (os, "rmdir"), (os, "mkdir"), (shutil, "rmtree"), (shards, "_renameat2_exchange")]


def killed_at(k, monkeypatch, fn):
    """Run fn with the k-th file-system step raising Killed (and every later one: the process is gone)."""
    state = {"n": 0, "dead": False}

    def wrap(real):
        def step(*a, **kw):
            if state["dead"]:
                raise Killed
            state["n"] += 1
            if state["n"] == k:
                state["dead"] = True
                raise Killed
            return real(*a, **kw)
        return step

    with monkeypatch.context() as m:
        for mod, name in STEPS:
            m.setattr(mod, name, wrap(getattr(mod, name)))
        try:
            fn()
        except Killed:
            return True
    return False


def write_texts(path, texts):
    path.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts)))
    return path


def spec(src, out, per):
    return shards.ShardSpec(source="jsonl", out=out, input=src, fractions=[1.0], samples_per_shard=per)


def content(out):
    """(texts via the loader, texts via tarfile) of OUT, after checking its index against the files."""
    index = json.loads((out / "sizes.json").read_text())
    by_tar = []
    for name, n in index["shards"].items():
        with tarfile.open(out / name) as tf:
            got = [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
        assert len(got) == n
        by_tar += got
    loader = make_loader(str(out), batch_size=4, rank=0, world_size=1, fields=("text",), shuffle=False)
    by_loader = [t for b in loader for t in b["text"]]
    assert loader.counts()["lost"] == 0 and loader.counts()["shard_errors"] == 0
    return sorted(by_loader), sorted(by_tar)


@pytest.mark.parametrize("before", ["absent", "ours", "plain"])
def test_kill_at_every_commit_step(tmp_path, monkeypatch, before):
    old_texts = [f"old text {i}" for i in range(7)]
    new_texts = [f"new text number {i}" for i in range(11)]
    old_src, new_src = write_texts(tmp_path / "old.jsonl", old_texts), write_texts(tmp_path / "new.jsonl", new_texts)
    out = tmp_path / "data" / "out"
    if before == "ours":
        shards.write_shards(spec(old_src, out, 2))
    elif before == "plain":  # a directory from an older writer: real files, no generation link
        shards.write_shards(spec(old_src, tmp_path / "made", 2))
        shutil.copytree(tmp_path / "made", out)
        assert not out.is_symlink()
    if before != "absent":
        (out / "notes.md").write_text("kept")
    def clean(data):
        """Only the live generation and its link are left."""
        assert os.listdir(data / ".out.unipt") == [os.readlink(data / "out").split("/")[1]]
        assert sorted(os.listdir(data)) == [".out.unipt", "out"]

    def reset():
        if before == "ours":
            shards.write_shards(spec(old_src, out, 2))
        else:
            shutil.rmtree(tmp_path / "data")
            if before == "plain":
                shutil.copytree(tmp_path / "made", out)
                (out / "notes.md").write_text("kept")

    hits = 0
    for k in range(1, 200):
        if not killed_at(k, monkeypatch, lambda: shards.write_shards(spec(new_src, out, 3))):
            break
        hits += 1
        if os.path.lexists(out) or before != "absent":  # (a first run killed early leaves nothing at all)
            by_loader, by_tar = content(out)
            assert by_loader == by_tar and by_loader in (sorted(old_texts), sorted(new_texts)), k
            if before != "absent":
                assert (out / "notes.md").read_text() == "kept"
        shards.write_shards(spec(new_src, out, 3))  # the next run recovers and clears the leftovers
        assert content(out)[0] == sorted(new_texts)
        clean(tmp_path / "data")
        reset()
    else:
        pytest.fail("the writer never finished")
    assert hits >= 4  # the kill points really covered the commit
    assert content(out)[0] == sorted(new_texts)
    clean(tmp_path / "data")
    if before != "absent":
        assert (out / "notes.md").read_text() == "kept"


def test_user_link_is_followed(tmp_path):
    src = write_texts(tmp_path / "t.jsonl", ["x y", "y z", "z x"])
    target = tmp_path / "big_disk" / "shards"
    target.parent.mkdir()
    os.symlink(target, tmp_path / "out")  # the user's own link, to a directory not yet there
    shards.write_shards(spec(src, tmp_path / "out", 2))
    assert target.is_symlink() and (tmp_path / "out" / "sizes.json").is_file()
    assert content(tmp_path / "out")[0] == ["x y", "y z", "z x"]


def test_out_that_is_a_file_is_refused(tmp_path):
    src = write_texts(tmp_path / "t.jsonl", ["x"])
    (tmp_path / "out").write_text("a file")
    with pytest.raises(shards.ShardInputError, match="exists and is not a directory"):
        shards.write_shards(spec(src, tmp_path / "out", 2))


def test_rerun_is_byte_identical_and_keeps_one_generation(tmp_path):
    src = write_texts(tmp_path / "t.jsonl", [f"t {i}" for i in range(9)])
    out = tmp_path / "out"
    shards.write_shards(spec(src, out, 4))
    first = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    gen1 = os.readlink(out)
    shards.write_shards(spec(src, out, 4))
    assert {p.name: p.read_bytes() for p in Path(out).iterdir()} == first
    assert os.readlink(out) != gen1 and os.listdir(tmp_path / ".out.unipt") == [os.readlink(out).split("/")[1]]
