"""Every method in the one trainer: unipt, lora, full, linear_probe on tiny random-init models.

What each method trains is checked against references built independently (a fresh transformers model's own
module and parameter names, LoRA's update written out by hand), and each method runs through the real
`unipt train` → checkpoint/ → `unipt eval` / load_trained path on the keyword CSV of tests/test_cli.py.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

from test_cli import write_csv
from tiny_models import tiny_bert_dir, tiny_llama_dir, tiny_t5_dir
from unipt_scale import trainer
from unipt_scale.backbone import wrap_module
from unipt_scale.cli import main
from unipt_scale.config import DEFAULT_LR, METHODS as ALL_METHODS, ConfigError, LoRAConfig, load_config
from unipt_scale.export import CHECKPOINT, WEIGHTS, load_trained
from unipt_scale.methods import BackboneEncoder, resolve_lora_targets
from unipt_scale.model import build_encoder, build_model, trained_state_dict, trained_state_keys

# The methods every task takes; method=ladder is the causal-LM baseline (tests/test_ladder.py).
METHODS = tuple(m for m in ALL_METHODS if m != "ladder")


HEAD = {"classifier.weight", "classifier.bias"}
R, ALPHA = 8, 16
TEXTS = ["the movie was great", "bad food", "a very happy day is fine", "not good"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("models")))


def _hf(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def _batch(model_dir):
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt"))


def _model(path, method, *overrides):
    torch.manual_seed(0)
    return build_model(load_config(None, [f"backbone.path={path}", f"method={method}", "task.num_classes=3",
                                          *overrides]))


# ------------------------------------------------------------------------------------------------ config

def test_method_default_and_learning_rates():
    cfg = load_config()
    assert cfg.method == "unipt" and cfg.train.lr == 5e-4 and cfg.lora.targets == "auto"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (R, ALPHA, 0.0)
    for method in METHODS:
        resolved = load_config(None, [f"method={method}"])
        assert resolved.train.lr == DEFAULT_LR[method]
        assert resolved.to_dict()["train"]["lr"] == DEFAULT_LR[method], "the value used is what is recorded"
        assert load_config(None, [f"method={method}", "train.lr=2e-4"]).train.lr == 2e-4
    assert DEFAULT_LR["full"] < DEFAULT_LR["unipt"] <= DEFAULT_LR["linear_probe"]
    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "tweets_minilm.yaml")
    assert load_config(shipped, ["method=full"]).train.lr == DEFAULT_LR["full"], "the YAML leaves lr to the method"
    assert load_config(None, ["lora.targets=query,key"]).lora.targets == ["query", "key"]


@pytest.mark.parametrize("overrides, says", [
    (["method=prefix"], "method='prefix' is not valid; choose one of unipt, lora, full, linear_probe"),
    (["lora.r=0"], "need r >= 1"),
    (["lora.dropout=1.0"], "dropout in [0, 1)"),
    (["lora.targets=[]"], "lora.targets=[]: use auto or a list"),
    (["method=full", "backbone.dtype=bfloat16"], "backbone.dtype=float32 with train.precision=bf16"),
])
def test_bad_method_config_is_one_line(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_lora_targets_that_match_nothing_name_the_modules(tiny, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"lora.targets \['attn'\] match no module of the backbone .*'query'"):
        _model(tiny, "lora", "lora.targets=[attn]")
    with pytest.raises(ConfigError, match="LoRA cannot adapt.*BertAttention"):
        _model(tiny, "lora", "lora.targets=[attention]")
    csv_path = write_csv(tmp_path / "d.csv", n=40)
    rc = main(["train", "--output-dir", str(tmp_path / "run"), f"backbone.path={tiny}", "data.source=csv",
               f"data.path={csv_path}", "data.batch_size=8", "method=lora", "lora.targets=[attn]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unipt")]
    assert rc == 2 and len(err) == 1 and "lora.targets ['attn'] match no module" in err[0], err
    assert "'query'" in err[0] and "'value'" in err[0] and not os.path.exists(tmp_path / "run")


def test_lora_targets_follow_the_architecture(tmp_path):
    root = str(tmp_path)
    assert resolve_lora_targets(_hf(tiny_bert_dir(root))) == ["query", "value"]
    llama = _hf(tiny_llama_dir(root))
    assert resolve_lora_targets(llama) == ["q_proj", "v_proj"]
    assert resolve_lora_targets(llama, ["k_proj"]) == ["k_proj"]
    with pytest.raises(ConfigError, match="q_proj"):
        resolve_lora_targets(llama, ["query"])
    from transformers import T5EncoderModel

    assert resolve_lora_targets(T5EncoderModel.from_pretrained(tiny_t5_dir(root))) == ["q", "v"]
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1))
    assert resolve_lora_targets(cnn) == ["0", "3"], "a conv backbone takes its ungrouped conv layers"


# ------------------------------------------------------------------------------------------------ trained sets

def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_what_it_claims(tiny, method):
    model = _model(tiny, method)
    hf = _hf(tiny)
    backbone = {f"encoder.backbone.model.{n}" for n, _ in hf.named_parameters()}
    d, c = hf.config.hidden_size, 3
    if method == "unipt":
        side = {f"encoder.side.{n}" for n, _ in model.encoder.side.named_parameters()}
        assert side and _trainable(model) == side | HEAD
    elif method == "lora":
        adapted = [n for n, m in hf.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")]
        assert len(adapted) == 2 * hf.config.num_hidden_layers
        adapters = {f"encoder.backbone.model.{n}.lora_{ab}.default.weight" for n in adapted for ab in "AB"}
        assert _trainable(model) == adapters | HEAD
        assert sum(p.numel() for n, p in model.named_parameters() if n in adapters) == len(adapted) * R * (d + d)
    elif method == "full":
        assert _trainable(model) == backbone | HEAD
    else:
        assert _trainable(model) == HEAD
    assert sum(p.numel() for n, p in model.named_parameters() if n in HEAD) == d * c + c
    keys = trained_state_keys(model)
    # the checkpoint rule: exactly the trained parameters (tiny BERT's trained modules carry no buffers); for
    # full fine-tuning that is the whole model
    assert set(keys) == _trainable(model)
    if method == "full":
        assert set(keys) == set(model.state_dict())
    assert set(trained_state_dict(model)) == set(keys)


def _lora_reference(hf, model, batch):
    """LoRA's update written out: every adapted query/value Linear gives W x + b + (alpha / r) B A x."""
    params = dict(model.named_parameters())
    handles = []
    for name, m in hf.named_modules():
        if name.rsplit(".", 1)[-1] in ("query", "value"):
            a = params[f"encoder.backbone.model.{name}.lora_A.default.weight"].detach()
            b = params[f"encoder.backbone.model.{name}.lora_B.default.weight"].detach()
            handles.append(m.register_forward_hook(
                lambda _m, inp, out, a=a, b=b: out + (ALPHA / R) * inp[0] @ a.t() @ b.t()))
    try:
        return hf(**batch).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["linear_probe", "lora", "full"])
