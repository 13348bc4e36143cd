"""The deep causal side network (unipt.side_blocks): a block against its equations written out position by
position, a fresh deep model is still the frozen LLM, causality, left padding, cached decoding against full
recompute, and what the blocks refuse."""
import math

import pytest
import torch

from lm_helpers import left_padded, perturbed
from tiny_models import tiny_causal_lm_dir
from unipt_scale.config import ConfigError, UniPTConfig, load_config
from unipt_scale.generation import generate
from unipt_scale.model import build_model
from unipt_scale.side_blocks import CausalSideBlock
from unipt_scale.side_network import UniPTSideNetwork


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal_lm_dir(str(tmp_path_factory.mktemp("deep")), "llama")


def _cfg(model_dir, tmp_path, *extra):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "good movie", "response": "bad day"}\n' * 24)
    return load_config(None, [f"backbone.path={model_dir}", "task.kind=causal_lm", "data.source=jsonl",
                              f"data.path={path}", "unipt.mapping_dim=16", "unipt.side_blocks=2", "unipt.side_heads=2",
                              "data.batch_size=4", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}", *extra])


def _block_reference(block, x, mask):
    """One block written out in fp64: for each position t, softmax attention over real positions s ≤ t (rotary
    positions counted over real tokens only), then the MLP."""
    B, N, d = x.shape
    h = block.heads
    hd = d // h
    out = torch.zeros(B, N, d, dtype=torch.float64)
    inv = [1.0 / 10000 ** (2 * i / hd) for i in range(hd // 2)]

    def rope(v, pos):
        a = torch.tensor([pos * f for f in inv], dtype=torch.float64)
        c, s = torch.cat([a.cos(), a.cos()]), torch.cat([a.sin(), a.sin()])
        return v * c + torch.cat([-v[hd // 2:], v[:hd // 2]]) * s

    W = {k: v.double() for k, v in block.state_dict().items()}
    ln = lambda v, w, b: torch.nn.functional.layer_norm(v, (d,), w, b)  # noqa: E731
    for b in range(B):
        pos = (mask[b].cumsum(0) - 1).clamp(min=0).tolist()
        qkv = [ln(x[b, t].double(), W["norm1.weight"], W["norm1.bias"]) @ W["qkv.weight"].t() + W["qkv.bias"]
               for t in range(N)]
        for t in range(N):
            heads = []
            for j in range(h):
                sl = slice(j * hd, (j + 1) * hd)
                q = rope(qkv[t][:d][sl], pos[t])
                seen = [s for s in range(t + 1) if mask[b, s] or s == t]
                scores = torch.stack([q @ rope(qkv[s][d:2 * d][sl], pos[s]) / math.sqrt(hd) for s in seen])
                w = torch.softmax(scores, 0)
                heads.append(sum(w[i] * qkv[s][2 * d:][sl] for i, s in enumerate(seen)))
            y = x[b, t].double() + torch.cat(heads) @ W["out.weight"].t() + W["out.bias"]
            m = ln(y, W["norm2.weight"], W["norm2.bias"]) @ W["fc1.weight"].t() + W["fc1.bias"]
            out[b, t] = y + torch.nn.functional.gelu(m) @ W["fc2.weight"].t() + W["fc2.bias"]
    return out


def test_a_block_is_its_equations():
    torch.manual_seed(0)
    block = CausalSideBlock(8, heads=2, mlp_ratio=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    got, _ = block(x, positions, mask)
    want = _block_reference(block, x, mask)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-10, atol=1e-10)


def test_a_fresh_deep_model_is_the_frozen_llm(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(_cfg(llama, tmp_path)).eval()
    assert len(model.encoder.side.blocks.blocks) == 2
    ref = AutoModelForCausalLM.from_pretrained(llama).eval()
    batch = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want, got = ref(**batch, position_ids=pos).logits, model.logits(batch)
    m = batch["attention_mask"].bool()
    assert torch.equal(got[m], want[m])


def test_the_future_does_not_reach_the_past_and_padding_does_not_shift_positions(llama, tmp_path):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    a = left_padded([[5, 6, 7, 8, 9, 10, 11, 12]])
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][0, 5:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        la, lb = model.logits(a), model.logits(b)
        padded = model.logits(left_padded([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7]]))
        alone = model.logits(left_padded([[5, 6, 7]]))
    assert (la[0, 5:] - lb[0, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(la[0, :5], lb[0, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded[1, -3:], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(temperature=0.8, top_k=10, seed=4)],
                         ids=["greedy", "beams", "sample"])
def test_cached_decoding_equals_full_recompute(llama, tmp_path, options):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    b = left_padded([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])
    fast = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=12, **options)
    slow = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=12, incremental=False, **options)
    assert torch.equal(fast, slow)


def test_training_moves_the_blocks(llama, tmp_path):
    model = build_model(_cfg(llama, tmp_path))
    perturbed(model, scale=0.05)
    batch = {**left_padded([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, -100, 7, 8, 9]])}
    loss, _ = model.training_loss(batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".blocks." in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("fields, causal, says", [
    (dict(side_blocks=1), False, "causal side network"),
    (dict(side_blocks=1, output="direct"), True, "output=project"),
    (dict(side_blocks=1, mapping_dim=12, side_heads=5), True, "does not divide"),
])
def test_what_the_blocks_refuse(fields, causal, says):
    with pytest.raises(ConfigError, match=says):
        UniPTSideNetwork(UniPTConfig(**fields), [16, 16, 16], 16, causal=causal)
