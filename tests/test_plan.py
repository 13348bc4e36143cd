"""`unipt plan` against arithmetic done by hand, against memory measured on tiny torch models, and the launch/ files.

Measured here (CPU, bf16): parameters, gradients (after a real backward), optimizer state (a real AdamW step on
fp32 masters) and activations (unique storages autograd saves during one forward, parameters excluded). The
CPU keeps dropout masks and LayerNorm statistics in the input dtype where CUDA uses bool/fp32, so the plan is
evaluated with `cpu_profile` for these comparisons. Activation predictions for the tiny models land within
2.1% (full and LoRA exactly or within 0.1%); ACT_TOL = 3% leaves room only for the small per-sample tensors
(pooled vectors, masks) the planner does not itemise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from unipt_scale import plan as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3
ACT_TOL = 0.03
PARAM_TOL = 0.15


# ---- hand-computed plan for a small BERT ---------------------------------------------------------------------------
SMALL_BERT = dict(model_type="bert", num_hidden_layers=2, hidden_size=64, intermediate_size=256,
                  num_attention_heads=4, vocab_size=100, max_position_embeddings=64, type_vocab_size=2)


def _write_config(tmp_path, d):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


def _run_json(tmp_path, argv):
    out = tmp_path / "plan.json"
    assert pl.main(argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_hand_computed_small_bert_zero2(tmp_path, capsys):
    cfg = _write_config(tmp_path, SMALL_BERT)
    p = _run_json(tmp_path, [cfg, "--gpus-per-node", "4", "--nodes", "1", "--batch-size", "2", "--seq-len", "16",
                             "--zero-stage", "2", "--lora-rank", "4"])
    # Parameters: embeddings 100*64 + 64*64 (positions) + 2*64 (types) + 2*64 (LayerNorm) = 10752;
    # a block: 4 attention Linears (64*64 + 64) = 16640, MLP 64*256 + 256 + 256*64 + 64 = 33088, 2 LayerNorms 256
    # -> 49984; pooler 64*64 + 64 = 4160.  Total 10752 + 2*49984 + 4160 = 114880.
    assert p["model"]["params"] == 114880
    assert p["model"]["largest_module_params"] == 49984
    b = lambda method, part: p[method]["parts"][part] * GIB  # noqa: E731
    # full: weights 2 B * 114880 (ZeRO-2 keeps weights whole); grads 2 B / 4 ranks; Adam 12 B / 4 ranks
    assert b("full", "weights") == pytest.approx(229760)
    assert b("full", "gradients") == pytest.approx(57440)
    assert b("full", "optimizer") == pytest.approx(344640)
    # Activations per token and layer, Korthikanti: 34h + 5aN = 34*64 + 5*4*16 = 2496, + 2 LayerNorms' fp32
    # mean/rstd (16) = 2512; two layers 5024; embeddings: ids 8 + LayerNorm input 128 + stats 8 + dropout mask 64
    # = 208.  (5024 + 208) * 16 tokens * 2 samples = 167424.
    assert b("full", "activations") == pytest.approx(167424)
    assert p["full"]["per_gpu_gib"] * GIB == pytest.approx(229760 + 57440 + 344640 + 167424)
    # LoRA r=4 on query and value: 2 layers * 2 * 4*(64+64) = 2048 trained.
    assert p["lora"]["trained_params"] == 2048
    assert b("lora", "weights") == pytest.approx(2 * (114880 + 2048))
    assert b("lora", "gradients") == pytest.approx(2 * 2048 / 4)
    assert b("lora", "optimizer") == pytest.approx(12 * 2048 / 4)
    # Frozen output/MLP Linears keep no input: 34h - 2h (attention output) - 2h (fc1) - 8h (fc2) = 22h = 1408,
    # + 320 scores + 16 stats + two rank-4 intermediates 2*2*4 = 1760 per layer; layer 0 keeps no q (k frozen,
    # input without grad): -128; the frozen embeddings keep nothing.  (2*1760 - 128) * 32 = 108544.
    assert b("lora", "activations") == pytest.approx(108544)
    # UniPT: 3 hidden states, d = 32.  Side parameters 3*(64*32 + 32 + 64) + (32*32 + 32 + 64) + 33 + (32*64 + 64)
    # = 9697, each 2 (weight) + 2/4 (grad, ZeRO-2) + 12/4 (Adam) bytes.
    assert p["unipt"]["trained_params"] == 9697
    assert b("unipt", "weights") == pytest.approx(229760)
    assert b("unipt", "gradients") == 0 and b("unipt", "optimizer") == 0
    assert b("unipt", "side_network") == pytest.approx(9697 * 5.5)
    # Stored hidden states 3 * 2 * 64 = 384 per token; the side network keeps (fused kernels) per tap 2*2*32 + 8,
    # merged 2*2*32, output 3*2*32 + 8, row sums 2*4, mask 1 = 408 + 128 + 200 + 8 + 1 = 745 per token, less than
    # the frozen forward's one-layer working set (2512): (384 + 2512) * 32 = 92672.
    assert b("unipt", "activations") == pytest.approx(92672)
    assert p["unipt"]["activation_detail_gib"]["side_network"] * GIB == pytest.approx(745 * 32)
    assert all(b(m, "zero3_gather") == 0 for m in pl.METHODS)
    assert "unipt" in capsys.readouterr().out


def test_hand_computed_small_bert_zero3_and_max_batch(tmp_path):
    cfg = _write_config(tmp_path, SMALL_BERT)
    p = _run_json(tmp_path, [cfg, "--gpus-per-node", "2", "--nodes", "2", "--batch-size", "2", "--seq-len", "16",
                             "--zero-stage", "3", "--gpu-mem-gib", str(2 / 1024), "--reserve-gib", str(1 / 1024)])
    b = lambda method, part: p[method]["parts"][part] * GIB  # noqa: E731
    assert b("full", "weights") == pytest.approx(229760 / 4)
    assert b("unipt", "weights") == pytest.approx(229760 / 4)
    # One block gathered whole (2 B * 49984); full fine-tuning also holds that block's whole gradient.
    assert b("unipt", "zero3_gather") == pytest.approx(99968)
    assert b("full", "zero3_gather") == pytest.approx(199936)
    # Usable 1 MiB = 1048576 B.  full static: 57440 + 57440 + 344640 + 199936 = 659456; per sample 83712
    # -> floor(389120 / 83712) = 4.
    assert p["full"]["max_batch_per_gpu"] == 4
    assert p["full"]["activation_per_sample_gib"] * GIB == pytest.approx(83712)


def test_korthikanti_form_for_a_gpt_block():
    """A post-LN GELU block with MLP 4h and dropout keeps exactly 34h + 5aN bytes per token (+ LayerNorm stats)."""
    t = pl.model_from_config(dict(SMALL_BERT, hidden_size=1024, intermediate_size=4096, num_attention_heads=16),
                             "gpt-like").towers[0]
    roles = frozenset(t.linears())
    got = sum(pl.layer_saved(t, 2048, roles, True, 2).values())
    assert got == 34 * 1024 + 5 * 16 * 2048 + 2 * 8
    flash = sum(pl.layer_saved(t, 2048, roles, True, 2, attention="flash").values())
    assert flash < got - 4 * 16 * 2048


# ---- measured on tiny torch models ------------------------------------------------------------------------------
def _saved_bytes(fn, module):
    """Unique storages autograd keeps during fn(), not counting parameters."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _optimizer_bytes(params):
    """fp32 masters + AdamW state after one real step: what mixed-precision Adam holds per trained parameter."""
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    for m, p in zip(masters, params):
        m.grad = p.grad.float()
    opt = torch.optim.AdamW(masters, lr=1e-3)
    opt.step()
    state = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return sum(m.nbytes for m in masters) + state


