"""Corrupt shards lose and hide nothing: every readable good sample arrives exactly once per pass, the rest is
counted (lost per shard against sizes.json, skipped by reason, one shard error per damaged region). Expected
counts come from `tarfile` with ignore_zeros, independently of the loader."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from unipt_scale.data import shards
from unipt_scale.data.stream import DataLossError, make_loader

WORDS = "a b c d e caption sentence number photo of good bad day".split()
PER_SHARD = 10


def members(path):
    with tarfile.open(path) as tf:
        return tf.getmembers()


def flip(path, offset, n=4):
    data = bytearray(Path(path).read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def reference(directory, need):
    """{shard: {key: {ext: bytes}}} of the members tarfile can read (ignore_zeros steps over bad headers)."""
    index = json.loads((directory / "sizes.json").read_text())
    out = {}
    for name in index["shards"]:
        found = {}
        with open(directory / name, "rb") as f:
            tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError:
                    break
                if m is None:
                    break
                try:
                    data = tf.extractfile(m).read()
                except tarfile.ReadError:
                    continue
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = data
        out[name] = found
    return index, out


def usable(sample, need):
    """What the loader must decide, decided here by hand: None if usable, else the skip reason."""
    if "image" in need:
        data = sample.get("png")
        if data is None:
            return "skipped_missing_image"
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:
            return "skipped_bad_image"
    if "text" in need:
        if "txt" not in sample:
            return "skipped_missing_text"
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "skipped_bad_text"
        if not text.strip():
            return "skipped_missing_text"
    if "label" in need:
        if "cls" not in sample:
            return "skipped_missing_label"
        try:
            int(sample["cls"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return "skipped_bad_label"
    return None


def expected(directory, need):
    index, found = reference(directory, need)
    good, skipped, lost = set(), {}, {}
    for name, samples in found.items():
        missing = index["shards"][name] - len(samples)
        if missing:
            lost[str(directory / name)] = missing
        for key, s in samples.items():
            why = usable(s, need)
            if why is None:
                good.add(key)
            else:
                skipped[why] = skipped.get(why, 0) + 1
    return index, good, skipped, lost


@pytest.fixture(scope="module")
def clean_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    src = root / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": " ".join(WORDS[(i + j) % 13] for j in range(1 + i % 4)),
                                         "label": i % 3}) for i in range(60)))
    out = root / "clean"
    shards.write_shards(shards.ShardSpec(source="jsonl", out=out, input=src, fractions=[1.0],
                                         samples_per_shard=PER_SHARD))
    return out


@pytest.fixture
def damaged(clean_text, tmp_path):
    """Six 10-sample shards: a flipped header, a truncated member, flipped payloads, a missing field, clean."""
    out = tmp_path / "damaged"
    shutil.copytree(clean_text, out)
    names = json.loads((out / "sizes.json").read_text())["splits"]["train"]["shards"]
    a, b, c, d = (out / n for n in names[:4])
    flip(a, members(a)[4].offset + 108)  # the 5th member's header (its uid field): checksum no longer matches
    mb = members(b)
    b.write_bytes(b.read_bytes()[:mb[17].offset_data + 2])  # cut inside the 18th member's payload
    mc = members(c)
    cls = next(m for m in mc if m.name.endswith(".cls"))
    txt = [m for m in mc if m.name.endswith(".txt")][3]
    flip(c, cls.offset_data, 1)  # a label byte -> not ASCII
    flip(c, txt.offset_data, 1)  # a text's first byte -> not UTF-8
    md = members(d)  # rewrite d without one sample's .cls member (same count in sizes.json)
    drop = [m for m in md if m.name.endswith(".cls")][6].name
    with tarfile.open(d) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.name != drop]
    with tarfile.open(d, "w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in kept:
            tf.addfile(m, io.BytesIO(data))
    return out, {str(a): 1, str(b): 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_good_sample_once_and_the_rest_counted(damaged, workers):
    out, errors = damaged
    index, good, skipped, lost = expected(out, ("text", "label"))
    assert lost and skipped  # the damage shows in the independent reference
    loader = make_loader(str(out), batch_size=4, num_workers=workers, rank=0, world_size=1, return_keys=True,
                         max_lost_fraction=None, shuffle_buffer=15)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        keys = [k for b in loader for k in b["keys"]]
        assert sorted(keys) == sorted(good)  # each good sample exactly once; nothing re-read to fill the epoch
        c = loader.pass_counts()
        assert c["samples"] == len(good)
        assert {k: v for k, v in c.items() if k.startswith("skipped_")} == skipped
        assert c["lost"] == sum(lost.values()) and c["lost_by_shard"] == lost
        assert c["shard_errors"] == len(errors)  # one flipped header, one truncation: each once
        assert c["samples"] + c["skipped"] + c["lost"] + c.get("dropped_remainder", 0) == index["total"]
    total = loader.counts()
    assert total["lost"] == 2 * sum(lost.values()) and total["shard_errors"] == 2 * len(errors)


def test_damaged_pass_ends_early_instead_of_refilling(damaged):
    out, _ = damaged
    _, good, _, _ = expected(out, ("text", "label"))
    loader = make_loader(str(out), batch_size=4, rank=0, world_size=1, drop_last=True, max_lost_fraction=None)
    n = sum(1 for _ in loader)
    assert n == len(good) // 4 < len(loader)  # len() is a clean pass; the damaged pass is one pass, shorter


def test_resume_over_damage_is_exact(damaged):
    out, _ = damaged

    def make():
        return make_loader(str(out), batch_size=3, num_workers=2, rank=0, world_size=1, return_keys=True,
                           max_lost_fraction=None, shuffle_buffer=15, seed=2)

    ref = make()
    full = [b["keys"] for b in ref]
    for k in (2, len(full) // 2, len(full) - 1):
        first = make()
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        second = make()
        second.load_state_dict(state)
        assert [b["keys"] for b in second] == full[k:]
        assert second.counts() == ref.counts()  # the truncation and the lost samples are not counted twice


def test_max_lost_fraction_fails_the_pass(damaged):
    out, _ = damaged
    _, _, _, lost = expected(out, ("text", "label"))
    share = sum(lost.values()) / 60
    with pytest.raises(DataLossError, match=r"lost .*max_lost_fraction=0\.01.*data\.max_lost_fraction"):
        list(make_loader(str(out), batch_size=4, rank=0, world_size=1))  # the default limit, 0.01
    ok = make_loader(str(out), batch_size=4, rank=0, world_size=1, max_lost_fraction=share)
    assert sum(len(b["labels"]) for b in ok) > 0 and ok.counts()["lost"] == sum(lost.values())
    with pytest.raises(DataLossError):
        list(make_loader(str(out), batch_size=4, rank=0, world_size=1, max_lost_fraction=share * 0.99))


def test_undecodable_image_and_flipped_image_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = ["image,caption,label"]
    for i in range(20):
        Image.new("RGB", (9, 7), (i * 12, 30, 200 - i * 9)).save(src / f"p{i}.png")
        rows.append(f"p{i}.png,{WORDS[i % 13]} {WORDS[(i + 3) % 13]},{i % 2}")
    (src / "d.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "img"
    shards.write_shards(shards.ShardSpec(source="csv", out=out, input=src / "d.csv", fractions=[1.0],
                                         samples_per_shard=PER_SHARD))
    first, second = (out / n for n in json.loads((out / "sizes.json").read_text())["splits"]["train"]["shards"])
    pngs = [m for m in members(first) if m.name.endswith(".png")]
    flip(first, pngs[2].offset_data + 16, 4)  # inside the IHDR chunk: its CRC no longer matches
    flip(first, pngs[5].offset_data + 200 if pngs[5].size > 210 else pngs[5].offset_data + 20, 4)
    png_header = [m for m in members(second) if m.name.endswith(".png")][3].offset
    flip(second, png_header + 140)  # a header of the second shard: that sample arrives without its image
    need = ("image", "text", "label")
    index, good, skipped, lost = expected(out, need)
    assert skipped.get("skipped_bad_image") and skipped.get("skipped_missing_image") == 1 and not lost
    loader = make_loader(str(out), batch_size=5, rank=0, world_size=1, image_size=4, return_keys=True,
                         max_lost_fraction=None, num_workers=2)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(good)
    c = loader.counts()
    assert {k: v for k, v in c.items() if k.startswith("skipped_")} == skipped
    assert c["lost_by_shard"] == lost and c["shard_errors"] == 1
    assert c["samples"] + c["skipped"] + c["lost"] == index["total"]


def test_resampling_empty_shards_fails_instead_of_hanging(tmp_path):
    for i in range(3):
        tarfile.open(tmp_path / f"e-{i}.tar", "w").close()  # valid tars without members, and no sizes.json
    loader = make_loader(str(tmp_path / "e-{0..2}.tar"), batch_size=2, rank=0, world_size=1, fields=("text",),
                         resampled=True, samples_per_epoch=10)
    with pytest.raises(RuntimeError, match="empty shards in a row"):
        list(loader)
