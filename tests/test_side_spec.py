"""side_spec, the one home of the side network's shape rules, against the torch modules it describes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from unipt_scale import plan as pl
from unipt_scale import side_spec
from unipt_scale.config import ConfigError, UniPTConfig

TOKEN_CASES = [  # (config fields, tapped hidden sizes, output width, causal)
    (dict(), [48, 64, 64], 64, False),
    (dict(mapping_dim=40), [96] * 5, 96, False),
    (dict(reduction_factor=4), [128] * 4, 128, True),
    (dict(anchor="separate", output="direct", down_norm="none", down_activation="relu", add_target_token=True,
          anchor_pooling="first"), [32, 64, 80], 80, False),
    (dict(anchor="separate", mapping_dim=24), [64, 64], 96, False),
    (dict(output="direct", reduction_factor=1), [64, 64, 64], 64, True),
    (dict(down_norm="none"), [72] * 3, 72, False),
    (dict(side_blocks=2, mapping_dim=32), [64] * 3, 64, True),
    (dict(side_blocks=1, side_heads=4, side_mlp_ratio=3), [128] * 4, 128, True),
]


@pytest.mark.parametrize("fields, sizes, out, causal", TOKEN_CASES)
def test_token_side_params_equal_the_built_module(fields, sizes, out, causal):
    from unipt_scale.model import count_parameters
    from unipt_scale.side_network import UniPTSideNetwork

    cfg = UniPTConfig(**fields)
    net = UniPTSideNetwork(cfg, sizes, out, causal=causal)
    assert side_spec.side_params(cfg, sizes, out) == count_parameters(net)["trainable_params"]
    assert side_spec.mapping_width(out, cfg.mapping_dim, cfg.reduction_factor) == net.mapping_dim


@pytest.mark.parametrize("channels, fields", [([16, 24, 40], dict()), ([8, 32], dict(mapping_dim=12, down_norm="none"))])
def test_feature_map_side_params_equal_the_built_module(channels, fields):
    from unipt_scale.model import count_parameters
    from unipt_scale.side_network import UniPTFeatureMapSideNetwork

    cfg = UniPTConfig(**fields)
    sizes = [(4 * 2 ** (len(channels) - 1 - i),) * 2 for i in range(len(channels))]
    net = UniPTFeatureMapSideNetwork(cfg, channels, sizes)
    want = side_spec.feature_map_side_params(channels, cfg.mapping_dim, cfg.reduction_factor, cfg.down_norm)
    assert want == count_parameters(net)["trainable_params"]


def test_the_planner_counts_the_side_network_the_trainer_builds():
    """plan's trained parameters for UniPT are side_spec's count of the module built on the same tower."""
    from unipt_scale.side_network import UniPTSideNetwork

    model = pl.model_from_config(dict(model_type="llama", num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, vocab_size=100), "tiny")
    for layers, d in (("all", None), ("every:2", 16), ("last:3", None)):
        o = pl.Options(layers=layers, mapping_dim=d)
        n = len(side_spec.resolve_layers(layers, 7))
        net = UniPTSideNetwork(UniPTConfig(layers=layers, mapping_dim=d), [64] * n, 64)
        assert pl.trained_params(model, "unipt", o) == sum(p.numel() for p in net.parameters())


def test_resolve_layers_is_the_one_rule():
    from unipt_scale.side_network import resolve_layers

    assert resolve_layers is side_spec.resolve_layers
    for spec, n, want in (("all", 4, [0, 1, 2, 3]), ("every:4", 10, [1, 5, 9]), ("last:3", 9, [6, 7, 8]),
                          ([0, 5, -1], 7, [0, 5, 6]), ("every:1", 2, [0, 1])):
        assert side_spec.resolve_layers(spec, n) == want == pl.resolve_taps(spec, n)
    assert pl.resolve_taps("0,5,-1", 7) == [0, 5, 6]
    for bad in ("every:0", "last:x", "some", [0, 0], [9]):
        with pytest.raises(ConfigError):
            side_spec.resolve_layers(bad, 4)
        with pytest.raises(pl.PlanError, match="--layers"):
            pl.resolve_taps(bad, 4)
    with pytest.raises(ConfigError, match="mapping_dim"):
        side_spec.mapping_width(1, None, 2)


def test_side_spec_and_the_planner_import_without_torch():
    code = ("import sys; import unipt_scale.side_spec, unipt_scale.plan; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
