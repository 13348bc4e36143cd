"""`unipt plan` against arithmetic done by hand, against memory measured on tiny torch models, and the launch/ files.

Measured here (CPU, bf16): parameters, gradients (after a real backward), optimizer state (a real AdamW step on
fp32 masters) and activations (unique storages autograd saves during one forward, parameters excluded). The
CPU keeps dropout masks and LayerNorm statistics in the input dtype where CUDA uses bool/fp32, so the plan is
evaluated with `cpu_profile` for these comparisons. Activation predictions for the tiny models land within
2.1% (full and LoRA exactly or within 0.1%); ACT_TOL = 3% leaves room only for the small per-sample tensors
(pooled vectors, masks) the planner does not itemise. Language modelling (a tiny Llama with a 1000-token untied
head through unipt_scale.lm.CausalLMModel): saved-for-backward bytes of UniPT, LoRA and full fine-tuning within
0.4%, the LM losses' peaks within 1.1% (live bytes followed through glibc's mallinfo2 after every aten op), the KV
cache, the SideCache and the ladder's cache after generate() exactly, generation's transients and a chunked
prefill within 16% alone (tolerance GEN_TOL, 20%: the allocator's history moves them).
"""
from __future__ import annotations

import dataclasses
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
    # output 3*2*32 + 8, row sums 2*4, mask 1 = 408 + 200 + 8 + 1 = 617 per token (no merged M_i: the fused
    # attention-aggregation never forms them), and per sample the gate's anchor, layer means, their product and α:
    # (2*2 + 1)*2*32 + 2*2 = 324. Less than the frozen forward's one-layer working set (2512):
    # (384 + 2512) * 32 = 92672.
    assert b("unipt", "activations") == pytest.approx(92672)
    assert p["unipt"]["activation_detail_gib"]["side_network"] * GIB == pytest.approx(617 * 32 + 2 * 324)
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


# ---- causal LM (task causal_lm): training through the frozen LM head, the LM loss, generation ------------------
TINY_LM = dict(model_type="llama", num_hidden_layers=3, hidden_size=64, intermediate_size=172, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False)


def _tiny_lm_dir(root, **over):
    """A tiny LlamaForCausalLM checkpoint (untied head unless tie_word_embeddings) with the tiny tokenizer."""
    import transformers
    from tiny_models import tiny_tokenizer

    cfg = dict(TINY_LM, **over)
    d = os.path.join(str(root), "lm-" + "-".join(f"{k}{v}" for k, v in sorted(over.items())))
    if not os.path.isdir(d):
        torch.manual_seed(0)
        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields, pad_token_id=0, bos_token_id=2,
                                                               eos_token_id=3)).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
    return d, cfg


def _lm_model(path, method, dtype=torch.bfloat16, *extra):
    from unipt_scale.config import load_config
    from unipt_scale.model import build_model

    cfg = load_config(None, [f"backbone.path={path}", "task.kind=causal_lm", "data.source=jsonl",
                             "data.path=/dev/null", f"method={method}", *extra])
    return build_model(cfg).to(dtype)


