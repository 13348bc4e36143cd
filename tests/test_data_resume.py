"""Resumable train loaders: a position taken after batch k continues bit for bit, without redoing the consumed
part, and iterating data leaves torch's (and Python's) global RNG untouched."""
import csv
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from unipt_scale.config import DataConfig
from unipt_scale.data import RecordLoader, build_data, shards, stream
from unipt_scale.data.pipeline import LimitedLoader
from unipt_scale.data.stream import make_loader

WORDS = "a b c d e caption sentence number photo of good bad day".split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """30 image+caption+label samples, 4 per shard (8 train shards)."""
    root = tmp_path_factory.mktemp("resume")
    src = root / "src"
    src.mkdir()
    rows = []
    for i in range(30):
        Image.new("RGB", (7, 5), (i * 8, 255 - i * 8, (i * 37) % 256)).save(src / f"i{i}.png")
        rows.append([f"i{i}.png", " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5)), i % 3])
    with open(src / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        w.writerows(rows)
    out = root / "shards"
    shards.write_shards(shards.ShardSpec(source="csv", out=out, input=src / "d.csv", fractions=[1.0],
                                         samples_per_shard=4))
    return out


@pytest.fixture(scope="module")
def text_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_csv")
    rng = random.Random(0)
    path = root / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(90):
            w.writerow([" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) + f" {WORDS[i % 12]}", ["pos", "neg"][i % 2]])
    return path


def same(a, b):
    """Batches identical: tensors bit for bit, lists element for element."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if torch.is_tensor(x[k]):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def resumed_from(make, epoch, k):
    """Batches after the position taken at batch k (0 = before the first), through a fresh loader."""
    first = make()
    first.set_epoch(epoch)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    it.close()
    second = make()
    second.set_epoch(epoch)
    second.load_state_dict(state)
    return list(second), second


STREAM_CASES = [
    dict(num_workers=0, resampled=False),
    dict(num_workers=2, resampled=False),
    dict(num_workers=0, resampled=True),
    dict(num_workers=2, resampled=True),
    dict(num_workers=2, resampled=False, rank=1, world_size=2),
]


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_stream_resume_is_bit_exact(image_shards, tokenizer, case):
    args = dict(batch_size=3, tokenizer=tokenizer, image_size=4, shuffle=True, shuffle_buffer=6, drop_last=True,
                return_keys=True, seed=5, rank=0, world_size=1, max_length=8)
    args.update(case)

    def make():
        return make_loader(str(image_shards), **args)

    ref = make()
    ref.set_epoch(2)
    full = list(ref)
    assert len(full) == len(ref) >= 4
    for k in (0, 1, len(full) // 2 + 1, len(full) - 1, len(full)):
        rest, loader = resumed_from(make, 2, k)
        same(rest, full[k:])
        assert loader.counts() == ref.counts()  # counters restored, then continued exactly
        assert loader.pass_counts() == ref.pass_counts()
    nxt = make()
    nxt.set_epoch(3)
    assert [b["keys"] for b in nxt] != [b["keys"] for b in full]  # a new epoch reshuffles


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_mixed_sources_and_split_samples(image_shards, resampled):
    """Weighted sources (the mix's draw counter is part of the position) and too few shards (every worker
    walks every shard and takes every k-th sample)."""
    two = str(image_shards / "train-{000000..000001}.tar")
    rest = str(image_shards / "train-{000002..000007}.tar")
    specs = {"mixed": f"{two}@1,{rest}@3"}
    if not resampled:
        specs["few"] = two
    for name, spec in specs.items():
        def make():
            # exact mode: the 2-shard source is split by sample (4 workers in all); resampling needs no split
            with pytest.warns(UserWarning, match="splitting by sample") if not resampled else _nothing():
                return make_loader(spec, batch_size=1, image_size=4, fields=("image", "label"), num_workers=2,
                                   resampled=resampled, shuffle_buffer=3, return_keys=True, rank=1, world_size=2,
                                   seed=9)

        ref = make()
        full = list(ref)
        assert len(full) >= 3, name
        for k in (1, len(full) // 2, len(full) - 1):
            got, loader = resumed_from(make, 0, k)
            same(got, full[k:])
            assert loader.counts() == ref.counts()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_limited_loader_resume(image_shards):
    def make():
        return LimitedLoader(make_loader(str(image_shards), batch_size=2, image_size=4, fields=("image", "label"),
                                         shuffle_buffer=4, drop_last=True, return_keys=True, num_workers=2,
                                         rank=0, world_size=1), 5)

    ref = make()
    ref.set_epoch(1)
    full = list(ref)
    assert len(full) == len(ref) == 5
    for k in (0, 2, 4, 5):
        rest, loader = resumed_from(make, 1, k)
        same(rest, full[k:])
    loader.set_epoch(2)  # a new epoch after a resumed one starts from its beginning, limited again
    assert len(list(loader)) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_record_loader_resume(text_csv, tokenizer, workers):
    cfg = DataConfig(source="csv", path=str(text_csv), batch_size=4, num_workers=workers, max_length=6, seed=3)

    def make():
        return build_data(cfg, tokenizer).train

    ref = make()
    assert isinstance(ref, RecordLoader)
    ref.set_epoch(4)
    full = list(ref)
    assert len(full) == len(ref) >= 5
    for k in (0, 1, 3, len(full)):
        rest, _ = resumed_from(make, 4, k)
        same(rest, full[k:])
    limited = lambda: LimitedLoader(make(), 3)  # noqa: E731
    lim = limited()
    lim.set_epoch(4)
    lim_full = list(lim)
    same(lim_full, full[:3])
    rest, _ = resumed_from(limited, 4, 2)
    same(rest, full[2:3])


def test_resume_does_not_redo_the_consumed_part(image_shards, monkeypatch):
    """Nothing consumed is decoded or collated again, and shards wholly consumed are not even opened."""
    calls = {"decode": 0, "collate": 0, "open": []}
    real_decode, real_collate, real_reader = stream.StreamDataset._decode, stream.StreamDataset._collate, \
        stream.ShardReader

    def decode(self, s, c):
        calls["decode"] += 1
        return real_decode(self, s, c)

    def collate(self, rows):
        calls["collate"] += 1
        return real_collate(self, rows)

    class Reader(real_reader):
        def __init__(self, url):
            calls["open"].append(Path(url).name)
            super().__init__(url)

    monkeypatch.setattr(stream.StreamDataset, "_decode", decode)
    monkeypatch.setattr(stream.StreamDataset, "_collate", collate)
    monkeypatch.setattr(stream, "ShardReader", Reader)

    def make():  # groups of one shard (buffer < shard size): samples permuted within each shard
        return make_loader(str(image_shards), batch_size=3, image_size=4, fields=("image", "label"), shuffle_buffer=2,
                           drop_last=True, return_keys=True, seed=1, rank=0, world_size=1)

    ref = make()
    full = list(ref)
    total_decodes, all_opened = calls["decode"], list(calls["open"])
    assert sorted(all_opened) == sorted(json.loads((image_shards / "sizes.json").read_text())["shards"])
    members = {}  # shard -> keys, read with tarfile
    for name in all_opened:
        with tarfile.open(image_shards / name) as tf:
            members[name] = {m.name.split(".")[0] for m in tf.getmembers()}
    k = 5
    first = make()
    it = iter(first)
    calls.update(decode=0, collate=0, open=[])
    for _ in range(k):
        next(it)
    state, consumed_decodes = first.state_dict(), calls["decode"]
    it.close()
    delivered = {key for b in full[:k] for key in b["keys"]}
    wholly = {n for n, keys in members.items() if keys <= delivered}
    assert wholly  # the case must have shards to skip
    calls.update(decode=0, collate=0, open=[])
    second = make()
    second.load_state_dict(state)
    rest = list(second)
    same(rest, full[k:])
    assert calls["decode"] == total_decodes - consumed_decodes
    assert calls["collate"] == len(full) - k
    assert set(calls["open"]) == set(members) - wholly and len(calls["open"]) == len(set(calls["open"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_global_rng_alone(image_shards, text_csv, tokenizer, workers):
    loaders = [
        make_loader(str(image_shards), batch_size=4, image_size=4, num_workers=workers, rank=0, world_size=1),
        make_loader(str(image_shards), batch_size=4, image_size=4, num_workers=workers, rank=0, world_size=1,
                    resampled=True),
        build_data(DataConfig(source="csv", path=str(text_csv), batch_size=8, num_workers=workers), tokenizer).train,
    ]
    loaders.append(LimitedLoader(loaders[0], 2))
    for ld in loaders:
        torch.manual_seed(123)
        random.seed(7)
        before, py_before = torch.get_rng_state(), random.getstate()
        first = list(ld)
        assert torch.equal(torch.get_rng_state(), before) and random.getstate() == py_before
        torch.manual_seed(999)  # another global state: the same data order
        same(list(ld), first)


def test_positions_are_checked(image_shards):
    a = make_loader(str(image_shards), batch_size=3, image_size=4, num_workers=0, rank=0, world_size=1)
    b = make_loader(str(image_shards), batch_size=3, image_size=4, num_workers=2, rank=0, world_size=1)
    with pytest.raises(ValueError, match="num_workers: saved 1, now 2"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a stream loader position"):
        a.load_state_dict({"epoch": 0})
    lim = LimitedLoader(a, 2)
    with pytest.raises(ValueError, match="2 batches per epoch, this loader has 3"):
        LimitedLoader(a, 3).load_state_dict(lim.state_dict())


def test_position_at_the_end_and_the_next_epoch(image_shards):
    def make():
        return make_loader(str(image_shards), batch_size=4, image_size=4, num_workers=2, return_keys=True,
                           rank=0, world_size=1, fields=("image", "label"))

    ld = make()
    ld.set_epoch(0)
    full = list(ld)
    end = ld.state_dict()
    assert end["batches"] == len(full) and all(w["done"] for w in end["workers"])
    again = make()
    again.load_state_dict(end)
    assert list(again) == []  # the epoch is over
    again.set_epoch(1)
    nxt = list(again)
    ref = make()
    ref.set_epoch(1)
    same(nxt, list(ref))
