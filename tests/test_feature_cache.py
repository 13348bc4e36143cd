"""The tapped-state cache (data.feature_cache): float32 trains exactly as without it, float16 and int8 within stated
tolerances; a second run reads every state instead of running the backbone; the directory is keyed by what decides
the states; a damaged shard is computed again, not trained on; and its size is planned before it is written."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from test_resume import _write_csv
from test_sweep import _CountForwards
from tiny_models import tiny_bert_dir
from unipt_scale.config import ConfigError, load_config
from unipt_scale.export import CHECKPOINT, WEIGHTS
from unipt_scale.feature_cache import TappedStateCache, _decode, _encode, estimate_bytes
from unipt_scale.sweep import run_sweep
from unipt_scale.trainer import train

# Largest difference of any logged training loss from the uncached run over 3 epochs (the measured ones are
# 3.6e-5 for float16 and 8e-4 for int8 on this model; the bounds leave room for other platforms' rounding).
LOSS_TOLERANCE = {"float16": 1e-3, "int8": 1e-2}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv")
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=16",
              "train.epochs=3", "task.dropout=0.3", "unipt.mapping_dim=8", "train.tensorboard=false",
              "train.num_threads=1", "train.precision=fp32", "train.log_every=1"]
    plain = train(load_config(None, [*common, f"output_dir={root / 'plain'}"]))
    return {"root": root, "common": common, "plain": plain}


def _cached(ws, tmp_path, dtype, name="run", cache=None, *extra):
    cache = cache or str(tmp_path / "cache")
    out = str(tmp_path / name)
    m = train(load_config(None, [*ws["common"], f"output_dir={out}", f"data.feature_cache={cache}",
                                 f"data.feature_cache_dtype={dtype}", *extra]))
    return m, out


def test_float32_cache_trains_exactly_as_without_it(ws, tmp_path, monkeypatch):
    counter = _CountForwards(monkeypatch)
    first, out = _cached(ws, tmp_path, "float32")
    plain = ws["plain"]
    assert first["train_loss"] == plain["train_loss"] and first["test"] == plain["test"]
    assert first["val_history"] == plain["val_history"]
    w, ref = (load_file(os.path.join(d, CHECKPOINT, WEIGHTS)) for d in (out, str(ws["root"] / "plain")))
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    # epoch 1 ran the backbone on each training batch; epochs 2 and 3 read the cache
    train_batches = 128 // 16
    fc = first["feature_cache"]
    # every distinct sample computed once (the CSV repeats a few texts: one key each)
    assert fc["misses"] == fc["samples"] and 150 < fc["samples"] <= 160 and fc["hits"] > 0
    n_first = counter.n
    assert n_first < 3 * train_batches, "later epochs did not run the backbone"

    counter.n = 0
    again, _ = _cached(ws, tmp_path, "float32", "again")
    assert counter.n == 0, "a second run reads every tapped state from the cache"
    assert again["feature_cache"]["misses"] == 0
    assert again["train_loss"] == plain["train_loss"] and again["test"] == plain["test"]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_lossy_caches_train_within_tolerance(ws, tmp_path, dtype):
    got, _ = _cached(ws, tmp_path, dtype)
    diff = max(abs(a[1] - b[1]) for a, b in zip(got["train_loss"], ws["plain"]["train_loss"]))
    assert 0 < diff < LOSS_TOLERANCE[dtype]
    assert got["test"]["loss"] == pytest.approx(ws["plain"]["test"]["loss"], abs=LOSS_TOLERANCE[dtype])


def test_int8_encoding_error_is_half_a_step_per_position():
    x = torch.randn(7, 5, 16) * torch.linspace(0.01, 30, 7)[:, None, None]
    enc = _encode(x, "int8")
    assert enc["q"].dtype == torch.int8 and enc["scale"].shape == (7,)
    err = (_decode(enc) - x).abs().reshape(7, -1).amax(dim=1)
    assert torch.all(err <= enc["scale"] / 2 + 1e-6)
    assert torch.equal(_decode(_encode(x, "float32")), x)


def test_the_directory_is_keyed_by_what_decides_the_states(ws, tmp_path):
    cache = str(tmp_path / "cache")
    _cached(ws, tmp_path, "float16", "a", cache)
    _cached(ws, tmp_path, "float16", "b", cache, "unipt.layers=[1,3]")
    _cached(ws, tmp_path, "int8", "c", cache)
    _cached(ws, tmp_path, "float16", "d", cache, "train.lr=1e-4", "train.seed=3")  # what is trained: same states
    dirs = sorted(os.listdir(cache))
    assert len(dirs) == 3
    layers = sorted(json.load(open(os.path.join(cache, d, "identity.json")))["layers"] for d in dirs)
    assert layers == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 3]]


def test_a_damaged_shard_is_computed_again(ws, tmp_path, monkeypatch, caplog):
    first, _ = _cached(ws, tmp_path, "float32")
    (sub,) = os.listdir(tmp_path / "cache")
    (shard,) = [n for n in os.listdir(tmp_path / "cache" / sub) if n.endswith(".tar")]
    path = tmp_path / "cache" / sub / shard
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # cut in the middle, as a crash of another writer might
    counter = _CountForwards(monkeypatch)
    again, _ = _cached(ws, tmp_path, "float32", "again")
    assert "damaged" in caplog.text and counter.n > 0
    assert again["train_loss"] == ws["plain"]["train_loss"] and again["test"] == ws["plain"]["test"]


def test_a_sweep_reads_the_cache_too(ws, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    _cached(ws, tmp_path, "float32", "fill", cache)
    counter = _CountForwards(monkeypatch)
    result = run_sweep(None, [*ws["common"], f"data.feature_cache={cache}", "data.feature_cache_dtype=float32"],
                       ["train.seed=0,1"], str(tmp_path / "sweep"))
    assert counter.n == 0 and result["frozen_forwards"] == 0
    seed0 = json.load(open(tmp_path / "sweep" / "seed=0" / "metrics.json"))
    assert seed0["train_loss"] == ws["plain"]["train_loss"]


def test_zero3_is_refused_with_the_cache(ws, tmp_path):
    """A rank that has a batch cached skips the frozen forward, which ZeRO-3 runs collectively."""
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(None, [*ws["common"], f"output_dir={tmp_path / 'o'}", f"data.feature_cache={tmp_path / 'c'}",
                           "deepspeed.enabled=true", "deepspeed.zero_stage=3"])
    load_config(None, [*ws["common"], f"output_dir={tmp_path / 'o'}", f"data.feature_cache={tmp_path / 'c'}",
                       "deepspeed.enabled=true", "deepspeed.zero_stage=2"])


def test_methods_that_train_the_backbone_are_refused(ws, tmp_path):
    for method in ("lora", "full"):
        with pytest.raises(ConfigError, match="cannot be cached"):
            load_config(None, [*ws["common"], f"method={method}", f"data.feature_cache={tmp_path}"])
    with pytest.raises(ConfigError, match="feature_cache_dtype"):
        load_config(None, [*ws["common"], "data.feature_cache_dtype=bf16"])


def test_the_estimate_bounds_what_is_written(ws, tmp_path):
    _, _ = _cached(ws, tmp_path, "float16")
    (sub,) = os.listdir(tmp_path / "cache")
    cache = TappedStateCache.__new__(TappedStateCache)
    cache.dir = str(tmp_path / "cache" / sub)
    written = cache.disk_bytes()
    # 160 samples of at most 64 positions over 4 tapped states of width 32, plus the final output
    bound = estimate_bytes(160, 64, [32] * 5, "float16")
    assert 0 < written <= bound
    assert estimate_bytes(10, 8, [4, 4], "int8") == 10 * (8 * 8 * 1 + 4 * 8 * 2 + 1024)


def test_plan_reports_the_cache_size():
    from unipt_scale.plan import build_parser, format_plan, load_model, options_from_args, plan

    args = build_parser().parse_args(["bert-base", "--cache-samples", "1000", "--seq-len", "128", "--layers",
                                      "every:3", "--cache-dtype", "int8"])
    p = plan(load_model("bert-base"), options_from_args(args))
    tower = p["model"]["towers"][0]
    assert p["feature_cache"]["bytes"] == estimate_bytes(1000, 128, [768] * (tower["tapped_layers"] + 1), "int8")
    assert "tapped-state cache" in format_plan(p)


def test_the_identity_follows_the_weight_files_and_a_random_backbones_seed(ws, tmp_path):
    import shutil

    from unipt_scale.backbone import load_backbone
    from unipt_scale.config import BackboneConfig
    from unipt_scale.feature_cache import backbone_fingerprint

    model = str(tmp_path / "model")
    shutil.copytree(load_config(None, ws["common"]).backbone.path, model)
    cfg = BackboneConfig(path=model)
    bb = load_backbone(cfg)
    before = backbone_fingerprint(bb, cfg, seed=0)
    assert before == backbone_fingerprint(bb, cfg, seed=1), "a saved backbone does not depend on the seed"
    weights = [n for n in os.listdir(model) if n.endswith(".safetensors")][0]
    st = os.stat(os.path.join(model, weights))
    os.utime(os.path.join(model, weights), ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # saved again
    assert backbone_fingerprint(bb, cfg, seed=0) != before
    rand = BackboneConfig(path=model, random_init=True)
    assert backbone_fingerprint(bb, rand, seed=0) != backbone_fingerprint(bb, rand, seed=1)