def _saved_bytes_of(fn, module):
    """Unique storages autograd keeps during fn(), not counting the module's parameters and buffers (the head)."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _lm_batch(B, N, vocab=1000):
    ids = torch.randint(5, vocab, (B, N))
    return {"input_ids": ids, "attention_mask": torch.ones(B, N, dtype=torch.long), "labels": ids.clone()}


@pytest.mark.parametrize("method, kernels", [("unipt", "efficient"), ("unipt", "reference"), ("lora", "efficient"),
                                             ("full", "efficient")])
def test_causal_lm_training_bytes_match_measured(tmp_path, method, kernels):
    """A training step of unipt_scale.lm.CausalLMModel (bf16, every position labelled): what autograd saves, against
    the planner's causal side network (prefix means) or backbone activations plus the chunked loss's saved rows."""
    path, cfg = _tiny_lm_dir(tmp_path)
    model = _lm_model(path, method, torch.bfloat16, f"unipt.kernels={kernels}", "task.loss_chunk_tokens=16").train()
    model.backbone.model.set_attn_implementation("eager")  # the attention the tests above measure
    B, N = 2, 32
    measured, (loss, _) = _saved_bytes_of(lambda: model.training_loss(_lm_batch(B, N)), model)
    loss.backward()
    o = pl.Options(batch=B, seq_len=N, gpus_per_node=1, zero_stage=0, task="causal_lm", lm_loss="chunked",
                   loss_chunk_tokens=16, side_kernels=kernels, profile=pl.cpu_profile(2))
    m = pl.model_from_config(cfg, "tiny-lm")
    r = pl.plan_method(m, method, o)
    loss_saved = B * pl.lm_loss_bytes(m.towers[0], "chunked", B, o)["per_sample"]
    if method == "unipt":
        d = r["activation_detail_gib"]
        pred = (d["stored_hidden_states"] + d["side_network"]) * GIB + loss_saved
    else:
        pred = r["parts"]["activations"] * GIB + loss_saved
    _close(pred, measured, ACT_TOL, f"causal_lm {method}/{kernels} saved for backward")
    # the frozen untied head: a V x D buffer of the task model
    assert r["parts"]["lm_head"] * GIB == model.lm_head_weight.nbytes == 2 * 1000 * 64
    assert r["lm_loss"] == "chunked"


def test_causal_side_network_terms_are_the_bidirectional_ones_plus_prefix_means():
    """The causal form keeps what the bidirectional one keeps plus the per-position gate's prefix means and, with
    the fused kernels, the merged M_i its aggregation keeps (the bidirectional form's fused op never forms them)."""
    m = pl.model_from_config(TINY_LM, "tiny-lm")
    t = m.towers[0]
    side = lambda task, k: pl.tower_activations(t, "unipt", pl.Options(seq_len=64, task=task, side_kernels=k))[  # noqa
        "detail"]["side_network"]
    L, d = t.layers + 1, 32
    gate = (2 * (L - 1) + 1) * 2 * d + (L - 1) * 2  # the per-sequence gate's, once per sample: not in the causal form
    assert side("causal_lm", "efficient") - side("classification", "efficient") == 64 * (
        L * 2 * d + 4 + 3 * 2 + (L - 1) * 2 * d) - gate
    assert side("causal_lm", "reference") - side("classification", "reference") == 64 * (
        (2 * (L - 1) + 1) * 2 * d + (L - 1) * 2 + 3 * 2 + 2 * 64) - gate


# Generation's live-byte peaks against the plan: alone the prompt's forward measures 2 % above the plan, after the
# rest of the suite 16 % below it (two hidden-state tensors of the batch fewer, from the allocator's history), so
# these comparisons allow 20 %.
GEN_TOL = 0.20


class _LiveBytes:
    """Peak bytes the C allocator holds, sampled after every aten op (a TorchDispatchMode), above the level at
    entry. Large blocks are mmapped (the threshold is fixed at 128 KiB, so glibc does not raise it) and returned
    at free, so mallinfo2 follows tensors as they are allocated and freed. Temporaries inside one op are not seen.
    What ran earlier in the process moves a peak by a few tensors (GEN_TOL)."""

    def __init__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
            fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                      "fordblks", "keepcost")
            self.info = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
            self.libc.mallinfo2.restype = self.info
        except (OSError, AttributeError):
            pytest.skip("needs glibc's mallinfo2 to follow allocations")
        self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD

    def now(self) -> int:
        m = self.libc.mallinfo2()
        return m.hblkhd + m.uordblks

    def trace(self, fn):
        """fn() under the mode (after one warm-up call); returns the live bytes above entry after every op, also
        kept in self.log while it runs (len(self.log) marks where a phase starts)."""
        from torch.utils._python_dispatch import TorchDispatchMode

        live = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                live.log.append(live.now() - base)
                return out

        import gc

        self.log = []
        fn()  # warm up (lazy initialisations)
        base = self.now()
        with Mode():  # and the mode's own first use (its lazy imports hold tens of MB), whatever ran before
            torch.ones(1).add_(1)
        self.log = []
        # No cyclic collection inside the measurement: when it runs would depend on everything the process did
        # before (other tests), and a collection that frees garbage mid-trace changes the peak.
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            base = self.now()
            with Mode():
                fn()
        finally:
            if enabled:
                gc.enable()
        return self.log


def test_lm_loss_working_set_matches_measured():
    """The chunked loss holds one chunk's logits (4 + P B per logit: fp32 logits made probabilities in place, and
    the 16-bit head's product and cast); the full loss, as transformers
    computes it (ForCausalLMLoss upcasts the model's logits), (12 + P) B per logit of B x N x V at its backward."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from unipt_scale.lm import chunked_lm_loss

    live = _LiveBytes()
    B, N, D, V, chunk = 4, 128, 64, 8000, 64
    t = pl.model_from_config(dict(TINY_LM, vocab_size=V, hidden_size=D), "lm").towers[0]
    o = pl.Options(batch=B, seq_len=N, task="causal_lm", loss_chunk_tokens=chunk)
    w = torch.randn(V, D, dtype=torch.bfloat16) * 0.1
    labels = torch.randint(0, V, (B, N))
    h = torch.randn(B, N, D, dtype=torch.bfloat16, requires_grad=True)

    def chunked():
        rows = h[:, :-1].reshape(-1, D)
        chunked_lm_loss(rows, w, labels[:, 1:].reshape(-1), chunk).backward()

    def full():
        logits = torch.nn.functional.linear(h, w)  # held, as a model's output holds them
        ForCausalLMLoss(logits, labels, V).backward()

    for kind, fn in (("chunked", chunked), ("full", full)):
        b = pl.lm_loss_bytes(t, kind, B, o)
        _close(B * b["per_sample"] + b["constant"], max(live.trace(fn)), 0.15, f"{kind} LM loss peak")
    assert pl.lm_loss_bytes(t, "chunked", B, o)["constant"] == (4 + 2) * chunk * V


def test_full_lm_loss_saves_fp32_log_probabilities(tmp_path):
    """transformers' LM loss keeps log-softmax's fp32 output (4 B per logit) and returns the P-byte logits: what
    the planner's full-logits term is made of, beside the base model's activations."""
    import transformers

    path, cfg = _tiny_lm_dir(tmp_path)
    lm = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").to(torch.bfloat16).train()
    lm.lm_head.requires_grad_(False)  # frozen, as unipt_scale.lm.CausalLMModel holds it
    batch = _lm_batch(2, 32)
    with_loss, out = _saved_bytes_of(lambda: lm(**batch), lm)
    base, _ = _saved_bytes_of(lambda: lm.model(input_ids=batch["input_ids"]), lm)
    _close(4 * 2 * 32 * 1000, with_loss - base, ACT_TOL, "log-softmax output saved by the full LM loss")
    assert out.logits.nbytes == 2 * 2 * 32 * 1000


def _capture_caches(model):
    """Wrap the model's incremental steps so the caches they return are kept: {"kv": DynamicCache, "side": ...}."""
    import unipt_scale.generation as lm

    caps = {}
    side = getattr(model.encoder, "side", None)
    if side is None:
        real = lm._backbone_cached

        def cached(*a, **k):
            y, past = real(*a, **k)
            caps["kv"] = past
            return y, past

        return caps, ("_backbone_cached", cached)
    bb, step = model.encoder.backbone, side.step

    def fwd(*a, real=bb.forward_cached, **k):
        states, past = real(*a, **k)
        caps["kv"] = past
        return states, past

    def side_step(*a, **k):
        y, cache = step(*a, **k)
        caps["side"] = cache
        return y, cache

    bb.forward_cached, side.step = fwd, side_step
    return caps, None


