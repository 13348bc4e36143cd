"""Multi-rank DeepSpeed runs on CPU (gloo, 2 ranks on 127.0.0.1) against a one-process run with the same global batch.

Every run is a subprocess on a tiny random-init BERT and a tiny CSV; each is started once per module and shared
by the assertions that read it. Deselect them all with `pytest -k "not deepspeed"` (about 3 minutes on 2 cores,
plus a one-off build of DeepSpeed's CPU ops, cached in $TORCH_EXTENSIONS_DIR).
"""
import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from ds_helpers import HERE, PY, REPO, RUN_TIMEOUT, deepspeed, ds_env, free_port, losses, metrics, run, \
    write_keyword_csv
from tiny_models import tiny_bert_dir
from unipt_scale.config import ConfigError, load_config

pytest.importorskip("deepspeed")
from unipt_scale.ds_config import resolve_ds_config  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 8
# Adam divides by sqrt(v): for weights with tiny gradients, float-level differences in how ranks reduce
# gradients grow to ~5e-5 after 8 steps at lr 3e-3 (measured); the weights themselves move by ~1e-2.
WEIGHT_ATOL = 1e-4

# No persistent (unpartitioned) small parameters, and no parameter kept gathered after its forward: the
# tiny model is then split like a large one, and an export that forgot to gather would come out empty.
ZERO = {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
STAGES = {
    # name: (DeepSpeed JSON, overrides that keep the global batch at GLOBAL_BATCH on 2 ranks)
    "zero1": ({"zero_optimization": {"stage": 1}}, ["data.batch_size=4"]),
    "zero2": ({"zero_optimization": {"stage": 2}}, ["data.batch_size=2", "train.grad_accum=2"]),
    "zero3": ({"zero_optimization": {"stage": 3, **ZERO}}, ["data.batch_size=4"]),
    "zero3_offload": ({"zero_optimization": {"stage": 3, **ZERO, "offload_optimizer": {"device": "cpu"},
                                             "offload_param": {"device": "cpu"}}}, ["data.batch_size=4"]),
}
DURATIONS = {}
DIFFS = {}  # max |loss or weight difference| to the one-process run


def _run(name, cmd, env=None, expect_ok=True):
    return run(name, cmd, env, expect_ok, durations=DURATIONS)


def _weights(out):
    return load_file(os.path.join(out, "checkpoint", "trained.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def _print_durations():
    """How long each subprocess run took (pytest -s shows it; --durations shows the tests')."""
    yield
    for name, seconds in DURATIONS.items():
        print(f"\n  {name:36s} {seconds:6.1f} s", end="")
    for stage, diff in DIFFS.items():
        print(f"\n  {stage}: max |difference to the 1-process run| = {diff:.3g}", end="")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny model, tiny CSV and the overrides every run shares."""
    root = tmp_path_factory.mktemp("ds")
    model = tiny_bert_dir(str(root))
    data = write_keyword_csv(root / "tweets.csv", 400)
    for name, (ds, _) in STAGES.items():
        (root / f"{name}.json").write_text(json.dumps(ds))
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.eval_batch_size=32",
              f"train.max_steps={STEPS}", "train.log_every=1", "train.lr=3e-3", "train.warmup_ratio=0.25",
              "task.dropout=0.0", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1"]
    return {"root": root, "model": model, "common": common}


@pytest.fixture(scope="module")
def reference(ws):
    """One process, the plain engine (no DeepSpeed), the whole global batch in one micro batch."""
    out = str(ws["root"] / "single")
    _run("1 process, local engine", [PY, "-m", "unipt_scale.cli", "train", "--output-dir", out, *ws["common"],
                                     f"data.batch_size={GLOBAL_BATCH}"])
    return out


class StageRuns:
    """2-rank runs by ZeRO stage, started on first use and shared by every test of the module."""

    def __init__(self, ws):
        self.ws, self.done, self.failed = ws, {}, {}

    def __call__(self, name):
        if name in self.failed:
            pytest.fail(f"the 2-rank {name} run failed earlier in this module:\n{self.failed[name]}")
        if name not in self.done:
            out = str(self.ws["root"] / name)
            _, extra = STAGES[name]
            try:
                _run(f"2 ranks, {name}", deepspeed(os.path.join(HERE, "ds_train.py"), f"output_dir={out}",
                                                    *self.ws["common"], *extra, "deepspeed.enabled=true",
                                                    f"deepspeed.config={self.ws['root'] / (name + '.json')}"))
            except pytest.fail.Exception as err:
                self.failed[name] = str(err)[-2000:]
                raise
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def stage_run(ws):
    return StageRuns(ws)


def _checks(out, rank):
    with open(os.path.join(out, f"checks.rank{rank}.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_ranks_match_one_process(stage, stage_run, reference):
    out = stage_run(stage)
    m = metrics(out)
    assert m["world_size"] == 2 and m["zero_stage"] == int(stage[4]) and m["steps"] == STEPS
    ref = losses(reference)
    got = losses(out)
    assert len(got) == len(ref) == STEPS
    assert ref.max() - ref.min() > 0.01, "a flat loss history would make the comparison weak"
    DIFFS[f"2 ranks {stage} loss history"] = (got - ref).abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert m["trainable_params"] == metrics(reference)["trainable_params"]
    assert m["frozen_params"] == metrics(reference)["frozen_params"]
    w, w_ref = _weights(out), _weights(reference)
    assert set(w) == set(w_ref)
    DIFFS[f"2 ranks {stage} weights"] = max((w[k] - w_ref[k]).abs().max().item() for k in w_ref)
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.parametrize("stage", list(STAGES))
def test_frozen_backbone_bit_identical_and_gradient_free(stage, stage_run):
    out = stage_run(stage)
    for rank in (0, 1):
        frozen = _checks(out, rank)["frozen"]
        assert frozen["missing"] == [] and frozen["checked"] == frozen["backbone_params"] > 0
        assert frozen["bit_identical"] and frozen["max_abs_diff"] == 0.0
        assert frozen["grads"] == 0 and frozen["requires_grad"] == 0


def test_exported_weights_identical_across_stages(stage_run):
    exported = {name: _weights(stage_run(name)) for name in STAGES}
    first = exported["zero1"]
    for name, w in exported.items():
        assert set(w) == set(first), name
        for k in first:
            assert w[k].shape == first[k].shape and w[k].numel() > 0, (name, k)
            torch.testing.assert_close(w[k], first[k], rtol=0, atol=WEIGHT_ATOL, msg=f"{name}: {k}")
    # The weights did train, far beyond the tolerance: zero-initialised up-projections moved away from zero.
    ups = [k for k in first if k.split(".")[-2] == "up"]
    assert ups and all(first[k].abs().max() > 50 * WEIGHT_ATOL for k in ups)


@pytest.mark.parametrize("stage", ["zero3", "zero3_offload"])
def test_zero3_each_rank_holds_half(stage, stage_run):
    out = stage_run(stage)
    reports = []
    for rank in (0, 1):
        with open(os.path.join(out, f"zero3_partition.rank{rank}.json")) as fh:
            reports.append(json.load(fh))
    for part in ("backbone", "trained"):
        total = reports[0][part]["total"]
        assert total > 0 and all(r[part]["total"] == total and r[part]["persistent"] == 0 for r in reports)
        for r in reports:
            assert 0.45 <= r[part]["share"] <= 0.55, (part, r)
        held = sum(r[part]["held"] for r in reports)
        assert total <= held <= total * 1.1, (part, held, total)  # shards cover it all, with little padding
    m = metrics(out)
    assert reports[0]["backbone"]["total"] == m["frozen_params"]
    assert reports[0]["trained"]["total"] == m["trainable_params"]


@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_uneven_eval_parts_are_gathered_in_step(stage, stage_run):
    """Ranks with 3 vs 1 and 4 vs 0 eval batches: no hang under ZeRO-3, every sample counted once, same answer."""
    out = stage_run(stage)
    per_rank = [_checks(out, r)["uneven_eval"] for r in (0, 1)]
    for case in ("short", "empty"):
        assert per_rank[0][case] == per_rank[1][case]
        assert per_rank[0][case]["num_samples"] == per_rank[0][case]["expected"]


def test_two_nodes_on_localhost(ws, reference):
    """2 "nodes" x 1 rank, torchrun's static rendezvous on 127.0.0.1, the CLI as entry point, ZeRO-3."""
    out = str(ws["root"] / "two_nodes")
    port = free_port()
    args = ["-m", "unipt_scale.cli", "train", "--output-dir", out, *ws["common"], "data.batch_size=4",
            "deepspeed.enabled=true", f"deepspeed.config={ws['root'] / 'zero3.json'}"]
    env = ds_env()
    t0 = time.time()
    nodes = [subprocess.Popen([PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (1, 0)]
    try:
        logs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    DURATIONS["2 nodes x 1 rank (torchrun)"] = time.time() - t0
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-4000:] for log in logs)
    m = metrics(out)
    assert m["world_size"] == 2 and m["zero_stage"] == 3
    DIFFS["2 nodes x 1 rank loss history"] = (losses(out) - losses(reference)).abs().max().item()
    torch.testing.assert_close(losses(out), losses(reference), rtol=0, atol=1e-5)
    for k, v in _weights(reference).items():
        torch.testing.assert_close(_weights(out)[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_kill_and_resume_continues_the_same_history(ws):
    """A 2-rank ZeRO-3 run (dropout on) is killed (SIGKILL) after step 7; resumed from its step-6 checkpoint it
    ends where the uninterrupted run ends: same loss history, same weights."""
    steps = 10
    args = [*ws["common"], f"train.max_steps={steps}", "task.dropout=0.2", "data.batch_size=4",
            "deepspeed.enabled=true", f"deepspeed.config={ws['root'] / 'zero3.json'}", "train.checkpoint_every=3"]
    full, crashed = str(ws["root"] / "uninterrupted"), str(ws["root"] / "crashed")
    script = os.path.join(HERE, "ds_train.py")

    _run("resume: uninterrupted", deepspeed(script, f"output_dir={full}", *args))
    dead = _run("resume: killed after step 7", deepspeed(script, "--kill-after-step=7", f"output_dir={crashed}",
                                                          *args), expect_ok=False)
    assert dead.returncode != 0
    assert not os.path.exists(os.path.join(crashed, "metrics.json"))
    with open(os.path.join(crashed, "checkpoints", "latest")) as fh:
        assert fh.read().strip() == "step00000006"
    _run("resume: resumed", deepspeed(script, f"output_dir={crashed}", *args, "train.resume=auto"))

    resumed, uninterrupted = metrics(crashed), metrics(full)
    assert resumed["steps"] == uninterrupted["steps"] == steps
    # Only steps 7..10 ran after the resume, not a silent restart; the sample count covers the whole run.
    assert resumed["resumed_from_step"] == 6 and uninterrupted["resumed_from_step"] is None
    assert resumed["samples_seen"] == uninterrupted["samples_seen"] == steps * 4 * 2
    assert [s for s, _ in resumed["train_loss"]] == list(range(1, steps + 1))
    torch.testing.assert_close(losses(crashed), losses(full), rtol=0, atol=1e-6)
    for k, v in _weights(full).items():
        torch.testing.assert_close(_weights(crashed)[k], v, rtol=0, atol=1e-6, msg=k)
    with open(os.path.join(crashed, "checkpoints", "latest")) as fh:
        assert fh.read().strip() == f"step{steps:08d}"  # the end-of-run checkpoint


def test_export_reloads_with_unipt_eval_on_one_process(stage_run, tmp_path):
    out = stage_run("zero3")
    report = str(tmp_path / "eval.json")
    env = ds_env()
    env.pop("DS_ACCELERATOR")
    _run("unipt eval of the ZeRO-3 export", [PY, "-m", "unipt_scale.cli", "eval", "--checkpoint",
                                             os.path.join(out, "checkpoint"), "--json", report], env=env)
    with open(report) as fh:
        evaluated = json.load(fh)["test"]
    trained = metrics(out)["test"]
    assert evaluated["num_samples"] == trained["num_samples"] > 0
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(trained["loss"], abs=1e-5)



def _ds_cfg(tmp_path, ds, *overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return load_config(None, ["deepspeed.enabled=true", f"deepspeed.config={path}", *overrides])


def test_config_rule_fills_what_the_json_leaves_out(tmp_path):
    cfg = _ds_cfg(tmp_path, {"zero_optimization": {"stage": 2}}, "data.batch_size=6", "train.grad_accum=3",
                  "train.clip_norm=0.5")
    _, ds, _ = resolve_ds_config(cfg, world_size=4, cuda=False)
    sizes = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    assert sizes == (6, 3, 72)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert "bf16" not in ds and "fp16" not in ds  # precision auto: fp32 on CPU ...
    assert resolve_ds_config(cfg, world_size=4, cuda=True)[1]["bf16"] == {"enabled": True}  # ... bf16 on CUDA
    fp16 = _ds_cfg(tmp_path, {"fp16": {"enabled": "auto"}}, "train.precision=fp16")
    assert resolve_ds_config(fp16, world_size=1, cuda=False)[1]["fp16"]["enabled"] is True
    assert resolve_ds_config(_ds_cfg(tmp_path, {}), 1, False)[1]["zero_optimization"]["stage"] == 0


def test_config_rule_json_values_win_and_are_returned(tmp_path):
    cfg = _ds_cfg(tmp_path, {"train_batch_size": 64, "gradient_accumulation_steps": 2, "gradient_clipping": 2.0,
                             "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}},
                  "data.batch_size=5", "deepspeed.zero_stage=3")
    before = cfg.to_dict()
    resolved, ds, notes = resolve_ds_config(cfg, world_size=4, cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["zero_optimization"]["stage"] == 3
    # The loaders, the step count and metrics.json then use what DeepSpeed uses ...
    assert (resolved.data.batch_size, resolved.train.grad_accum, resolved.train.clip_norm) == (8, 2, 2.0)
    assert any("data.batch_size = 8" in n for n in notes)
    assert cfg.to_dict() == before, "... and the run config given is left as it was"


@pytest.mark.parametrize("ds, overrides, says", [
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, (),
     "train_batch_size"),
    ({"scheduler": {"type": "WarmupLR"}}, (), "scheduler"),
    ({"zero_optimization": {"stage": 4}}, (), "stage"),
    ({"zero_optimization": {"stage": 3}}, ("backbone.quantization=nf4",), "ZeRO stage 0, 1 or 2"),
])
def test_config_rule_refuses_what_cannot_run(tmp_path, ds, overrides, says):
    with pytest.raises(ConfigError, match=says):
        resolve_ds_config(_ds_cfg(tmp_path, ds, *overrides), world_size=2, cuda=False)
    # ZeRO-2 takes both (only what trains is sharded).
    zero2 = {**ds, "zero_optimization": {"stage": 2}}
    if ds.get("zero_optimization", {}).get("stage") == 3:
        assert resolve_ds_config(_ds_cfg(tmp_path, zero2, *overrides), 2, False)[1]["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ds_config(load_config(None, ["deepspeed.config=/nonexistent/ds.json"]), world_size=1, cuda=False)


def test_two_rank_zero3_exits_0_three_times_in_a_row():
    """A run that trained fine exits 0 every time (launch/stress_exit.sh: tiny BERT, 2 ranks, ZeRO-3, gloo; three runs
    in CI's time, `bash launch/stress_exit.sh 50` for a longer stress)."""
    env = ds_env()
    env["PYTHON"] = PY
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "stress_exit.sh"), "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT * 2)
    DURATIONS["2 ranks ZeRO-3 x 3 (stress_exit.sh)"] = time.time() - t0
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "3 runs, 0 non-zero exits", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split(":")[1].split(",")[0].strip() for line in lines[:-1]] == ["exit 0"] * 3
