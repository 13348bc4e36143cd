"""Quantized frozen backbones (bitsandbytes int8 / NF4, `backbone.quantization`) on tiny checkpoints: hidden states
against the full-precision backbone, resident bytes against the saved checkpoint, UniPT and QLoRA training with
only their own parameters learning, causal-LM generation, checkpoints, and the refusals."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tiny_models import tiny_bert_dir, tiny_causal_lm_dir
from unipt_scale.backbone import BackboneLoadError, load_backbone
from unipt_scale.config import BackboneConfig, ConfigError, load_config
from unipt_scale.generation import generate
from unipt_scale.model import build_model
from unipt_scale.quantization import frozen_weight_bytes, quantized_scheme, quantized_types

SCHEMES = ["int8", "nf4"]
# Largest relative error (Frobenius, real tokens) of any hidden state against the fp32 backbone, measured on these
# seeded tiny checkpoints (hidden 64; the quantization is deterministic): bert int8 5.5e-4, nf4 6.2e-3; llama int8
# 9.6e-3, nf4 0.133 (random-init weights have no outliers to spare: real models are measured in the README).
# The bounds leave about 2x room.
BOUND = {("bert", "int8"): 1.2e-3, ("bert", "nf4"): 1.3e-2, ("llama", "int8"): 2e-2, ("llama", "nf4"): 0.27}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("quant"))
    return {"bert": tiny_bert_dir(root, hidden=64, layers=3), "llama": tiny_causal_lm_dir(root, "llama", hidden=64)}


BATCH = {"input_ids": torch.tensor([[2, 10, 11, 12, 13, 14, 3], [2, 15, 16, 17, 3, 0, 0]]),
         "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}


def _states(path, scheme):
    bb = load_backbone(BackboneConfig(path=path, quantization=scheme))
    bb.tap(list(range(bb.num_hidden_states)))
    return bb, bb(BATCH).hidden_states


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_hidden_states_stay_within_the_scheme_bound(dirs, arch, scheme):
    _, ref = _states(dirs[arch], "none")
    bb, got = _states(dirs[arch], scheme)
    assert quantized_scheme(bb.model) == scheme
    linears = [m for m in bb.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, quantized_types()) for m in linears), "every linear layer is quantized"
    real = BATCH["attention_mask"].bool()
    errors = [((g[real] - r[real]).norm() / r[real].norm()).item() for g, r in zip(got, ref)]
    assert errors[0] == 0, "the embedding output is not quantized"
    assert all(0 < e < BOUND[arch, scheme] for e in errors[1:]), errors
    assert all(h.dtype == torch.float32 and not h.requires_grad for h in got)


def _saved_tensor_bytes(directory):
    """Bytes of the tensors in a saved model, less the quant-state JSON bitsandbytes packs into uint8 tensors
    (`...weight.quant_state.bitsandbytes__nf4`): metadata on disk, Python attributes in memory."""
    total = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as fh:
                for key in fh.keys():
                    if ".quant_state.bitsandbytes__" in key:
                        continue
                    t = fh.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resident_bytes_match_the_saved_checkpoint_and_shrink(dirs, tmp_path, scheme):
    full = load_backbone(BackboneConfig(path=dirs["bert"])).model
    quant = load_backbone(BackboneConfig(path=dirs["bert"], quantization=scheme)).model
    assert frozen_weight_bytes(full) == sum(p.numel() * 4 for p in full.parameters()) + \
        sum(b.numel() * b.element_size() for b in full.buffers())
    # Independent count: what transformers serialises for the quantized model (codes, scales, quant state).
    quant.save_pretrained(tmp_path / "saved")
    measured = frozen_weight_bytes(quant)
    assert abs(measured - _saved_tensor_bytes(tmp_path / "saved")) <= 0.01 * measured
    # The linear weights shrink by the scheme's factor (int8: 1 byte + a 4-byte row scale per 64 inputs, 3.8x;
    # NF4: half a byte + the block scales, 7.5x on large layers, less on these 64-wide ones, where the 16-entry
    # code and the 256-entry code of the double-quantized scales, 1.1 KB a layer, weigh in); the rest stays fp32.
    linear_fp32 = sum(m.weight.numel() * 4 for m in full.modules() if isinstance(m, torch.nn.Linear))
    linear_q = sum(frozen_weight_bytes(m) - m.bias.numel() * m.bias.element_size()
                   for m in quant.modules() if isinstance(m, quantized_types()))
    lo, hi = {"int8": (3.5, 4.0), "nf4": (5.0, 8.0)}[scheme]
    assert lo <= linear_fp32 / linear_q <= hi, linear_fp32 / linear_q
    assert measured < frozen_weight_bytes(full)
    from unipt_scale.model import count_parameters

    assert count_parameters(quant) == count_parameters(full), "parameters are counted unpacked"


def _cls_cfg(path, tmp_path, *extra):
    csv = tmp_path / "texts.csv"
    if not csv.exists():
        fillers = ["movie", "food", "day", "night", "the movie", "the food", "a day", "a night"]
        rows = ["text,label"] + [f"{a} {w} {b},{w}" for w in ("good", "bad") for a in fillers[:4] for b in fillers]
        csv.write_text("\n".join(rows) + "\n")
    return load_config(None, [f"backbone.path={path}", "data.source=csv", f"data.path={csv}", "unipt.mapping_dim=16",
                              "data.batch_size=8", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}",
                              "task.num_classes=2", "data.split=[0.5,0.25,0.25]", *extra])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unipt_on_a_quantized_base_trains_only_the_side_network(dirs, tmp_path, scheme):
    model = build_model(_cls_cfg(dirs["bert"], tmp_path, f"backbone.quantization={scheme}"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.encoder.backbone.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-2)
    labels = torch.tensor([0, 1])
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(BATCH), labels)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.encoder.backbone.parameters())
        assert all(p.grad is not None for p in trained)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _lm_cfg(path, tmp_path, *extra):
    pairs = tmp_path / "pairs.jsonl"
    words = ["good", "bad", "movie", "food", "day", "night"]
    pairs.write_text("".join(json.dumps({"prompt": f"{words[i % 6]} {words[(i + 1) % 6]}",
                                         "response": f"{words[(i + 2) % 6]}"}) + "\n" for i in range(24)))
    return load_config(None, [f"backbone.path={path}", "task.kind=causal_lm", "data.source=jsonl",
                              f"data.path={pairs}", "unipt.mapping_dim=16", "data.batch_size=4",
                              "data.max_length=16", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}",
                              *extra])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fresh_causal_unipt_on_a_quantized_base_is_the_quantized_llm(dirs, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    from unipt_scale.quantization import bnb_config, fit_cpu_kernels, load_device_map

    model = build_model(_lm_cfg(dirs["llama"], tmp_path, f"backbone.quantization={scheme}")).eval()
    ref = AutoModelForCausalLM.from_pretrained(dirs["llama"], quantization_config=bnb_config(scheme, torch.float32),
                                               device_map=load_device_map()).eval()
    fit_cpu_kernels(ref)
    pos = (BATCH["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(**BATCH, position_ids=pos).logits
        got = model.logits(BATCH)
    real = BATCH["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["unipt", "lora"])
def test_generation_on_a_quantized_base_equals_full_recompute(dirs, tmp_path, method):
    model = build_model(_lm_cfg(dirs["llama"], tmp_path, "backbone.quantization=nf4", f"method={method}")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    prompts = {"input_ids": BATCH["input_ids"][:, :4], "attention_mask": BATCH["attention_mask"][:, :4].flip(-1)}
    prompts["input_ids"] = prompts["input_ids"] * prompts["attention_mask"]  # left padded
    fast = generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=16)
    slow = generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=16, incremental=False)
    assert fast.shape == (2, 16) and torch.equal(fast, slow)


def _cli_overrides(cfg):
    d = cfg.to_dict()
    keys = ["backbone.path", "backbone.quantization", "method", "task.kind", "task.num_classes", "data.source",
            "data.path", "data.split", "unipt.mapping_dim", "data.batch_size", "data.max_length", "train.tensorboard",
            "train.max_steps"]
    out = []
    for key in keys:
        sec, name = key.split(".") if "." in key else (None, key)
        value = d[sec][name] if sec else d[name]
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def test_qlora_trains_and_checkpoints_only_adapters_and_head(dirs, tmp_path, capsys):
    from unipt_scale.cli import main
    from unipt_scale.export import load_trained, read_checkpoint

    cfg = _cls_cfg(dirs["bert"], tmp_path, "method=lora", "backbone.quantization=nf4", "train.max_steps=3",
                   "data.max_length=16")
    model = build_model(cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("classifier.") for n in trained)
    assert any(n.startswith("classifier.") for n in trained) and any("lora_" in n for n in trained)
    out = tmp_path / "qlora"
    assert main(["train", "--output-dir", str(out), *_cli_overrides(cfg)]) == 0
    _, state, _ = read_checkpoint(str(out / "checkpoint"))
    assert set(state) == {k for k in model.state_dict() if "lora_" in k or k.startswith("classifier.")}
    assert not any(k.endswith(("SCB", "absmax", "quant_map")) for k in state), "the quantized base is never saved"
    reloaded, cfg2, _ = load_trained(str(out / "checkpoint"))
    assert cfg2.backbone.quantization == "nf4" and quantized_scheme(reloaded) == "nf4"
    trained_run = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == trained_run["test"]["accuracy"]
    assert main(["predict", "--checkpoint", str(out / "checkpoint"), "good movie night", "bad food day"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    from unipt_scale.data import text_collate
    from unipt_scale.preprocessors import load_tokenizer

    batch = text_collate(load_tokenizer(cfg2.backbone), cfg2.data.max_length)(
        [{"text": "good movie night"}, {"text": "bad food day"}])
    with torch.no_grad():
        probs = reloaded(batch).softmax(-1)
    assert [x["probability"] for x in lines] == [round(float(p.max()), 4) for p in probs]


def test_causal_unipt_on_int8_trains_and_generates_from_the_checkpoint(dirs, tmp_path, capsys):
    from unipt_scale.cli import main
    from unipt_scale.export import load_trained
    from unipt_scale.generation import generate_texts
    from unipt_scale.preprocessors import load_tokenizer

    cfg = _lm_cfg(dirs["llama"], tmp_path, "backbone.quantization=int8", "train.max_steps=3")
    out = tmp_path / "lm"
    overrides = [o for o in _cli_overrides(cfg) if not o.startswith("task.num_classes")]
    assert main(["train", "--output-dir", str(out), *overrides]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--max-new-tokens", "4", "good movie"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    model, cfg2, _ = load_trained(str(out / "checkpoint"))
    assert quantized_scheme(model) == "int8"
    want = generate_texts(model, load_tokenizer(cfg2.backbone), [{"prompt": "good movie"}], max_new_tokens=4,
                          trained_length=cfg2.data.max_length)
    assert line["completion"] == want[0]


def test_unipt_info_reports_the_resident_frozen_bytes(dirs, tmp_path, capsys):
    from unipt_scale.cli import main

    reported = {}
    for scheme in ["none", *SCHEMES]:
        path = tmp_path / f"info-{scheme}.json"
        cfg = _cls_cfg(dirs["bert"], tmp_path, f"backbone.quantization={scheme}")
        args = [o for o in _cli_overrides(cfg) if not o.startswith(("train.max_steps", "data.max_length"))]
        assert main(["info", "--json", str(path), *args]) == 0
        info = json.loads(path.read_text())
        assert info == json.loads(capsys.readouterr().out)
        assert info["quantization"] == {"backbone": scheme}
        reported[scheme] = info["frozen_weight_bytes"]
    full = load_backbone(BackboneConfig(path=dirs["bert"])).model
    assert reported["none"] == frozen_weight_bytes(full)
    assert reported["none"] > reported["int8"] > reported["nf4"]


@pytest.mark.parametrize("overrides, error, says", [
    (["method=full", "backbone.quantization=nf4"], ConfigError, "method=lora on the quantized base"),
    (["backbone.quantization=int4"], ConfigError, "none, int8, nf4"),
    (["backbone.random_init=true", "backbone.quantization=int8"], BackboneLoadError, "save_pretrained"),
    (["backbone.path=builtin:efficientnet-lite0", "backbone.quantization=nf4"], BackboneLoadError, "linear layers"),
])
def test_what_cannot_be_quantized_is_refused_with_the_fix(dirs, tmp_path, overrides, error, says):
    with pytest.raises(error, match=says):
        build_model(load_config(None, [f"backbone.path={dirs['bert']}", "task.num_classes=2", *overrides]))


def test_cli_refusal_is_one_line(dirs, tmp_path, capsys):
    from unipt_scale.cli import main

    code = main(["train", "--output-dir", str(tmp_path / "x"), f"backbone.path={dirs['bert']}", "method=full",
                 "backbone.quantization=int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "quantization" in err
    assert not (tmp_path / "x").exists()


def test_bench_quantization_quick_reports_what_an_independent_load_measures(tmp_path):
    from unipt_scale.bench.quality import tiny_text_model
    from unipt_scale.bench.quantization import main

    out = tmp_path / "q.json"
    assert main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (rows,) = result["backbones"].values()
    assert list(rows) == ["none", "int8", "nf4"]
    same = tiny_text_model(str(tmp_path), "bert", hidden=64)  # the same seeded stand-in, built again
    for scheme, row in rows.items():
        model = load_backbone(BackboneConfig(path=same, quantization=scheme)).model
        assert row["frozen_weight_bytes"] == frozen_weight_bytes(model)
        if scheme != "none":
            errors = row["rel_error_per_state"]
            assert errors[0] == 0 and all(e > 0 for e in errors[1:]) and row["rel_error_max"] == max(errors)
            assert row["weight_bytes_ratio"] < 0.5
    assert rows["nf4"]["rel_error_last"] > rows["int8"]["rel_error_last"]
    assert main(["--schemes", "int4"]) == 2
