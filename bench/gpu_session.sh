#!/usr/bin/env bash
# The one script a GPU session runs (issue 5, the Triton fused-MoE kernels): every GPU check and
# benchmark, in order of importance, each under its own time limit, all within one wall-clock budget.
#
#   bench/gpu_session.sh            on the GPU machine, from anywhere in the repo
#   bench/gpu_session.sh --smoke    anywhere: the same steps with CPU smoke flags, to test this script
#
# Steps (a failed or timed-out step is recorded and the next one runs):
#   1 nvidia-smi and the Python environment (torch, triton, CUDA, the packages moeinf imports)
#   2 tests/runtime/test_cuda.py: kernels vs references at model shapes (fused_moe, and fused_quant_moe on
#     int8 / int4 weights), routing, norm, whole models CUDA vs CPU (resident, offloaded, and hybrid:
#     misses computed on the host beside the GPU's share)
#   2b tests/kernels/test_quant_moe.py on the GPU: fused_quant_moe's odd shapes, formats, record views and
#     host-share rows compiled for real (issue 15)
#   3 python -m bench.kernels: fused_moe against the torch baselines, configs as shipped (heuristic)
#   4 python -m bench.tune_moe: tunes block configs into moeinf/kernels/configs/ (this copy of the repo)
#   5 python -m bench.kernels again: now with the tuned configs
#   6 python -m bench.gpu_offload: host-to-device bandwidth, offloaded decode speed, and transformers +
#     Accelerate offloading at the same 25% budget (MoE-Infinity's baseline)
#   6b python -m bench.gpu_offload --hybrid-only: a Qwen3-30B-A3B-shaped model at 25 / 50% budget with
#     host_compute never / always / auto against resident (issue 14)
#   6c python -m bench.kernels --formats int8 int8g int4: fused_quant_moe against fused_moe on the dequantized
#     weights (issue 15)
#   7 tests/runtime/test_cuda.py -k fused_moe, bf16, again: the tuned configs through the default lookup
#   8 tests/kernels/test_kernels.py on the GPU (odd shapes; informative: a few tests expect CPU-only checks)
# then copies the results where they come back: $OUT when set (the device tool's folder; at most 8
# files, plain names, so everything else travels in results.tar.gz), and always the work folder.
#
# The GPU machine reaches no package registry: nothing is installed. Its python3 holds torch, triton,
# transformers, numba, cupy, pytest (and pytest-xdist, used when present); moeinf and the benchmarks
# (python -m bench.NAME) run from the tree through PYTHONPATH. Python wheels a session brings along
# in .whl/ are installed into /tmp/site first.
#
# Environment: PYTHON (default python3), SESSION_BUDGET_S (default 540: the whole run, within the
# device tool's 600 s), TUNE_BUDGET_S (default 150, lowered when time is short), WORK (work folder;
# default bench/results/gpu-session-<UTC time>, or a temp folder with --smoke), OUT.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--smoke]" >&2
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [[ $SMOKE == 1 ]]; then
    WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-session-smoke.XXXXXX")}
else
    WORK=${WORK:-$REPO/bench/results/gpu-session-$STAMP}
fi
mkdir -p "$WORK"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-540}
RESERVE=20  # seconds kept back for packing the results
SUMMARY=$WORK/summary.txt
STEP=0
: >"$WORK/steps.tsv"

exec > >(tee -a "$WORK/session.log") 2>&1

export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ $SMOKE == 0 ]]; then
    export TRITON_INTERPRET=0  # real kernels; tests/conftest.py only sets it where it is unset
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

remaining() { echo $((START + BUDGET - RESERVE - $(date +%s))); }

record() {  # name status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
    printf '=== %-22s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

# step NAME MAX_S MIN_S COMMAND...: runs COMMAND under `timeout` for at most MAX_S seconds and what
# the budget has left; skips it when less than MIN_S is left. Output goes to the console and to
# $WORK/NN-NAME.log. Never fails the script.
step() {
    local name=$1 max=$2 min=$3
    shift 3
    STEP=$((STEP + 1))
    local log left limit t0 rc status
    log=$(printf '%s/%02d-%s.log' "$WORK" "$STEP" "$name")
    left=$(($(remaining) - 10))  # timeout's --kill-after
    if ((left < min)); then
        record "$name" skipped 0 "only ${left}s left, needs ${min}s"
        return 0
    fi
    limit=$((max < left ? max : left))
    echo "=== [$STEP] $name (limit ${limit}s): $*"
    t0=$(date +%s)
    if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
    case $rc in
        0) status=pass ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    record "$name" "$status" "$(($(date +%s) - t0))" "rc=$rc, log $(basename "$log")"
}

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 4)  # compiles in parallel; each worker holds at most one model's experts (GBs)
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)

