"""`unipt bench data`: one row per (kind, workers), a full epoch each, and the trainer's rate beside it."""
import json

from unipt_scale.bench import data as bench


def test_bench_rows_and_trainer_slot(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"train_samples_per_second": 50.0, "steps": 3}))
    out = tmp_path / "bench.json"
    rc = bench.main(["--json", str(out), "--workers", "0,1", "--image-samples", "20", "--text-samples", "30",
                     "--samples-per-shard", "8", "--batch-size", "8", "--source-image-size", "24",
                     "--image-size", "16", "--tokenizer", "auto", "--trainer-metrics", str(metrics),
                     "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {(r["kind"], r["workers"]): r for r in report["results"]}
    assert set(rows) == {("image+text", 0), ("image+text", 1), ("text", 0), ("text", 1)}
    assert report["config"]["samples"]["image+text"] == 20
    for (kind, _), r in rows.items():
        assert r["samples"] == report["config"]["samples"][kind]  # a full epoch, nothing skipped
        assert r["skipped"] == 0 and r["samples_per_second"] > 0
        assert r["batches"] == -(-r["samples"] // 8)  # one reader (0 or 1 worker): one partial batch at most
    assert report["trainer"] == {"metrics": str(metrics), "samples_per_second": 50.0}
    for kind, best in report["best_samples_per_second"].items():
        assert best == max(r["samples_per_second"] for r in report["results"] if r["kind"] == kind)
        assert report["headroom"][kind] == round(best / 50.0, 3)
    assert "samples/s" in capsys.readouterr().out


def test_bench_without_trainer_and_bad_args(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--json", str(out), "--workers", "0", "--kinds", "text", "--text-samples", "10",
                       "--samples-per-shard", "4", "--tokenizer", "none"]) == 0
    report = json.loads(out.read_text())
    assert [r["kind"] for r in report["results"]] == ["text"]
    assert report["trainer"]["samples_per_second"] is None and report["headroom"] is None
    (tmp_path / "m.json").write_text(json.dumps({"steps": 3}))
    assert bench.main(["--trainer-metrics", str(tmp_path / "m.json")]) == 2
    assert bench.main(["--trainer-metrics", str(tmp_path / "absent.json")]) == 2
    assert bench.main(["--kinds", "video"]) == 2
    assert "error" in capsys.readouterr().err
