"""`unipt bench shared` on a tiny backbone: the rows it reports are the measurements divided as they say, the nine
separate runs equal the sweep's variants, and bad arguments are one line."""
import json

import pytest

from test_resume import _write_csv
from tiny_models import tiny_bert_dir
from unipt_scale.bench import shared


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-shared")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv")
    out = root / "shared.json"
    code = shared.main(["--ks", "1,3", "--steps", "2", "--warmup", "1", "--sweep-steps", "2", "--threads", "1",
                        "--cache-limit-train", "64", "--cache-dtype", "float32",
                        "--json", str(out), f"backbone.path={model}", "data.source=csv", f"data.path={data}",
                        "data.batch_size=16", "data.limit_train=0", "data.limit_eval=0", "unipt.mapping_dim=8"])
    assert code == 0
    return json.load(open(out))


def test_step_rows_are_their_medians_divided(result):
    st = result["step"]
    assert [r["k"] for r in st["per_k"]] == [1, 3]
    for row in st["per_k"]:
        assert row["shared_step_ms"] == pytest.approx(sorted(st["samples_ms"][f"shared_k{row['k']}"])[0] / 2
                                                      + sorted(st["samples_ms"][f"shared_k{row['k']}"])[1] / 2)
        assert row["separate_steps_ms"] == pytest.approx(row["k"] * st["one_step_ms"])
        assert row["shared_over_one_step"] == pytest.approx(row["shared_step_ms"] / st["one_step_ms"])
    assert len(st["samples_ms"]["one_step"]) == 2 and st["batch_size"] == 16


def test_the_sweep_equals_nine_separate_runs(result):
    sw = result["sweep"]
    assert sw["variants"] == 9 and sw["identical_variants"] == 9
    assert sw["sweep_over_separate"] == pytest.approx(sw["sweep_wall_s"] / sw["separate_wall_s"])
    # one frozen forward per training batch for all nine (2 steps), plus one per evaluation batch
    assert sw["frozen_forwards_in_sweep"] < 9 * 2


def test_cached_epochs_are_measured_on_the_same_run(result):
    ca = result["cache"]
    assert ca["cached"]["steps_per_epoch"] == ca["uncached"]["steps_per_epoch"] == 64 // 16
    assert ca["epoch2_speedup"] == pytest.approx(ca["uncached"]["epoch2_s"] / ca["cached"]["epoch2_s"])
    assert ca["cached"]["cache_hits"] > 0 and ca["uncached"]["cache_hits"] == 0
    # float32: the cached run trains on the same states, so it ends at the same loss
    assert ca["cached"]["train_loss_last"] == ca["uncached"]["train_loss_last"]


def test_load_average_is_recorded(result):
    assert len(result["loadavg_start"]) == 3 and len(result["loadavg_end"]) == 3


@pytest.mark.parametrize("argv", [["--ks", "0"], ["--ks", "a"], ["--steps", "0"], ["data.batch_size=0"],
                                  ["backbone.path=/nonexistent/model"]])
def test_bad_arguments_are_one_line(argv, capsys):
    assert shared.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unipt bench shared: ")