@pytest.mark.parametrize("method", ["unipt", "lora", "ladder"])
def test_generation_caches_match_measured(tmp_path, monkeypatch, method):
    """After unipt_scale.generation.generate, the KV cache and UniPT's SideCache hold exactly what the planner counts."""
    import unipt_scale.generation as lm

    path, cfg = _tiny_lm_dir(tmp_path)
    model = _lm_model(path, method, torch.bfloat16).eval()
    caps, patch = _capture_caches(model)
    if patch:
        monkeypatch.setattr(lm, *patch)
    B, prompt, new = 3, 40, 6
    b = _lm_batch(B, prompt)
    lm.generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=new)
    n = prompt + new - 1  # the last token is produced, not fed back
    g = pl.generation_bytes(pl.model_from_config(cfg, "tiny-lm").towers[0], method,
                            pl.Options(batch=B, seq_len=n, generate=True))
    kv = sum(x.nbytes for layer in caps["kv"].layers for x in (layer.keys, layer.values))
    assert kv == B * g["kv_cache"] == B * 2 * 3 * (2 * 16) * n * 2
    if method == "unipt":
        c = caps["side"]
        assert tuple(c.targets.shape) == (3, B, n, 32)  # the interacting layers' projected states
        side = sum(x.nbytes for x in (c.targets, c.mask, c.anchor_sum, c.target_sum, c.count))
        assert side == B * g["side_cache"]
    elif method == "ladder":
        c = caps["side"]
        d = 64 // 16  # TINY_LM's width over ladder.reduction
        assert len(c.blocks) == 3 and tuple(c.blocks[0].keys.filled.shape)[-2:] == (n, d)
        side = sum(b.keys.filled.nbytes + b.values.filled.nbytes for b in c.blocks)
        side += c.key_mask.filled.nbytes + c.count.nbytes
        assert side == B * g["side_cache"] == B * (3 * 2 * n * d * 2 + n + 4)
    else:
        assert g["side_cache"] == 0 and "side" not in caps


@pytest.mark.parametrize("method", ["unipt", "lora", "ladder"])
def test_generation_transients_match_measured(tmp_path, monkeypatch, method):
    """Live bytes while generate runs (fp32, so the CPU path makes no dtype copies) against the planner's phases:
    the prompt's frozen forward, UniPT's side network over the prompt, and the last decoding step."""
    import unipt_scale.generation as lm

    live = _LiveBytes()
    path, cfg = _tiny_lm_dir(tmp_path, hidden_size=256, intermediate_size=512)
    model = _lm_model(path, method, torch.float32, "unipt.kernels=efficient").eval()
    marks = []

    def marked(kind, real):
        def call(*a, **k):
            marks.append((kind, len(live.log)))
            return real(*a, **k)
        return call

    if method in ("unipt", "ladder"):
        bb, side = model.encoder.backbone, model.encoder.side
        bb.forward_cached = marked("backbone", bb.forward_cached)
        side.step = marked("side", side.step)
    else:
        monkeypatch.setattr(lm, "_backbone_cached", marked("backbone", lm._backbone_cached))
    B, N, new = 4, 64, 3
    b = _lm_batch(B, N)

    def run():
        marks.clear()
        lm.generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=new)

    log = live.trace(run)
    assert method == "lora" or model.encoder.backbone._capture is True  # hooks keep only the tapped states
    steps = [i for kind, i in marks if kind == "backbone"]
    assert len(steps) == new
    t = pl.model_from_config(cfg, "tiny-lm").towers[0]
    g = pl.generation_bytes(t, method, pl.Options(batch=B, seq_len=N, generate=True, dtype="fp32",
                                                  attention="flash"))  # transformers' default: sdpa
    if method in ("unipt", "ladder"):
        side_start = [i for kind, i in marks if kind == "side"][0]
        _close(B * (g["prefill_backbone"] + g["kv_cache"]), max(log[:side_start]), GEN_TOL, "prompt's frozen forward")
        _close(B * (g["prefill_side"] + g["kv_cache"] + g["side_cache"]), max(log[side_start:steps[1]]),
               GEN_TOL, "side network over the prompt")
    else:
        _close(B * (g["prefill_backbone"] + g["kv_cache"]), max(log[:steps[1]]), GEN_TOL, "prompt's frozen forward")
    # the last step extends caches of N + new - 2 positions by one
    last = pl.generation_bytes(t, method, pl.Options(batch=B, seq_len=N + new - 1, generate=True, dtype="fp32"))
    _close(B * last["decode_step"], max(log[steps[-1]:]) - log[steps[-1] - 1], GEN_TOL, "one decoding step")


