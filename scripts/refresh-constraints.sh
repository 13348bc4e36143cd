#!/usr/bin/env bash
# scripts/refresh-constraints.sh [--keep DIR]
#
# Moves the pinned dependencies to the newest releases, on purpose and only when they pass: copies the working
# tree to a scratch directory, lifts setup.py's tested upper bounds there, installs with nothing pinned but torch
# (the machine's CPU build, 2.13.0), runs the whole test suite in that environment, and only when it is green
# rewrites constraints.txt (every installed version) and raises the bounds in setup.py and pyproject.toml to the
# versions it passed with, and README.md's tested-versions line with them. A red run changes nothing and prints
# where its log is. Review and commit the diff (tests/test_install.py checks the four files agree).
#
# --keep DIR  build the scratch copy and its environment in DIR and keep them (default: a temporary directory,
#             removed at the end unless the run failed). Environment: PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
keep=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) [[ $# -ge 2 ]] || usage 2; keep=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "refresh-constraints.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
work=${keep:-$(mktemp -d)}
mkdir -p "$work"
copy="$work/repo"
rm -rf "$copy"
mkdir -p "$copy"
# The tracked and untracked-but-not-ignored files, as they are in the working tree.
(cd "$root" && git ls-files -z --cached --others --exclude-standard) | (cd "$root" && xargs -0 tar -cf - --) \
    | tar -xf - -C "$copy"
[[ -e "$root/../shared" && ! -e "$work/shared" ]] && ln -s "$(cd "$root/../shared" && pwd)" "$work/shared"
python3 "$root/scripts/refresh_constraints.py" unbound "$copy"
printf 'torch==2.13.0\n' > "$work/only-torch.txt"

log="$work/refresh.log"
echo "refresh-constraints: installing the newest releases into $work/venv (log: $log)"
if ! CONSTRAINTS="$work/only-torch.txt" bash "$copy/scripts/install.sh" "$work/venv" test >"$log" 2>&1; then
    echo "refresh-constraints: the install failed; nothing changed (log: $log)" >&2
    exit 1
fi
"$work/venv/bin/python" -m pip freeze --all --disable-pip-version-check > "$work/freeze.txt" 2>>"$log"
echo "refresh-constraints: running the test suite on them"
if ! (cd "$copy" && UNIPT_REFRESH_RUN=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
        TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/unipt_scale/torch_extensions}" \
        "$work/venv/bin/python" -m pytest -q tests ${PYTEST_ARGS:-}) >>"$log" 2>&1; then
    tail -n 5 "$log" >&2
    echo "refresh-constraints: the tests failed on the newest releases; nothing changed (kept: $work)" >&2
    exit 1
fi
tail -n 1 "$log"
python3 "$root/scripts/refresh_constraints.py" apply "$root" "$work/freeze.txt"
[[ -n "$keep" ]] || rm -rf "$work"
echo "refresh-constraints: done; review \`git diff constraints.txt setup.py pyproject.toml README.md\` and commit it"
