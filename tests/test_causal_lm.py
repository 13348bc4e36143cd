"""Causal UniPT on tiny decoders: the causal form against its equations written out, causality through the public
API, a fresh model is the frozen LLM, the chunked LM loss, and incremental generation against full recompute."""
import json

import pytest
import torch
import torch.nn.functional as F

from lm_helpers import left_padded, perturbed, write_pairs
from tiny_models import tiny_causal_lm_dir
from unipt_scale.config import UniPTConfig, load_config
from unipt_scale.generation import generate
from unipt_scale.lm import chunked_lm_loss
from unipt_scale.model import build_model
from unipt_scale.side_network import UniPTSideNetwork

ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lm"))
    return {a: tiny_causal_lm_dir(root, a) for a in ARCHS} | {"tied": tiny_causal_lm_dir(root, "llama", tie=True)}


def _cfg(model_dir, tmp_path, *extra):
    return load_config(None, [f"backbone.path={model_dir}", "task.kind=causal_lm", "data.source=jsonl",
                              f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}", "unipt.mapping_dim=8",
                              "data.batch_size=4", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}", *extra])


def _causal_side_reference(side, hidden_states, mask, final):
    """The causal form of ../shared/unipt-equations.md, position by position, in fp64."""
    cfg = side.cfg
    T = [side.down_norms[i](side.down[i](h.double())) for i, h in enumerate(hidden_states)]
    A, targets = T[-1], T[:-1]
    B, N, d = A.shape
    out = torch.zeros(B, N, side.out_dim, dtype=torch.float64)
    m = mask.double()
    for b in range(B):
        for t in range(N):
            cnt = max(m[b, :t + 1].sum().item(), 1.0)
            a_t = (m[b, :t + 1, None] * A[b, :t + 1]).sum(0) / cnt
            merged, scores = [], []
            for Ti in targets:
                s = torch.relu(Ti[b, :t + 1] @ A[b, t]) * m[b, :t + 1]
                w = s / s.sum().clamp(min=cfg.eps)
                merged.append(w @ Ti[b, :t + 1] + Ti[b, t])
                mu = (m[b, :t + 1, None] * Ti[b, :t + 1]).sum(0) / cnt
                scores.append(side.gate(a_t * mu).squeeze())
            alpha = torch.softmax(torch.stack(scores), 0)
            M = sum(al * mi for al, mi in zip(alpha, merged))
            o = A[b, t] + side.proj_norm(side.proj(M))
            out[b, t] = side.up(torch.relu(o)) + final[b, t].double()
    return out