TINY = {
    "bert": (dict(model_type="bert", num_hidden_layers=3, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                  vocab_size=1000, max_position_embeddings=64, type_vocab_size=2), ["query", "value"]),
    "llama": (dict(model_type="llama", num_hidden_layers=3, hidden_size=128, intermediate_size=344,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64),
              ["q_proj", "v_proj"]),
    "t5": (dict(model_type="t5", num_layers=3, d_model=128, d_ff=512, num_heads=4, d_kv=32, vocab_size=1000),
           ["q", "v"]),
    "clip_vision": (dict(model_type="clip_vision_model", num_hidden_layers=3, hidden_size=128, intermediate_size=512,
                         num_attention_heads=4, image_size=32, patch_size=8), ["q_proj", "v_proj"]),
}
B, N = 2, 32


def _build(family):
    import transformers as tf

    d = {k: v for k, v in TINY[family][0].items() if k != "model_type"}
    if family == "bert":  # no pooler: its first-token view would keep the whole last hidden state (a task head)
        return tf.BertModel(tf.BertConfig(**d, attn_implementation="eager"), add_pooling_layer=False)
    if family == "llama":
        return tf.LlamaModel(tf.LlamaConfig(**d, attn_implementation="eager"))
    if family == "t5":
        return tf.T5EncoderModel(tf.T5Config(**d, attn_implementation="eager"))
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(**d, attn_implementation="eager"))


