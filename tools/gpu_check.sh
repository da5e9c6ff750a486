#!/usr/bin/env bash
# One prepared run of the whole GPU path, for the first machine with a GPU (target: under 5 minutes on an
# H100/H200): every CUDA/Triton test, the Triton kernels compiled ahead of time, and a short compiled bench of
# the CUDA expert formulations; one summary table at the end. Without a CUDA device it says so and exits 0.
#
#   tools/gpu_check.sh            (from the repository root or anywhere; PYTHON=... to pick the interpreter)
#   OUT=dir tools/gpu_check.sh    (logs and bench JSON go to $OUT, default a temp folder)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXX)}
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here; nothing to check (the CPU suite is 'make test')."
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

declare -a NAMES STATUS SECS
run() {  # run NAME TIMEOUT_S CMD...: record pass/fail, seconds and the log's last pytest line
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    NAMES+=("$name")
    SECS+=($((SECONDS - t0)))
    if [ $rc -eq 0 ]; then STATUS+=("pass"); elif [ $rc -eq 124 ]; then STATUS+=("TIMEOUT"); else STATUS+=("FAIL rc=$rc"); fi
    echo "  $name: ${STATUS[-1]} (${SECS[-1]} s) -- $(grep -E 'passed|failed|error|skipped' "$OUT/$name.log" | tail -1)"
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton tests run the compiled kernels on the GPU
run "cuda ops + experts (test_kernels_cuda)" 120 "$PY" -m pytest -q -m cuda tests/test_kernels_cuda.py
run "triton kernels on GPU (test_kernels_triton)" 120 "$PY" -m pytest -q tests/test_kernels_triton.py
run "custom ops, fake kernels, export (test_kernels_ops)" 90 "$PY" -m pytest -q tests/test_kernels_ops.py
run "AOT sm90 compile (test_kernels_aot)" 90 "$PY" -m pytest -q tests/test_kernels_aot.py
run "compiled decode bench (tools/gpu_decode_bench.py)" 120 "$PY" tools/gpu_decode_bench.py --json "$OUT/bench.json"

echo
echo "| check | result | seconds |"
echo "|---|---|---:|"
fail=0
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} |"
    [ "${STATUS[$i]}" = "pass" ] || fail=1
done
echo
sed -n '/^| tokens/,$p' "$OUT/compiled decode bench (tools/gpu_decode_bench.py).log" 2>/dev/null
echo "logs: $OUT"
exit $fail