def test_backbone_encoder_is_the_transformers_forward(tiny, method):
    model = _model(tiny, method).train()
    hf, batch = _hf(tiny), _batch(tiny)
    if method == "lora":  # lora_B starts at zero; give the adapters values so the update shows
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        ref = _lora_reference(hf, model, batch)
        assert (ref - hf(**batch).last_hidden_state).abs().max() > 1e-2
    else:
        ref = hf(**batch).last_hidden_state
    tokens, mask = model.encoder(batch)
    assert torch.equal(mask, batch["attention_mask"].bool()) and not mask.all()
    # real tokens (right padding: the backbone's positions-from-the-mask are transformers' own 0, 1, …)
    torch.testing.assert_close(tokens[mask], ref[mask], rtol=1e-5, atol=1e-5)
    # the backbone's own dropout is off in training (same function in every method); gradients reach exactly
    # what is trained
    assert not model.encoder.backbone.model.training
    logits = model(batch)
    assert logits.requires_grad
    logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    unused = {n for n in _trainable(model) if ".pooler." in n}  # BERT's pooler output feeds nothing
    assert got == _trainable(model) - unused
    if method == "linear_probe":
        assert not tokens.requires_grad, "the probe's backbone runs under no_grad"


def test_lora_on_a_conv_backbone():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
    base = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    base[0].load_state_dict(cnn[0].state_dict())
    base[1].load_state_dict(cnn[2].state_dict())
    enc = build_encoder(wrap_module(cnn, ["1", "2"], torch.zeros(1, 3, 16, 16)), "lora", lora=LoRAConfig(r=2))
    assert isinstance(enc, BackboneEncoder) and enc.lora_targets == ["0", "2"] and enc.pooling == "mean"
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, 16, 16)
    tokens, mask = enc({"pixel_values": x})
    params = dict(enc.named_parameters())

    def lora(i, conv, inp):  # base conv + (alpha / r) B(A(x)), A with the conv's own geometry, B 1x1
        a = params[f"backbone.model.{i}.lora_A.default.weight"]
        b = params[f"backbone.model.{i}.lora_B.default.weight"]
        low = nn.functional.conv2d(inp, a, stride=conv.stride, padding=conv.padding)
        return conv(inp) + (ALPHA / 2) * nn.functional.conv2d(low, b)

    with torch.no_grad():
        ref = lora(2, base[1], torch.relu(lora(0, base[0], x)))
    assert mask is None and tokens.shape == (2, 8 * 8, 16)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ unipt train

# Rates that make each method's loss fall clearly on this task within 24 steps (fixed seeds).
LR = {"unipt": "1e-2", "lora": "1e-2", "full": "1e-3", "linear_probe": "1e-2"}


