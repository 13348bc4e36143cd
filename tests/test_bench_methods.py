"""`unipt bench methods`: the record it writes, and physical facts its numbers must obey on a tiny BERT.

The facts checked are the ones the package's claims rest on: a frozen no-grad backbone leaves nothing of
itself for backward, full fine-tuning trains every backbone weight, LoRA trains exactly r·(in+out) per
adapted projection, AdamW keeps two fp32 moments per trained weight. The measured memory comes from each
method's own process (bench.memory); its meter is checked against a known allocation. With --quantization
none,nf4 every method runs again on the NF4 base: its frozen weights are counted as `unipt info` counts them on
the same config built independently, they shrink, and full fine-tuning there is recorded as refused.
"""
import json
import math

import pytest
import torch
import torch.nn as nn

from tiny_models import tiny_bert_dir
from unipt_scale.backbone import load_backbone
from unipt_scale.bench import memory
from unipt_scale.bench import methods as bench
from unipt_scale.config import BackboneConfig, UniPTConfig
from unipt_scale.model import UniPTEncoder

B, N, C = 4, 16, 3
R = 8
FIELDS = {"step_ms_median", "step_ms_min", "step_ms_max", "step_ms", "trainable_params", "frozen_params",
          "optimizer_bytes", "grad_bytes", "saved_bytes", "saved_bytes_with_params", "saved_bytes_backbone",
          "cuda_max_allocated", "loss_first", "loss_last"} | set(bench.ISOLATED_FIELDS)
