"""bench headlines end to end on a tiny decoder and a tiny BBC-layout article folder."""
import json
import os

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
                 "--out-dir", str(tmp_path / "runs"), f"data.path={bbc}", "unipt.mapping_dim=8"]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"zero_shot", "unipt"}
    for name, r in report["results"].items():
        assert 0 <= r["scores"]["rougeL"] <= 1 and r["scores"]["num_samples"] > 0
        assert r["peak_rss_bytes"] > 0 and r["examples"]
        assert (r["train"] is None) == (name == "zero_shot")
    assert report["results"]["unipt"]["train"]["steps"] == 2
    assert main(["--json", str(out), "--methods", "nonsense"]) == 2
