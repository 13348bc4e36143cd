"""`unipt bench quality --quick`: every suite on tiny random-init stand-ins, through the real trainer, each run in
its own process. Checked: the JSON's schema, that its aggregates are its runs' numbers, that the learning rate
was chosen on the validation split by the stated rule, that refusals are recorded, and that the charts are PNGs;
for the headline suite, that every ROUGE-L is rouge-score's on the texts the run recorded, that the references are
the article files' headlines, and that the zero-shot texts are transformers' own greedy generate of the stand-in.
"""
import json
import math
import os
import statistics

import pytest
from PIL import Image

from unipt_scale import assets
from unipt_scale.bench import quality
from unipt_scale.cli import main as cli_main
from unipt_scale.config import DEFAULT_LR

METHODS = quality.DEFAULT_METHODS  # what a suite runs unless --methods names others

SEEDS = 2
FACTORS = [0.5, 2.0]
PNG = b"\x89PNG\r\n\x1a\n"
HEADLINES = "headlines-smollm2"
METRIC = {"retrieval-fmnist": "rsum", HEADLINES: "rougeL"}
# The suites the full fixture runs; the task-family suites run in a lighter test of their own (CI's time).
FAMILIES = ["video-moving-fashion", "vqa-sort-of-clevr", "grounding-sort-of-clevr"]
SUITES = [name for name in quality.SUITES if name not in FAMILIES]
METHOD_FIELDS = {"status", "lr", "lr_sweep", "seeds", "runs", "metric", "test", "val_metric", "peak_memory_bytes",
                 "rss_baseline_bytes", "rss_method", "cuda_peak_allocated", "step_ms_median", "wall_s",
                 "process_wall_s", "trainable_params", "frozen_params", "optimizer_bytes", "steps", "samples_seen",
                 "test_samples", "val_samples"}