@pytest.mark.parametrize("backend", ["reference", "efficient"])
def test_causal_side_network_is_the_equations(backend):
    torch.manual_seed(0)
    cfg = UniPTConfig(mapping_dim=6, kernels=backend, zero_init_up=False)
    side = UniPTSideNetwork(cfg, [10, 10, 10], 10, causal=True)
    hs = [torch.randn(2, 7, 10) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    final = torch.randn(2, 7, 10)
    got = side(hs, mask, final)
    side64 = side.double()
    ref = _causal_side_reference(side64, hs, mask, final)
    torch.testing.assert_close(got.double()[mask], ref[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_the_future_leaves_the_past_unchanged(dirs, tmp_path, arch):
    model = build_model(_cfg(dirs[arch], tmp_path)).eval()
    perturbed(model, scale=0.3)
    a = left_padded([[5, 6, 7, 8, 9, 10, 11, 12]])
    b = {k: v.clone() for k, v in a.items()}
    t = 4
    b["input_ids"][0, t + 1:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        la, lb = model.logits(a), model.logits(b)
        ha, hb = model.hidden(a), model.hidden(b)
    assert (la[0, t + 1:] - lb[0, t + 1:]).abs().max() > 1e-3, "the future does change later positions"
    torch.testing.assert_close(ha[0, :t + 1], hb[0, :t + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(la[0, :t + 1], lb[0, :t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS + ["tied"])
def test_fresh_model_gives_the_frozen_llm_logits(dirs, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = build_model(_cfg(dirs[arch], tmp_path)).eval()
    ref = AutoModelForCausalLM.from_pretrained(dirs[arch]).eval()
    batch = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(**batch, position_ids=pos).logits
        got = model.logits(batch)
    m = batch["attention_mask"].bool()
    assert torch.equal(got[m], want[m])


def test_training_lowers_the_loss_and_only_the_side_network_learns(dirs, tmp_path):
    from unipt_scale.trainer import train

    cfg = _cfg(dirs["llama"], tmp_path, "train.max_steps=30", "train.lr=1e-2", "train.log_every=5",
               "train.warmup_ratio=0", "data.max_length=32")
    metrics = train(cfg)
    losses = [v for _, v in metrics["train_loss"]]
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True), losses
    assert metrics["test"]["num_tokens"] > 0 and metrics["test"]["perplexity"] > 1
    model = build_model(cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("encoder.side.") for n in trained)
    batch = {**left_padded([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, -100, 7, 8]])}
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("encoder.side."))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("encoder.side."))


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_generation_equals_full_recompute(dirs, tmp_path, arch):
    model = build_model(_cfg(dirs[arch], tmp_path)).eval()
    perturbed(model, scale=0.2)
    batch = left_padded([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])  # left-padded prompts
    fast = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=32)
    slow = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=32, incremental=False)
    assert fast.shape == (3, 32)
    assert torch.equal(fast, slow)
    # A prompt alone gives what it gives inside the padded batch.
    alone = generate(model, torch.tensor([[11, 12]]), torch.ones(1, 2, dtype=torch.long), max_new_tokens=32)
    assert torch.equal(alone[0], fast[1])


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64)
    y = torch.randint(0, 101, (37,))
    plain = F.cross_entropy(h @ w.t(), y)
    (g_plain,) = torch.autograd.grad(plain, h)
    for chunk in (1, 5, 37, 64):
        got = chunked_lm_loss(h, w, y, chunk)
        (g,) = torch.autograd.grad(got, h)
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_plain, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: chunked_lm_loss(x, w, y, 8), (h,))
    with torch.no_grad():  # evaluation: the loss alone, no gradient written
        torch.testing.assert_close(chunked_lm_loss(h, w, y, 5), plain.detach(), rtol=1e-12, atol=1e-12)


def test_chunked_loss_memory_does_not_grow_with_vocabulary():
    """What the loss keeps for backward is the same for a 1k and a 64k vocabulary: the gradient rows it wrote in the
    forward, n x D, nothing else; the plain loss keeps n x V logits."""
    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    h = torch.randn(256, 32, requires_grad=True)
    y = torch.randint(0, 1000, (256,))
    chunked, plain = [], []
    for vocab in (1_000, 64_000):
        w = torch.randn(vocab, 32)
        chunked.append(saved_bytes(lambda: chunked_lm_loss(h, w, y, 64)))
        plain.append(saved_bytes(lambda: F.cross_entropy(h @ w.t(), y)))
    assert chunked[0] == chunked[1] == h.numel() * 4
    assert plain[1] > 50 * chunked[1]