RSS_METHODS = {memory.RSS_HWM, memory.RSS_SAMPLED.format(ms=2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("out") / "sub" / "methods.json"
    rc = bench.main(["--backbone", tiny, "--batch", str(B), "--seq", str(N), "--steps", "2", "--warmup", "1",
                     "--threads", "1", "--text", "synthetic", "--quantization", "none,nf4", "--json", str(path)])
    assert rc == 0
    assert not list(path.parent.glob(".tmp-*"))  # the atomic write left no temporary behind
    return json.loads(path.read_text())


def _hf(tiny):
    return load_backbone(BackboneConfig(path=tiny)).model


def test_schema(result):
    assert set(result) == {"config", "device", "methods", "frozen_forward", "ratios_vs_full", "ratios_vs_lora",
                           "summary", "schemes", "rows"}
    assert result["config"]["quantization"] == ["none", "nf4"] and list(result["schemes"]) == ["none", "nf4"]
    for key in bench.SCHEME_KEYS:  # the top level is the first scheme's, as before there were schemes
        assert result[key] == result["schemes"]["none"][key], key
    cfg = result["config"]
    assert (cfg["batch"], cfg["seq"], cfg["steps"], cfg["warmup"], cfg["threads"]) == (B, N, 2, 1, 1)
    assert cfg["methods"] == list(bench.METHODS) and cfg["text"] == "synthetic"
    assert cfg["lora_targets"] == ["query", "value"] and cfg["lora_r"] == R
    assert 0 < cfg["real_token_fraction"] <= 1
    assert result["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert set(result["methods"]) == set(bench.METHODS)
    for name, m in result["methods"].items():
        assert FIELDS <= set(m), (name, FIELDS - set(m))
        assert len(m["step_ms"]) == 2 and m["step_ms_min"] <= m["step_ms_median"] <= m["step_ms_max"]
        assert m["step_ms_min"] > 0
        assert math.isfinite(m["loss_first"]) and math.isfinite(m["loss_last"])
        assert (m["cuda_max_allocated"] is None) == (not torch.cuda.is_available())
    assert set(result["ratios_vs_full"]) == set(result["ratios_vs_lora"]) == set(bench.METHODS)
    ff = result["frozen_forward"]
    assert len(ff["ms"]) == 2 and 0 < ff["ms_min"] <= ff["ms_median"] <= ff["ms_max"]
    assert ff["tapped_hidden_states"] == 3 + 1  # the embeddings and every layer, as UniPT reads them


def test_isolated_memory_fields(result):
    """Each method's own process: a peak at or above its baseline, its own step times, the same model."""
    cfg = result["config"]
    assert cfg["memory"] == "isolated" and cfg["memory_method"] in RSS_METHODS
    cuda = torch.cuda.is_available()
    for name, m in result["methods"].items():
        assert m["rss_method"] == cfg["memory_method"], name
        assert isinstance(m["rss_baseline_bytes"], int) and m["rss_baseline_bytes"] > 0
        assert m["rss_peak_bytes"] >= m["rss_baseline_bytes"]
        assert m["peak_rss_above_baseline"] == m["rss_peak_bytes"] - m["rss_baseline_bytes"]
        if cuda:
            assert m["peak_memory_bytes"] == m["cuda_peak_above_loaded"] >= 0
            assert m["cuda_peak_allocated"] >= m["cuda_loaded_allocated"]
        else:
            assert m["peak_memory_bytes"] == m["peak_rss_above_baseline"]
            assert m["cuda_peak_allocated"] is None and m["cuda_loaded_allocated"] is None
        assert len(m["isolated_step_ms"]) == 2 and all(t > 0 and math.isfinite(t) for t in m["isolated_step_ms"])
        assert m["isolated_step_ms_median"] == pytest.approx(sorted(m["isolated_step_ms"])[0] / 2
                                                             + sorted(m["isolated_step_ms"])[1] / 2)
        assert m["isolated_process_wall_s"] > 0
        # the child built the very model the parent measured
        assert m["isolated_trainable_params"] == m["trainable_params"], name
        assert m["isolated_optimizer_bytes"] == m["optimizer_bytes"], name


def test_summary_is_unipt_against_full_lora_and_the_frozen_forward(result):
    summ, ms = result["summary"], result["methods"]
    assert summ["unipt_over_full"] == result["ratios_vs_full"]["unipt"]
    assert summ["unipt_over_lora"] == result["ratios_vs_lora"]["unipt"]
    assert summ["frozen_forward_ms_median"] == result["frozen_forward"]["ms_median"]
    assert summ["unipt_step_over_frozen_forward"] == pytest.approx(
        ms["unipt"]["step_ms_median"] / result["frozen_forward"]["ms_median"])
    assert summ["unipt_isolated_step_over_frozen_forward"] == pytest.approx(
        ms["unipt"]["isolated_step_ms_median"] / result["frozen_forward"]["ms_median"])
    for key in ("peak_memory_bytes", "isolated_step_ms_median"):
        want = ms["unipt"][key] / ms["full"][key] if ms["full"][key] else None
        assert summ["unipt_over_full"][key] == (None if want is None else pytest.approx(want))


@pytest.mark.parametrize("force_sampling", [False, True])
def test_the_meter_sees_a_known_allocation(force_sampling):
    """64 MiB touched after the baseline and freed before the end: the peak holds it, and not much more."""
    res = memory.run_isolated("unipt_scale.bench.memory:allocate_child", {"mib": 64, "force_sampling": force_sampling})
    rec = res["result"]
    assert rec["rss_method"] in RSS_METHODS
    if force_sampling:
        assert rec["rss_method"] == memory.RSS_SAMPLED.format(ms=2)
    # a few pages of slack below: RSS outside the block can shrink meanwhile (seen 4-16 KiB on a loaded machine)
    assert 64 * 2 ** 20 - 64 * 2 ** 10 <= rec["peak_rss_above_baseline"] <= 96 * 2 ** 20, rec


def test_a_run_that_fails_in_its_process_is_one_line(tmp_path):
    res = memory.run_isolated("unipt_scale.bench.memory:allocate_child", {})  # no "mib": a KeyError in the child
    assert res["error"]["kind"] == "failed" and res["error"]["type"] == "KeyError"
    assert "\n" not in res["error"]["message"]
    with pytest.raises(ValueError, match="not a function of unipt_scale.bench"):
        memory.run_isolated("os:system", {})


@pytest.mark.parametrize("base", ["full", "lora"])
def test_ratios_are_the_records_divided(result, base):
    ms = result["methods"]
    for name, r in result[f"ratios_vs_{base}"].items():
        assert set(r) == set(bench.RATIO_FIELDS)
        for k, v in r.items():
            if ms[name][k] is None or not ms[base][k]:
                assert v is None
            else:
                assert v == pytest.approx(ms[name][k] / ms[base][k], rel=1e-12), (name, k)
        assert r["trainable_params"] is not None and r["step_ms_median"] is not None
    assert all(v == pytest.approx(1.0) for v in result[f"ratios_vs_{base}"][base].values() if v is not None)


def test_frozen_backbones_save_nothing_of_themselves(result):
    ms = result["methods"]
    # UniPT's and the probe's backbones run under no_grad: autograd keeps nothing from inside them
    assert ms["unipt"]["saved_bytes_backbone"] == 0 and ms["linear_probe"]["saved_bytes_backbone"] == 0
    # the trained backbones keep their activations, and that is most of what they save
    for name in ("full", "lora"):
        assert ms[name]["saved_bytes_backbone"] > 0.5 * ms[name]["saved_bytes"], name
    assert ms["unipt"]["saved_bytes"] < ms["lora"]["saved_bytes"] < ms["full"]["saved_bytes"]
    # the probe keeps only the head's input (B×D fp32, for the head's weight gradient) and the loss's
    # log-softmax (B×C) — no backbone activation
    D = 32
    extra = ms["linear_probe"]["saved_bytes"] - B * D * 4
    assert 0 <= extra <= B * C * 4 + 16, ms["linear_probe"]["saved_bytes"]
    assert ms["linear_probe"]["saved_bytes"] < B * N * D * 4  # less than one hidden state


def test_trainable_parameter_counts(result, tiny):
    ms = result["methods"]
    hf = _hf(tiny)
    D = hf.config.hidden_size
    head = D * C + C
    assert ms["full"]["trainable_params"] == sum(p.numel() for p in hf.parameters()) + head
    assert ms["full"]["frozen_params"] == 0
    adapted = [m for n, m in hf.named_modules() if n.rsplit(".", 1)[-1] in ("query", "value")
               and isinstance(m, nn.Linear)]
    assert len(adapted) == 2 * hf.config.num_hidden_layers
    lora = sum(R * (m.in_features + m.out_features) for m in adapted)
    assert ms["lora"]["trainable_params"] == lora + head
    enc = UniPTEncoder(load_backbone(BackboneConfig(path=tiny)), UniPTConfig())
    side = list(enc.side.parameters())
    assert ms["unipt"]["trainable_params"] == sum(p.numel() for p in side) + head
    assert ms["linear_probe"]["trainable_params"] == head
    # every method freezes or trains the same backbone: trainable + frozen is the same total, up to LoRA's adapters
    total = ms["full"]["trainable_params"]
    assert ms["linear_probe"]["trainable_params"] + ms["linear_probe"]["frozen_params"] == total
    assert ms["unipt"]["trainable_params"] + ms["unipt"]["frozen_params"] == total + sum(p.numel() for p in side)
    assert ms["lora"]["trainable_params"] + ms["lora"]["frozen_params"] == total + lora

    # AdamW: two fp32 moments per trained weight plus a 4-byte step counter per tensor
    tensors = {"unipt": len(side) + 2, "lora": 2 * len(adapted) + 2, "linear_probe": 2}
    for name, n in tensors.items():
        assert ms[name]["optimizer_bytes"] == 8 * ms[name]["trainable_params"] + 4 * n, name
        assert ms[name]["grad_bytes"] == 4 * ms[name]["trainable_params"], name
    # full: BERT's pooler is trainable but unused by mean pooling, so it gets no gradient and no AdamW state
    pooler = sum(p.numel() for p in hf.pooler.parameters())
    assert ms["full"]["grad_bytes"] == 4 * (ms["full"]["trainable_params"] - pooler)
    assert ms["full"]["optimizer_bytes"] == 8 * (ms["full"]["trainable_params"] - pooler) + 4 * (
        sum(1 for _ in hf.parameters()) - sum(1 for _ in hf.pooler.parameters()) + 2)


def test_sequential_order_measures_the_same_memory(result, tiny, tmp_path):
    path = tmp_path / "seq.json"
    assert bench.main(["--backbone", tiny, "--batch", str(B), "--seq", str(N), "--steps", "1", "--warmup", "0",
                       "--threads", "1", "--text", "synthetic", "--methods", "unipt,full", "--order", "sequential",
                       "--memory", "off", "--json", str(path)]) == 0
    seq = json.loads(path.read_text())
    assert seq["config"]["order"] == "sequential" and seq["ratios_vs_lora"] == {}
    assert seq["config"]["memory"] == "off" and seq["summary"]["unipt_over_lora"] is None
    assert all(seq["methods"][m][k] is None for m in ("unipt", "full") for k in bench.ISOLATED_FIELDS)
    assert seq["summary"]["unipt_step_over_frozen_forward"] > 0
    for name in ("unipt", "full"):
        for k in ("saved_bytes", "saved_bytes_backbone", "trainable_params", "optimizer_bytes", "grad_bytes"):
            assert seq["methods"][name][k] == result["methods"][name][k], (name, k)


def test_models_are_the_trainers(tiny):
    """Every method is built by model.build_model from the run config the trainer would get."""
    from unipt_scale.methods import BackboneEncoder
    from unipt_scale.model import ClassificationModel

    for name in bench.METHODS:
        torch.manual_seed(0)
        model, _, notes = bench.build_method(name, tiny, R, 16, None)
        assert isinstance(model, ClassificationModel) and model.num_classes == C
        enc = model.encoder
        assert isinstance(enc, UniPTEncoder if name == "unipt" else BackboneEncoder), name
        if name == "lora":
            assert notes == {"lora_targets": ["query", "value"]}
        cfg = bench.method_config(name, tiny)
        assert cfg.method == name and cfg.train.lr == bench.DEFAULT_LR[name]


@pytest.mark.parametrize("argv, says", [
    (["--methods", "unipt,prefix"], "choose from"),
    (["--methods", "full,full"], "twice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch", "-1"], "--batch must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch", "many"], "invalid int"),
    (["--memory", "shared"], "invalid choice"),
    (["--backbone", "/no/such/model"], "does not exist"),
])
def test_bad_input_exits_2(argv, says, capsys):
    assert bench.main(argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--seq", "65"], "--seq 64 or less"),
    (["--lora-targets", "attn"], "--lora-targets ['attn'] match no module"),
])
def test_bad_input_for_this_backbone_exits_2(tiny, extra, says, capsys):
    argv = ["--backbone", tiny, "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--methods", "lora", "--text", "synthetic"]
    assert bench.main(argv + extra) == 2
    assert says in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- quantized base