class _Keep(trainer.Callback):
    """Holds the trainer's model, so its logits can be compared with the reloaded checkpoint's."""

    def on_step_end(self, tr):
        self.model = tr.model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """`unipt train` once per method: 48 training rows in batches of 16, 8 epochs, the loss logged per epoch."""
    root = tmp_path_factory.mktemp("methods")
    data = write_csv(root / "data.csv", n=120)
    runs = {}
    real_train = trainer.train
    with pytest.MonkeyPatch.context() as mp:
        for method in METHODS:
            keep = _Keep()
            mp.setattr(trainer, "train", lambda cfg, callbacks=(), trust_remote_code=False, keep=keep:
                       real_train(cfg, [*callbacks, keep], trust_remote_code))
            out = str(root / method)
            argv = ["train", "--output-dir", out, f"backbone.path={tiny}", "data.source=csv", f"data.path={data}",
                    "data.split=[0.4,0.3,0.3]", "data.batch_size=16", f"method={method}", f"train.lr={LR[method]}",
                    "train.max_steps=24", "train.log_every=3", "task.dropout=0.0", "train.tensorboard=false",
                    "train.num_threads=1"]
            assert main(argv) == 0, method
            with open(os.path.join(out, "metrics.json")) as fh:
                runs[method] = {"out": out, "metrics": json.load(fh), "model": keep.model.eval()}
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_unipt_train_each_method(trained, method, tiny):
    run = trained[method]
    m = run["metrics"]
    assert m["config"]["method"] == method and m["config"]["train"]["lr"] == float(LR[method])
    losses = [v for _, v in m["train_loss"]]
    assert len(losses) == 8, "one value per epoch over the same 48 rows"
    assert losses[-1] < losses[0] - 0.05, losses
    model = run["model"]
    state = trained_state_dict(model)
    assert sum(v.numel() for v in state.values()) == m["trainable_params"]
    assert m["frozen_params"] == (0 if method == "full" else sum(p.numel() for p in _hf(tiny).parameters()))

    from safetensors.torch import load_file

    saved = load_file(os.path.join(run["out"], CHECKPOINT, WEIGHTS))
    assert set(saved) == set(trained_state_keys(model))
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    reloaded, cfg, meta = load_trained(os.path.join(run["out"], CHECKPOINT))
    assert cfg.method == method and meta["num_classes"] == 2
    batch = _batch(tiny)
    with torch.no_grad():
        assert torch.equal(reloaded(batch), model(batch)), "identical logits after the reload"
    # what is not trained is the backbone as loaded from its directory; for full fine-tuning it moved
    reference = _hf(tiny).state_dict()
    now = {k[len("encoder.backbone.model."):].replace(".base_layer.", "."): v
           for k, v in reloaded.state_dict().items() if k.startswith("encoder.backbone.model.") and ".lora_" not in k}
    assert set(now) == set(reference)
    moved = [k for k in reference if not torch.equal(now[k], reference[k])]
    assert (len(moved) > 0) == (method == "full"), moved[:3]


@pytest.mark.parametrize("method", METHODS)
def test_unipt_eval_and_predict_reload_each_method(trained, method, tmp_path, capsys):
    run = trained[method]
    ck = os.path.join(run["out"], CHECKPOINT)
    report = str(tmp_path / "eval.json")
    assert main(["eval", "--checkpoint", ck, "--json", report]) == 0
    with open(report) as fh:
        ev = json.load(fh)["test"]
    test = run["metrics"]["test"]
    assert ev["num_samples"] == test["num_samples"] > 0
    assert ev["accuracy"] == test["accuracy"] and ev["loss"] == pytest.approx(test["loss"], abs=1e-6)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", ck, *TEXTS]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    from unipt_scale.data import text_collate

    model = run["model"]
    batch = text_collate(model.encoder.backbone.tokenizer, 64)([{"text": t} for t in TEXTS])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    assert [x["text"] for x in lines] == TEXTS
    assert [x["probability"] for x in lines] == [round(float(p.max()), 4) for p in probs]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_each_method_bit_identically(tiny, tmp_path, method):
    """A run stopped after step 5 and resumed from its step-4 checkpoint ends with the uninterrupted run's
    loss history and weights (the engine state holds the method's trained keys and their AdamW moments)."""
    data = write_csv(tmp_path / "data.csv", n=120)
    common = [f"backbone.path={tiny}", "data.source=csv", f"data.path={data}", "data.split=[0.4,0.3,0.3]",
              "data.batch_size=16", f"method={method}", "train.max_steps=8", "train.log_every=1",
              "train.checkpoint_every=4", "train.tensorboard=false", "train.num_threads=1", "lora.dropout=0.1"]

    class Stop(trainer.Callback):
        def on_step_end(self, tr):
            if tr.state.step == 5:
                raise KeyboardInterrupt

    full_run = trainer.train(load_config(None, [*common, f"output_dir={tmp_path / 'a'}"]))
    stopped = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        trainer.train(load_config(None, [*common, f"output_dir={stopped}"]), callbacks=[Stop()])
    resumed = trainer.train(load_config(None, [*common, f"output_dir={stopped}", "train.resume=auto"]))
    assert resumed["resumed_from_step"] == 4 and resumed["train_loss"] == full_run["train_loss"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / CHECKPOINT / WEIGHTS))
    b = load_file(os.path.join(stopped, CHECKPOINT, WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

