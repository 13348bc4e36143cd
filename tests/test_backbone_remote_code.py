"""A model directory's own Python runs only when the caller passes trust_remote_code=True (--trust-remote-code).

The directory's Python writes a marker file when imported, so "never imported" is observed, not assumed.
"""
import json
import os
import shutil
import sys

import pytest
import torch

from tiny_models import tiny_bert_dir, tiny_tokenizer
from unipt_scale.backbone import BackboneLoadError, inspect_backbone, load_backbone
from unipt_scale.config import BackboneConfig
from unipt_scale.preprocessors import load_tokenizer

CODE = '''import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import BertConfig, BertModel


class MarkerConfig(BertConfig):
    model_type = "marker-net"


class MarkerModel(BertModel):
    config_class = MarkerConfig
'''


def _custom_dir(root, model_type, with_weights_from=None):
    """config.json with an auto_map into marker_model.py; model_type decides whether transformers knows it."""
    d = os.path.join(root, f"custom-{model_type}")
    marker = os.path.join(root, f"imported-{model_type}")
    if with_weights_from:
        shutil.copytree(with_weights_from, d)
        cfg = json.load(open(os.path.join(d, "config.json")))
    else:
        os.makedirs(d)
        tiny_tokenizer().save_pretrained(d)
        cfg = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "vocab_size": 64, "max_position_embeddings": 64, "architectures": ["MarkerModel"]}
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "marker_model.MarkerConfig",
                                                "AutoModel": "marker_model.MarkerModel"})
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with open(os.path.join(d, "marker_model.py"), "w") as fh:
        fh.write(CODE.format(marker=marker))
    return d, marker


@pytest.mark.parametrize("random_init", [False, True])
def test_custom_code_is_refused_without_the_flag_and_never_imported(tmp_path, random_init):
    d, marker = _custom_dir(str(tmp_path), "marker-net")
    cfg = BackboneConfig(path=d, random_init=random_init)
    for call in (load_backbone, inspect_backbone, load_tokenizer):
        with pytest.raises(BackboneLoadError) as err:
            call(cfg)
        msg = str(err.value)
        assert "\n" not in msg and "needs custom Python code" in msg and "--trust-remote-code" in msg
    assert not os.path.exists(marker)
    assert not any("marker_model" in name for name in sys.modules)


def test_a_native_model_type_with_an_auto_map_loads_natively_without_the_code(tmp_path):
    """auto_map beside a model_type transformers ships (common on hub checkpoints): transformers' own class."""
    root = str(tmp_path)
    d, marker = _custom_dir(root, "bert", with_weights_from=tiny_bert_dir(root))
    bb = load_backbone(BackboneConfig(path=d))
    assert type(bb.model).__name__ == "BertModel"
    assert not os.path.exists(marker)


def test_the_flag_runs_the_directory_code(tmp_path, monkeypatch):
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    d, marker = _custom_dir(str(tmp_path), "marker-net")
    bb = load_backbone(BackboneConfig(path=d, random_init=True), trust_remote_code=True)
    assert os.path.exists(marker)
    assert type(bb.model).__name__ == "MarkerModel" and bb.num_hidden_states == 3
    batch = dict(bb.tokenizer(["good movie"], return_tensors="pt"))
    assert bb(batch).final.shape == (1, batch["input_ids"].shape[1], 32)
    assert torch.isfinite(bb(batch).final).all()
