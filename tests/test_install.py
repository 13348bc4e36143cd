"""A fresh install works today and keeps working: nothing at the repository root shadows an installed package,
whatever the current directory, and the pinned versions, the tested bounds and the README agree."""
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ds_helpers import PY, REPO, RUN_TIMEOUT, ds_env
from tiny_models import tiny_bert_dir

SCRIPTS = os.path.join(REPO, "scripts")
# scripts/refresh-constraints.sh runs this suite on the newest releases in a copy whose bounds it lifted: the checks
# that the repository's pins, bounds and README agree are about the files it rewrites afterwards, not the releases.
refresh_run = pytest.mark.skipif(bool(os.environ.get("UNIPT_REFRESH_RUN")),
                                 reason="scripts/refresh-constraints.sh's scratch run: the pins are rewritten after it")
# The only names the root may give `import`: the package itself, and setup.py (which no installed distribution
# provides; checked below).
ROOT_IMPORTABLE = {"unipt_scale", "setup"}


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_constraints", os.path.join(SCRIPTS, "refresh_constraints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _importable_names(directory):
    """Top-level names that a sys.path entry `directory` resolves as a module or a regular package (a folder
    without __init__.py is only a namespace portion, which never hides a regular package found later)."""
    names = set()
    suffixes = tuple(importlib.machinery.all_suffixes())
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif os.path.isfile(path) and entry.endswith(suffixes):
            names.add(entry.split(".", 1)[0])
    return names


def test_the_root_offers_import_no_name_but_the_package_and_setup():
    names = _importable_names(REPO)
    assert names <= ROOT_IMPORTABLE, f"importable from the repository root: {sorted(names - ROOT_IMPORTABLE)}"
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py")), \
        "kernels/ must not be a top-level package (it hides the PyPI package `kernels`)"
    # No installed distribution provides a top-level name the root also offers (other than this project).
    provided = importlib.metadata.packages_distributions()
    clashes = {n: provided[n] for n in names if set(provided.get(n, ())) - {"unipt_scale"}}
    assert not clashes, f"the repository root hides installed packages: {clashes}"


