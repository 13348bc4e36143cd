"""`unipt bench generate` on a tiny Llama: every system decodes every shape, the rates and ratios are the
recorded times' own, and bad flags fail in one line."""
import json

import pytest

from unipt_scale.bench import generate as bench


def test_every_system_decodes_every_shape_and_the_numbers_are_its_times(tmp_path, capsys):
    path = tmp_path / "g.json"
    assert bench.main(["--quick", "--repeats", "2", "--batch-sizes", "1,2", "--prompt-lengths", "8,20",
                       "--new-tokens", "5", "--threads", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert len(result["loadavg_start"]) == len(result["loadavg_end"]) == 3
    rows = result["rows"]
    assert {(r["system"], r["batch"], r["prompt_tokens"]) for r in rows} == {
        (s, b, n) for s in bench.SYSTEMS for b in (1, 2) for n in (8, 20)}
    for r in rows:
        assert len(r["seconds"]) == 2 and r["seconds_median"] == pytest.approx(sum(r["seconds"]) / 2)
        assert r["tokens_per_second"] == pytest.approx(r["batch"] * 5 / r["seconds_median"])
        frozen = next(f for f in rows if f["system"] == "frozen" and (f["batch"], f["prompt_tokens"]) ==
                      (r["batch"], r["prompt_tokens"]))
        assert r["time_vs_frozen"] == pytest.approx(r["seconds_median"] / frozen["seconds_median"])
    assert "vs frozen" in capsys.readouterr().out


@pytest.mark.parametrize("flags, says", [(["--systems", "frozen,medusa"], "unknown"),
                                         (["--batch-sizes", "1,x"], "--batch-sizes"),
                                         (["--new-tokens", "0"], "--new-tokens")])
def test_bad_flags_fail_in_one_line(flags, says, capsys):
    assert bench.main(["--quick", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
