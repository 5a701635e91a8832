#!/usr/bin/env bash
# On a GPU machine: the kernel tests in float32 and bfloat16, both tiers (sharded over $SHARDS
# processes: Triton compilation is CPU-bound), their largest errors per kernel and dtype, then
# bench.core.
#   bash bench/gpu_checks.sh [bench.core arguments...]
# Logs and JSON go to $OUT (default /tmp/nsa_gpu). Set SKIP_TESTS=1 or SKIP_BENCH=1 to skip a part,
# TEST_FILES to choose test files, MARK to choose the tier (default both: "slow or not slow").
set -u
OUT=${OUT:-/tmp/nsa_gpu}
MARK=${MARK:-slow or not slow}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ! python3 -c "import pytest" 2>/dev/null; then  # the GPU image may lack pytest: carried wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="${PYTHONPATH:-}:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if [ -z "${SKIP_TESTS:-}" ]; then
  start=$(date +%s)
  # Shard the tests over processes: Triton and XLA compilation are CPU-bound, the GPU work small.
  # XLA autotuning only changes speed, not results: off for the tests (much faster compiles).
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  python3 -m pytest --collect-only -q -p no:cacheprovider -m "$MARK" ${TEST_FILES:-tests/test_kernels_*.py} 2>/dev/null \
    | grep "::" > "$OUT/ids.txt"
  shards=${SHARDS:-6}
  pids=()
  for i in $(seq 0 $((shards - 1))); do
    awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$OUT/ids.txt" > "$OUT/shard_$i.txt"
    mapfile -t ids < "$OUT/shard_$i.txt"
    [ "${#ids[@]}" -gt 0 ] || continue
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" NSA_KERNEL_ERRLOG="$OUT/err_$i.jsonl" \
      timeout "${TEST_TIMEOUT:-300}" \
      python3 -m pytest -v -p no:cacheprovider -m "$MARK" "${ids[@]}" > "$OUT/test_$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  echo "kernel tests ($(wc -l < "$OUT/ids.txt") collected) took $(( $(date +%s) - start )) s"
  cat "$OUT"/test_*.log > "$OUT/tests.log"  # killed shards leave no summary line: compare with ids
  for r in PASSED FAILED SKIPPED ERROR; do echo "$r: $(grep -c "::.* $r" "$OUT/tests.log")"; done
  grep -hE "^(FAILED|ERROR)" "$OUT"/test_*.log | cut -c1-400 | head -n 12
  rm -f "$OUT"/test_*.log "$OUT"/shard_*.txt
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
  cat "$OUT"/err_*.jsonl > "$OUT/errors.jsonl" && rm -f "$OUT"/err_*.jsonl
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m bench.core --out "$OUT/kernels.json" "$@" 2> "$OUT/bench.err"
  echo "bench exit $?"; grep -E "Error|error" "$OUT/bench.err" | sort | uniq -c | head -n 10
fi
