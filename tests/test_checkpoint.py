import os

import pytest
import torch

from tiny_models import tiny_bert_dir
from unipt_scale.export import WEIGHTS, load_trained, read_checkpoint, save_trained
from unipt_scale.config import load_config
from unipt_scale.model import build_model, trained_state_dict


@pytest.fixture(scope="module")
def model_and_cfg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("m"))
    cfg = load_config(overrides=[f"backbone.path={tiny_bert_dir(root)}", "task.num_classes=3", "unipt.mapping_dim=8"])
    model = build_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


def test_round_trip_gives_identical_outputs(model_and_cfg, tmp_path):
    model, cfg = model_and_cfg
    state = trained_state_dict(model)
    assert state and not any("backbone" in k for k in state), "only trained weights are saved"
    assert set(state) >= {k for k, p in model.named_parameters() if p.requires_grad}
    save_trained(state, cfg, str(tmp_path / "ckpt"), {"num_classes": 3, "label_names": ["a", "b", "c"]})
    assert os.path.getsize(tmp_path / "ckpt" / WEIGHTS) < 0.5 * sum(
        p.numel() * 4 for p in model.parameters())
    reloaded, cfg2, meta = load_trained(str(tmp_path / "ckpt"))
    assert meta["label_names"] == ["a", "b", "c"] and cfg2.unipt.mapping_dim == 8
    tok = model.encoder.backbone.tokenizer
    batch = dict(tok(["good movie", "bad food was awful"], padding=True, return_tensors="pt"))
    torch.testing.assert_close(reloaded(batch), model(batch))


def test_failed_save_keeps_previous_checkpoint(model_and_cfg, tmp_path, monkeypatch):
    model, cfg = model_and_cfg
    target = str(tmp_path / "ckpt")
    save_trained(trained_state_dict(model), cfg, target, {"num_classes": 3})
    before = open(os.path.join(target, WEIGHTS), "rb").read()

    import unipt_scale.export as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_tensors_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_trained(trained_state_dict(model), cfg, target, {"num_classes": 3})
    assert open(os.path.join(target, WEIGHTS), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temporary directory is left behind"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a unipt checkpoint"):
        read_checkpoint(str(tmp_path))


def test_crash_between_renames_is_recovered(model_and_cfg, tmp_path):
    """A crash after moving the old checkpoint aside and before moving the new one in loses nothing."""
    model, cfg = model_and_cfg
    target = tmp_path / "ckpt"
    save_trained(trained_state_dict(model), cfg, str(target), {"num_classes": 3})
    before = (target / WEIGHTS).read_bytes()
    os.replace(target, tmp_path / ".ckpt.old-abc123")  # the state such a crash leaves
    (tmp_path / ".ckpt.tmp-def456").mkdir()
    (tmp_path / ".ckpt.tmp-def456" / WEIGHTS).write_bytes(b"half written")
    read_checkpoint(str(target))
    assert (target / WEIGHTS).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