def _inputs(family):
    if family == "clip_vision":
        return {"pixel_values": torch.randn(B, 3, 32, 32, dtype=torch.bfloat16)}
    return {"input_ids": torch.randint(0, 1000, (B, N))}


def _measure(family, method, side_kernels="efficient"):
    """(weights, grads, optimizer, activations, side-network bytes) of one forward/backward in bf16."""
    from peft import LoraConfig, get_peft_model

    model = _build(family).to(torch.bfloat16).train()
    inp = _inputs(family)
    if method == "lora":
        # DeepSpeed's bf16 engine casts the adapters too; peft alone would keep them in fp32.
        model = get_peft_model(model, LoraConfig(r=8, target_modules=TINY[family][1])).to(torch.bfloat16)
    if method != "unipt":
        acts, out = _saved_bytes(lambda: model(**inp), model)
        loss = out.last_hidden_state.float().pow(2).mean()
        if getattr(out, "pooler_output", None) is not None:
            loss = loss + out.pooler_output.float().pow(2).mean()
        loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        weights = sum(p.nbytes for p in model.parameters())
        grads = sum(p.grad.nbytes for p in trained)
        return weights, grads, _optimizer_bytes(trained), acts, 0
    from unipt_scale.config import UniPTConfig
    from unipt_scale.side_network import UniPTSideNetwork

    model.requires_grad_(False).eval()
    with torch.no_grad():
        hs = list(model(**inp, output_hidden_states=True).hidden_states)
    net = UniPTSideNetwork(UniPTConfig(kernels=side_kernels), [h.shape[-1] for h in hs], hs[-1].shape[-1])
    net = net.to(torch.bfloat16)
    with torch.no_grad():  # non-trivial values: the zero-init up-projection would leave no gradient path to check
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    acts, y = _saved_bytes(lambda: net(hs, None, hs[-1]), net)
    y.float().pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters()), "the frozen backbone must get no gradients"
    side = list(net.parameters())
    side_bytes = sum(p.nbytes for p in side) + sum(p.grad.nbytes for p in side) + _optimizer_bytes(side)
    return sum(p.nbytes for p in model.parameters()), 0, 0, acts, side_bytes


