"""The code layout: one module per task kind and per encoder kind, and imports that only go down (tasks →
encoders → backbone and side networks); the old public import paths name the same objects."""
import ast
import os

import pytest

import unipt_scale
from unipt_scale import config, encoders, tasks

PACKAGE = os.path.dirname(unipt_scale.__file__)
SHIMS = {"unipt_scale.model", "unipt_scale.lm", "unipt_scale.methods"}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("unipt_scale")}


def _modules(sub):
    folder = os.path.join(PACKAGE, sub)
    return {f"unipt_scale.{sub}.{f[:-3]}".replace(".__init__", ""): os.path.join(folder, f)
            for f in os.listdir(folder) if f.endswith(".py")}


def test_every_task_kind_is_one_module_with_the_task_interface():
    assert tuple(tasks.TASKS) == config.TASK_KINDS
    for kind, module in tasks.TASKS.items():
        assert module.__name__ == f"unipt_scale.tasks.{kind}" and callable(module.build)
        # Its model (vqa has two forms: two towers with a fusion, or one vision-language backbone), each complete.
        models = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
                  and hasattr(v, "training_loss") and hasattr(v, "trained_state_keys")]
        assert 1 <= len(models) <= 2, kind
        for model in models:
            for name in ("training_loss", "eval_step", "eval_metrics", "trained_state_keys"):
                assert callable(getattr(model, name)), (kind, name)


@pytest.mark.parametrize("sub, must_not", [
    ("encoders", ("unipt_scale.tasks", "unipt_scale.trainer", *SHIMS)),
    ("tasks", ("unipt_scale.trainer", "unipt_scale.engine", *SHIMS)),
])
def test_nothing_imports_back_up(sub, must_not):
    for name, path in _modules(sub).items():
        bad = sorted(m for m in _imports(path) if any(m == b or m.startswith(b + ".") for b in must_not))
        assert not bad, f"{name} imports {bad}"


def test_the_package_itself_uses_the_homes_not_the_old_paths():
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            if not f.endswith(".py") or rel in SHIMS:
                continue
            assert not (_imports(path) & SHIMS), f"{rel} imports {sorted(_imports(path) & SHIMS)}"


def test_the_old_import_paths_name_the_same_objects():
    from unipt_scale import lm, methods, model, trained
    from unipt_scale.encoders import backbone_tuning
    from unipt_scale.tasks import causal_lm, classification, retrieval

    assert model.build_model is tasks.build_model and model.UniPTEncoder is encoders.UniPTEncoder
    assert model.ClassificationModel is classification.ClassificationModel
    assert model.RetrievalModel is retrieval.RetrievalModel and model.count_parameters is trained.count_parameters
    assert lm.CausalLMModel is causal_lm.CausalLMModel and lm.chunked_lm_loss is causal_lm.chunked_lm_loss
    assert methods.BackboneEncoder is backbone_tuning.BackboneEncoder is encoders.BackboneEncoder
    assert methods.resolve_lora_targets is backbone_tuning.resolve_lora_targets


def test_setup_installs_every_subpackage():
    """A wheel (not only the editable install CI uses) holds every folder of the package."""
    setup = ast.parse(open(os.path.join(os.path.dirname(PACKAGE), "setup.py"), encoding="utf-8").read())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    found = {os.path.relpath(root, os.path.dirname(PACKAGE)).replace(os.sep, ".")
             for root, _, files in os.walk(PACKAGE) if "__init__.py" in files}
    assert found <= set(listed), sorted(found - set(listed))
