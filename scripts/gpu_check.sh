#!/usr/bin/env bash
# The kernels' CUDA check, in one run of under 10 minutes: install, kernel tests on the GPU, kernel bench.
#
# usage: scripts/gpu_check.sh OUT_DIR
#
#   1. refuses (exit 2) unless an NVIDIA GPU is visible;
#   2. installs the package into a venv with scripts/install.sh (torch pinned by constraints.txt), unless
#      GPU_CHECK_PYTHON names a python that already has it; refuses (exit 3) if that torch cannot see the GPU;
#   3. runs the kernel tests on CUDA with the Triton kernels compiled (TRITON_INTERPRET=0): fp32, fp16, bf16,
#      fp64 gradchecks, plain and causal;
#   4. `unipt bench kernels`: errors, saved bytes and fwd+bwd times of the fused kernels against eager torch and
#      torch.compile (bf16, the decoder shapes, plain vs causal attention and per-position aggregation), then a
#      wider sweep of the decoder shapes without torch.compile;
#   5. if `unipt bench methods` takes the options, a short UniPT / LoRA / full fine-tuning step-time run.
#
# Everything it writes is under OUT_DIR: env.txt, install.log, kernel_tests*.{log,xml} (one pair per parallel
# pytest shard), bench_kernels*.{json,log}, bench_methods.{json,log} and summary.json (each step's status, exit
# code and seconds). Exit 0 when every step that ran passed, 1 otherwise. Each step has its own time cap inside GPU_CHECK_BUDGET_S (default 570 s).
# Environment: GPU_CHECK_VENV (default $TMPDIR/unipt_gpu_check/venv), GPU_CHECK_PYTHON (skip the install),
# GPU_CHECK_METHODS=0 (skip step 5), GPU_CHECK_BUDGET_S.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR   (JSON and logs go there)" >&2
    exit 64
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
start=$(date +%s)
budget="${GPU_CHECK_BUDGET_S:-570}"
steps_file="$out/.steps.tsv"
: > "$steps_file"

log() { echo "[gpu_check $(( $(date +%s) - start ))s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }

# ---- 1. a GPU, or a clear refusal ----------------------------------------------------------------------------
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > "$out/gpus.txt" 2>&1 \
        || ! grep -q "^GPU" "$out/gpus.txt"; then
    echo "gpu_check: no NVIDIA GPU visible here (nvidia-smi is missing or lists no GPU)." >&2
    echo "gpu_check: this script checks the CUDA kernels and needs a CUDA machine; on a CPU run scripts/test.sh" >&2
    echo "gpu_check: (the Triton kernels are tested there in Triton's CPU interpreter)." >&2
    rm -f "$out/gpus.txt" "$steps_file"
    exit 2
fi
log "GPU: $(head -n 1 "$out/gpus.txt")"

# run_step NAME CAP_S LOGFILE CMD...: runs CMD under min(CAP_S, time left), records status/rc/seconds
run_step() {
    local name="$1" cap="$2" logfile="$3"
    shift 3
    local remaining t0 rc status
    remaining=$(left)
    if [ "$remaining" -lt 20 ]; then
        log "$name: skipped (${remaining}s of the budget left)"
        printf '%s\tskipped\t-\t0\n' "$name" >> "$steps_file"
        return 0
    fi
    [ "$cap" -gt "$remaining" ] && cap=$remaining
    log "$name: up to ${cap}s -> $logfile"
    t0=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then
        # a shell function: run it in a child bash that timeout can signal (its pytest shards die with it)
        timeout --signal=TERM --kill-after=15 "$cap" bash -c "$(declare -f "$1"); py='$py' out='$out' $1" \
            > "$logfile" 2>&1
    else
        timeout --signal=TERM --kill-after=15 "$cap" "$@" > "$logfile" 2>&1
    fi
    rc=$?
    case $rc in
        0) status=passed ;;
        124|137) status=timed_out ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$steps_file"
    log "$name: $status (rc $rc, $(( $(date +%s) - t0 ))s); last lines:"
    tail -n 5 "$logfile" | sed 's/^/    /'
    return $rc
}

