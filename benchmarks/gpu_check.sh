#!/usr/bin/env bash
# GPU check of ofmu, for a lent GPU machine (no internet; e.g. torch 2.11 cu130, triton 3.6,
# Python 3.12, 16 cores). Refuses to run without a GPU. Builds ofmu._C with its CUDA kernels in
# place for this GPU's architecture only (no pip: nothing is resolved or downloaded), runs the GPU
# tests, the kernels under compute-sanitizer (memcheck, racecheck) and a short kernel benchmark.
#
#   bash benchmarks/gpu_check.sh            # writes ./gpu_out
#   OUT=/tmp/o bash benchmarks/gpu_check.sh
#
# Time estimate on an H100 machine (16 cores), from parts measured on a 2-core CPU machine:
#   build, one architecture: 237 s on a loaded 2-core machine with 2 jobs, of which nvcc on the
#     .cu file 16-24 s; the rest is three host C++ files with torch's headers, which 16 jobs
#     compile side by side: ~60-90 s                                              limit 180 s
#   GPU tests: 562 collected with -m gpu in the four files below (kernel contract per dtype,
#     Triton compiles, 40 optimizer tests of a few steps each): ~60-120 s            limit 200 s
#   compute-sanitizer: 210 cases x 5 launches (benchmarks/sanitize_kernels.py, 34 s on this CPU
#     with the C++ kernels), plus torch start-up under the tool: ~30-60 s per tool    limit 2x90 s
#   kernel benchmark, 2^16..2^26, 5 repeats: ~30-60 s                                  limit 90 s
#   total ~4-6 min, at most BUDGET_S=480 s (8 min): one rerun fits 15 minutes of device time.
#
# $OUT holds at most 7 files (the device tool brings back 8): summary.txt (each step's command,
# exit status and time, and the last lines of every failed step's log), pytest_gpu.log,
# sanitize.log, bench_kernels.log, the benchmark's CSV and PNG (bench/), and logs.tar.gz with
# every step's full log and the pytest JUnit XML.
# Exit status: 0 when every step passed; 1 when one failed; 2 at once when no GPU is visible.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"

# python3 first: on the GPU machines the plain `python3` is the one that holds torch.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # ofmu, ofmu_kernels from source
export PYTHONUNBUFFERED=1

# 0. A GPU, or nothing: every GPU test would skip and the check would look green.
if ! why=$("$PY" -c 'import torch; print("" if torch.cuda.is_available() else
  f"no CUDA device visible to torch {torch.__version__} (torch.cuda.is_available() is False)")' \
  2>&1) || [ -n "$why" ]; then
  echo "gpu_check.sh: $(echo "${why:-python did not run}" | tail -n 1) [python: $PY]; this" \
    "check needs a GPU, nothing was run" | tee "$SUMMARY" >&2
  exit 2
fi

# Build for this GPU only (one architecture: the shortest build); TORCH_CUDA_ARCH_LIST overrides.
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-16}"              # parallel nvcc/c++ jobs (16 cores)
BUDGET_S="${BUDGET_S:-480}"                    # hard deadline for the whole script (8 min)
BENCH_ARGS="${BENCH_ARGS:---max-exp 26 --repeats 5}"  # a quick sweep: 2^16 .. 2^26 elements
GPU_TESTS=(tests/test_kernels_gpu.py tests/test_optimizer_gpu.py tests/test_kernels.py
           tests/test_kernels_triton.py)      # the files with GPU-marked tests, nothing else

: >"$SUMMARY"
FAILED=0
LOGS=$(mktemp -d)  # every step's log; packed into $OUT/logs.tar.gz on exit (see the top)

pack_logs() {
  cat "$LOGS"/sanitize_*.log >"$OUT/sanitize.log" 2>/dev/null
  for f in pytest_gpu.log bench_kernels.log; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/$f"
  done
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
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
  command -v compute-sanitizer; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; $PY -m pytest --version; \
  echo TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# 2. Build ofmu._C in place with the CUDA kernels; OFMU_FORCE_CUDA turns a silent CPU-only build
#    into an error. If that fails, build CPU-only so that the Triton checks still run.
if ! OFMU_FORCE_CUDA=1 step build_cuda 180 "$PY" setup.py build_ext --inplace; then
  echo "!! CUDA build failed; falling back to a CPU-only build" | tee -a "$SUMMARY"
  OFMU_SKIP_CUDA_BUILD=1 step build_cpu 90 "$PY" setup.py build_ext --inplace
fi
step registered 30 "$PY" -c "
import torch, ofmu._C as C
from ofmu import backend_info
print('built for', C.cuda_archs, '; device', torch.cuda.get_device_capability())
info = backend_info()
print(info)
assert info.chosen['cuda'][0] == 'cuda', info.chosen['cuda']
"

# 3. The GPU tests, and proof that they ran: the JUnit XML must show at least one test that
#    was not skipped (a run where every GPU test skips is a failure, not a pass).
export PY LOGS
step pytest_gpu 200 bash -c '"$PY" -m pytest -m gpu -q -rs --durations=15 \
  --junitxml="$LOGS/pytest_gpu.xml" "$@"; rc=$?
"$PY" - "$LOGS/pytest_gpu.xml" <<"EOF" || rc=1
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "skipped", "failures", "errors")}
print("JUnit:", n, "->", n["tests"] - n["skipped"], "GPU tests ran")
sys.exit(0 if n["tests"] - n["skipped"] > 0 else 1)
EOF
exit $rc' pytest_gpu "${GPU_TESTS[@]}"

# 4. The kernels' tail and alignment cases under compute-sanitizer. Each tensor is its own
#    allocation (no caching allocator), so a read past an operand's end leaves its allocation.
SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  2>/dev/null || true)
if [ -n "$SAN" ]; then
  FILTER=()
  "$SAN" --help 2>/dev/null | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=ofmu)
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitize_$tool" 90 "$SAN" --tool "$tool" \
      --error-exitcode 1 --print-limit 20 ${FILTER[@]+"${FILTER[@]}"} "$PY" benchmarks/sanitize_kernels.py \
      $([ "$tool" = memcheck ] && echo --big)
  done
else
  echo "!! compute-sanitizer not found (PATH, \$CUDA_HOME/bin): no sanitizer pass" | tee -a "$SUMMARY"
  FAILED=1
fi

# 5. Kernel microbenchmark: a short sweep.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step bench_kernels 90 "$PY" -m ofmu.bench.kernels --device cuda --out "$OUT/bench" $BENCH_ARGS

echo "== total: $SECONDS s; $([ $FAILED -eq 0 ] && echo ALL PASSED || echo SOME STEPS FAILED)" \
  | tee -a "$SUMMARY"
exit $FAILED
