"""`unipt bench kernels` smoke test: records, error columns, saved bytes and the analytic roofline."""
import json
import os
import subprocess
import sys

import pytest
import torch

from unipt_scale.bench import kernels as bench

from kernel_cases import CUDA, DEV


REQUIRED = {"op", "shape", "dtype", "fwd_max_abs_err", "bwd_max_abs_err", "saved_bytes_fused", "saved_bytes_reference",
            "roofline_ms_fused", "roofline_ms_eager", "flops_fwd_fused", "bytes_fwd_eager", "backend", "measured"}


def test_quick_run_writes_records(tmp_path, capsys):
    path = tmp_path / "out" / "kernels.json"
    # on a GPU the timing sweep (torch.compile per record) is scripts/gpu_check.sh's job, not a unit test's
    assert bench.main(["--json", str(path), "--quick"] + (["--timing", "off"] if CUDA else [])) == 0
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
        if r["op"].startswith("cross_attention"):
            assert r["saved_bytes_fused"] * 4 < r["saved_bytes_reference"]
    big = [r for r in records if r["shape_name"] == "llm-n4096"]
    assert big and (not cpu or all(not r["measured"] and r["fwd_max_abs_err"] is None for r in big))
    # the causal ops: measured on the CPU proxy shape, with the same saved bytes as the plain attention
    by = {(r["op"], r["shape_name"], r["backend"]): r for r in measured}
    for backend in ("efficient",) if cpu else ("triton",):
        plain, causal = (by[(op, "dec-proxy", backend)] for op in ("cross_attention", "cross_attention_causal"))
        assert causal["saved_bytes_fused"] == plain["saved_bytes_fused"]
        assert causal["saved_extra_bytes_fused"] == plain["saved_extra_bytes_fused"]
        assert ("aggregation_causal", "dec-proxy", backend) in by
    dec = [r for r in records if r["op"] == "cross_attention_causal" and r["shape_name"] == "dec-n4096-d128"]
    assert dec and all(0.5 < r["causal_flop_ratio"] < 0.52 for r in dec)


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


def test_causal_roofline_reports_the_flop_ratio():
    """Causal attention: the fused kernels visit about half the tiles (64-tiles at d = 128: 65/128 of them); the
    eager reference still computes every score, so its FLOPs stay and the fused/eager gap widens."""
    full = bench.roofline("cross_attention", 16, 1, 4096, 4096, 128, torch.bfloat16)
    causal = bench.roofline("cross_attention_causal", 16, 1, 4096, 4096, 128, torch.bfloat16)
    assert causal["causal_flop_ratio"] == pytest.approx(65 / 128)
    assert causal["causal_flop_ratio_fwd"] == causal["causal_flop_ratio_dk"] == pytest.approx(65 / 128)
    assert causal["causal_pair_ratio"] == pytest.approx(4097 / 8192)
    assert causal["flops_fwd_fused"] == pytest.approx(65 / 128 * full["flops_fwd_fused"])
    assert causal["flops_fwd_eager"] == full["flops_fwd_eager"]
    assert causal["roofline_ms_fused_noncausal"] == pytest.approx(full["roofline_ms_fused"])
    assert causal["roofline_ms_fused"] < 0.6 * full["roofline_ms_fused"]
    assert causal["roofline_speedup"] > 1.8 * full["roofline_speedup"]
    # d = 512 runs 32-tiles: at N = 2048 also 64 blocks a side
    wide = bench.roofline("cross_attention_causal", 16, 1, 2048, 4096, 512, torch.bfloat16)
    assert wide["causal_flop_ratio"] == pytest.approx(65 / 128)
    agg = bench.roofline("aggregation_causal", 16, 1, 4096, 4096, 128, torch.bfloat16)
    assert agg["roofline_speedup"] > 1.5 and "causal_flop_ratio" not in agg


def test_decoder_shapes_cover_n_2048_4096_and_d_64_to_512():
    dec = {(N, d) for name, (L, B, N, D, d) in bench.SHAPES.items() if name.startswith("dec-n")}
    assert dec == {(N, d) for N in (2048, 4096) for d in (64, 128, 256, 512)}
    assert set(bench.CAUSAL_OPS) <= set(bench.OPS)


def test_importing_the_bench_leaves_triton_interpret_alone(tmp_path):
    """A library import must not pick the Triton mode; the command's main() does, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, unipt_scale.bench.kernels, unipt_scale.bench.methods\n"
            "from unipt_scale.kernels._utils import interpreting\n"
            "print(os.environ.get('TRITON_INTERPRET'), interpreting())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["None", "False"]
    if CUDA:
        return
    path = tmp_path / "k.json"
    out = subprocess.run([sys.executable, "-m", "unipt_scale.bench.kernels", "--shapes", "tiny", "--ops",
                          "cross_attention_causal", "--dtypes", "float32", "--json", str(path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in out.stdout
    assert {r["backend"] for r in json.loads(path.read_text())} == {"efficient", "triton-interpreter"}


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
    for op in ("cross_attention", "cross_attention_causal"):
        calls.clear()
        res = bench.time_gpu(op, "tiny", torch.float32, device=DEV)
        assert res == {"ms_fused": 1.5, "ms_eager": 1.5, "ms_compile": 1.5} and calls == [2, 2, 2]
    res = bench.time_gpu("aggregation_causal", "tiny", torch.float32, device=DEV, compile=False)
    assert res == {"ms_fused": 1.5, "ms_eager": 1.5} and calls[-2:] == [5, 5]

    def failing(fn, warmup=0, rep=0):
        raise RuntimeError("boom")

    monkeypatch.setattr(triton.testing, "do_bench", failing)
    res = bench.time_gpu("aggregation", "tiny", torch.float32, device=DEV)
    assert res["ms_fused"] is None and "boom" in res["note"]