@pytest.mark.parametrize("method", ["unipt", "lora", "ladder"])
def test_a_chunked_prefill_holds_what_the_plan_says(tmp_path, monkeypatch, method):
    """generate(prefill_chunk=16) on a 64-token prompt: the live bytes of the prompt's forward (every chunk, the KV
    cache growing to the whole prompt) against the planner's caches plus its transient at --prefill-chunk 16."""
    import unipt_scale.generation as lm

    live = _LiveBytes()
    path, cfg = _tiny_lm_dir(tmp_path, hidden_size=256, intermediate_size=512)
    model = _lm_model(path, method, torch.float32, "unipt.kernels=efficient").eval()
    marks = []
    if method == "lora":
        real = lm._backbone_cached
        monkeypatch.setattr(lm, "_backbone_cached", lambda *a, **k: (marks.append(len(live.log)), real(*a, **k))[1])
    else:
        bb = model.encoder.backbone
        real = bb.forward_cached
        bb.forward_cached = lambda *a, **k: (marks.append(len(live.log)), real(*a, **k))[1]
    B, N, chunk = 4, 64, 16
    b = _lm_batch(B, N)

    def run():
        marks.clear()
        lm.generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=2, prefill_chunk=chunk)

    log = live.trace(run)
    assert method == "lora" or model.encoder.backbone._capture is True
    assert len(marks) == N // chunk + 1  # four chunks, then one decoding step
    t = pl.model_from_config(cfg, "tiny-lm").towers[0]
    o = dict(batch=B, seq_len=N, generate=True, dtype="fp32", attention="flash")
    g = pl.generation_bytes(t, method, pl.Options(**o, prefill_chunk=chunk))
    whole = pl.generation_bytes(t, method, pl.Options(**o))
    planned = B * (g["kv_cache"] + g["side_cache"] + max(g["prefill_backbone"], g["prefill_side"]))
    _close(planned, max(log[:marks[-1]]), GEN_TOL, "chunked prefill")
    assert max(g["prefill_backbone"], g["prefill_side"]) < max(whole["prefill_backbone"], whole["prefill_side"])


def test_hand_computed_small_llama_causal_lm(tmp_path, capsys):
    cfg = _write_config(tmp_path, TINY_LM)
    p = _run_json(tmp_path, [cfg, "--task", "causal_lm", "--gpus-per-node", "1", "--zero-stage", "0",
                             "--batch-size", "2", "--seq-len", "16"])
    b = lambda method, part: p[method]["parts"][part] * GIB  # noqa: E731
    # The untied frozen head: 1000 x 64 in bf16, the same for every method.
    assert all(b(m, "lm_head") == 2 * 1000 * 64 for m in pl.METHODS)
    # UniPT's chunked loss: 15 predicted rows per sequence keep their gradient row and a mask byte (2*64 + 1) = 129 B:
    # 2 * 15 * 129 = 3870; one chunk of min(1024, 30) rows x 1000 logits x (4 + 2) B = 180000.
    assert p["unipt"]["lm_loss"] == "chunked" and b("unipt", "lm_loss") == 3870 + 180000
    # LoRA and full, by default, the model's B x N x V logits: 2 * 16 * 1000 * (12 + 2) = 448000.
    assert p["lora"]["lm_loss"] == p["full"]["lm_loss"] == "full"
    assert b("lora", "lm_loss") == b("full", "lm_loss") == 448000
    out = capsys.readouterr().out
    assert "LM head (frozen)" in out and "LM loss" in out and "the default: chunked for UniPT" in out
    # The causal side network: per token the bidirectional set plus (3 + 1) * 2 * 32 prefix means, a 4-byte
    # log-sum-exp and 3 * 2 B of mask and counts = 266, and the 3 * 2 * 32 = 192 B of merged M_i its aggregation
    # keeps (the bidirectional form's fused attention-aggregation does not): 458; less, per sample, the
    # bidirectional gate's anchor, layer means, their product and α: (2*3 + 1)*2*32 + 3*2 = 454.
    cls = _run_json(tmp_path, [cfg, "--gpus-per-node", "1", "--zero-stage", "0", "--batch-size", "2",
                               "--seq-len", "16"])
    extra = (p["unipt"]["activation_detail_gib"]["side_network"]
             - cls["unipt"]["activation_detail_gib"]["side_network"]) * GIB
    assert extra == pytest.approx(2 * 16 * 458 - 2 * 454)
    assert "lm_head" not in cls["unipt"]["parts"] and "task" not in cls["inputs"]
    # --lm-loss chunked puts LoRA and full on UniPT's loss.
    c = _run_json(tmp_path, [cfg, "--task", "causal_lm", "--gpus-per-node", "1", "--zero-stage", "0",
                             "--batch-size", "2", "--seq-len", "16", "--lm-loss", "chunked"])
    assert {c[m]["parts"]["lm_loss"] for m in pl.METHODS} == {(3870 + 180000) / GIB}
    assert "--lm-loss chunked" in capsys.readouterr().out


