#!/usr/bin/env bash
# GPU check of the compiled kernels, for a lent GPU machine (no internet; torch 2.11 cu130,
# triton 3.6, Python 3.12, 16 cores). Builds ofmu._C with its CUDA kernels in place (no pip, so
# nothing is resolved or downloaded), runs the GPU tests and the kernel parity tests, then the
# kernel microbenchmark if benchmarks/bench_kernels.py exists. Logs and results go to $OUT.
#
# $OUT holds at most 7 files, since the device tool brings back only 8: summary.txt (each step's
# command, exit status and time, and the last lines of every failed step's log), the logs of the
# two pytest steps and of the benchmark, the benchmark's CSV and PNG (bench/), and logs.tar.gz
# with every step's full log and the pytest JUnit XML files.
#
#   bash benchmarks/gpu_check.sh            # writes ./gpu_out
#   OUT=/tmp/o bash benchmarks/gpu_check.sh
#
# Budget: < 8 minutes in all (BUDGET_S=450 s): every step has its own timeout, cut to what is
# left of the budget, so one hang cannot eat the rest.
# Exit status: 0 when every step passed, 1 otherwise (see $OUT/summary.txt).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# python3 first: on the GPU machines the plain `python3` is the one that holds torch.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export MAX_JOBS="${MAX_JOBS:-16}"              # parallel nvcc/c++ jobs (16 cores)
export OFMU_CUDA_ARCHS="${OFMU_CUDA_ARCHS:-90}" # sm_90 only: H100/H200, and a short build
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # ofmu, ofmu_kernels from source
export PYTHONUNBUFFERED=1

BUDGET_S="${BUDGET_S:-450}"                    # hard deadline for the whole script (< 8 min)
BENCH_ARGS="${BENCH_ARGS:---max-exp 28 --repeats 10}"  # a quick sweep: 2^16 .. 2^28 elements

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
LOGS=$(mktemp -d)  # every step's log; packed into $OUT/logs.tar.gz on exit (see the top)

pack_logs() {
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  for f in pytest_gpu.log pytest_parity.log bench_kernels.log; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/$f"
  done
  rm -rf "$LOGS"
}
trap pack_logs EXIT

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout (never past the deadline), logs to
# $LOGS/NAME.log, records rc and time (and a failed step's last lines) in the summary.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "== $name: SKIPPED, budget of ${BUDGET_S}s spent" | tee -a "$SUMMARY"
    FAILED=1
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc  ${name}: $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  if [ $rc -ne 0 ]; then
    FAILED=1
    tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  fi
  return $rc
}

# 1. What machine this is.
step env 30 bash -c "nvidia-smi; command -v nvcc && nvcc --version; command -v ninja; \
  $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; $PY -m pytest --version"

# 2. Build ofmu._C in place with the CUDA kernels; OFMU_FORCE_CUDA turns a silent CPU-only build
#    into an error. If that fails, build CPU-only so that the Triton and CPU checks still run.
if ! OFMU_FORCE_CUDA=1 step build_cuda 180 "$PY" setup.py build_ext --inplace; then
  echo "!! CUDA build failed; falling back to a CPU-only build" | tee -a "$SUMMARY"
  OFMU_SKIP_CUDA_BUILD=1 step build_cpu 90 "$PY" setup.py build_ext --inplace
fi
step registered 30 "$PY" -c "
import torch, ofmu._C  # noqa
from ofmu import backend_info
for key in ('CPU', 'CUDA', 'Meta'):
    print(key, all(torch._C._dispatch_has_kernel_for_dispatch_key(f'ofmu::{op}', key)
                   for op in ('reduce3', 'combine', 'update')))
print(backend_info())
assert torch._C._dispatch_has_kernel_for_dispatch_key('ofmu::update', 'CUDA'), 'no CUDA kernels'
"

# 3. Tests: every GPU-marked test of the project, then the rest of the kernel parity tests
#    (CPU ones too: the same build must pass them here; the Triton ones run compiled on the GPU).
#    tests/test_kernels.py holds the kernel contract for every backend: its cuda and triton-cuda
#    cases are GPU-marked (first step), its cpp-cpu cases run in the parity step.
#    The parity step deselects the GPU-marked tests, which the first step already ran, and
#    test_backend_parity's triton cases: they drive the Triton backend with CPU tensors, which
#    works only under TRITON_INTERPRET=1 (CPU CI) and raises "x is on cpu" where a GPU is seen.
step pytest_gpu 150 "$PY" -m pytest -m gpu -q -rs --durations=10 --junitxml="$LOGS/pytest_gpu.xml" tests
PARITY=()
for f in tests/test_kernels.py tests/test_kernels_cpp.py tests/test_kernels_triton.py \
  tests/test_backend_parity.py tests/test_contract.py tests/test_cuda_compile.py; do
  [ -f "$f" ] && PARITY+=("$f")
done
OMP_NUM_THREADS=4 step pytest_parity 120 "$PY" -m pytest -m "not gpu" \
  -k "not (backend_parity and triton)" -q -rs --durations=10 \
  --junitxml="$LOGS/pytest_parity.xml" "${PARITY[@]}"

# 4. Kernel microbenchmark (written elsewhere; skipped when absent).
if [ -f benchmarks/bench_kernels.py ]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  step bench_kernels 240 "$PY" -m ofmu.bench.kernels --device cuda --out "$OUT/bench" $BENCH_ARGS
else
  echo "-- benchmarks/bench_kernels.py not found: no benchmark" | tee -a "$SUMMARY"
fi

echo "== total: $SECONDS s; $([ $FAILED -eq 0 ] && echo ALL PASSED || echo SOME STEPS FAILED)" \
  | tee -a "$SUMMARY"
exit $FAILED
