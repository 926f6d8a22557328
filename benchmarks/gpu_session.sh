#!/usr/bin/env bash
# Everything a GPU session runs, in one device call (from the repository root):
#   bash benchmarks/gpu_session.sh            # results under $OUT (default ./gpu_out)
# 1. environment (nvidia-smi, CuPy, CUDA), 2. pytest -m gpu (CuPy backend vs numpy, every kernel
# (the DM, ML and position-refinement ones), whole reconstructions for 1 and 3 modes, batching
# forced, DM+ML with position refinement through the fused ML/position steps), 3. the benchmark (cases a, b, b192 and
# atomics vs sets), 4. the engine's DM iteration through the backend contract (CupyBackend's passes)
# against its FFT floor, 1 and 3 modes (benchmarks/cpu_bench.py --backend cupy --json), 5. the live job on the GPU
# (issue 19: benchmarks/live.py --direct --backend cupy --json: a growing scan file of 2000 64² views at
# 50 a second followed by the live job, then the post-stop job on the same file; one JSON line with
# first_preview_s, previews, max_preview_gap_s, lag_first_s/lag_last_s, final_after_stop_s, post_stop_path_s,
# scan_file_equal, data_error_ratio, nrmse_ratio). Optional: SANITIZE=1 adds compute-sanitizer memcheck on the kernel tests;
# QUICK=1 runs the benchmark at small sizes. Needs no network: the package is laid out in a
# temporary folder (hxn_ptycho/ with cuda/ and callbacks/ in place) instead of pip-installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

SITE="$(mktemp -d)"
cp -r hxn_ptycho "$SITE/hxn_ptycho"
rm -rf "$SITE/hxn_ptycho/cuda" "$SITE/hxn_ptycho/callbacks"
cp -r cuda "$SITE/hxn_ptycho/cuda"
cp -r callbacks "$SITE/hxn_ptycho/callbacks"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HXN_PTYCHO_KERNEL_CACHE="${HXN_PTYCHO_KERNEL_CACHE:-$OUT/.kernel_cache}"

{
    echo "== $(date -u +%FT%TZ)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -P -c "import sys, numpy, cupy; from hxn_ptycho.gpu import gpu_available; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'runtime', cupy.cuda.runtime.runtimeGetVersion()); print(gpu_available())"
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest -m gpu"
timeout 300 "$PY" -P -m pytest -o addopts= -m gpu -q -rs --durations=10 -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml" tests/test_gpu.py tests/test_session.py 2>&1 | tee "$OUT/pytest_gpu.log"
rc_tests=${PIPESTATUS[0]}

if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (kernel tests)"
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -P -m pytest -o addopts= -m gpu -q -x \
        -p no:cacheprovider -k "not reconstruction" tests/test_gpu.py 2>&1 | tail -40 | tee "$OUT/sanitizer.log"
fi

echo "== benchmark"
timeout "${BENCH_TIMEOUT:-420}" "$PY" -P benchmarks/gpu_bench.py ${QUICK:+--quick} --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.txt"
rc_bench=${PIPESTATUS[0]}

echo "== the backend contract on the GPU: the engine's DM iteration (CupyBackend's passes) and its FFT floor"
# cpu_bench's cases with --backend cupy: n = 128, 2000 views, 1 and 3 modes; one JSON line each
# (frames_iterations_per_s, ratio_to_fft_floor; peak_rss_gb is the host's)
timeout "${CONTRACT_TIMEOUT:-300}" "$PY" -P benchmarks/cpu_bench.py --backend cupy --iterations 5 --json \
    ${QUICK:+--views 300} 2>&1 | tee "$OUT/contract.jsonl"
rc_contract=${PIPESTATUS[0]}

echo "== the live job on the GPU (issue 19): growing scan file, live job and post-stop job with backend cupy"
# --direct: the feeder writes the growing file (no RunEngine: bluesky is not needed on the device); the
# jobs are real processes (python -m hxn_ptycho.job, found through PYTHONPATH above), one rank
timeout "${LIVE_TIMEOUT:-300}" "$PY" -P benchmarks/live.py --direct --backend cupy --json \
    ${QUICK:+--views 400 --iterations 30} 2>&1 | tee "$OUT/live.jsonl"
rc_live=${PIPESTATUS[0]}

echo "== done: pytest rc=$rc_tests, benchmark rc=$rc_bench, contract rc=$rc_contract, live rc=$rc_live (results in $OUT)"
rm -rf "$SITE"
[ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ] && [ "$rc_contract" = 0 ] && [ "$rc_live" = 0 ]