def test_train_then_unipt_generate(dirs, tmp_path, capsys):
    from unipt_scale.cli import main
    from unipt_scale.export import load_trained
    from unipt_scale.generation import generate_texts

    out = tmp_path / "run"
    cfg = _cfg(dirs["llama"], tmp_path, "train.max_steps=3", "data.max_length=32")
    assert main(["train", "--output-dir", str(out), *[f"{k}" for k in _overrides(cfg)]]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--max-new-tokens", "5", "good movie",
                 "bad day"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["good movie", "bad day"]
    model, cfg2, _ = load_trained(str(out / "checkpoint"))
    from unipt_scale.preprocessors import load_tokenizer

    want = generate_texts(model, load_tokenizer(cfg2.backbone), [{"prompt": "good movie"}, {"prompt": "bad day"}],
                          max_new_tokens=5, trained_length=cfg2.data.max_length)
    assert [x["completion"] for x in lines] == want
    assert main(["generate", "--checkpoint", str(out / "checkpoint"), "--max-new-tokens", "0", "x"]) == 2


def _overrides(cfg):
    d = cfg.to_dict()
    return [f"backbone.path={d['backbone']['path']}", "task.kind=causal_lm", "data.source=jsonl",
            f"data.path={d['data']['path']}", "unipt.mapping_dim=8", "data.batch_size=4", "train.tensorboard=false",
            f"train.max_steps={d['train']['max_steps']}", f"data.max_length={d['data']['max_length']}"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods_train_and_generate_on_the_same_task(dirs, tmp_path, method):
    """LoRA and full fine-tuning go through the same causal_lm task: the loss is the same at step 0 (the same
    frozen function), only the method's own parameters learn, and cached generation equals recompute."""
    cfg = _cfg(dirs["llama"], tmp_path, f"method={method}")
    model = build_model(cfg).eval()
    unipt = build_model(_cfg(dirs["llama"], tmp_path)).eval()
    batch = {**left_padded([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, -100, 7, 8, 9]])}
    with torch.no_grad():
        torch.testing.assert_close(model.training_loss(batch)[0], unipt.training_loss(batch)[0], rtol=0, atol=1e-6)
    perturbed(model, scale=0.05)
    model.train()
    loss, _ = model.training_loss(batch)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trained and (method != "lora" or all("lora_" in n for n in trained))
    model.eval()
    b = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    fast = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=12)
    slow = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=12, incremental=False)
    assert torch.equal(fast, slow)


def test_causal_layer_confidences_are_per_position():
    torch.manual_seed(0)
    side = UniPTSideNetwork(UniPTConfig(mapping_dim=6, zero_init_up=False), [10, 10, 10], 10, causal=True)
    hs = [torch.randn(2, 5, 10) for _ in range(3)]
    alpha = side.layer_confidences(hs, torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 5, 10))
    assert alpha.shape == (2, 5, 2)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 5))


def test_a_long_prompt_is_cut_at_the_end_of_its_last_user_turn():
    """The system prompt and the instruction that opens the turn survive; the document's end is what goes."""
    from tiny_models import tiny_tokenizer
    from unipt_scale.data.lm import IGNORE, encode_pair, prompt_ids, render_prompt

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}[CLS] {{ m.role }} {{ m.content }} [SEP] {% endfor %}"
                         "{% if add_generation_prompt %}[CLS] assistant{% endif %}")
    body = "the food was fine " * 40
    record = {"messages": [{"role": "system", "content": "good day"},
                           {"role": "user", "content": "bad movie night " + body}], "response": "happy"}
    full = tok(render_prompt(tok, record), add_special_tokens=False)["input_ids"]
    ids = prompt_ids(tok, record, 40)
    assert len(full) > 100 and 30 <= len(ids) <= 40
    head = tok(render_prompt(tok, {"messages": [record["messages"][0], {"role": "user", "content": "bad movie night"}]}),
               add_special_tokens=False)["input_ids"][:-4]  # up to the user turn's opening words
    assert ids[:len(head)] == head
    assert ids[-3:] == full[-3:], "the turn closes and the generation prompt follows"
    x, y = encode_pair(tok, record, 48)
    response = tok("happy", add_special_tokens=False)["input_ids"]
    assert len(x) <= 48 and x[:len(head)] == head and y[-len(response):] == response
    assert all(v == IGNORE for v in y[:-len(response)])


def test_evaluation_runs_at_most_the_training_micro_batch_per_forward(dirs, tmp_path):
    """An eval batch of 128 long sequences would hold every tapped state of all of them at once (above the
    training step's peak); the causal task model evaluates data.batch_size sequences per forward, same result."""
    model = build_model(_cfg(dirs["llama"], tmp_path, "data.batch_size=2")).eval()
    perturbed(model, scale=0.3)
    assert model.eval_rows == 2
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16], [17, 18, 19], [20, 21, 22, 23, 24]]
    batch = left_padded(rows)
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]["input_ids"].shape[0]))
    chunked = model.eval_step(batch)
    hook.remove()
    assert seen == [2, 2, 1]
    model.eval_rows = None
    whole = model.eval_step(batch)
    assert chunked["tokens"] == whole["tokens"] and chunked["correct"] == whole["correct"]
    assert chunked["loss_sum"] == pytest.approx(whole["loss_sum"], rel=1e-6)