def test_hand_computed_small_llama_generation(tmp_path, capsys):
    cfg = _write_config(tmp_path, TINY_LM)
    p = _run_json(tmp_path, [cfg, "--generate", "--gpus-per-node", "1", "--zero-stage", "0", "--batch-size", "2",
                             "--seq-len", "16"])
    assert p["mode"] == "generate" and p["inputs"]["task"] == "causal_lm"
    b = lambda method, part: p[method]["parts"][part] * GIB  # noqa: E731
    # KV cache: 2 (k, v) * 3 layers * 2 kv heads * 16 head dim * 16 tokens * 2 sequences * 2 B = 12288, every method.
    assert all(b(m, "kv_cache") == 12288 for m in pl.METHODS)
    # Side cache: 3 interacting layers * 16 tokens * d=32 * 2 B = 3072, mask 16, prefix sums 4 * 32 * 2 = 256,
    # count 2 -> 3346 per sequence.
    assert b("unipt", "side_cache") == 2 * 3346 and b("lora", "side_cache") == b("full", "side_cache") == 0
    # The ladder (d = 64 // 16 = 4): 3 blocks * (k, v) * 16 tokens * 4 * 2 B = 768, mask 16, fp32 count 4 -> 788.
    assert p["columns"] == [*pl.METHODS, "ladder"] and b("ladder", "side_cache") == 2 * 788
    assert b("ladder", "side_network") == 2 * pl.trained_params(pl.model_from_config(TINY_LM, "x"), "ladder",
                                                                 pl.Options())
    assert b("unipt", "side_network") == 2 * pl.trained_params(pl.model_from_config(TINY_LM, "x"), "unipt",
                                                                pl.Options())
    # LoRA r=8 on q (64 -> 64) and v (64 -> 32, the kv heads) of 3 layers, unmerged, 2 B each.
    assert b("lora", "adapters") == 2 * 3 * 8 * ((64 + 64) + (64 + 32)) and "adapters" not in p["full"]["parts"]
    assert all(b(m, "lm_head") == 128000 for m in pl.METHODS)
    for m in pl.METHODS:
        assert sum(p[m]["parts"].values()) == pytest.approx(p[m]["per_gpu_gib"])
    out = capsys.readouterr().out
    assert "KV cache" in out and "side cache" in out and "incremental decoding" in out


def test_causal_lm_presets():
    """Llama-2 at 4k context: the head is untied; the cache and loss terms are what the formulas say at scale."""
    m7, m70 = pl.load_model("llama-2-7b"), pl.load_model("llama-2-70b")
    assert pl.lm_head_params(m7.towers[0]) == 32000 * 4096 and pl.lm_head_params(m70.towers[0]) == 32000 * 8192
    # 70B with the head: the published 69.0e9.
    assert abs(m70.params() + pl.lm_head_params(m70.towers[0]) - 69e9) / 69e9 < 0.01
    gen = lambda m, **k: pl.plan(m, pl.Options(batch=8, seq_len=4096, generate=True, attention="flash",  # noqa
                                               **k))
    g7 = gen(m7, gpus_per_node=1, zero_stage=0)
    # 2 * 32 layers * 4096 * 4096 tokens * 8 * 2 B = 16 GiB; the side cache 32 * 8 * 4096 * 2048 * 2 B = 4 GiB
    # (+ about 1 MiB of mask and prefix sums).
    assert g7["unipt"]["parts"]["kv_cache"] == g7["lora"]["parts"]["kv_cache"] == 16
    assert g7["unipt"]["parts"]["side_cache"] == pytest.approx(4, abs=0.01)
    # 70B's grouped-query attention (8 kv heads) makes its KV cache small next to a d = 4096 side cache over 80 layers.
    g70 = gen(m70, nodes=2, zero_stage=3)
    assert g70["unipt"]["parts"]["kv_cache"] == 10 and g70["unipt"]["parts"]["side_cache"] > 19.9
    # ZeRO-3 partitions the weights but not the head (a buffer).
    assert g70["unipt"]["parts"]["weights"] * GIB == pytest.approx(2 * m70.params() / 16)
    assert g70["unipt"]["parts"]["lm_head"] * GIB == 2 * 32000 * 8192
    tr = pl.plan(m7, pl.Options(seq_len=4096, gpus_per_node=1, zero_stage=0, task="causal_lm", attention="flash"))
    assert tr["unipt"]["fits"] and not tr["full"]["fits"]
    # the chunked loss does not grow with the micro batch's tokens, the full logits do
    assert tr["unipt"]["parts"]["lm_loss"] < 0.6 < 1.7 < tr["lora"]["parts"]["lm_loss"]
    tied = pl.model_from_config(dict(pl.PRESETS["llama-2-7b"], tie_word_embeddings=True), "tied")
    assert pl.plan_method(tied, "unipt", pl.Options(task="causal_lm"))["parts"]["lm_head"] == 0


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
    (["bert-base", "--task", "causal_lm"], "needs a decoder LLM"),
    (["t5-base", "--generate"], "needs a decoder LLM"),
    (["llama-2-7b", "--task", "causal"], "--task 'causal' is not valid"),
    (["llama-2-7b", "--task", "causal_lm", "--lm-loss", "fused"], "--lm-loss 'fused' is not valid"),
    (["llama-2-7b", "--lm-loss", "chunked"], "add --task causal_lm"),
    (["llama-2-7b", "--generate", "--task", "retrieval"], "drop --task retrieval"),
    (["llama-2-7b", "--task", "causal_lm", "--loss-chunk-tokens", "0"], "--loss-chunk-tokens must be >= 1"),
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
    r = _script("deepspeed_multinode.sh", ["/runs/x", "launch/ds_zero2.json"], HOSTFILE="launch/hostfile.example",
                GRID="train.lr=1e-4,3e-4 train.seed=0,1")
    assert r.returncode == 0, r.stderr
    printed = r.stdout.replace("\\,", ",")  # printf %q escapes the commas
    assert ("--module unipt_scale.cli sweep --config launch/configs/llama2-70b-unipt.yaml --output-dir /runs/x "
            "--grid train.lr=1e-4,3e-4 --grid train.seed=0,1 deepspeed.enabled=true") in printed, r.stdout
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


