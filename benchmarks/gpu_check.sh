#!/usr/bin/env bash
# GPU check (issue 14): on a machine with one visible CUDA GPU, in under 8 minutes,
#   (a) the test suite with CURRSEARCH_TEST_DEVICE=cuda (every test built on the tiny test config
#       trains, records and estimates on the GPU; tests/conftest.py), then
#   (b) the fidelity benchmark of examples/medium.toml (examples/default.toml while medium.toml is
#       absent) with --set train.device=cuda: wall seconds and peak GPU memory per setting.
# Each part runs under `timeout`; the results are JSON under OUT (first argument, default gpu_check_out):
#   OUT/gpu_check.json      summary: versions, GPU, each part's exit code, wall seconds and limit,
#                           test counts (and failed test ids), the benchmark's numbers
#   OUT/fidelity_run.json   the benchmark's numbers, written after every setting (benchmarks/gpu_check.py)
#   OUT/tests.xml, OUT/tests.log, OUT/fidelity.log, OUT/fidelity/   junit XML, logs, the benchmark's reports
# Exit status: 2 when no GPU is visible (nothing runs), 1 when a part failed or hit its time limit, 0 otherwise.
#
#   bash benchmarks/gpu_check.sh [OUT]                                   # on the GPU machine
#   CURRSEARCH_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh [OUT]   # CPU rehearsal at tiny sizes
#
# Settings (environment): GPU_CHECK_TEST_LIMIT / GPU_CHECK_BENCH_LIMIT, seconds per part (default 200 / 220);
# GPU_CHECK_TESTS, pytest arguments (default: tests; CPU rehearsal: tests/test_arch.py -k reproducible);
# GPU_CHECK_ESTIMATORS (default reference,additive,fut1,fut2,fut1-hvp); GPU_CHECK_N_RANDOM (8), GPU_CHECK_N_NEAR (1);
# GPU_CHECK_SETTINGS (fresh,warm); PYTHON (python).
set -uo pipefail

ms() { date +%s%3N; }  # wall clock, milliseconds
secs() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${1:-gpu_check_out}")
DEVICE=${CURRSEARCH_GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
TEST_LIMIT=${GPU_CHECK_TEST_LIMIT:-200}
BENCH_LIMIT=${GPU_CHECK_BENCH_LIMIT:-220}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1

case "$DEVICE" in
  cuda)
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
      echo "gpu_check: FAILED: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run this on a machine" \
           "with a GPU and a CUDA build of torch, or rehearse on the CPU with CURRSEARCH_GPU_CHECK_DEVICE=cpu" >&2
      exit 2
    fi
    read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests}"
    CONFIG=examples/default.toml
    [[ -f examples/medium.toml ]] && CONFIG=examples/medium.toml
    SIZES=()
    N_RANDOM=${GPU_CHECK_N_RANDOM:-8}
    N_NEAR=${GPU_CHECK_N_NEAR:-1}
    ;;
  cpu)  # rehearsal: the same steps at tiny sizes (seconds, not minutes)
    read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests/test_arch.py -k reproducible}"
    CONFIG=examples/default.toml
    SIZES=(--set data.num_batches=6 --set data.batch_size=4 --set data.seq_len=32 --set data.vocab_size=512
           --set data.eval_seqs_per_domain=4 --set model.n_layer=1 --set model.n_embd=32 --set model.n_head=2
           --set train.warmup_steps=10 --set record.projection_dim=32)
    N_RANDOM=${GPU_CHECK_N_RANDOM:-3}
    N_NEAR=${GPU_CHECK_N_NEAR:-1}
    ;;
  *)
    echo "gpu_check: CURRSEARCH_GPU_CHECK_DEVICE must be cuda (default) or cpu, got '$DEVICE'" >&2
    exit 2
    ;;
esac

mkdir -p "$OUT" || exit 1
rm -f "$OUT/gpu_check.json" "$OUT/fidelity_run.json" "$OUT/tests.xml"
rm -rf "${OUT:?}/fidelity"  # a store left there would be reused, not recorded (and timed) again
echo "gpu_check: device $DEVICE, output $OUT, config $CONFIG"

# (a) the test suite on the device
t0=$(ms)
CURRSEARCH_TEST_DEVICE=$DEVICE timeout --kill-after=15 "$TEST_LIMIT" \
  "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --durations=10 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$(secs $(( $(ms) - t0 )))
echo "gpu_check: tests exit $tests_rc in ${tests_s} s (limit $TEST_LIMIT s): $(tail -n 1 "$OUT/tests.log")"

# (b) the fidelity benchmark on the device, times and peak memory per setting
t0=$(ms)
timeout --kill-after=15 "$BENCH_LIMIT" \
  "$PY" benchmarks/gpu_check.py fidelity "$CONFIG" --quiet --set "train.device=$DEVICE" ${SIZES[@]+"${SIZES[@]}"} \
    --estimators "${GPU_CHECK_ESTIMATORS:-reference,additive,fut1,fut2,fut1-hvp}" \
    --n-random "$N_RANDOM" --n-near "$N_NEAR" --settings "${GPU_CHECK_SETTINGS:-fresh,warm}" \
    --out "$OUT/fidelity" --json "$OUT/fidelity_run.json" > "$OUT/fidelity.log" 2>&1
bench_rc=$?
bench_s=$(secs $(( $(ms) - t0 )))
echo "gpu_check: fidelity benchmark exit $bench_rc in ${bench_s} s (limit $BENCH_LIMIT s)"

"$PY" benchmarks/gpu_check.py summary "$OUT" --device "$DEVICE" \
  --tests-rc "$tests_rc" --tests-seconds "$tests_s" --tests-limit "$TEST_LIMIT" \
  --bench-rc "$bench_rc" --bench-seconds "$bench_s" --bench-limit "$BENCH_LIMIT" || exit 1
echo "gpu_check: wrote $OUT/gpu_check.json"

status=0
for part in "tests:$tests_rc" "fidelity benchmark:$bench_rc"; do
  rc=${part##*:}
  if [[ $rc -ne 0 ]]; then
    what="failed (exit $rc)"
    [[ $rc -eq 124 || $rc -eq 137 ]] && what="hit its time limit"
    echo "gpu_check: FAILED: the ${part%:*} $what; see $OUT/$([[ ${part%:*} == tests ]] && echo tests.log || echo fidelity.log)" >&2
    status=1
  fi
done
exit $status
