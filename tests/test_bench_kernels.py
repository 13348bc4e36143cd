"""`unipt bench kernels` smoke test: records, error columns, saved bytes and the analytic roofline."""
import json

import pytest
import torch

from unipt_scale.bench import kernels as bench

REQUIRED = {"op", "shape", "dtype", "fwd_max_abs_err", "bwd_max_abs_err", "saved_bytes_fused", "saved_bytes_reference",
            "roofline_ms_fused", "roofline_ms_eager", "flops_fwd_fused", "bytes_fwd_eager", "backend", "measured"}


def test_quick_run_writes_records(tmp_path, capsys):
    path = tmp_path / "out" / "kernels.json"
    assert bench.main(["--json", str(path), "--quick"]) == 0
    records = json.loads(path.read_text())
    printed = capsys.readouterr().out
    assert "No GPU" in printed or "GPU:" in printed
    assert "cross_attention" in printed and "roof fused ms" in printed
    ops = {r["op"] for r in records}
    assert ops == set(bench.OPS)
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["roofline_ms_fused"] > 0 and r["roofline_ms_eager"] > 0
        assert set(r["shape"]) == {"L", "B", "N", "D", "d"}
    measured = [r for r in records if r["measured"]]
    cpu = not torch.cuda.is_available()
    # CPU: the efficient path and the interpreter both on 'tiny' for every op, in float32
    assert {(r["op"], r["backend"]) for r in measured} >= (
        {(op, "efficient") for op in bench.OPS} | {(op, "triton-interpreter") for op in bench.OPS} if cpu else set())
    for r in measured:
        assert r["fwd_max_abs_err"] < 1e-4 * max(1.0, r["fwd_ref_max_abs"]), r
        assert r["bwd_max_rel_err"] < 1e-4, r
        assert r["saved_bytes_fused"] > 0 and r["saved_bytes_reference"] > 0
        if r["op"] == "cross_attention":
            assert r["saved_bytes_fused"] * 4 < r["saved_bytes_reference"]
    big = [r for r in records if r["shape_name"] == "llm-n4096"]
    assert big and (not cpu or all(not r["measured"] and r["fwd_max_abs_err"] is None for r in big))


def test_cost_model_orders_of_magnitude():
    # relu-L1 attention: the eager path streams the N×N scores ~23 times; at d = 64 that dominates
    r = bench.roofline("cross_attention", 12, 2, 1024, 768, 64, torch.bfloat16)
    assert r["roofline_speedup"] > 5
    assert r["flops_bwd_fused"] == pytest.approx(18 / 8 * r["flops_bwd_eager"])
    # the projection is one GEMM either way: no speed-up expected, only the ReLU copy disappears
    p = bench.roofline("projection", 32, 1, 4096, 4096, 512, torch.bfloat16)
    assert 0.9 < p["roofline_speedup"] < 1.1
    q = bench.roofline("projection_relu", 32, 1, 4096, 4096, 512, torch.bfloat16)
    assert q["roofline_speedup"] > 1.3


def test_saved_tensor_bytes_counts_storages_once():
    x = torch.randn(10, 10, requires_grad=True)

    def fn():
        y = x.exp()  # saves its output (400 B)
        return (y[:5] * y[5:]).sum()  # saves two views of the same storage

    _, total, extra = bench.saved_tensor_bytes(fn, [x])
    assert total == 400 and extra == 400
    _, total, extra = bench.saved_tensor_bytes(lambda: (x * x).sum(), [x])
    assert total == 400 and extra == 0


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "nope"])


def test_timing_columns_with_a_stand_in_timer(monkeypatch):
    """The GPU timing path, run on CPU with do_bench/torch.compile replaced (both need CUDA/a compiler here)."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup=0, rep=0):
        grads = fn()
        assert all(g is not None for g in grads)
        calls.append(len(grads))
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch, "compile", lambda f: f)
    res = bench.time_gpu("cross_attention", "tiny", torch.float32, device="cpu")
    assert res == {"ms_fused": 1.5, "ms_eager": 1.5, "ms_compile": 1.5} and calls == [2, 2, 2]

    def failing(fn, warmup=0, rep=0):
        raise RuntimeError("boom")

    monkeypatch.setattr(triton.testing, "do_bench", failing)
    res = bench.time_gpu("aggregation", "tiny", torch.float32, device="cpu")
    assert res["ms_fused"] is None and "boom" in res["note"]