# ---- quantized base (--quantization int8 | nf4) --------------------------------------------------------------------
# Input widths are multiples of 64 and output widths of 32: bitsandbytes' CPU repack of a 4-bit layer needs both.
TINY_Q = {
    "llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=128, intermediate_size=384,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64),
    "bert": dict(model_type="bert", num_hidden_layers=2, hidden_size=128, intermediate_size=512,
                 num_attention_heads=4, vocab_size=1000, max_position_embeddings=64, type_vocab_size=2),
}


def _quantized_dir(root, family):
    import transformers as tf

    d = os.path.join(str(root), f"q-{family}")
    torch.manual_seed(0)
    fields = {k: v for k, v in TINY_Q[family].items() if k != "model_type"}
    model = tf.LlamaModel(tf.LlamaConfig(**fields)) if family == "llama" else tf.BertModel(tf.BertConfig(**fields))
    model.save_pretrained(d)
    return d


@pytest.mark.parametrize("family", list(TINY_Q))
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_weight_bytes_match_measured(tmp_path, family, scheme):
    """Resident bytes of a transformers model loaded through BitsAndBytesConfig on the CPU (every storage once:
    parameters, buffers, SCB, the 4-bit quant_state) against the planner's weights; nf4 at load (the double-quantized
    layout CUDA keeps) and, where bitsandbytes repacks it at the first no-grad forward, in its CPU layout."""
    import logging

    import transformers as tf
    from unipt_scale.quantization import frozen_weight_bytes

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    q = (tf.BitsAndBytesConfig(load_in_8bit=True) if scheme == "int8" else
         tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True))
    model = tf.AutoModel.from_pretrained(_quantized_dir(tmp_path, family), quantization_config=q, device_map="cpu",
                                         dtype=torch.bfloat16)
    m = pl.model_from_config(TINY_Q[family], family)
    planned = lambda layout: pl.backbone_weight_bytes(m, pl.Options(quantization=scheme, quant_layout=layout))  # noqa
    measured = frozen_weight_bytes(model, frozen_only=False)
    _close(planned("cuda"), measured, 0.15, f"{family}/{scheme} quantized weights")
    assert planned("cuda") < 0.7 * 2 * m.params()  # the embeddings stay in bf16
    if scheme == "nf4":
        with torch.no_grad():
            model.eval()(input_ids=torch.randint(0, 1000, (1, 8)))
        layers = [x for x in model.modules() if hasattr(getattr(x, "weight", None), "quant_state")]
        if getattr(layers[0].weight.quant_state, "packing_format_for_cpu", False):
            _close(planned("cpu"), frozen_weight_bytes(model, frozen_only=False), 0.15, f"{family}/nf4 CPU layout")


