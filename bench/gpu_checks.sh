#!/usr/bin/env bash
# On a GPU machine: the kernel tests in float32 and bfloat16 (four files in parallel: Triton
# compilation is CPU-bound), their largest errors per kernel and dtype, then bench/kernels.py.
#   bash bench/gpu_checks.sh [bench/kernels.py arguments...]
# Logs and JSON go to $OUT (default /tmp/nsa_gpu). Set SKIP_TESTS=1 or SKIP_BENCH=1 to skip a part.
set -u
OUT=${OUT:-/tmp/nsa_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ! python3 -c "import pytest" 2>/dev/null; then  # the GPU image may lack pytest: carried wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="${PYTHONPATH:-}:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if [ -z "${SKIP_TESTS:-}" ]; then
  start=$(date +%s)
  pids=()
  for f in compressed sliding selected selection; do
    NSA_KERNEL_ERRLOG="$OUT/err_$f.jsonl" timeout "${TEST_TIMEOUT:-300}" \
      python3 -m pytest -q -p no:cacheprovider "tests/test_kernels_$f.py" > "$OUT/test_$f.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  echo "kernel tests took $(( $(date +%s) - start )) s"
  for f in compressed sliding selected selection; do
    echo "== $f: $(tail -n 1 "$OUT/test_$f.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/test_$f.log" | cut -c1-400 | head -n 8
  done
  python3 - "$OUT" <<'PY'
import glob, json, sys, collections
worst = collections.defaultdict(float)
for path in glob.glob(sys.argv[1] + "/err_*.jsonl"):
    for line in open(path):
        r = json.loads(line)
        key = (r["kernel"], r["dtype"], r["what"])
        worst[key] = max(worst[key], r["err"])
print("largest relative errors (float32: max-abs / max|ref|; bfloat16: norm-wise)")
for (kernel, dtype, what), err in sorted(worst.items()):
    print(f"  {kernel:15s} {dtype:9s} {what:14s} {err:.2e}")
PY
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels.py --out "$OUT/kernels.json" "$@" 2> "$OUT/bench.err"
  echo "bench exit $?"; grep -E "Error|error" "$OUT/bench.err" | sort | uniq -c | head -n 10
fi
