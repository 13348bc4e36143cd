"""The text work of scripts/refresh-constraints.sh: lift the tested upper bounds in a scratch copy, and after a green
test run write the resolved versions back as constraints.txt, as the new bounds of setup.py and pyproject.toml, and
as README.md's tested-versions block.

    python scripts/refresh_constraints.py unbound REPO_COPY        # drop every `<=X` bound (scratch copy only)
    python scripts/refresh_constraints.py apply REPO FREEZE_FILE   # pin its versions, raise the bounds, README

Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import tempfile
from typing import Dict, Iterable, List

HEADER = """\
# The exact versions CI last passed with: scripts/install.sh installs under them (pip -c), so a fresh
# install today gets what CI tested. Rewritten only by scripts/refresh-constraints.sh, after the test suite passed
# on the newest releases. torch is the CPU wheel of this machine image (a CUDA machine takes its own build of 2.13.0).
"""
# A requirement string of setup.py / pyproject.toml with a tested upper bound: name[extras] >=low, <=high.
_BOUND = re.compile(r'"(?P<name>[A-Za-z0-9_.\-]+)(?P<lower>[^"<]*?)(?P<sep>,?)<=(?P<upper>[^",;\s]+)"')


def canonical(name: str) -> str:
    """PEP 503 names: `huggingface_hub`, `Huggingface-Hub` and `huggingface.hub` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_requirements(setup_text: str) -> List[str]:
    """install_requires and every extra of setup.py, read from its literals (setup.py is not run)."""
    found: List[str] = []
    for node in ast.walk(ast.parse(setup_text)):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            value = ast.literal_eval(node.value)
            found.extend(value if isinstance(value, list) else [r for reqs in value.values() for r in reqs])
    return found


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group(0))


def without_upper_bounds(text: str) -> str:
    """Every `"name>=low,<=high"` becomes `"name>=low"` (and `"name<=high"` becomes `"name"`)."""
    return _BOUND.sub(lambda m: f'"{m["name"]}{m["lower"]}"', text)


def with_upper_bounds(text: str, versions: Dict[str, str]) -> str:
    """Each bounded requirement's `<=` moves to the version in `versions` (canonical names); others stay."""
    def raise_bound(m: re.Match) -> str:
        version = versions.get(canonical(m["name"]))
        if version is None:
            return m.group(0)
        return f'"{m["name"]}{m["lower"]}{m["sep"]}<={version}"'

    return _BOUND.sub(raise_bound, text)


def parse_freeze(lines: Iterable[str]) -> Dict[str, str]:
    """`pip freeze --all` output → {canonical name: version}; editable installs, comments and pip are left out.
    A local version label (torch's `+cpu`) is dropped: the pin then matches the CPU and the CUDA build alike."""
    versions: Dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if canonical(name) in ("pip", "unipt-scale"):
            continue
        versions[canonical(name)] = version.split("+", 1)[0]
    return versions


def constraints_text(freeze_lines: Iterable[str]) -> str:
    names = {}
    for line in freeze_lines:
        if "==" in line and not line.startswith(("#", "-e ")):
            names[canonical(line.split("==", 1)[0])] = line.split("==", 1)[0].strip()
    versions = parse_freeze(freeze_lines)
    pins = sorted((names[k], v) for k, v in versions.items())
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins, key=lambda p: p[0].lower()))


# The packages README.md names in its "Tested versions" block (the rest are pinned in constraints.txt alone).
README_PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "kernels", "deepspeed", "triton",
                   "peft", "accelerate", "bitsandbytes", "safetensors", "webdataset", "numpy", "setuptools", "pytest")
README_START, README_END = "<!-- tested-versions: written by scripts/refresh-constraints.sh -->", \
    "<!-- /tested-versions -->"


def tested_versions_block(versions: Dict[str, str]) -> str:
    listed = ", ".join(f"{name} {versions[name]}" for name in README_PACKAGES if name in versions)
    return f"{README_START}\n{listed}.\n{README_END}"


def with_tested_versions(readme: str, versions: Dict[str, str]) -> str:
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise SystemExit("refresh_constraints: README.md has no tested-versions block; nothing written")
    return readme[:start] + tested_versions_block(versions) + readme[end + len(README_END):]


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def unbound(repo: str) -> None:
    for name in ("setup.py", "pyproject.toml"):
        path = os.path.join(repo, name)
        write_atomic(path, without_upper_bounds(_read(path)))


def apply(repo: str, freeze_file: str) -> List[str]:
    """Write constraints.txt and raise the bounds; returns one line per changed pin."""
    freeze = _read(freeze_file).splitlines()
    new = parse_freeze(freeze)
    old_path = os.path.join(repo, "constraints.txt")
    old = parse_freeze(_read(old_path).splitlines()) if os.path.exists(old_path) else {}
    missing = [requirement_name(r) for r in setup_requirements(_read(os.path.join(repo, "setup.py")))
               if requirement_name(r) not in new]
    if missing:
        raise SystemExit(f"refresh_constraints: the scratch environment lacks {', '.join(missing)}; nothing written")
    readme = with_tested_versions(_read(os.path.join(repo, "README.md")), new)  # checked before anything is written
    for name in ("setup.py", "pyproject.toml"):
        path = os.path.join(repo, name)
        write_atomic(path, with_upper_bounds(_read(path), new))
    write_atomic(old_path, constraints_text(freeze))
    write_atomic(os.path.join(repo, "README.md"), readme)
    return [f"{k}: {old.get(k, '(new)')} -> {v}" for k, v in sorted(new.items()) if old.get(k) != v] + \
        [f"{k}: {v} -> (gone)" for k, v in sorted(old.items()) if k not in new]


def main(argv: List[str]) -> int:
    if len(argv) == 2 and argv[0] == "unbound":
        unbound(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "apply":
        changes = apply(argv[1], argv[2])
        print("\n".join(changes) if changes else "constraints unchanged: the pinned versions are the newest")
        return 0
    print("usage: refresh_constraints.py unbound REPO_COPY | apply REPO FREEZE_FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
