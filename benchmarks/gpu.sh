#!/usr/bin/env bash
# Everything lorap measures and tests on a GPU, in one go (a machine with CUDA and lorap's
# requirements; the CPU machines CI and the default job run on never need it):
#   - the tests that need CUDA (skipped elsewhere);
#   - docs/records/speed.md's GPU sections: which multiple --align should default to on CUDA
#     (align-choice-cuda), when a factor pair beats its dense matrix there (pair-break-even-cuda),
#     and dense against compressed whole models (speed-cuda: first the rows that also decode compiled,
#     CUDA graphs as engines run decode; the rest last).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]
#
# PYTHON picks the interpreter (default python3). Each step runs even when one before it failed;
# the exit status says whether every step passed. With RESULTS_DIR, docs/records/speed.md and the benchmarks'
# JSON records (one archive: runs/bench-speed-cuda, runs/bench-align) are copied there as each step ends.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${1:-}
WORK=runs/bench-speed-cuda
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK" runs/bench-align
status=0

save() {
    [ -n "$RESULTS" ] || return 0
    mkdir -p "$RESULTS"
    cp docs/records/speed.md "$RESULTS/speed.md"
    tar -czf "$RESULTS/records.tar.gz" runs/bench-speed-cuda runs/bench-align 2>/dev/null
}

step() {
    echo "== $* ($(date -u +%T))"
    "$@" || { echo "== FAILED ($?): $*"; status=1; }
    save
}

step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__)"
# First what a short loan must not miss: factor pairs against narrowed heads, decoding eager and as
# engines do (CUDA graphs).
step "$PY" benchmarks/speed.py --only speed-cuda --rows compiled --repeats 3
step timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_bench.py tests/test_streaming.py -k "gpu or cuda"
step timeout 150 "$PY" benchmarks/align_choice.py --device cuda --dtype bfloat16
step timeout 120 "$PY" benchmarks/pair_break_even.py --device cuda --dtype bfloat16
step "$PY" benchmarks/speed.py --only speed-cuda --rows eager --repeats 3
exit $status