def _close(pred, meas, tol, what):
    assert meas > 0 or pred == 0, what
    err = abs(pred - meas) / max(meas, 1)
    assert err <= tol, f"{what}: predicted {pred:.0f} B, measured {meas:.0f} B ({100 * err:.1f}% off)"


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("method", ["full", "lora", "unipt"])
def test_predicted_bytes_match_measured(family, method):
    torch.manual_seed(0)
    model = pl.model_from_config(TINY[family][0], family)
    o = pl.Options(batch=B, seq_len=N, gpus_per_node=1, nodes=1, zero_stage=0, lora_rank=8,
                   profile=pl.cpu_profile(2))
    r = pl.plan_method(model, method, o)
    weights, grads, optim, acts, side = _measure(family, method)
    pooler = 128 * 128 + 128 if family == "bert" else 0  # counted by the planner (AutoModel loads it), not built here
    part = lambda k: r["parts"][k] * GIB  # noqa: E731
    _close(part("weights") - 2 * pooler, weights, PARAM_TOL, f"{family}/{method} weights")
    if method == "unipt":
        _close(part("side_network"), side, PARAM_TOL, f"{family}/unipt side network (weights+grads+Adam)")
        detail = r["activation_detail_gib"]
        pred = (detail["stored_hidden_states"] + detail["side_network"]) * GIB
    else:
        _close(part("gradients") - 2 * pooler * (method == "full"), grads, PARAM_TOL, f"{family}/{method} gradients")
        _close(part("optimizer") - 12 * pooler * (method == "full"), optim, PARAM_TOL, f"{family}/{method} optimizer")
        pred = part("activations")
    _close(pred, acts, ACT_TOL, f"{family}/{method} activations")


def test_reference_side_kernels_match_measured():
    """The reference cross attention keeps the N x N tensors; the planner's reference mode says how much."""
    torch.manual_seed(0)
    model = pl.model_from_config(TINY["llama"][0], "llama")
    o = pl.Options(batch=B, seq_len=N, gpus_per_node=1, zero_stage=0, side_kernels="reference",
                   profile=pl.cpu_profile(2))
    d = pl.plan_method(model, "unipt", o)["activation_detail_gib"]
    *_, acts, _ = _measure("llama", "unipt", side_kernels="reference")
    _close((d["stored_hidden_states"] + d["side_network"]) * GIB, acts, ACT_TOL, "llama/unipt reference kernels")


def test_side_params_and_taps_match_the_side_network():
    from unipt_scale.config import UniPTConfig
    from unipt_scale.side_network import UniPTSideNetwork, resolve_layers

    for spec, n in (("all", 13), ("every:4", 25), ("last:3", 9), ([0, 5, -1], 7), ("every:1", 2)):
        assert pl.resolve_taps(spec, n) == resolve_layers(spec, n)
    assert pl.resolve_taps("0,5,-1", 7) == resolve_layers([0, 5, -1], 7)
    for sizes, out, d in (([48, 64, 64], 64, None), ([96] * 5, 96, 40)):
        net = UniPTSideNetwork(UniPTConfig(mapping_dim=d), sizes, out)
        assert pl.side_params(sizes, out, pl.mapping_dim(out, d, 2)) == sum(p.numel() for p in net.parameters())


# ---- presets ----------------------------------------------------------------------------------------------------
def _hf_params(name):
    """Parameters of the preset built by transformers on the meta device (nothing allocated)."""
    import transformers as tf

    d = {k: v for k, v in pl.PRESETS[name].items() if k != "model_type"}
    with torch.device("meta"):
        if name.startswith("llama"):
            models = [tf.LlamaModel(tf.LlamaConfig(**d))]
        elif name.startswith("t5"):
            models = [tf.T5EncoderModel(tf.T5Config(**d))]
        elif name.startswith("bert"):
            models = [tf.BertModel(tf.BertConfig(**d))]
        else:
            models = [tf.CLIPTextModel(tf.CLIPTextConfig(**d["text_config"])),
                      tf.CLIPVisionModel(tf.CLIPVisionConfig(**d["vision_config"]))]
    return sum(p.numel() for m in models for p in m.parameters())


@pytest.mark.parametrize("name", list(pl.PRESETS))
def test_preset_params_equal_transformers(name):
    assert pl.load_model(name).params() == _hf_params(name)


def test_published_sizes():
    # Llama-2-70B: 69.0e9 with its 262M-parameter LM head, which classification/retrieval do not load.
    assert abs(pl.load_model("llama-2-70b").params() - 69e9) / 69e9 < 0.02
    assert abs(pl.load_model("llama-2-13b").params() - 13.0e9) / 13.0e9 < 0.02
    assert abs(pl.load_model("bert-base").params() - 110e6) / 110e6 < 0.02
    assert abs(pl.load_model("t5-3b").params() - 1.24e9) / 1.24e9 < 0.02  # the encoder of the 2.85e9 model