def test_hand_computed_quantized_llama_bytes():
    """The tiny Llama's 14 Linears (393216 weights; 1280 output rows a layer) by hand."""
    m = pl.model_from_config(TINY_Q["llama"], "q")
    rest = m.params() - 393216  # embeddings 128000 + 5 norms x 128
    assert rest == 128640 and pl.quantized_params(m) == 393216
    o = lambda q, **k: pl.Options(quantization=q, **k)  # noqa: E731
    # int8: one byte a weight + an fp32 scale per output row (2 x 1280 rows).
    assert pl.backbone_weight_bytes(m, o("int8")) == 393216 + 4 * 2560 + 2 * rest
    # nf4 double-quantized: half a byte a weight, one 8-bit absmax per 64 (6144), an fp32 scale per 256 blocks (13 a
    # layer: q, k, v, o 1 each, gate/up/down 3 each), and per Linear the 16 + 256 entry codes and an offset (1092 B).
    assert pl.backbone_weight_bytes(m, o("nf4")) == 196608 + 6144 + 4 * 26 + 14 * 1092 + 2 * rest
    # bitsandbytes' CPU layout: a bf16 absmax per 64 and the 16-entry code and the offset.
    assert pl.backbone_weight_bytes(m, o("nf4", quant_layout="cpu")) == 196608 + 2 * 6144 + 14 * 68 + 2 * rest
    # QLoRA upcasts what is not quantized to fp32.
    assert pl.backbone_weight_bytes(m, o("nf4"), "lora") - pl.backbone_weight_bytes(m, o("nf4")) == 2 * rest
    # The de-quantization working set: the largest Linear (128 x 384) in bf16; int8 only for QLoRA's backward.
    assert pl.dequant_bytes(m, o("nf4"), "unipt") == pl.dequant_bytes(m, o("nf4"), "lora") == 2 * 128 * 384
    assert pl.dequant_bytes(m, o("int8"), "unipt") == 0 < pl.dequant_bytes(m, o("int8"), "lora")
    # T5's MLP output (wo) stays unquantized; BERT's pooler is quantized.
    t5 = pl.model_from_config(TINY["t5"][0], "t5")
    assert pl.quantized_params(t5) == 3 * (4 * 128 * 128 + 128 * 512)
    bert = pl.model_from_config(TINY_Q["bert"], "bert")
    assert pl.quantized_params(bert) == 2 * (4 * 128 * 128 + 2 * 128 * 512) + 128 * 128


def test_quantized_plan_columns_and_json(tmp_path, capsys):
    cfg = _write_config(tmp_path, TINY_Q["llama"])
    p = _run_json(tmp_path, [cfg, "--gpus-per-node", "1", "--seq-len", "32", "--quantization", "nf4"])
    assert p["columns"] == ["unipt", "qlora", "lora", "full"] and p["inputs"]["quantization"] == "nf4"
    assert "refused" in p["full"] and not p["full"]["fits"]
    m = pl.model_from_config(TINY_Q["llama"], "q")
    o = pl.Options(gpus_per_node=1, seq_len=32, quantization="nf4")
    assert p["unipt"]["parts"]["weights"] * GIB == pl.backbone_weight_bytes(m, o)
    assert p["lora"]["parts"]["weights"] * GIB == 2 * (m.params() + p["lora"]["trained_params"])  # the bf16 base
    assert p["qlora"]["parts"]["weights"] * GIB == pl.backbone_weight_bytes(m, o, "lora") + 2 * p["qlora"][
        "trained_params"]
    assert p["unipt"]["parts"]["dequant"] * GIB == 2 * 128 * 384 and "dequant" not in p["lora"]["parts"]
    for k in ("unipt", "qlora", "lora"):
        assert sum(p[k]["parts"].values()) == pytest.approx(p[k]["per_gpu_gib"])
    assert p["model"]["quantization"]["weight_bytes"] == pl.backbone_weight_bytes(m, o)
    out = capsys.readouterr().out
    assert "QLoRA" in out and "refused" in out and "dequant working set" in out and "LoRA bf16" in out
    # LLM.int8 keeps every int8 Linear's input for QLoRA's backward; NF4 keeps only its weight.
    acts = {q: pl.plan_method(m, "lora", pl.Options(seq_len=32, quantization=q))["parts"]["activations"]
            for q in ("none", "int8", "nf4")}
    assert acts["nf4"] == acts["none"] < acts["int8"]
    g = _run_json(tmp_path, [cfg, "--generate", "--gpus-per-node", "1", "--seq-len", "32", "--quantization", "int8"])
    assert g["unipt"]["parts"]["weights"] * GIB == pl.backbone_weight_bytes(m, pl.Options(quantization="int8"))


@pytest.mark.parametrize("argv, needle", [
    (["llama-2-7b", "--quantization", "int4"], "--quantization 'int4' is not valid"),
    (["llama-2-7b", "--quantization", "nf4", "--zero-stage", "3"], "use --zero-stage 0-2"),
])
def test_quantization_errors_name_the_fix(argv, needle, capsys):
    assert pl.main(argv) == 2 and needle in capsys.readouterr().err


def test_unipt_forward_keeps_only_the_tapped_states():
    """The hooked frozen forward: beside the tapped states only the untapped block input/output in flight."""
    m = pl.model_from_config(dict(TINY_Q["llama"], num_hidden_layers=6), "q")
    t = m.towers[0]
    n, P, h = 32, 2, 128
    work = n * sum(pl.layer_saved(t, n, frozenset(t.linears()), True, P).values())
    fwd = lambda layers: pl.tower_activations(t, "unipt", pl.Options(seq_len=n, layers=layers))["detail"]  # noqa
    assert fwd("all")["backbone_forward"] == work  # every state is tapped (stored)
    assert fwd("every:2")["backbone_forward"] == work + n * P * h  # 0, 2, 4, 6: one of a block's two untapped
    assert fwd("every:3")["backbone_forward"] == work + 2 * n * P * h  # 0, 3, 6: both of block 1's
    # the final output is kept beside the taps when the last hidden state is not tapped
    assert fwd("0,3")["stored_hidden_states"] == 3 * n * P * h
    assert fwd("last:2")["stored_hidden_states"] == 2 * n * P * h


