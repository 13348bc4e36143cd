"""bench headlines end to end on a tiny decoder and a tiny BBC-layout article folder, at none and on its NF4
quantization (the frozen weights shrink; the quantized rows are compared with the same system at none)."""
import json
import os

import pytest

from tiny_models import tiny_causal_lm_dir
from unipt_scale.bench.headlines import main, rouge_l
from unipt_scale.data.lm import BBC_CLASSES, read_bbc_headlines


def _bbc(root):
    words = ["good", "bad", "movie", "food", "day", "night", "happy", "sad", "the", "was"]
    for c, cls in enumerate(BBC_CLASSES):
        os.makedirs(os.path.join(root, cls))
        for i in range(6):
            head = " ".join(words[(i + c + k) % len(words)] for k in range(3))
            body = " ".join(words[(i * 3 + k) % len(words)] for k in range(30))
            with open(os.path.join(root, cls, f"{i:03d}.txt"), "w", encoding="latin-1") as fh:
                fh.write(f"{head}\n\n{body}\n")
    return root


def test_rouge_l_and_exact_match():
    s = rouge_l(["UK economy grows", "a b"], ["UK economy grows", "c d"])
    assert s["exact_match"] == 0.5 and s["rougeL"] == 0.5 and s["num_samples"] == 2


def test_bench_headlines_runs_each_system(tmp_path):
    bbc = _bbc(str(tmp_path / "bbc"))
    assert len(read_bbc_headlines(bbc)) == 30
    model = tiny_causal_lm_dir(str(tmp_path))
    out = tmp_path / "h.json"
    assert main(["--json", str(out), "--backbone", model, "--methods", "zero_shot,unipt", "--max-steps", "2",
                 "--train-limit", "8", "--test-limit", "4", "--max-new-tokens", "3", "--max-length", "48",
                 "--quantization", "none,nf4", "--out-dir", str(tmp_path / "runs"), f"data.path={bbc}",
                 "unipt.mapping_dim=8"]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"zero_shot", "unipt"}
    assert report["quantization"] == ["none", "nf4"] and report["results"] == report["schemes"]["none"]
    for scheme, results in report["schemes"].items():
        assert set(results) == {"zero_shot", "unipt"}
        for name, r in results.items():
            assert r["scheme"] == scheme
            assert 0 <= r["scores"]["rougeL"] <= 1 and r["scores"]["num_samples"] > 0
            assert r["peak_rss_bytes"] > 0 and r["examples"]
            assert (r["train"] is None) == (name == "zero_shot")
    assert report["results"]["unipt"]["train"]["steps"] == report["schemes"]["nf4"]["unipt"]["train"]["steps"] == 2
    rows = {(r["system"], r["scheme"]): r for r in report["rows"]}
    assert set(rows) == {(s, q) for s in ("zero_shot", "unipt") for q in ("none", "nf4")}
    for system in ("zero_shot", "unipt"):
        base, q = rows[system, "none"], rows[system, "nf4"]
        assert base["vs_none"] is None and q["label"] == f"{system}@nf4"
        assert 0 < q["frozen_weight_bytes"] < 0.6 * base["frozen_weight_bytes"], system  # the 4-bit decoder
        assert q["vs_none"]["rougeL_delta"] == pytest.approx(q["rougeL"] - base["rougeL"])
        assert q["vs_none"]["frozen_weight_bytes_ratio"] == pytest.approx(
            q["frozen_weight_bytes"] / base["frozen_weight_bytes"])
    # the frozen decoder is the same whether a fresh side network sits beside it or a trained one
    assert rows["zero_shot", "nf4"]["frozen_weight_bytes"] == rows["unipt", "nf4"]["frozen_weight_bytes"]
    assert main(["--json", str(out), "--methods", "nonsense"]) == 2
    assert main(["--json", str(out), "--quantization", "int4"]) == 2
