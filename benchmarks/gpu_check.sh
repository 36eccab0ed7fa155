#!/usr/bin/env bash
# One unattended check of lnorm on a GPU machine: the environment, the CUDA tests (tests/gpu with
# the compiled Triton kernels) and `lnorm bench ops --device cuda`, with logs and JSON in $OUT.
#
#   bash benchmarks/gpu_check.sh          (from anywhere; or `make gpu-check`)
#
# Then, optional, with what is left of the budget: `lnorm bench rnn --device cuda` (the recurrent
# layers' fused Triton path, then their pure-torch path) and benchmarks/triton_launch_sweep.py.
# Made for a bare machine without network: nothing is installed; python3 needs torch (CUDA build),
# triton, numpy and pytest; lnorm runs from src/ (PYTHONPATH), installed or not.
# Environment: OUT (results folder; default benchmarks/out/gpu-check-<UTC time>), PYTHON (default
# python3), GPU_CHECK_BUDGET_S (whole run, default 470 s), GPU_CHECK_SHARDS (parallel pytest
# processes, default half the cores, at most 8: compiling the kernels' variants dominates).
# Every step runs under `timeout` within what is left of the budget, so the script cannot hang;
# it exits 0 only when every step passed. summary.txt lists each step's exit status and seconds.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/benchmarks/out/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
CORES=$(nproc 2>/dev/null || echo 2)
SHARDS=${GPU_CHECK_SHARDS:-$(( CORES / 2 < 1 ? 1 : (CORES / 2 > 8 ? 8 : CORES / 2) ))}
mkdir -p "$OUT" || exit 2
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # the compiled kernels on CUDA tensors (tests/gpu/conftest.py reads it)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/lnorm-triton-cache}
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS=0
: > "$OUT/summary.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: run CMD under timeout (MAX_SECONDS or what is left of the budget,
# whichever is less), output to $OUT/NAME.log, status and time to summary.txt. With OPTIONAL=1
# (a measurement for later tuning) a failure or a cut-off does not fail the run.
step() {
    local name=$1 cap=$2 limit t0 rc optional=${OPTIONAL:-0}
    shift 2
    limit=$(left)
    (( limit > cap )) && limit=$cap
    if (( limit < 5 )); then
        echo "$name: not run (budget of ${BUDGET}s spent)" | tee -a "$OUT/summary.txt"
        (( optional )) || STATUS=1
        return 1
    fi
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local note=""
    (( rc == 124 || rc == 137 )) && note=" (timed out after ${limit}s)"
    (( optional )) && note="$note (optional)"
    echo "$name: exit $rc, $(( $(date +%s) - t0 ))s$note" | tee -a "$OUT/summary.txt"
    (( rc == 0 || optional )) || STATUS=1
    return $rc
}

ENV_PY='
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", repr(exc))
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", p.name, "|", p.multi_processor_count, "SMs |", round(p.total_memory / 2**30), "GiB")
import shutil
print("C compiler (triton builds its launchers with it):", shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))
import lnorm
print("lnorm", lnorm.__version__, "from", lnorm.__file__, "| backend for cuda:", lnorm.get_backend("cuda"))
'

# run the collected test ids in $SHARDS parallel pytest processes (round robin); fail if any fails
run_tests() {
    local ids_file=$OUT/test_ids.txt i pids=() rc=0 shard_rc
    "$PY" -m pytest tests/gpu --collect-only -q -p no:cacheprovider > "$OUT/tests_collect.log" 2>&1
    grep -E '^tests/gpu/[^ ]+::[^ ]+$' "$OUT/tests_collect.log" > "$ids_file"
    echo "$(wc -l < "$ids_file") tests in $SHARDS shards"
    [ -s "$ids_file" ] || { cat "$OUT/tests_collect.log"; return 1; }
    for (( i = 0; i < SHARDS; i++ )); do
        awk -v n="$SHARDS" -v i="$i" '(NR - 1) % n == i' "$ids_file" > "$OUT/tests_shard$i.ids"
        mapfile -t ids < "$OUT/tests_shard$i.ids"
        if (( ${#ids[@]} )); then
            "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfE "${ids[@]}" > "$OUT/tests_shard$i.log" 2>&1 &
            pids+=("$!")
        fi
    done
    for (( i = 0; i < ${#pids[@]}; i++ )); do
        wait "${pids[$i]}"
        shard_rc=$?
        echo "shard $i: exit $shard_rc: $(tail -n 1 "$OUT/tests_shard$i.log")"
        (( shard_rc == 0 )) || rc=1
    done
    grep -h -E '^(FAILED|ERROR) ' "$OUT"/tests_shard*.log | head -n 40
    return $rc
}

echo "gpu_check: results in $OUT, budget ${BUDGET}s, $SHARDS test shards"
(timeout 20 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1) || echo "nvidia-smi unavailable" >> "$OUT/nvidia-smi.txt"
step env 60 "$PY" -c "$ENV_PY"
cat "$OUT/env.log"

# TERM reaches the shards through the process group of the subshell that `timeout` starts
export OUT PY SHARDS
step tests 200 bash -c "$(declare -f run_tests); run_tests"
cat "$OUT/tests.log"

step bench_ops 240 "$PY" -m lnorm bench ops --device cuda --repeats 5 --json "$OUT/bench_ops.json"
cat "$OUT/bench_ops.log"

# the recurrent layers on the GPU (the fused Triton path: backend auto picks triton for CUDA)
# against cuDNN and the naive cell, at the issue's B=64, T=100, I=H=512; then the main case again
# with lnorm's pure-torch path (LNORM_BACKEND=torch), the speedup's other side. Optional: a
# measurement; the fused path's correctness is in the tests above
OPTIONAL=1 step bench_rnn 90 "$PY" -m lnorm bench rnn --device cuda --batch 64 --input-size 512 \
    --hidden-size 512 --repeats 3 --json "$OUT/bench_rnn.json"
cat "$OUT/bench_rnn.log"
OPTIONAL=1 LNORM_BACKEND=torch step bench_rnn_torch_path 60 "$PY" -m lnorm bench rnn --device cuda \
    --cases main --batch 64 --input-size 512 --hidden-size 512 --repeats 3 --json "$OUT/bench_rnn_torch_path.json"
cat "$OUT/bench_rnn_torch_path.log"

# launch settings measured for later tuning, in what is left of the budget (its JSON is written
# after every case, so a cut-off run still reports; the log is not echoed, to keep the tables last)
OPTIONAL=1 step launch_sweep 120 "$PY" benchmarks/triton_launch_sweep.py --json "$OUT/launch_sweep.json"

echo "---- summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
cat "$OUT/summary.txt"
exit $STATUS