def test_a_tied_lm_head_is_held_whole_under_zero3_only(tmp_path):
    """ZeRO-3 partitions the embeddings a tied head shares, so the task model reads that matrix whole (as it holds
    an untied head): V x D more per rank under ZeRO-3, nothing more below it."""
    cfg = _write_config(tmp_path, {**TINY_LM, "tie_word_embeddings": True})
    head = {}
    for stage in (2, 3):
        p = _run_json(tmp_path, [cfg, "--task", "causal_lm", "--gpus-per-node", "2", "--zero-stage", str(stage),
                                 "--batch-size", "1", "--seq-len", "16"])
        head[stage] = p["unipt"]["parts"]["lm_head"] * GIB
    assert head[2] == 0 and head[3] == 2 * 1000 * 64  # bf16


@pytest.mark.parametrize("blocks, heads", [(1, 0), (2, 2)])
def test_deep_side_network_bytes_match_measured(tmp_path, blocks, heads):
    """--side-blocks: the deep causal side network's parameters (as built), what its training step saves for
    backward (bf16, CPU), and its blocks' keys and values in the side cache after generation."""
    from unipt_scale.generation import generate
    from unipt_scale.model import count_parameters

    path, cfg = _tiny_lm_dir(tmp_path)
    extra = [f"unipt.side_blocks={blocks}", f"unipt.side_heads={heads}", "task.loss_chunk_tokens=16"]
    model = _lm_model(path, "unipt", torch.bfloat16, *extra).train()
    B, N = 2, 32
    measured, (loss, _) = _saved_bytes_of(lambda: model.training_loss(_lm_batch(B, N)), model)
    loss.backward()
    o = pl.Options(batch=B, seq_len=N, gpus_per_node=1, zero_stage=0, task="causal_lm", lm_loss="chunked",
                   loss_chunk_tokens=16, side_blocks=blocks, side_heads=heads, profile=pl.cpu_profile(2))
    m = pl.model_from_config(cfg, "tiny-lm")
    r = pl.plan_method(m, "unipt", o)
    d = r["activation_detail_gib"]
    pred = (d["stored_hidden_states"] + d["side_network"]) * GIB + \
        B * pl.lm_loss_bytes(m.towers[0], "chunked", B, o)["per_sample"]
    _close(pred, measured, ACT_TOL, f"deep side network ({blocks} blocks) saved for backward")
    assert r["trained_params"] == count_parameters(model)["trainable_params"]

    captured = {}
    side, step = model.encoder.side, model.encoder.side.step

    def keep(*a, **k):
        y, cache = step(*a, **k)
        captured["cache"] = cache
        return y, cache

    side.step = keep
    model.eval()
    prompt, new = 20, 5
    generate(model, _lm_batch(B, prompt)["input_ids"], torch.ones(B, prompt, dtype=torch.long), max_new_tokens=new)
    n = prompt + new - 1
    g = pl.generation_bytes(m.towers[0], "unipt", pl.Options(batch=B, seq_len=n, generate=True, side_blocks=blocks,
                                                               side_heads=heads))
    c = captured["cache"]
    kv = sum(x.nbytes for bc in c.blocks for x in bc.filled())
    core = sum(x.nbytes for x in (c.targets, c.mask, c.anchor_sum, c.target_sum, c.count))
    assert kv == B * blocks * 2 * n * 32 * 2 and core + kv == B * g["side_cache"]


@pytest.mark.parametrize("output", ["blend", "residual"])
def test_ladder_bytes_match_measured(tmp_path, output):
    """method=ladder's column (--task causal_lm): its parameters as built and what its training step saves for
    backward (bf16, CPU): every hidden state, the downsamplers, gates and side blocks."""
    from unipt_scale.model import count_parameters

    path, cfg = _tiny_lm_dir(tmp_path)
    model = _lm_model(path, "ladder", torch.bfloat16, "ladder.reduction=4", "ladder.rank=8",
                      f"ladder.output={output}", "task.loss_chunk_tokens=16").train()
    B, N = 2, 32
    measured, (loss, _) = _saved_bytes_of(lambda: model.training_loss(_lm_batch(B, N)), model)
    loss.backward()
    o = pl.Options(batch=B, seq_len=N, gpus_per_node=1, zero_stage=0, task="causal_lm", lm_loss="chunked",
                   loss_chunk_tokens=16, ladder_reduction=4, ladder_rank=8, ladder_output=output,
                   profile=pl.cpu_profile(2))
    m = pl.model_from_config(cfg, "tiny-lm")
    r = pl.plan_method(m, "ladder", o)
    d = r["activation_detail_gib"]
    acts = pl.tower_activations(m.towers[0], "ladder", o)
    pred = (d["stored_hidden_states"] + d["side_network"]) * GIB + acts["constant"] + \
        B * pl.lm_loss_bytes(m.towers[0], "chunked", B, o)["per_sample"]
    _close(pred, measured, ACT_TOL, f"ladder ({output}) saved for backward")
    assert r["trained_params"] == count_parameters(model)["trainable_params"]
    assert r["lm_loss"] == "chunked" and r["parts"]["gradients"] == r["parts"]["optimizer"] == 0
    cols = pl.plan(m, dataclasses.replace(o, ladder_output=output))
    assert pl.columns(cols) == ("unipt", "lora", "full", "ladder")