write_summary() {
    "${py:-python3}" - "$steps_file" "$out" << 'EOF' || true
import json, os, sys, xml.etree.ElementTree as ET
steps_file, out = sys.argv[1], sys.argv[2]
steps = []
for line in open(steps_file, encoding="utf-8"):
    name, status, rc, secs = line.rstrip("\n").split("\t")
    steps.append(dict(step=name, status=status, rc=None if rc == "-" else int(rc), seconds=int(secs)))
summary = dict(steps=steps, ok=all(s["status"] in ("passed", "skipped") for s in steps))
shards = {}
for name in sorted(os.listdir(out)):
    if name.startswith("kernel_tests_") and name.endswith(".xml"):
        try:
            root = ET.parse(os.path.join(out, name)).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            shards[name[len("kernel_tests_"):-4]] = {k: int(suite.get(k, 0))
                                                     for k in ("tests", "failures", "errors", "skipped")}
        except Exception as e:  # noqa: BLE001
            shards[name[len("kernel_tests_"):-4]] = f"unreadable: {e!r}"
if shards:
    counts = [v for v in shards.values() if isinstance(v, dict)]
    summary["kernel_tests"] = dict({k: sum(c[k] for c in counts) for k in ("tests", "failures", "errors", "skipped")},
                                   shards=shards)
for name in ("bench_kernels.json", "bench_kernels_sweep.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        recs = json.load(open(path, encoding="utf-8"))
        summary[name] = [{k: r.get(k) for k in ("op", "shape_name", "dtype", "backend", "fwd_max_abs_err",
                                                "bwd_max_rel_err", "saved_bytes_fused", "saved_bytes_reference",
                                                "causal_flop_ratio", "ms_fused", "ms_eager", "ms_compile", "note")}
                         for r in recs if r.get("measured")]
json.dump(summary, open(os.path.join(out, "summary.json"), "w", encoding="utf-8"), indent=1)
print(json.dumps(summary["steps"]))
EOF
    rm -f "$steps_file"
}

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=0   # compiled kernels (tests/conftest.py defaults it to 1 for CPU runs)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/unipt_gpu_check/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/unipt_gpu_check/inductor}"

# ---- 2. install --------------------------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    py="$GPU_CHECK_PYTHON"
    log "install: skipped, using GPU_CHECK_PYTHON=$py"
    printf 'install\tskipped\t-\t0\n' >> "$steps_file"
else
    venv="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/unipt_gpu_check/venv}"
    py="$venv/bin/python"
    if ! run_step install 300 "$out/install.log" bash "$root/scripts/install.sh" "$venv" test; then
        echo "gpu_check: the install failed; see $out/install.log (torch==2.13.0 comes from constraints.txt)" >&2
        write_summary
        exit 3
    fi
fi
{
    echo "# nvidia-smi"; nvidia-smi 2>&1
    echo "# python"; "$py" - << 'EOF' 2>&1
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
} > "$out/env.txt"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
    echo "gpu_check: the installed torch cannot use the GPU ($(grep '^python' "$out/env.txt"))." >&2
    echo "gpu_check: the index served a CPU build of torch==2.13.0; install its CUDA build into the venv and" >&2
    echo "gpu_check: rerun with GPU_CHECK_PYTHON=VENV/bin/python (the tests would otherwise run on the CPU)." >&2
    printf 'cuda_torch\tfailed\t1\t0\n' >> "$steps_file"
    write_summary
    exit 3
fi
if [ "$("$py" -c 'from unipt_scale.kernels._utils import interpreting; print(interpreting())')" != "False" ]; then
    echo "gpu_check: the Triton kernels were built for the interpreter although TRITON_INTERPRET=0" >&2
    printf 'compiled_triton\tfailed\t1\t0\n' >> "$steps_file"
    write_summary
    exit 3
fi
log "$(grep '^python' "$out/env.txt")"

cd "$root"
failed=0

# ---- 3. kernel tests on CUDA -------------------------------------------------------------------------------------
# Compiling the Triton kernels dominates (an fp32 kernel with a 64x64 tile takes ptxas tens of seconds), so the
# tests run as parallel pytest shards sharing TRITON_CACHE_DIR; each shard writes its own log and JUnit XML.
kernel_tests() {
    local ca=tests/test_kernel_cross_attention.py
    local heavy="matches_reference or default_tiles or unequal_tiles or saved or shared_storage or only_one"
    local shards=(
        "ca_reference|$ca|matches_reference"
        "ca_tiles|$ca|default_tiles or unequal_tiles"
        "ca_saved|$ca|saved or shared_storage or only_one"
        "ca_rest|$ca|not ($heavy)"
        "aggregation|tests/test_kernel_aggregation.py tests/test_kernel_attention_aggregate.py|"
        "projection|tests/test_kernel_projection.py|"
        "side_network_bench|tests/test_side_network_kernels.py tests/test_bench_kernels.py|"
    )
    local pids=() names=() rc=0 spec name files expr i
    for spec in "${shards[@]}"; do
        IFS='|' read -r name files expr <<< "$spec"
        # shellcheck disable=SC2086  # files is a space-separated list
        "$py" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$out/kernel_tests_$name.xml" \
            ${expr:+-k "$expr"} $files > "$out/kernel_tests_$name.log" 2>&1 &
        pids+=($!)
        names+=("$name")
    done
    for i in "${!pids[@]}"; do
        if wait "${pids[$i]}"; then
            echo "shard ${names[$i]}: passed: $(tail -n 1 "$out/kernel_tests_${names[$i]}.log")"
        else
            echo "shard ${names[$i]}: FAILED: $(tail -n 1 "$out/kernel_tests_${names[$i]}.log")"
            grep -E "^(FAILED|ERROR)" "$out/kernel_tests_${names[$i]}.log" | head -n 20
            rc=1
        fi
    done
    return $rc
}
run_step kernel_tests 270 "$out/kernel_tests.log" kernel_tests || failed=1

# ---- 4. kernel bench: fused vs eager vs torch.compile, then a wider sweep without compile -------------------------
run_step bench_kernels 150 "$out/bench_kernels.log" \
    "$py" -m unipt_scale.cli bench kernels --json "$out/bench_kernels.json" --dtypes bfloat16 \
    --shapes dec-n2048-d64,dec-n4096-d128 --ops cross_attention,cross_attention_causal,aggregation_causal \
    || failed=1
run_step bench_kernels_sweep 120 "$out/bench_kernels_sweep.log" \
    "$py" -m unipt_scale.cli bench kernels --json "$out/bench_kernels_sweep.json" --dtypes bfloat16 \
    --timing no-compile --ops cross_attention,cross_attention_causal,aggregation,aggregation_causal \
    --shapes dec-n2048-d128,dec-n2048-d256,dec-n2048-d512,dec-n4096-d64,dec-n4096-d256,dec-n4096-d512 \
    || failed=1

# ---- 5. hook: a short `unipt bench methods` run, when it takes these options ---------------------------------------
if [ "${GPU_CHECK_METHODS:-1}" != "0" ]; then
    help="$("$py" -m unipt_scale.cli bench methods --help 2>&1 || true)"
    if printf '%s' "$help" | grep -q -- "--device" && printf '%s' "$help" | grep -q -- "--steps" \
            && printf '%s' "$help" | grep -q -- "--json"; then
        run_step bench_methods 60 "$out/bench_methods.log" \
            "$py" -m unipt_scale.cli bench methods --device cuda --steps 5 --warmup 2 --batch 16 --seq 128 \
            --methods unipt,lora,full --json "$out/bench_methods.json" || failed=1
    else
        log "bench_methods: skipped (\`unipt bench methods --help\` lacks --device/--steps/--json)"
        printf 'bench_methods\tskipped\t-\t0\n' >> "$steps_file"
    fi
fi

write_summary
log "done: $out/summary.json"
exit $failed
