"""method=ladder (LST/QST): its parameter count, its equations against a plain loop, the residual form starts at
the frozen LLM, causality, cached decoding against full recompute, training only the side network, and what it
refuses."""
import pytest
import torch

from lm_helpers import left_padded, perturbed
from tiny_models import tiny_causal_lm_dir
from unipt_scale.config import ConfigError, LadderConfig, load_config
from unipt_scale.generation import generate
from unipt_scale.side_spec import ladder_params
from unipt_scale.model import build_model, count_parameters


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal_lm_dir(str(tmp_path_factory.mktemp("ladder")), "llama", hidden=64, layers=3)


def _cfg(model_dir, tmp_path, *extra):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"prompt": "good movie {w}", "response": "bad day {w}"}}\n'
                            for w in ("night", "food", "happy", "sad") * 6))
    return load_config(None, [f"backbone.path={model_dir}", "task.kind=causal_lm", "data.source=jsonl",
                              f"data.path={path}", "method=ladder", "ladder.reduction=4", "ladder.rank=8",
                              "data.batch_size=4", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("output", ["blend", "residual"])
def test_the_parameter_count_is_the_built_module(llama, tmp_path, output):
    model = build_model(_cfg(llama, tmp_path, f"ladder.output={output}"))
    cfg = LadderConfig(reduction=4, rank=8, output=output)
    want = ladder_params(4, 64, cfg.reduction, cfg.rank, cfg.mlp_ratio, cfg.output)
    assert count_parameters(model)["trainable_params"] == want


def test_the_side_network_is_the_ladder_equations(llama, tmp_path):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    side = model.encoder.side
    batch = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    with torch.no_grad():
        out = model.encoder.backbone(batch)
        got = side(out.hidden_states, out.mask, out.final)
        h, m = out.hidden_states, out.mask.bool()
        pos = (m.long().cumsum(1) - 1).clamp(min=0)
        down = lambda i, x: side.down_out[i](torch.nn.functional.silu(side.down_in[i](x)))  # noqa: E731
        s = down(0, h[0])
        for i in range(len(side.side)):
            z = torch.sigmoid(side.gates[i])
            s = (1 - z) * down(i + 1, h[i + 1]) + z * s
            s, _ = side.side[i](s, pos, m)
        g = torch.sigmoid(side.head_gate)
        want = g * side.up(side.norm(s)) + (1 - g) * out.final
    torch.testing.assert_close(got[m], want[m], rtol=0, atol=1e-6)


def test_the_residual_form_starts_at_the_frozen_llm_and_blend_does_not(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(llama).eval()
    batch = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    m = batch["attention_mask"].bool()
    with torch.no_grad():
        want = ref(**batch, position_ids=pos).logits
        residual = build_model(_cfg(llama, tmp_path, "ladder.output=residual")).eval().logits(batch)
        blend = build_model(_cfg(llama, tmp_path)).eval().logits(batch)
    assert torch.equal(residual[m], want[m])
    assert (blend[m] - want[m]).abs().max() > 1e-3, "QST's blend starts away from the frozen model"


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(temperature=0.9, top_p=0.9, seed=2)],
                         ids=["greedy", "beams", "sample"])
def test_cached_decoding_equals_full_recompute_and_the_past_ignores_the_future(llama, tmp_path, options):
    model = perturbed(build_model(_cfg(llama, tmp_path))).eval()
    b = left_padded([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])
    fast = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=10, **options)
    slow = generate(model, b["input_ids"], b["attention_mask"], max_new_tokens=10, incremental=False, **options)
    assert torch.equal(fast, slow)
    a = left_padded([[5, 6, 7, 8, 9, 10, 11, 12]])
    c = {k: v.clone() for k, v in a.items()}
    c["input_ids"][0, 5:] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        la, lc = model.logits(a), model.logits(c)
    torch.testing.assert_close(la[0, :5], lc[0, :5], rtol=0, atol=1e-6)


def test_training_moves_only_the_side_network_and_exports_only_it(llama, tmp_path):
    from safetensors.torch import load_file

    from unipt_scale.trainer import train

    cfg = _cfg(llama, tmp_path, "train.max_steps=6", "train.lr=3e-3", "train.log_every=1", "data.max_length=24")
    metrics = train(cfg)
    losses = [v for _, v in metrics["train_loss"]]
    assert losses[-1] < losses[0], losses
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "trained.safetensors"))
    assert weights and all(k.startswith("encoder.side.") for k in weights)
    assert sum(w.numel() for w in weights.values()) == metrics["trainable_params"]


def test_ladder_is_refused_outside_causal_lm(tmp_path):
    with pytest.raises(ConfigError, match="task.kind=causal_lm"):
        load_config(None, ["method=ladder"])


def test_on_an_nf4_base_it_is_qst_and_trains(llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from unipt_scale.trainer import train

    metrics = train(_cfg(llama, tmp_path, "backbone.quantization=nf4", "train.max_steps=3", "data.max_length=24"))
    assert metrics["steps"] == 3 and metrics["train_loss"][-1][1] is not None
    assert metrics["trainable_params"] == ladder_params(4, 64, 4, 8)