def test_from_the_root_the_installed_kernels_package_wins_and_a_backbone_loads(tmp_path):
    """The way it broke: Python started at the root puts the root first on sys.path."""
    model = tiny_bert_dir(str(tmp_path))
    code = (
        "import json, os, sys, importlib.util\n"
        "assert sys.path[0] in ('', os.getcwd()), sys.path[:2]\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "import unipt_scale.kernels as k\n"
        "from unipt_scale.backbone import load_backbone\n"
        "from unipt_scale.config import BackboneConfig\n"
        f"bb = load_backbone(BackboneConfig(path={model!r}))\n"
        "origin = spec.origin if spec is not None else None\n"
        "print(json.dumps({'kernels': origin, 'ours': k.__file__, 'layers': bb.num_hidden_states}))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["ours"] == os.path.join(REPO, "kernels", "src", "__init__.py")
    if importlib.util.find_spec("kernels") is not None and found["kernels"] is not None:
        # A regular package found anywhere on the path wins over the root's namespace folder.
        assert not found["kernels"].startswith(os.path.join(REPO, "kernels") + os.sep), found["kernels"]
    assert found["layers"] >= 1


def _setup_text():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as fh:
        return fh.read()


def _pins():
    with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as fh:
        return _refresh_module().parse_freeze(fh.read().splitlines())


@refresh_run
def test_every_dependency_is_pinned_inside_its_range_at_its_tested_bound():
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement

    refresh, pins = _refresh_module(), _pins()
    requirements = refresh.setup_requirements(_setup_text())
    assert len(requirements) >= 15
    for text in requirements:
        req = Requirement(text)
        name = refresh.canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {text}"
        uppers = [s.version for s in req.specifier if s.operator == "<="]
        assert uppers == [pins[name]], f"{text}: the upper bound is the tested version {pins[name]}"
    for name in ("transformers", "tokenizers", "huggingface-hub", "kernels", "peft", "deepspeed", "triton",
                 "bitsandbytes", "webdataset", "safetensors", "accelerate", "numpy", "setuptools"):
        assert name in pins, f"{name} is not pinned"
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as fh:
        assert f'"setuptools>=70,<={pins["setuptools"]}"' in fh.read()


@refresh_run
def test_this_environment_is_the_pinned_one():
    """What the tests run on is what constraints.txt says (scripts/install.sh installs under it)."""
    pins = _pins()
    for name in ("transformers", "tokenizers", "huggingface-hub", "peft", "deepspeed", "safetensors", "numpy"):
        assert importlib.metadata.version(name) == pins[name], f"{name}: installed != constraints.txt"
    assert importlib.metadata.version("torch").split("+")[0] == pins["torch"]


@refresh_run
def test_readme_names_the_pinned_versions():
    refresh = _refresh_module()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert refresh.tested_versions_block(_pins()) in readme


def test_refresh_lifts_and_raises_the_bounds_and_writes_constraints(tmp_path):
    refresh = _refresh_module()
    setup = ('setup(install_requires=["torch>=2.4,<=2.13.0", "ninja<=1.13.2", "tqdm", "huggingface-hub>=0.24,<=2.4.0"],\n'
             '      extras_require={"test": ["pytest>=7,<=9.2.0"]})\n')
    assert [refresh.requirement_name(r) for r in refresh.setup_requirements(setup)] == \
        ["torch", "ninja", "tqdm", "huggingface-hub", "pytest"]
    lifted = refresh.without_upper_bounds(setup)
    assert '"torch>=2.4"' in lifted and '"ninja"' in lifted and '"pytest>=7"' in lifted and "<=" not in lifted
    raised = refresh.with_upper_bounds(setup, {"torch": "2.13.0", "ninja": "1.14.0", "huggingface-hub": "2.5.1"})
    assert '"ninja<=1.14.0"' in raised and '"huggingface-hub>=0.24,<=2.5.1"' in raised
    assert '"pytest>=7,<=9.2.0"' in raised, "a package missing from the freeze keeps its bound"
    freeze = ["Torch==2.13.0+cpu", "-e /repo", "pip==23.2.1", "huggingface_hub==2.5.1", "ninja==1.14.0",
              "pytest==9.3.0", "tqdm==4.71.0", "setuptools==85.0.0", "unipt_scale==0.1.0"]
    assert refresh.parse_freeze(freeze) == {"torch": "2.13.0", "huggingface-hub": "2.5.1", "ninja": "1.14.0",
                                            "pytest": "9.3.0", "tqdm": "4.71.0", "setuptools": "85.0.0"}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "setup.py").write_text(setup)
    (repo / "pyproject.toml").write_text('requires = ["setuptools>=70,<=84.2.1"]\n')
    (repo / "constraints.txt").write_text("ninja==1.13.2\n")
    (repo / "README.md").write_text(f"intro\n{refresh.README_START}\nold\n{refresh.README_END}\nrest\n")
    (tmp_path / "freeze.txt").write_text("\n".join(freeze) + "\n")
    changes = refresh.apply(str(repo), str(tmp_path / "freeze.txt"))
    assert "ninja: 1.13.2 -> 1.14.0" in changes
    assert '"ninja<=1.14.0"' in (repo / "setup.py").read_text()
    assert '"setuptools>=70,<=85.0.0"' in (repo / "pyproject.toml").read_text()
    pinned = [line.lower() for line in (repo / "constraints.txt").read_text().splitlines()]
    assert "torch==2.13.0" in pinned and "huggingface_hub==2.5.1" in pinned and not any("pip==" in p for p in pinned)
    assert "huggingface-hub 2.5.1" in (repo / "README.md").read_text()
    # A freeze that lacks a dependency of setup.py writes nothing.
    (tmp_path / "short.txt").write_text("ninja==2.0\n")
    before = {p.name: p.read_text() for p in repo.iterdir()}
    with pytest.raises(SystemExit, match="lacks"):
        refresh.apply(str(repo), str(tmp_path / "short.txt"))
    assert {p.name: p.read_text() for p in repo.iterdir()} == before


def test_launch_local_cpu_from_the_root_trains_on_two_ranks_and_exits_0(tmp_path):
    pytest.importorskip("deepspeed")
    from ds_helpers import write_keyword_csv

    model = tiny_bert_dir(str(tmp_path))
    data = str(tmp_path / "data.csv")
    write_keyword_csv(data, 200)
    env = ds_env()
    env.update(PYTHON=PY, STEPS="3", BATCH="4")
    out = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/local_cpu.sh", str(out), f"backbone.path={model}", "data.source=csv",
                           f"data.path={data}", "unipt.mapping_dim=8", "data.limit_eval=32"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 3 and metrics["steps"] == 3
    assert "world_size 2  zero_stage 3  steps 3" in proc.stdout