echo "gpu session $STAMP: budget ${BUDGET}s, work folder $WORK, python $PY, smoke $SMOKE"

# ------------------------------------------------------------------------------ 1 environment
if [[ $SMOKE == 0 ]]; then
    step nvidia-smi 30 5 nvidia-smi
else
    record nvidia-smi skipped 0 "smoke"
fi
step python-env 60 10 "$PY" -c '
import importlib, platform, sys
import torch, triton
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
missing = []
for name in ("moeinf", "transformers", "numba", "safetensors", "tokenizers", "tqdm", "numpy", "pytest", "cupy", "xdist"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        missing.append(name)
        print(name, "MISSING:", type(error).__name__, error)
from moeinf.kernels.block_configs import device_name, interpreting
print("TRITON_INTERPRET", interpreting(), "config device", device_name(torch.device("cuda")) if torch.cuda.is_available() else "-")
sys.exit(1 if set(missing) - {"cupy", "xdist"} else 0)
'

# ------------------------------------------------------------------------------ 2 CUDA tests
step cuda-tests 240 30 "${PYTEST[@]}" "${XDIST[@]}" tests/runtime/test_cuda.py --junitxml="$WORK/test_cuda.xml"
if [[ $SMOKE == 0 ]]; then
    step quant-kernel-tests-gpu 90 30 "${PYTEST[@]}" "${XDIST[@]}" tests/kernels/test_quant_moe.py \
        --junitxml="$WORK/test_quant_moe_gpu.xml"
else
    record quant-kernel-tests-gpu skipped 0 "smoke: tests/kernels/test_quant_moe.py runs in the normal suite"
fi

# ------------------------------------------------------------------------------ 3-5 kernels, tune, kernels
if [[ $SMOKE == 0 ]]; then
    KERNELS=("$PY" -m bench.kernels --formats float)
    KERNELS_QUANT=("$PY" -m bench.kernels --formats int8 int8g int4)
    TUNE=("$PY" -m bench.tune_moe --results-dir "$WORK")
    OFFLOAD=("$PY" -m bench.gpu_offload --out "$WORK" --workdir /tmp/gpu-offload-bench --hybrid-layers 0)
    HYBRID=("$PY" -m bench.gpu_offload --hybrid-only --out "$WORK" --workdir /tmp/gpu-hybrid-bench)
else
    KERNELS=("$PY" -m bench.kernels --cpu --formats float --models Mixtral-8x7B/16 --tokens 1 --min-time 0.01)
    KERNELS_QUANT=("$PY" -m bench.kernels --cpu --formats int8 int8g int4 --models Mixtral-8x7B/16 --tokens 1)
    TUNE=("$PY" -m bench.tune_moe --smoke --models tiny --tokens 1 --max-candidates 3 --out-dir "$WORK/configs"
        --results-dir "$WORK")
    OFFLOAD=("$PY" -m bench.gpu_offload --smoke --out "$WORK" --workdir "$WORK/offload-work" --hybrid-layers 0)
    HYBRID=("$PY" -m bench.gpu_offload --smoke --hybrid-only --out "$WORK" --workdir "$WORK/hybrid-work")
fi
step kernels-before 180 40 "${KERNELS[@]}" --out "$WORK/kernels-before"

touch "$WORK/.before-tune"
# keep about 4 minutes for what follows (kernels again and the offload benchmark); at least 30 s
TUNE_BUDGET=$(($(remaining) - 250))
TUNE_BUDGET=$((TUNE_BUDGET > ${TUNE_BUDGET_S:-150} ? ${TUNE_BUDGET_S:-150} : TUNE_BUDGET))
TUNE_BUDGET=$((TUNE_BUDGET < 30 ? 30 : TUNE_BUDGET))
step tune-moe $((TUNE_BUDGET + 120)) 60 "${TUNE[@]}" --budget-s "$TUNE_BUDGET"
mkdir -p "$WORK/configs"
if [[ $SMOKE == 0 ]]; then
    find moeinf/kernels/configs -maxdepth 1 -name '*.json' -newer "$WORK/.before-tune" -exec cp {} "$WORK/configs/" \;
fi
TUNED=$(find "$WORK/configs" -name '*.json' | wc -l)
echo "tuned config files: $TUNED"

if ((TUNED > 0)); then
    step kernels-after 180 40 "${KERNELS[@]}" --out "$WORK/kernels-after"
else
    record kernels-after skipped 0 "no tuned config file"
fi

# ------------------------------------------------------------------------------ 6 offload benchmark
step gpu-offload 300 90 "${OFFLOAD[@]}"
step gpu-hybrid 200 60 "${HYBRID[@]}"
step kernels-quant 180 60 "${KERNELS_QUANT[@]}" --out "$WORK/kernels-quant"

# ------------------------------------------------------------------------------ 7-8 extra checks, time permitting
if ((TUNED > 0)); then
    step cuda-tests-tuned 150 45 "${PYTEST[@]}" "${XDIST[@]}" tests/runtime/test_cuda.py -k "fused_moe and bfloat16" \
        --junitxml="$WORK/test_cuda_tuned.xml"
else
    record cuda-tests-tuned skipped 0 "no tuned config file"
fi
if [[ $SMOKE == 0 ]]; then
    step kernel-tests-gpu 150 45 "${PYTEST[@]}" "${XDIST[@]}" tests/kernels/test_kernels.py --junitxml="$WORK/test_kernels_gpu.xml"
else
    record kernel-tests-gpu skipped 0 "smoke: tests/kernels/test_kernels.py runs in the normal suite"
fi

# ------------------------------------------------------------------------------ results
{
    echo "gpu session $STAMP, $(($(date +%s) - START))s of ${BUDGET}s, smoke $SMOKE"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    echo
    printf '%-22s %-8s %6s  %s\n' step status seconds note
    while IFS=$'\t' read -r name status seconds note; do
        printf '%-22s %-8s %6s  %s\n' "$name" "$status" "$seconds" "$note"
    done <"$WORK/steps.tsv"
    for log in "$WORK"/*-cuda-tests*.log "$WORK"/*-kernel-tests-gpu.log; do
        if [[ -f $log ]]; then
            echo
            echo "$(basename "$log"): $(grep -E '(passed|failed|skipped|error)' "$log" | tail -n 1)"
        fi
    done
    for log in "$WORK"/*-tune-moe.log; do
        if [[ -f $log ]]; then
            echo
            sed -n '/^model .* speedup/,/^wrote/p' "$log"
        fi
    done
    echo
    echo "tuned config files (copy into moeinf/kernels/configs/ to ship them):"
    find "$WORK/configs" -name '*.json' -printf '  %f\n'
} >"$SUMMARY" 2>&1 || true
cat "$SUMMARY"

tar -czf "$WORK.tar.gz" -C "$(dirname "$WORK")" --exclude offload-work "$(basename "$WORK")" 2>/dev/null || true
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$SUMMARY" "$OUT/summary.txt"
    if [[ -f "$WORK.tar.gz" ]]; then
        cp "$WORK.tar.gz" "$OUT/results.tar.gz"
    fi
    # plain names only come back from $OUT; the config files (with '=' and ',') travel in the tarball
    for pair in "kernels-before/kernels-*.csv:kernels-before.csv" "kernels-after/kernels-*.csv:kernels-after.csv" \
        "kernels-quant/kernels-*.csv:kernels-quant.csv" "tune_moe-*.csv:tune_moe.csv" \
        "gpu-offload-*.json:gpu-offload.json"; do
        for file in "$WORK"/${pair%%:*}; do
            if [[ -f $file ]]; then
                cp "$file" "$OUT/${pair##*:}"
            fi
        done
    done
    cp "$WORK/session.log" "$OUT/session.log"
    echo "results in $OUT: $(cd "$OUT" && echo *)"
fi
echo "work folder $WORK (and $WORK.tar.gz)"
