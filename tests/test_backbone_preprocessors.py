"""Tokenizer and image transform come from the model directory without its weights."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import VOCAB, tiny_bert_dir, tiny_llama_dir, tiny_vit_dir
from unipt_scale.backbone import load_backbone
from unipt_scale.config import BackboneConfig
from unipt_scale.preprocessors import load_image_transform, load_tokenizer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    assert not any(f in os.listdir(dst) for f in WEIGHT_FILES)
    return dst


@pytest.fixture
def no_weights(monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was built or loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModel, "from_config", classmethod(refuse))


def _eos_only_tokenizer_dir(root):
    """A GPT-style tokenizer: an eos token and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    d = os.path.join(root, "eos-only")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(d)
    LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, architectures=["LlamaForCausalLM"]).save_pretrained(d)
    return d


def test_tokenizer_loads_from_a_directory_without_weights(tmp_path, no_weights):
    d = _without_weights(tiny_bert_dir(str(tmp_path)), str(tmp_path / "bert-no-weights"))
    tok = load_tokenizer(BackboneConfig(path=d))
    assert tok.padding_side == "right" and tok.pad_token == "[PAD]"
    assert tok("good movie")["input_ids"] == [VOCAB.index(w) for w in ("[CLS]", "good", "movie", "[SEP]")]
    assert load_tokenizer(BackboneConfig(path=d, padding_side="left")).padding_side == "left"


def test_the_same_directory_without_weights_fails_only_for_the_model(tmp_path):
    from unipt_scale.backbone import BackboneLoadError

    d = _without_weights(tiny_bert_dir(str(tmp_path)), str(tmp_path / "bert-no-weights"))
    with pytest.raises(BackboneLoadError, match=r"weights could not be loaded .*backbone.random_init=true") as err:
        load_backbone(BackboneConfig(path=d))
    assert "\n" not in str(err.value)
    assert load_backbone(BackboneConfig(path=d, random_init=True)).num_hidden_states == 4


def test_pad_token_falls_back_to_eos(tmp_path, no_weights):
    tok = load_tokenizer(BackboneConfig(path=_eos_only_tokenizer_dir(str(tmp_path))))
    assert tok.pad_token == "[SEP]" and tok.pad_token_id == VOCAB.index("[SEP]")
    batch = tok(["good", "good movie"], padding=True)
    assert batch["input_ids"][0][-1] == VOCAB.index("[SEP]") and batch["attention_mask"][0] == [1, 0]


def test_vision_and_builtin_cnn_have_no_tokenizer(tmp_path, no_weights):
    assert load_tokenizer(BackboneConfig(path=tiny_vit_dir(str(tmp_path)))) is None
    assert load_tokenizer(BackboneConfig(path="builtin:efficientnet-lite0")) is None


def test_load_backbone_uses_the_same_tokenizer(tmp_path):
    d = tiny_llama_dir(str(tmp_path))
    cfg = BackboneConfig(path=d, padding_side="left")
    alone, bb = load_tokenizer(cfg), load_backbone(cfg)
    assert type(bb.tokenizer) is type(alone) and bb.tokenizer.get_vocab() == alone.get_vocab()
    assert (bb.tokenizer.pad_token, bb.tokenizer.padding_side) == (alone.pad_token, alone.padding_side)
    assert (alone.pad_token, alone.padding_side) == ("[PAD]", "left")


def _vit_with_processor(root, channels):
    from transformers import ViTImageProcessor

    d = _without_weights(tiny_vit_dir(root, channels=channels), os.path.join(root, f"vit-processor-{channels}"))
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * channels,
                      image_std=[0.25] * channels).save_pretrained(d)
    return d


def _photo(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_transform_is_the_processors_resize_and_normalisation(tmp_path, channels, no_weights):
    d = _vit_with_processor(str(tmp_path), channels)
    transform = load_image_transform(BackboneConfig(path=d), 8)
    img = _photo()
    got = transform(img)
    # Reference: PIL bilinear resize to 8x8 (ViT's), x/255, (x - 0.5) / 0.25 per channel.
    ref_img = img.convert("L" if channels == 1 else "RGB").resize((8, 8), Image.BILINEAR)
    ref = np.asarray(ref_img, dtype=np.float64).reshape(8, 8, channels).transpose(2, 0, 1) / 255.0
    ref = torch.from_numpy((ref - 0.5) / 0.25).float()
    assert got.dtype == torch.float32 and got.shape == (channels, 8, 8)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # Grey input for an RGB processor (and the reverse) is converted to the processor's channel count.
    assert transform(_photo("L")).shape == (channels, 8, 8)
    again = pickle.loads(pickle.dumps(transform))  # data workers get it by pickling
    torch.testing.assert_close(again(img), got, rtol=0, atol=0)


def test_image_transform_center_crops_like_clip(tmp_path, no_weights):
    from transformers import CLIPImageProcessor

    d = str(tmp_path / "clip-processor")
    CLIPImageProcessor().save_pretrained(d)
    shutil.copy(os.path.join(tiny_vit_dir(str(tmp_path), channels=3), "config.json"), d)
    got = load_image_transform(BackboneConfig(path=d), 8)(_photo(size=(40, 30)))
    # Reference: shorter side to 8 (bicubic, 30x40 → 8x10), centre 8x8 crop, CLIP's mean/std.
    img = _photo(size=(40, 30)).resize((10, 8), Image.BICUBIC).crop((1, 0, 9, 8))
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    ref = ((np.asarray(img, dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)
    torch.testing.assert_close(got, torch.from_numpy(ref).float(), rtol=0, atol=1e-5)


def test_a_shortest_edge_processor_stretches_the_whole_image_to_the_square(tmp_path, no_weights):
    """ViLT's processor fixes only the shortest edge (the other stays free), which a batch of squares cannot hold:
    the whole image is stretched to the square, then rescaled and normalised by the processor."""
    from transformers import ViltImageProcessor

    from tiny_models import tiny_vilt_dir

    d = tiny_vilt_dir(str(tmp_path), image_size=32)
    got = load_image_transform(BackboneConfig(path=d), 32)(_photo(size=(40, 30)))
    img = _photo(size=(40, 30)).resize((32, 32), Image.BICUBIC)
    mean, std = np.array(ViltImageProcessor().image_mean), np.array(ViltImageProcessor().image_std)
    ref = ((np.asarray(img, dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)
    torch.testing.assert_close(got, torch.from_numpy(ref).float(), rtol=0, atol=1e-5)


def test_no_processor_file_means_the_data_default(tmp_path, no_weights):
    assert load_image_transform(BackboneConfig(path=tiny_vit_dir(str(tmp_path))), 16) is None
    assert load_image_transform(BackboneConfig(path=tiny_bert_dir(str(tmp_path))), 16) is None
    assert load_image_transform(BackboneConfig(path="builtin:efficientnet-lite0"), 64) is None
