"""Streaming loader: coverage across simulated ranks/workers, resampling, bad data, batch contract."""
import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from unipt_scale.data import shards, stream
from unipt_scale.data.stream import make_loader


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a b c d e caption sentence number photo of".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def write_image_csv(folder, specs):
    """specs: list of (filename, bytes-or-PIL image, caption, label) -> CSV path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, img, caption, label in specs:
        if isinstance(img, bytes):
            (folder / name).write_bytes(img)
        else:
            fmt = {"jpg": "JPEG", "png": "PNG"}[name.rsplit(".", 1)[1]]
            img.save(folder / name, format=fmt)
        rows.append([name, caption, label])
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        w.writerows(rows)
    return folder / "data.csv"


def tar_truth(out):
    """{key: (caption, label)} from the tars themselves."""
    index = json.loads((Path(out) / "sizes.json").read_text())
    truth = {}
    for name in index["shards"]:
        with tarfile.open(Path(out) / name) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                truth.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return {k: (v["txt"].decode() if "txt" in v else None, int(v["cls"])) for k, v in truth.items()}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """22 image+caption+label samples in 8 train shards (3 per shard, the last has 1)."""
    root = tmp_path_factory.mktemp("img")
    specs = [(f"i{i}.jpg", Image.new("RGB", (12, 9), (i * 11, 255 - i * 11, 40)), f"caption number {i}", i % 4)
             for i in range(22)]
    csv_path = write_image_csv(root / "src", specs)
    out = root / "shards"
    assert shards.main(["--source", "csv", "--input", str(csv_path), "--out", str(out), "--fractions", "1",
                        "--samples-per-shard", "3", "--quiet"]) == 0
    return out


def collect(loader):
    keys, batches = [], 0
    for b in loader:
        keys += b["keys"]
        batches += 1
    return keys, batches


def test_exact_mode_covers_every_sample_once_across_ranks_and_workers(image_shards):
    truth = tar_truth(image_shards)
    for epoch in (0, 1):
        seen, per_rank = [], {}
        for rank in (0, 1):
            loader = make_loader(str(image_shards), batch_size=4, rank=rank, world_size=2, num_workers=2,
                                 epoch=epoch, image_size=8, shuffle_buffer=5, return_keys=True)
            got_batches = 0
            keys = []
            for b in loader:
                got_batches += 1
                n = len(b["keys"])
                assert b["pixel_values"].shape == (n, 3, 8, 8) and b["pixel_values"].dtype == torch.float32
                assert b["labels"].dtype == torch.long and b["labels"].shape == (n,)
                for k, text, lab in zip(b["keys"], b["text"], b["labels"].tolist()):
                    assert (text, lab) == truth[k]
                keys += b["keys"]
            assert got_batches == len(loader)  # epoch length from the index matches what comes out
            assert len(keys) == loader.num_samples
            assert len(set(keys)) == len(keys)
            per_rank[rank] = keys
            seen += keys
            assert loader.counts()["samples"] == len(keys) and loader.counts()["skipped"] == 0
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(seen) == sorted(truth)
        if epoch == 0:
            first = per_rank
    assert first[0] != per_rank[0]  # a new epoch reshuffles


def test_set_epoch_and_common_batches(image_shards):
    loader = make_loader(str(image_shards), batch_size=4, rank=0, world_size=2, num_workers=0, return_keys=True)
    order0, _ = collect(loader)
    loader.set_epoch(3)
    order3, n3 = collect(loader)
    assert order0 != order3 and n3 == len(loader)
    assert loader.common_num_batches == min(loader.batches_per_rank)
    assert sum(loader.samples_per_rank) == 22


def test_resampled_is_deterministic_per_seed_epoch_and_rank(image_shards):
    def run(**kw):
        args = dict(batch_size=4, rank=0, world_size=2, num_workers=0, resampled=True, seed=0, epoch=0,
                    image_size=8, return_keys=True)
        args.update(kw)
        loader = make_loader(str(image_shards), **args)
        keys, n = collect(loader)
        assert n == len(loader)
        return keys

    base = run()
    assert base == run()
    assert len(base) == 4 * 3  # 22 samples / 2 ranks -> 11 -> 3 batches of 4 per rank
    assert run(seed=1) != base
    assert run(epoch=1) != base
    assert run(rank=1) != base
    assert len(set(base)) < len(base) or set(base) != set(tar_truth(image_shards))  # sampled, not a permutation


def test_resampled_equal_length_on_every_rank_with_workers(image_shards):
    lens = []
    for rank in (0, 1):
        loader = make_loader(str(image_shards), batch_size=4, rank=rank, world_size=2, num_workers=2,
                             resampled=True, samples_per_epoch=40, image_size=8, return_keys=True)
        keys, n = collect(loader)
        assert n == len(loader) == 6  # 20 per rank -> 5 batches -> 3 per worker
        lens.append(n)
    assert lens[0] == lens[1]


def test_bad_samples_are_skipped_or_converted_and_counted(tmp_path):
    rgba = Image.new("RGBA", (6, 6), (0, 0, 0, 0))  # fully transparent: must come out white, not black
    pal = Image.new("P", (6, 6), 3)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    specs = [(f"g{i}.jpg", Image.new("RGB", (6, 6), (i * 30, 0, 0)), f"good {i}", 0) for i in range(6)]
    specs += [
        ("bad.jpg", b"\xff\xd8 definitely not a jpeg", "bad bytes", 1),
        ("nocap.jpg", Image.new("RGB", (6, 6)), "", 1),
        ("pal.png", pal, "palette", 2),
        ("cmyk.jpg", Image.new("CMYK", (6, 6), (0, 255, 0, 0)), "cmyk", 2),
        ("grey.png", Image.new("L", (6, 6), 128), "grey", 2),
        ("alpha.png", rgba, "alpha", 3),
        ("trunc.png", None, "truncated png", 3),
    ]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    specs[-1] = ("trunc.png", buf.getvalue()[:60], "truncated png", 3)
    csv_path = write_image_csv(tmp_path / "src", specs)
    out = tmp_path / "out"
    assert shards.main(["--source", "csv", "--input", str(csv_path), "--out", str(out), "--fractions", "1",
                        "--samples-per-shard", "3", "--quiet"]) == 0
    index = json.loads((out / "sizes.json").read_text())
    assert index["fields"] == ["image", "text", "label"]  # one caption missing does not drop the field
    assert index["field_counts"]["text"] == len(specs) - 1
    truth = tar_truth(out)
    bad = {k for k, (cap, _) in truth.items() if cap in (None, "bad bytes", "truncated png")}
    assert len(bad) == 3
    loader = make_loader(str(out), batch_size=4, rank=0, world_size=1, num_workers=2, image_size=6,
                         return_keys=True)
    got = {}
    for b in loader:
        for k, t, px in zip(b["keys"], b["text"], b["pixel_values"]):
            got[k] = (t, px)
    assert set(got) == set(truth) - bad  # every good sample arrives
    c = loader.counts()
    assert c["skipped_bad_image"] == 2 and c["skipped_missing_text"] == 1 and c["skipped"] == 3
    assert c["converted_P"] == 1 and c["converted_CMYK"] == 1 and c["converted_L"] == 1 and c["converted_RGBA"] == 1
    assert c["samples"] == len(truth) - 3
    alpha = next(px for t, px in got.values() if t == "alpha")
    assert alpha.shape == (3, 6, 6) and torch.allclose(alpha, torch.ones_like(alpha))
    grey = next(px for t, px in got.values() if t == "grey")
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)


def test_truncated_shard_keeps_its_complete_samples(image_shards, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(image_shards, out)
    index = json.loads((out / "sizes.json").read_text())
    victim = out / index["splits"]["train"]["shards"][2]
    with tarfile.open(victim) as tf:
        members = tf.getmembers()
    keys_in_order = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    jpg = next(m for m in members if m.name == keys_in_order[2] + ".jpg")
    data = victim.read_bytes()
    victim.write_bytes(data[:jpg.offset_data + jpg.size // 2])  # cut inside the 3rd sample's image
    truth = tar_truth(image_shards)
    loader = make_loader(str(out), batch_size=5, rank=0, world_size=1, num_workers=0, image_size=8,
                         return_keys=True, max_lost_fraction=None)
    keys, _ = collect(loader)
    assert sorted(keys) == sorted(set(truth) - {keys_in_order[2]})
    c = loader.counts()
    assert c["shard_errors"] == 1  # one truncation, counted once
    assert c["skipped"] == c["skipped_missing_image"] == 1  # the torn sample (its label survives) is counted
    assert c["lost"] == 0 and c["samples"] == len(truth) - 1


def test_shard_vanishing_after_planning_is_counted_not_fatal(image_shards, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(image_shards, out)
    index = json.loads((out / "sizes.json").read_text())
    gone = index["splits"]["train"]["shards"][0]
    with tarfile.open(out / gone) as tf:
        lost = {m.name.split(".")[0] for m in tf.getmembers()}
    loader = make_loader(str(out), batch_size=8, rank=0, world_size=1, image_size=8, return_keys=True,
                         max_lost_fraction=None)
    (out / gone).unlink()  # e.g. a node-local cache evicted it mid-run
    keys, _ = collect(loader)
    assert sorted(keys) == sorted(set(tar_truth(image_shards)) - lost)
    c = loader.counts()
    assert c["shard_errors"] == 1 and c["lost"] == len(lost) == 3
    assert c["lost_by_shard"] == {str(out / gone): 3}
    with pytest.raises(FileNotFoundError, match="shard not found"):  # caught up front when planning
        make_loader(str(out), batch_size=8, rank=0, world_size=1)


def test_too_few_shards(image_shards, tmp_path):
    import shutil

    out = tmp_path / "two"
    out.mkdir()
    index = json.loads((image_shards / "sizes.json").read_text())
    names = index["splits"]["train"]["shards"][:2]
    for n in names:
        shutil.copy(image_shards / n, out / n)
    (out / "sizes.json").write_text(json.dumps({**index, "splits": {"train": {"shards": names, "samples": 6}},
                                                "shards": {n: 3 for n in names}}))
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        make_loader(str(out), batch_size=2, rank=0, world_size=2, num_workers=2, few_shards="error")
    seen = []
    for rank in (0, 1):
        with pytest.warns(UserWarning, match="splitting by sample"):
            loader = make_loader(str(out), batch_size=2, rank=rank, world_size=2, num_workers=2, image_size=8,
                                 return_keys=True)
        keys, n = collect(loader)
        assert n == len(loader)
        seen += keys
    assert sorted(seen) == sorted(tar_truth(out))


def write_text_shards(out, texts, label, per_shard):
    src = out.parent / (out.name + ".jsonl")
    src.write_text("\n".join(json.dumps({"text": t, "label": label}) for t in texts))
    shards.write_shards(shards.ShardSpec(source="jsonl", out=out, input=src, fractions=[1.0],
                                         samples_per_shard=per_shard))
    return out


def test_text_batches_tokenised_and_padded(tmp_path, tokenizer):
    texts = ["a", "a b c", "a b", "b c d e a", "c"]
    out = write_text_shards(tmp_path / "t", texts, 1, 2)
    loader = make_loader(str(out), batch_size=5, tokenizer=tokenizer, rank=0, world_size=1, shuffle=False)
    (batch,) = list(loader)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == (5, 5)
    lengths = batch["attention_mask"].sum(1).tolist()
    for row_ids, row_mask, n in zip(batch["input_ids"], batch["attention_mask"], lengths):
        assert row_mask.tolist() == [1] * n + [0] * (5 - n)  # right padding
        assert row_ids[n:].eq(tokenizer.pad_token_id).all()
    assert sorted(lengths) == [1, 1, 2, 3, 5]
    assert batch["labels"].tolist() == [1] * 5


def test_tokenize_left_padding_truncation_and_no_pad_token(tokenizer):
    import copy

    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    enc = stream.tokenize_batch(left, ["a b c", "a"], max_length=None)
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert enc["input_ids"][1].tolist() == [0, 0, tokenizer.convert_tokens_to_ids("a")]
    assert stream.tokenize_batch(tokenizer, ["a b c d e"], max_length=2)["input_ids"].shape == (1, 2)
    nopad = copy.deepcopy(tokenizer)
    nopad.pad_token = None
    enc = stream.tokenize_batch(nopad, ["a b", "a"], max_length=None)
    assert enc["input_ids"][1, 1].item() == nopad.eos_token_id and enc["attention_mask"][1].tolist() == [1, 0]


def test_image_only_samples_and_transform_options(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (255, 0, 51 * i)).save(src / f"x{i}.png")
    (src / "d.csv").write_text("image\n" + "".join(f"x{i}.png\n" for i in range(3)))
    out = tmp_path / "o"
    shards.write_shards(shards.ShardSpec(source="csv", out=out, input=src / "d.csv", fractions=[1.0]))
    assert json.loads((out / "sizes.json").read_text())["fields"] == ["image"]
    (batch,) = list(make_loader(str(out), batch_size=3, rank=0, world_size=1, image_size=4))
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert torch.allclose(batch["pixel_values"][:, 0], torch.ones(3, 4, 4))  # red 255 -> +1
    norm = stream.ImageTransform((4, 6), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="stretch")
    (batch,) = list(make_loader(str(out), batch_size=3, rank=0, world_size=1, image_transform=norm))
    assert batch["pixel_values"].shape == (3, 3, 4, 6)
    assert torch.allclose(batch["pixel_values"][:, 0], torch.full((3, 4, 6), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(batch["pixel_values"][:, 1], torch.full((3, 4, 6), -2.0))


def test_weighted_sources(tmp_path):
    a = write_text_shards(tmp_path / "a", [f"a {i}" for i in range(20)], 0, 5)
    b = write_text_shards(tmp_path / "b", [f"b {i}" for i in range(20)], 1, 5)
    loader = make_loader(f"{a}@3,{b}@1", batch_size=10, rank=0, world_size=1, resampled=True,
                         samples_per_epoch=800, seed=4)
    labels = torch.cat([x["labels"] for x in loader])
    assert len(labels) == 800 and 0.68 < (labels == 0).float().mean().item() < 0.82
    exact = make_loader([(str(a), 3.0), (str(b), 1.0)], batch_size=7, rank=0, world_size=1, num_workers=2)
    texts = [t for x in exact for t in x["text"]]
    assert sorted(texts) == sorted([f"a {i}" for i in range(20)] + [f"b {i}" for i in range(20)])
    assert len(exact) == 2 * 3  # 20 samples per worker (two a- and two b-shards each) -> 3 batches of 7


def test_spec_forms_resolve_to_the_same_shards(image_shards):
    names = json.loads((image_shards / "sizes.json").read_text())["splits"]["train"]["shards"]
    urls = [str(image_shards / n) for n in names]
    forms = [str(image_shards), f"{image_shards}/train-{{000000..000007}}.tar", f"{image_shards}/train-*.tar",
             urls, ",".join(urls), "::".join(urls), [str(image_shards / "train-{000000..000003}.tar"),
                                                    str(image_shards / "train-{000004..000007}.tar")]]
    for f in forms:
        (src,) = stream.resolve_sources(f)
        assert src.urls == urls and src.sizes == [3] * 7 + [1] and src.fields == ("image", "text", "label")
    with pytest.raises(FileNotFoundError):
        stream.resolve_sources(str(image_shards / "train-00009{0..1}.tar"))
    with pytest.raises(ValueError, match="no split 'dev'"):
        stream.resolve_sources(str(image_shards), split="dev")
    with pytest.raises(ValueError, match="weights must be > 0"):
        stream.resolve_sources([(str(image_shards), 0.0)])


def test_resolve_rank(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert stream.resolve_rank() == (2, 3)
    assert stream.resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError):
        stream.resolve_rank(rank=1)
    with pytest.raises(ValueError):
        stream.resolve_rank(3, 3)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert stream.resolve_rank() == (0, 1)  # the initialised process group wins over the environment
    finally:
        dist.destroy_process_group()


def test_fields_needed_without_index(image_shards, tmp_path):
    import shutil

    names = json.loads((image_shards / "sizes.json").read_text())["splits"]["train"]["shards"]
    for n in names[:4]:
        shutil.copy(image_shards / n, tmp_path / n)
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(ValueError, match="pass fields"):
        make_loader(pattern, batch_size=4, rank=0, world_size=1)
    loader = make_loader(pattern, batch_size=4, rank=0, world_size=1, fields=("text",), return_keys=True)
    with pytest.raises(TypeError, match="epoch length unknown"):
        len(loader)
    keys, _ = collect(loader)
    assert len(keys) == 12
    with pytest.raises(ValueError, match="samples_per_epoch"):
        make_loader(pattern, batch_size=4, rank=0, world_size=1, fields=("text",), resampled=True)


def test_counts_after_the_last_batch_still_arrive(tmp_path):
    """With drop_last the tail is never batched; its skip counts must still reach the main process."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s-0.tar"), encoder=False) as w:
        for i in range(7):
            w.write({"__key__": f"{i:03d}", "txt": f"text {i}".encode()})
        w.write({"__key__": "007", "json": b"{}"})  # no text at the very end
    for workers in (0, 1):
        loader = make_loader(str(tmp_path / "s-0.tar"), batch_size=3, rank=0, world_size=1, fields=("text",),
                             shuffle=False, drop_last=True, num_workers=workers)
        texts = [t for b in loader for t in b["text"]]
        assert texts == [f"text {i}" for i in range(6)]
        assert loader.counts()["skipped_missing_text"] == 1


def test_open_clip_flat_index_gives_epoch_length(image_shards, tmp_path):
    import shutil

    names = json.loads((image_shards / "sizes.json").read_text())["splits"]["train"]["shards"][:3]
    for n in names:
        shutil.copy(image_shards / n, tmp_path / n)
    (tmp_path / "sizes.json").write_text(json.dumps({n: 3 for n in names}))  # open_clip's layout
    loader = make_loader(str(tmp_path / "train-{000000..000002}.tar"), batch_size=4, rank=0, world_size=1,
                         fields=("image", "label"), image_size=8)
    assert len(loader) == 3 and loader.num_samples == 9
    assert sum(len(b["labels"]) for b in loader) == 9
    assert stream.stream_classes(str(image_shards)) == ["0", "1", "2", "3"]  # integer labels: names 0..max