STATS = {"mean", "std", "min", "max", "n", "values"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    path, charts = root / "res" / "q.json", root / "charts"
    rc = quality.main(["--quick", "--suite", ",".join(SUITES), "--seeds", str(SEEDS), "--lr-factors", "0.5,2", "--threads", "1",
                       "--json", str(path), "--out-dir", str(charts), "--work-dir", str(root / "work")])
    assert rc == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["q.json"]  # atomic: no temporary left behind
    return json.loads(path.read_text()), charts


def _close(stat, values):
    assert stat["values"] == pytest.approx(values) and stat["n"] == len(values)
    assert stat["mean"] == pytest.approx(statistics.fmean(values))
    assert stat["min"] == min(values) and stat["max"] == max(values)
    if len(values) > 1:
        assert stat["std"] == pytest.approx(statistics.stdev(values))
    else:
        assert stat["std"] is None


def test_schema(out):
    res, _ = out
    assert res["schema"] == quality.SCHEMA and set(res) == {"schema", "complete", "config", "device", "suites"}
    assert res["complete"] is True
    cfg = res["config"]
    assert cfg["quick"] is True and cfg["seeds"] == [0, 1] and cfg["lr_factors"] == FACTORS
    assert cfg["methods"] == list(METHODS) and cfg["suites"] == SUITES
    assert cfg["default_lr"] == {m: DEFAULT_LR[m] for m in METHODS}
    assert set(res["suites"]) == set(SUITES)
    for name, s in res["suites"].items():
        assert s["status"] == "completed" and s["quick"] is True and s["stand_in"], name
        assert s["metric"] == METRIC.get(name, "accuracy")
        assert ("zero_shot" in s) == ("generation" in s) == (name == HEADLINES)
        b = s["budget"]
        assert b["limit_train"] == b["max_steps"] * b["batch_size"]
        assert f"train.max_steps={b['max_steps']}" in s["overrides"]
        assert set(s["methods"]) == set(METHODS)
        assert set(s["ratios"]) == {"unipt_over_full", "unipt_over_lora", "unipt_over_linear_probe"}


def test_aggregates_are_the_runs(out):
    res, _ = out
    for name, s in res["suites"].items():
        metric = s["metric"]
        for m, r in s["methods"].items():
            if r["status"] == "refused":
                continue
            assert r["status"] == "completed" and METHOD_FIELDS <= set(r), (name, m, METHOD_FIELDS - set(r))
            runs = r["runs"]
            assert [x["seed"] for x in runs] == [0, 1] and all(x["lr"] == r["lr"] for x in runs)
            assert all(x["status"] == "completed" for x in runs)
            _close(r["metric"], [x["test"][metric] for x in runs])
            _close(r["peak_memory_bytes"], [x["memory"]["peak_memory_bytes"] for x in runs])
            _close(r["step_ms_median"], [x["step_ms_median"] for x in runs])
            _close(r["wall_s"], [x["wall_s"] for x in runs])
            for k, stat in r["test"].items():
                assert STATS == set(stat) and all(math.isfinite(v) for v in stat["values"]), (name, m, k)
            for x in runs:
                mem = x["memory"]
                assert mem["peak_memory_bytes"] >= 0 and mem["rss_peak_bytes"] >= mem["rss_baseline_bytes"] > 0
                assert x["step_ms_median"] > 0 and x["wall_s"] > 0 and x["steps"] == s["budget"]["max_steps"]
                assert len(x["step_ms"]) == x["steps"] and all(t > 0 for t in x["step_ms"])
                assert x["samples_seen"] == s["budget"]["max_steps"] * s["budget"]["batch_size"]
                assert math.isfinite(x["train_loss_first"]) and math.isfinite(x["train_loss_last"])
                assert x["trainable_params"] == r["trainable_params"] > 0
                assert x["optimizer_bytes"] > 0
                if m != "full":  # two fp32 AdamW moments per trained weight (full: BERT's unused pooler has none)
                    assert x["optimizer_bytes"] >= 8 * x["trainable_params"], (name, m)
            if metric in ("accuracy", "rougeL"):
                assert all(0 <= v <= 1 for v in r["metric"]["values"])
            else:  # rsum is the sum of the six recalls, run by run, so also in the mean
                parts = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
                assert r["metric"]["mean"] == pytest.approx(sum(r["test"][p]["mean"] for p in parts))
                assert all(0 <= r["test"][p]["mean"] <= 1 for p in parts)


def test_every_method_sees_the_same_data(out):
    res, _ = out
    for name, s in res["suites"].items():
        done = [r for r in s["methods"].values() if r["status"] == "completed"]
        assert len({r["test_samples"] for r in done}) == 1 and done[0]["test_samples"] > 0, name
        assert len({r["val_samples"] for r in done}) == 1, name


def test_learning_rate_is_chosen_on_validation(out):
    res, _ = out
    for name, s in res["suites"].items():
        metric = s["metric"]
        for m, r in s["methods"].items():
            sweep = r["lr_sweep"]
            assert sweep["split"] == "val" and sweep["seed"] == 0 and sweep["metric"] == metric
            assert sweep["default_lr"] == DEFAULT_LR[m] and sweep["factors"] == FACTORS
            if r["status"] == "refused":
                assert sweep["runs"] == []
                continue
            assert [x["lr"] for x in sweep["runs"]] == pytest.approx([DEFAULT_LR[m] * f for f in FACTORS])
            for x in sweep["runs"]:
                assert set(x) == {"lr", "factor", "status", f"val_{metric}"}, "nothing of the test split"
            best = max(sweep["runs"], key=lambda x: (x[f"val_{metric}"], -abs(math.log(x["factor"]))))
            assert sweep["chosen_lr"] == r["lr"] == best["lr"], (name, m)
            # the seed-0 run is the sweep's run at that learning rate; a frozen-forward method's sweep trained every
            # rate on one forward per batch, and its chosen variant, run again alone, came out the same
            assert r["runs"][0]["val"][metric] == best[f"val_{metric}"]
            shared = m in ("unipt", "linear_probe")
            assert sweep.get("shared_forward", False) is shared, (name, m)
            if shared:
                assert sweep["same_as_alone"] is True and sweep["frozen_forwards"] > 0


def test_lora_on_the_conv_backbones_is_refused_with_its_reason(out):
    res, charts = out
    for name in ("fmnist-efficientnet", "retrieval-fmnist"):
        lora = res["suites"][name]["methods"]["lora"]
        assert lora["status"] == "refused" and "peft's LoRA cannot adapt" in lora["reason"], lora
        assert "metric" not in lora and res["suites"][name]["ratios"]["unipt_over_lora"] is None
    assert res["suites"]["tweets-minilm"]["methods"]["lora"]["status"] == "completed"


def test_trainable_parameters_follow_the_method(out):
    res, _ = out
    s = res["suites"]["tweets-minilm"]["methods"]
    hidden, classes = 32, 3
    assert s["linear_probe"]["trainable_params"] == hidden * classes + classes
    assert s["linear_probe"]["trainable_params"] < s["lora"]["trainable_params"] < s["full"]["trainable_params"]
    assert s["unipt"]["trainable_params"] < s["full"]["trainable_params"]
    for name, suite in res["suites"].items():
        total = {m: r["trainable_params"] + r["frozen_params"] for m, r in suite["methods"].items() if "metric" in r}
        frozen = "zero_shot" if name == HEADLINES else "linear_probe"  # no probe on a causal LM
        rows = dict(suite["methods"], zero_shot=suite.get("zero_shot"))
        assert total["full"] == rows[frozen]["trainable_params"] + rows[frozen]["frozen_params"], name
    assert res["suites"][HEADLINES]["zero_shot"]["trainable_params"] == 0


def test_ratios_are_unipt_over_the_others(out):
    res, _ = out
    s = res["suites"]["tweets-minilm"]
    u, f = s["methods"]["unipt"], s["methods"]["full"]
    r = s["ratios"]["unipt_over_full"]
    assert r["metric"] == pytest.approx(u["metric"]["mean"] / f["metric"]["mean"])
    assert r["peak_memory_bytes"] == pytest.approx(u["peak_memory_bytes"]["mean"] / f["peak_memory_bytes"]["mean"])
    assert r["step_ms_median"] == pytest.approx(u["step_ms_median"]["mean"] / f["step_ms_median"]["mean"])
    assert r["trainable_params"] == pytest.approx(u["trainable_params"] / f["trainable_params"])


def test_charts_are_png_images(out):
    res, charts = out
    files = sorted(p.name for p in charts.iterdir())
    assert len(files) == 2 * len(SUITES)
    for name, s in res["suites"].items():
        assert set(s["charts"]) == {"quality_vs_memory", "step_time"}
        for path in s["charts"].values():
            assert path.startswith(str(charts)) and name in path
            data = open(path, "rb").read()
            assert data[:8] == PNG and len(data) > 10_000
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.size[0] >= 500 and img.size[1] >= 300


def test_charts_go_beside_the_json_and_one_seed_has_no_std(tmp_path):
    path = tmp_path / "one.json"
    assert quality.main(["--quick", "--suite", "tweets-minilm", "--methods", "linear_probe", "--seeds", "1",
                         "--lr-factors", "1", "--threads", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    r = res["suites"]["tweets-minilm"]["methods"]["linear_probe"]
    assert r["metric"]["n"] == 1 and r["metric"]["std"] is None and len(r["lr_sweep"]["runs"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one-tweets-minilm-quality-memory.png", "one-tweets-minilm-step-time.png", "one.json"]


@pytest.mark.parametrize("argv, says", [
    (["--suite", "nope"], "--suite: unknown ['nope']"),
    (["--methods", "unipt,prefix"], "--methods: unknown ['prefix']"),
    (["--methods", "unipt,unipt"], "each name once"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--lr-factors", "0,1"], "distinct positive numbers"),
    (["--lr-factors", "fast"], "give positive numbers"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--seeds", "two"], "invalid int"),
])
def test_bad_input_is_one_line(argv, says, tmp_path, capsys):
    assert quality.main(argv + ["--quick", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1]  # our own errors are that one line; argparse's follow its usage
    assert len(err) == 1 or err[0].startswith("usage:")
    assert not (tmp_path / "x.json").exists()


def test_no_output_named_is_one_line(capsys):
    assert quality.main(["--quick"]) == 2
    assert "give --json FILE" in capsys.readouterr().err


@pytest.mark.parametrize("suite, says", [
    ("tweets-mpnet", "needs builtin:all-mpnet-base-v2, which unipt_scale.assets does not provide yet"),
    ("tweets-smollm2", "needs builtin:smollm2-135m, which unipt_scale.assets does not provide yet"),
    ("fmnist-efficientnet", "apt-get install dataset-fashion-mnist"),
    (HEADLINES, "needs builtin:smollm2-135m, which unipt_scale.assets does not provide yet"),
])
def test_a_suite_without_its_assets_refuses_in_one_line(suite, says, tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(assets.BUILTIN_MODELS, "all-mpnet-base-v2", raising=False)
    monkeypatch.delitem(assets.BUILTIN_MODELS, "smollm2-135m", raising=False)
    import unipt_scale.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "FASHION_MNIST_DIR", str(tmp_path / "no-such-dir"))
    assert quality.main(["--suite", suite, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "--quick" in err
    assert not (tmp_path / "x.json").exists()


def test_cli_delegates(tmp_path, capsys):
    assert cli_main(["bench", "quality", "--suite", "nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_the_documented_budgets_are_the_suites():
    """The module docstring's budget table is what the suites run."""
    rows = {line.split()[0]: line.split()[1:5] for line in quality.__doc__.splitlines()
            if line.strip() and line.split()[0] in quality.SUITES}
    assert set(rows) == set(quality.SUITES)
    for name, suite in quality.SUITES.items():
        b = suite.budget
        assert rows[name] == [str(b["max_steps"]), str(b["batch_size"]), str(b["max_steps"] * b["batch_size"]),
                              str(b["limit_eval"])], name


# ---------------------------------------------------------------------------------------------- headline suite
def _rouge_reference(rows):
    """rouge-score itself (not the project's wrapper) on recorded (reference, generated) texts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f1 = [scorer.score(r["reference"], r["generated"])["rougeL"].fmeasure for r in rows]
    exact = [r["generated"].lower().split() == r["reference"].lower().split() for r in rows]
    return sum(f1) / len(f1), sum(exact) / len(exact)


def _headline_runs(s):
    yield "zero_shot", s["zero_shot"]["runs"][0]
    for m, r in s["methods"].items():
        for x in r.get("runs", []):
            yield m, x


def _override(s, key):
    return next(o.split("=", 1)[1] for o in s["overrides"] if o.startswith(key + "="))


def test_headline_scores_are_rouge_score_on_the_recorded_texts(out):
    res, _ = out
    s = res["suites"][HEADLINES]
    articles = _override(s, "data.path")
    keys = {}
    nonzero = False
    chose = {(m, id(r["runs"][0])) for m, r in s["methods"].items() if r.get("runs")}  # the sweep's seed-0 runs
    for m, x in _headline_runs(s):
        # Only a sweep's runs write val headlines (their val ROUGE-L chooses the learning rate).
        assert set(x["generations"]) == ({"val", "test"} if (m, id(x)) in chose else {"test"}), m
        for split in x["generations"]:
            rows = x["generations"][split]
            rouge, exact = _rouge_reference(rows)
            assert x[split]["rougeL"] == pytest.approx(rouge, abs=1e-12), (m, split)
            assert x[split]["exact_match"] == pytest.approx(exact) and x[split]["num_samples"] == len(rows)
            nonzero |= rouge > 0
            keys.setdefault(split, [r["key"] for r in rows])
            assert [r["key"] for r in rows] == keys[split], "every run scores the same articles, in one order"
            for r in rows:  # the reference is line 1 of the article's file
                with open(os.path.join(articles, r["key"]), encoding="latin-1") as fh:
                    assert r["reference"] == fh.readline().strip()
                assert len(r["generated"].split()) <= s["generation"]["max_new_tokens"]
            assert x[split]["loss"] > 0 and x[split]["num_tokens"] > 0  # the trainer's own token evaluation
    assert nonzero, "the stand-in's texts overlap their references somewhere, so the comparison means something"
    assert not set(keys["val"]) & set(keys["test"])
    for m, r in s["methods"].items():
        if "metric" in r:  # the method's metric is its seeds' test ROUGE-L, the sweep its seed-0 val ROUGE-L
            assert r["metric"]["values"] == pytest.approx([_rouge_reference(x["generations"]["test"])[0]
                                                           for x in r["runs"]])
            swept = {x["lr"]: x["val_rougeL"] for x in r["lr_sweep"]["runs"]}
            assert swept[r["lr"]] == pytest.approx(_rouge_reference(r["runs"][0]["generations"]["val"])[0])


def test_headline_zero_shot_is_the_frozen_model(out):
    """One row, no training, and its texts are what transformers' greedy generate writes with the saved stand-in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipt_scale.data.lm import HEADLINE_INSTRUCTION

    res, _ = out
    s = res["suites"][HEADLINES]
    z = s["zero_shot"]
    assert z["status"] == "completed" and z["trainable_params"] == 0 and z["steps"] == 0
    assert len(z["runs"]) == 1 and z["metric"]["n"] == 1 and z["metric"]["std"] is None and "lr_sweep" not in z
    run = z["runs"][0]
    rouge, exact = _rouge_reference(run["generations"]["test"])
    assert z["metric"]["mean"] == pytest.approx(rouge, abs=1e-12) and z["test"]["exact_match"]["mean"] == exact
    assert z["test_samples"] == s["methods"]["unipt"]["test_samples"] == len(run["generations"]["test"])
    for m in ("unipt", "lora"):  # both leave the decoder's own weights frozen: the zero-shot model's
        assert s["methods"][m]["frozen_params"] == z["frozen_params"]

    backbone, max_length = _override(s, "backbone.path"), int(_override(s, "data.max_length"))
    articles = _override(s, "data.path")
    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForCausalLM.from_pretrained(backbone).eval()
    for r in run["generations"]["test"]:
        with open(os.path.join(articles, r["key"]), encoding="latin-1") as fh:
            body = " ".join(line.strip() for line in fh.read().split("\n")[1:] if line.strip())
        ids = tok(HEADLINE_INSTRUCTION + body + "\n", add_special_tokens=False)["input_ids"][-max_length:]
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=s["generation"]["max_new_tokens"], do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert r["generated"] == tok.decode(new, skip_special_tokens=True).strip(), r["key"]


def test_headline_linear_probe_is_not_applicable(out):
    res, _ = out
    s = res["suites"][HEADLINES]
    probe = s["methods"]["linear_probe"]
    assert probe["status"] == "refused" and probe["lr_sweep"]["runs"] == [] and "metric" not in probe
    assert "linear_probe has nothing to train for task.kind=causal_lm" in probe["reason"]
    assert s["ratios"]["unipt_over_linear_probe"] is None
    assert all(s["methods"][m]["status"] == "completed" for m in ("unipt", "lora", "full"))
    table = quality.table(res)
    assert "zero_shot" in table and "linear_probe  refused: method=linear_probe has nothing" in table


# ---------------------------------------------------------------------------------------------- quantized base
QSEEDS = 2


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    """tweets-minilm at none and int8: none sweeps, int8 reuses each method's chosen learning rate."""
    root = tmp_path_factory.mktemp("quality-quant")
    path = root / "q.json"
    rc = quality.main(["--quick", "--suite", "tweets-minilm", "--quantization", "none,int8", "--methods",
                       "unipt,lora,full", "--seeds", str(QSEEDS), "--lr-factors", "0.5,2", "--threads", "1",
                       "--json", str(path), "--work-dir", str(root / "work")])
    assert rc == 0
    return json.loads(path.read_text()), root


def test_quantized_runs_reuse_the_none_sweeps_learning_rate(quant):
    res, _ = quant
    assert res["schema"] == quality.SCHEMA and res["config"]["quantization"] == ["none", "int8"]
    s = res["suites"]["tweets-minilm"]
    assert list(s["schemes"]) == ["int8"] and s["quantization"]["reference"] == "none"
    none, int8 = s["methods"], s["schemes"]["int8"]["methods"]
    for m in ("unipt", "lora"):
        r = int8[m]
        assert r["status"] == "completed" and r["scheme"] == "int8", (m, r.get("reason"))
        assert "lr_sweep" not in r and r["lr_source"] == quality.LR_FROM_NONE, "no sweep of its own"
        assert r["lr"] == none[m]["lr_sweep"]["chosen_lr"] == none[m]["lr"]
        assert [x["lr"] for x in r["runs"]] == [r["lr"]] * QSEEDS and [x["seed"] for x in r["runs"]] == [0, 1]
        assert all(x["scheme"] == "int8" for x in r["runs"])
        _close(r["metric"], [x["test"]["accuracy"] for x in r["runs"]])
        _close(r["peak_memory_bytes"], [x["memory"]["peak_memory_bytes"] for x in r["runs"]])
        _close(r["step_ms_median"], [x["step_ms_median"] for x in r["runs"]])
        assert r["trainable_params"] == none[m]["trainable_params"], m
        assert 0 < r["frozen_weight_bytes"] < 0.6 * none[m]["frozen_weight_bytes"], m  # int8 linears
    full = int8["full"]
    assert full["status"] == "refused" and "method=full trains every backbone weight" in full["reason"]
    assert "runs" not in full and s["schemes"]["int8"]["ratios"]["unipt_over_full"] is None
    assert none["full"]["status"] == "completed"  # the none runs are today's


def test_quantized_deltas_are_the_difference_of_the_recorded_means(quant):
    res, _ = quant
    s = res["suites"]["tweets-minilm"]
    rows = {(r["method"], r["scheme"]): r for r in s["quantization"]["rows"]}
    assert set(rows) == {(m, q) for m in ("unipt", "lora", "full") for q in ("none", "int8")}
    for (m, q), row in rows.items():
        rec = (s["methods"] if q == "none" else s["schemes"][q]["methods"])[m]
        assert row["status"] == rec["status"] and row["label"] == quality.label(m, q)
        if rec["status"] == "refused":
            assert row["reason"] == rec["reason"] and "metric" not in row
            continue
        assert row["metric"]["mean"] == rec["metric"]["mean"] and row["metric"]["std"] == rec["metric"]["std"]
        assert row["peak_memory_bytes"] == rec["peak_memory_bytes"]["mean"]
        assert row["step_ms_median"] == rec["step_ms_median"]["mean"]
        assert row["frozen_weight_bytes"] == rec["frozen_weight_bytes"] == rec["runs"][0]["frozen_weight_bytes"]
        if q == "none":
            assert row["delta_vs_none"] is None
        else:
            assert row["delta_vs_none"] == pytest.approx(
                statistics.fmean(x["test"]["accuracy"] for x in rec["runs"])
                - statistics.fmean(x["test"]["accuracy"] for x in s["methods"][m]["runs"]), abs=1e-12)
    assert rows["lora", "int8"]["label"] == "QLoRA@int8"
    text = quality.table(res)
    assert "QLoRA@int8" in text and "full@int8          refused: method=full" in text


def test_quantized_frozen_bytes_are_unipt_infos_count(quant):
    """The recorded bytes equal frozen_weight_bytes of the same config built apart from the benchmark."""
    from unipt_scale.config import load_config
    from unipt_scale.model import build_model
    from unipt_scale.quantization import frozen_weight_bytes

    res, _ = quant
    s = res["suites"]["tweets-minilm"]
    for q, methods in (("none", s["methods"]), ("int8", s["schemes"]["int8"]["methods"])):
        for m in ("unipt", "lora"):
            cfg = load_config(None, s["overrides"] + [f"method={m}", f"backbone.quantization={q}"])
            assert methods[m]["frozen_weight_bytes"] == frozen_weight_bytes(build_model(cfg, num_classes=3)), (q, m)


def test_quantized_charts_have_every_scheme(quant):
    res, root = quant
    charts = res["suites"]["tweets-minilm"]["charts"]
    assert set(charts) == {"quality_vs_memory", "step_time"}
    for path in charts.values():
        with Image.open(path) as img:
            img.verify()


@pytest.fixture(scope="module")
def quant_lm(tmp_path_factory):
    """The headline suite (zero-shot per scheme) and the CNN suite (refused) at nf4, listed before none."""
    root = tmp_path_factory.mktemp("quality-quant-lm")
    path = root / "q.json"
    rc = quality.main(["--quick", "--suite", f"{HEADLINES},fmnist-efficientnet", "--quantization", "nf4,none",
                       "--methods", "unipt", "--seeds", "1", "--lr-factors", "1", "--threads", "1",
                       "--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


def test_headline_zero_shot_per_scheme_and_cnn_refusal(quant_lm):
    res = quant_lm
    assert res["config"]["quantization"] == ["none", "nf4"], "none runs first: the others reuse its choices"
    s = res["suites"][HEADLINES]
    z, zq = s["zero_shot"], s["schemes"]["nf4"]["zero_shot"]
    assert z["status"] == zq["status"] == "completed" and zq["scheme"] == "nf4"
    assert zq["runs"][0]["set_up_as"] == "method=unipt" and z["runs"][0]["set_up_as"] == "method=full"
    assert zq["trainable_params"] == 0 and zq["steps"] == 0
    assert 0 < zq["frozen_weight_bytes"] < z["frozen_weight_bytes"]
    rouge, _ = _rouge_reference(zq["runs"][0]["generations"]["test"])
    assert zq["metric"]["mean"] == pytest.approx(rouge, abs=1e-12)
    rows = {(r["method"], r["scheme"]): r for r in s["quantization"]["rows"]}
    assert rows["zero_shot", "nf4"]["delta_vs_none"] == pytest.approx(zq["metric"]["mean"] - z["metric"]["mean"])
    u = s["schemes"]["nf4"]["methods"]["unipt"]
    assert u["status"] == "completed" and u["lr"] == s["methods"]["unipt"]["lr"]
    cnn = res["suites"]["fmnist-efficientnet"]
    assert cnn["methods"]["unipt"]["status"] == "completed"
    refused = cnn["schemes"]["nf4"]["methods"]["unipt"]
    assert refused["status"] == "refused" and "is a convolutional network" in refused["reason"]
    assert "\n" not in refused["reason"]


def test_without_none_a_quantized_scheme_sweeps(tmp_path):
    path = tmp_path / "q.json"
    assert quality.main(["--quick", "--suite", "tweets-minilm", "--quantization", "int8", "--methods",
                         "linear_probe", "--seeds", "1", "--lr-factors", "1", "--threads", "1",
                         "--json", str(path)]) == 0
    r = json.loads(path.read_text())["suites"]["tweets-minilm"]["methods"]["linear_probe"]
    assert r["status"] == "completed" and r["scheme"] == "int8" and r["lr_source"] == quality.LR_OWN_SWEEP
    assert r["lr_sweep"]["chosen_lr"] == r["lr"] and len(r["lr_sweep"]["runs"]) == 1


def test_scheme_lists_agree_and_bad_ones_are_one_line(tmp_path, capsys):
    from unipt_scale import quantization
    from unipt_scale.bench import headlines

    assert quality.SCHEMES == headlines.SCHEMES == quantization.SCHEMES
    assert quality.main(["--quick", "--quantization", "none,int4", "--json", str(tmp_path / "x.json")]) == 2
    assert "--quantization: unknown ['int4']" in capsys.readouterr().err


def test_variants_are_their_method_with_their_overrides(tmp_path):
    path = tmp_path / "q.json"
    assert quality.main(["--quick", "--suite", HEADLINES, "--methods", "unipt,lora,deep,qlora",
                         "--variant", "deep=unipt unipt.side_blocks=1 train.lr=2e-3",
                         "--variant", "qlora=lora backbone.quantization=nf4", "--seeds", "1", "--lr-factors", "1",
                         "--threads", "1", "--no-zero-shot", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert "zero_shot" not in res["suites"][HEADLINES]
    # A sweep of one learning rate chooses nothing: its runs write test headlines only.
    runs = [r for m in res["suites"][HEADLINES]["methods"].values() for r in m["runs"]]
    assert all(set(r["generations"]) == {"test"} and "rougeL" not in (r["val"] or {}) for r in runs)
    assert res["config"]["variants"] == {"deep": {"method": "unipt", "overrides": ["unipt.side_blocks=1"]},
                                         "qlora": {"method": "lora", "overrides": ["backbone.quantization=nf4"]}}
    assert res["config"]["default_lr"] == {"unipt": DEFAULT_LR["unipt"], "lora": DEFAULT_LR["lora"], "deep": 2e-3,
                                           "qlora": DEFAULT_LR["lora"]}
    m = res["suites"][HEADLINES]["methods"]
    assert all(m[k]["status"] == "completed" for k in ("unipt", "lora", "deep", "qlora")), m
    assert m["deep"]["lr"] == 2e-3 and m["unipt"]["lr"] == DEFAULT_LR["unipt"]
    assert m["deep"]["trainable_params"] > m["unipt"]["trainable_params"]  # the side block's own weights
    assert m["qlora"]["trainable_params"] == m["lora"]["trainable_params"]  # the same adapters ...
    assert m["qlora"]["runs"][0]["frozen_weight_bytes"] < m["lora"]["runs"][0]["frozen_weight_bytes"]  # ... on NF4


@pytest.mark.parametrize("variant, says", [
    ("deep", "write NAME=METHOD"),
    ("deep=prefix", "unknown method 'prefix'"),
    ("lora=unipt", "that is not a method's"),
    ("deep=unipt train.seed=3", "train.seed is the benchmark's to set"),
    ("deep=unipt train.lr=fast", "train.lr='fast' is not a positive number"),
    ("deep=unipt side_blocks", "'side_blocks' is not KEY=VALUE"),
])
def test_bad_variants_are_one_line(variant, says, tmp_path, capsys):
    assert quality.main(["--quick", "--methods", "unipt", "--variant", variant, "--json",
                         str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


# ----------------------------------------------------------------------------------------------------------------
# --merge: several invocations' methods as one result
# ----------------------------------------------------------------------------------------------------------------
def _split(res, keep, suites=None):
    """The result as if an invocation had run only the methods `keep` (and the zero-shot row where kept)."""
    part = json.loads(json.dumps(res))
    for name in list(part["suites"]):
        if suites is not None and name not in suites:
            del part["suites"][name]
            continue
        s = part["suites"][name]
        s["methods"] = {m: r for m, r in s["methods"].items() if m in keep}
        if "zero_shot" not in keep:
            s.pop("zero_shot", None)
    part["config"]["methods"] = [m for m in part["config"]["methods"] if m in keep]
    return part


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_merge_is_the_union_of_the_invocations(out, tmp_path, capsys):
    res, _ = out
    a = _write(tmp_path / "a.json", _split(res, {"unipt", "full", "zero_shot"}))
    b = _write(tmp_path / "b.json", _split(res, {"lora", "linear_probe"}))
    merged_path = tmp_path / "merged" / "all.json"
    assert quality.main(["--merge", a, b, "--json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["complete"] and merged["config"]["merged_from"] == [a, b]
    assert merged["suites"].keys() == {n for n, s in res["suites"].items() if s["status"] == "completed"}
    for name, s in merged["suites"].items():
        original = res["suites"][name]
        assert s["methods"] == original["methods"]  # every record as measured, none altered
        assert s.get("zero_shot") == original.get("zero_shot")
        assert s["ratios"] == original["ratios"]  # recomputed over the union: the single run's ratios
        assert s["merged_from"] == [a, b]
        for chart in s["charts"].values():
            assert chart.startswith(str(merged_path.parent)) and open(chart, "rb").read(8) == PNG
    printed = capsys.readouterr().out
    assert "lora" in printed and "unipt" in printed and f"wrote {merged_path}" in printed


def test_merge_refuses_what_does_not_compare_in_one_line(out, tmp_path, capsys):
    res, _ = out
    a = _write(tmp_path / "a.json", _split(res, {"unipt"}))
    cases = []
    cases.append(([a, _write(tmp_path / "dup.json", _split(res, {"unipt", "lora"}))], "has unipt and so has"))
    other = _split(res, {"lora"})
    for s in other["suites"].values():
        s["budget"] = dict(s["budget"], max_steps=s["budget"]["max_steps"] + 1)
    cases.append(([a, _write(tmp_path / "budget.json", other)], "budget differs from"))
    unfinished = dict(_split(res, {"lora"}), complete=False)
    cases.append(([a, _write(tmp_path / "partial.json", unfinished)], "did not finish"))
    cases.append(([a, _write(tmp_path / "device.json", dict(_split(res, {"lora"}), device="cuda: H100"))],
                  "one device only"))
    cases.append(([a, _write(tmp_path / "junk.json", {"schema": "other"})], "not a bench quality result"))
    cases.append(([a, str(tmp_path / "missing.json")], "cannot read it as JSON"))
    cases.append(([a], "two or more"))
    for files, says in cases:
        target = tmp_path / "m.json"
        assert quality.main(["--merge", *files, "--json", str(target)]) == 2, says
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, (says, err)
        assert not target.exists()
    assert quality.main(["--merge", a, a, "--json", a]) == 2
    assert "one of the files to merge" in capsys.readouterr().err


def test_task_family_suites_train_every_method_on_their_generated_data(tmp_path):
    path = tmp_path / "families.json"
    assert quality.main(["--quick", "--suite", ",".join(FAMILIES), "--methods", "unipt,full,linear_probe",
                         "--seeds", "1", "--lr-factors", "1", "--threads", "1", "--json", str(path),
                         "--work-dir", str(tmp_path / "work")]) == 0
    res = json.loads(path.read_text())
    assert list(res["suites"]) == FAMILIES
    for name, suite in res["suites"].items():
        assert suite["metric"] == ("rsum" if name.startswith("video") else "accuracy")
        for method, rec in suite["methods"].items():
            assert rec["status"] == "completed", (name, method, rec.get("reason"))
            run = rec["runs"][0]
            assert math.isfinite(run["test"][suite["metric"]]) and run["test"]["num_samples"] > 0
            if name.startswith("video"):
                assert 0.0 <= run["test"]["order_accuracy"] <= 1.0
            else:
                assert {"accuracy_relational", "accuracy_nonrelational"} <= set(run["test"])