@pytest.mark.parametrize("name", list(pl.PRESETS))
@pytest.mark.parametrize("stage", [1, 3])
def test_unipt_below_lora_below_full(name, stage):
    o = pl.Options(batch=4, gpus_per_node=8, nodes=2, zero_stage=stage)
    p = pl.plan(pl.load_model(name), o)
    assert p["unipt"]["per_gpu_gib"] < p["lora"]["per_gpu_gib"] < p["full"]["per_gpu_gib"]
    assert p["unipt"]["max_batch_per_gpu"] >= p["lora"]["max_batch_per_gpu"] >= p["full"]["max_batch_per_gpu"]


def test_zero3_weights_scale_with_world_size():
    model = pl.load_model("llama-2-70b")
    for method in pl.METHODS:
        w = [pl.plan_method(model, method, pl.Options(zero_stage=3, nodes=k))["parts"]["weights"] * 8 * k
             for k in (1, 2, 4, 16)]
        assert max(w) == pytest.approx(min(w), rel=1e-12)
    # Below stage 3 every rank holds the whole bf16 backbone.
    w2 = pl.plan_method(model, "unipt", pl.Options(zero_stage=2, nodes=4))["parts"]["weights"]
    assert w2 * GIB == pytest.approx(2 * model.params())


def test_offload_checkpointing_attention_and_kernels_move_memory():
    model = pl.load_model("llama-2-7b")
    base = pl.plan(model, pl.Options(zero_stage=3, seq_len=2048))
    opt = pl.plan(model, pl.Options(zero_stage=3, seq_len=2048, offload="optimizer"))
    par = pl.plan(model, pl.Options(zero_stage=3, seq_len=2048, offload="param"))
    assert opt["full"]["parts"]["optimizer"] == 0 < base["full"]["parts"]["optimizer"]
    assert opt["full"]["cpu_offload_gib_per_node"] > 0
    assert par["full"]["parts"]["weights"] == 0 and par["full"]["parts"]["zero3_gather"] > 0
    ckpt = pl.plan(model, pl.Options(zero_stage=3, seq_len=2048, activation_checkpointing=True))
    flash = pl.plan(model, pl.Options(zero_stage=3, seq_len=2048, attention="flash"))
    for m in ("full", "lora"):
        assert ckpt[m]["parts"]["activations"] < base[m]["parts"]["activations"] / 10
        assert flash[m]["parts"]["activations"] < base[m]["parts"]["activations"] / 2
    # The reference cross attention's extra (the N x N tensors) grows with N^2 per sample; the fused kernels' does not.
    side = lambda n, k: pl.plan_method(model, "unipt", pl.Options(seq_len=n, side_kernels=k))[  # noqa: E731
        "activation_detail_gib"]["side_network"]
    extra = [side(n, "reference") - side(n, "efficient") for n in (1024, 4096)]
    assert extra[1] / extra[0] > 8 and side(4096, "efficient") / side(1024, "efficient") == pytest.approx(4, rel=1e-3)


# ---- command line and JSON ----------------------------------------------------------------------------------------
def test_json_schema(tmp_path):
    p = _run_json(tmp_path, ["clip-vit-l-14", "--nodes", "2", "--zero-stage", "3", "--batch-size", "8"])
    assert p["inputs"]["world_size"] == 16 and p["inputs"]["zero_stage"] == 3 and p["inputs"]["batch_size"] == 8
    assert [t["name"] for t in p["model"]["towers"]] == ["text", "vision"]
    assert [t["tokens"] for t in p["model"]["towers"]] == [77, 257]
    for m in pl.METHODS:
        r = p[m]
        assert set(r["parts"]) == {"weights", "gradients", "optimizer", "activations", "side_network", "zero3_gather"}
        assert sum(r["parts"].values()) == pytest.approx(r["per_gpu_gib"])
        assert isinstance(r["fits"], bool) and isinstance(r["max_batch_per_gpu"], int)
        assert r["trained_params"] > 0
    assert set(p["unipt"]["activation_detail_gib"]) == {f"{t}.{k}" for t in ("text", "vision") for k in
                                                        ("stored_hidden_states", "side_network", "backbone_forward")}