def _independent_frozen_bytes(tiny, method, scheme):
    """frozen_weight_bytes of the same config, loaded and built apart from the benchmark's code."""
    from unipt_scale.config import load_config
    from unipt_scale.model import build_model
    from unipt_scale.quantization import frozen_weight_bytes

    cfg = load_config(None, [f"backbone.path={tiny}", f"method={method}", f"backbone.quantization={scheme}",
                             f"task.num_classes={C}", f"lora.r={R}"])
    return frozen_weight_bytes(build_model(cfg))


def test_quantized_rows_count_their_frozen_weights(result, tiny):
    rows = {(r["method"], r["scheme"]): r for r in result["rows"]}
    assert set(rows) == {(m, q) for m in bench.METHODS for q in ("none", "nf4")}
    nf4 = result["schemes"]["nf4"]["methods"]
    for name in ("unipt", "linear_probe", "lora"):
        row, base = rows[name, "nf4"], rows[name, "none"]
        assert row["status"] == "completed" and row["label"] == ("QLoRA@nf4" if name == "lora" else f"{name}@nf4")
        assert row["frozen_weight_bytes"] == _independent_frozen_bytes(tiny, name, "nf4"), name
        assert base["frozen_weight_bytes"] == _independent_frozen_bytes(tiny, name, "none"), name
        assert 0 < row["frozen_weight_bytes"] < 0.6 * base["frozen_weight_bytes"], name  # 4-bit linears
        assert nf4[name]["isolated_frozen_weight_bytes"] == row["frozen_weight_bytes"], "the child built it too"
        assert nf4[name]["trainable_params"] == result["methods"][name]["trainable_params"], name
        for k, v in row["vs_none"].items():
            want = row[k] / base[k] if row.get(k) is not None and base.get(k) else None
            assert v == (None if want is None else pytest.approx(want)), (name, k)
        assert row["vs_none"]["frozen_weight_bytes"] < 0.6 and row["peak_memory_bytes"] is not None
        assert rows[name, "none"]["vs_none"] is None
    full = rows["full", "nf4"]
    assert full["status"] == "refused" and nf4["full"]["status"] == "refused"
    assert "method=full trains every backbone weight" in full["reason"] and "\n" not in full["reason"]
    assert "step_ms_median" not in full and result["schemes"]["nf4"]["ratios_vs_full"] == {}
    assert set(result["schemes"]["nf4"]["ratios_vs_lora"]) == {"unipt", "linear_probe", "lora"}
    ff = result["schemes"]["nf4"]["frozen_forward"]
    assert ff["scheme"] == "nf4" and ff["frozen_weight_bytes"] < result["frozen_forward"]["frozen_weight_bytes"]


def test_quantized_table_labels_qlora_and_the_refusal(result):
    text = bench.table(result["schemes"]["nf4"]["methods"], "nf4")
    assert "QLoRA@nf4" in text and "full@nf4           refused: method=full" in text
    assert "QLoRA@nf4" in bench.vs_none_table(result["schemes"])


def test_bad_quantization_exits_2(capsys):
    assert bench.main(["--quantization", "int4"]) == 2
    assert "--quantization: unknown ['int4']" in capsys.readouterr().err