def test_llama_70b_two_nodes_zero3_printout(capsys):
    assert pl.main(["llama-2-70b", "--gpus-per-node", "8", "--nodes", "2", "--gpu-mem-gib", "80", "--zero-stage", "3",
                    "--dtype", "bf16", "--batch-size", "1", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "16 ranks" in out and "ZeRO-3" in out and "largest batch / GPU" in out
    p = pl.plan(pl.load_model("llama-2-70b"), pl.Options(nodes=2, zero_stage=3, seq_len=4096))
    assert p["unipt"]["fits"] and not p["full"]["fits"]
    assert p["unipt"]["parts"]["weights"] * GIB == pytest.approx(2 * pl.load_model("llama-2-70b").params() / 16)


def test_cli_wiring():
    r = subprocess.run([sys.executable, "-m", "unipt_scale.plan", "bert-base", "--zero-stage", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "bert-base" in r.stdout


@pytest.mark.parametrize("argv, needle", [
    (["llama-3-8b"], "neither a preset"),
    (["/nonexistent/config.json"], "neither a preset"),
    (["bert-base", "--zero-stage", "4"], "--zero-stage 4 is not valid"),
    (["bert-base", "--offload", "param", "--zero-stage", "2"], "needs --zero-stage 3"),
    (["bert-base", "--offload", "optimizer", "--zero-stage", "0"], "needs ZeRO"),
    (["bert-base", "--offload", "disk", "--zero-stage", "3"], "--offload 'disk' is not valid"),
    (["bert-base", "--dtype", "int8"], "--dtype 'int8'"),
    (["bert-base", "--seq-len", "4096"], "use --seq-len <= 512"),
    (["bert-base", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bert-base", "--layers", "last:1"], "at least one more"),
    (["bert-base", "--layers", "0,99"], "out of range"),
    (["bert-base", "--gpu-mem-gib", "1", "--reserve-gib", "2"], "--reserve-gib"),
    (["bert-base", "--json", "/nonexistent/dir/plan.json"], "does not exist"),
])
def test_input_errors_name_the_fix(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(pl, "plan", lambda *a, **k: pytest.fail("planned despite bad input"))
    assert pl.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("unipt plan: error:")


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert pl.main([str(bad)]) == 2 and "cannot read" in capsys.readouterr().err
    gpt2 = _write_config(tmp_path, {"model_type": "gpt2", "n_layer": 12})
    assert pl.main([gpt2]) == 2 and "supported: llama" in capsys.readouterr().err
    partial = _write_config(tmp_path, {"model_type": "llama", "hidden_size": 64})
    assert pl.main([partial]) == 2 and "num_attention_heads" in capsys.readouterr().err
    # a model directory holding config.json works like the file
    assert pl.main([_write_config(tmp_path, SMALL_BERT).rsplit("/", 1)[0]]) == 0


# ---- launch/ ------------------------------------------------------------------------------------------------------
DS_FILES = {"ds_zero1.json": 1, "ds_zero2.json": 2, "ds_zero3.json": 3, "ds_zero3_offload.json": 3}


@pytest.mark.parametrize("name, stage", DS_FILES.items())
def test_deepspeed_configs_parse(name, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    text = open(os.path.join(ROOT, "launch", name)).read()
    assert '"auto"' not in text
    d = json.loads(text)
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & set(d)
    assert d["bf16"]["enabled"] is True and d["gradient_clipping"] == 1.0
    # What the trainer adds from the run config; DeepSpeed then validates every key of the ZeRO section.
    cfg = DeepSpeedConfig(dict(d, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2))
    assert cfg.zero_optimization_stage == stage and cfg.train_batch_size == 8
    offload = name.endswith("offload.json")
    assert (cfg.zero_config.offload_optimizer is not None) == offload
    assert (cfg.zero_config.offload_param is not None) == offload


@pytest.mark.parametrize("name", ["llama2-7b-unipt.yaml", "llama2-70b-unipt.yaml", "t5-3b-unipt.yaml",
                                  "clip-vit-l14-dual-unipt.yaml"])
def test_example_run_configs_load(name, monkeypatch):
    from unipt_scale.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(os.path.join("launch", "configs", name))
    assert cfg.deepspeed.enabled and os.path.isfile(cfg.deepspeed.config)
    assert cfg.backbone.path.startswith("/") and cfg.backbone.dtype == "bfloat16"
    assert cfg.data.source == "shards" and cfg.data.train_shards
    # the micro batch fits by the planner's count on the cluster the file is written for
    preset = {"llama2-7b": "llama-2-7b", "llama2-70b": "llama-2-70b", "t5-3b": "t5-3b",
              "clip-vit-l14-dual": "clip-vit-l-14"}[name[:-len("-unipt.yaml")]]
    stage = json.load(open(cfg.deepspeed.config))["zero_optimization"]["stage"]
    nodes = 2 if "70b" in name else 1
    seq = cfg.data.max_length if not name.startswith("clip") else None
    p = pl.plan_method(pl.load_model(preset), "unipt", pl.Options(batch=cfg.data.batch_size, seq_len=seq,
                                                                   nodes=nodes, zero_stage=stage))
    assert p["fits"], f"{name}: {p['per_gpu_gib']:.1f} GiB per GPU"


def _script(name, args, **env):
    e = dict(os.environ, DRY_RUN="1", **env)
    return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args], capture_output=True, text=True,
                          env=e, timeout=30)


def test_launch_scripts_dry_run():
    r = _script("deepspeed_multinode.sh", ["/runs/x", "launch/ds_zero3.json", "train.max_steps=10"],
                HOSTFILE="launch/hostfile.example")
    assert r.returncode == 0, r.stderr
    for piece in ("--hostfile launch/hostfile.example", "--num_nodes 2", "--num_gpus 8", "--master_addr gpu-node-01",
                  "--module unipt_scale.cli train --config launch/configs/llama2-70b-unipt.yaml",
                  "--output-dir /runs/x", "deepspeed.enabled=true", "deepspeed.config=launch/ds_zero3.json",
                  "train.max_steps=10"):
        assert piece in r.stdout, piece
    r = _script("torchrun_multinode.sh", ["/runs/x"], NUM_NODES="4", GPUS_PER_NODE="4", MASTER_ADDR="10.0.0.1",
                CONFIG="launch/configs/t5-3b-unipt.yaml")
    assert r.returncode == 0, r.stderr
    for piece in ("--nnodes 4", "--nproc_per_node 4", "--rdzv_endpoint 10.0.0.1:29500",
                  "-m unipt_scale.cli train --config launch/configs/t5-3b-unipt.yaml"):
        assert piece in r.stdout, piece
    assert "deepspeed.config=" not in r.stdout  # the run config's own JSON is kept
    r = _script("slurm_multinode.sbatch", ["/runs/x", "launch/ds_zero2.json"], SLURM_NNODES="3",
                SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="77", MASTER_ADDR="n1")
    assert r.returncode == 0, r.stderr
    for piece in ("srun --nodes 3", "torchrun --nnodes 3", "--rdzv_id 77", "deepspeed.config=launch/ds_zero2.json"):
        assert piece in r.stdout, piece


def test_launch_scripts_refuse_bad_setup():
    r = _script("deepspeed_multinode.sh", ["/runs/x"], HOSTFILE="/nonexistent/hostfile")
    assert r.returncode == 2 and "hostfile.example" in r.stderr
    r = _script("torchrun_multinode.sh", ["/runs/x"], CONFIG="launch/configs/missing.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_multinode.sbatch"), "/runs/x"],
                       capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "DRY_"))})
    assert r.returncode == 2 and "sbatch" in r.stderr
    r = _script("torchrun_multinode.sh", [])
    assert r.returncode == 2 and "usage" in r.stderr
