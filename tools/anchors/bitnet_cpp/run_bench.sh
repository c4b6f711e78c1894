#!/usr/bin/env bash
# Side-by-side pp/tg timing of bitnet.cpp's llama-bench and `bitnet bench` on the same I2_S GGUF,
# run alternately (A B B' B'' A B B' B'' ...) so that drift in machine load hits both.
#
# Usage: run_bench.sh BITNET_CPP_DIR MODEL.gguf BITNET_BIN OUTDIR
#   THREADS   comma-separated thread counts, each run separately (default "2")
#   ROUNDS    alternation rounds (default 2)
#   PP, TG    prompt / generated lengths (default 512 / 128), REPS (default 3)
#   OUR_RUNS  space-separated LEVEL:HEAD pairs for our runs after each llama-bench run: LEVEL is a
#             BITNET_CPU_KERNEL value or auto, HEAD our --lm-head (exact = the file's F16 tied
#             embedding, as bitnet.cpp reads it; q8 = our int8 head). Default "auto:exact auto:q8 avx2:q8"
#   MAX_LOAD  wait (up to WAIT_S, default 600 s) until the 1-minute load is below it (default 1.5)
#   EXTRA_LLAMA_BENCH / EXTRA_OURS  extra arguments (e.g. "-p 0" for a tg-only pass)
# Every run's stdout/stderr goes to OUTDIR/NN-<engine>-t<threads>.log with the load average
# before and after.
set -euo pipefail
BN=${1:?usage: run_bench.sh BITNET_CPP_DIR MODEL.gguf BITNET_BIN OUTDIR}
MODEL=${2:?}; OURS=${3:?}; OUT=${4:?}
THREADS=${THREADS:-2}; ROUNDS=${ROUNDS:-2}; PP=${PP:-512}; TG=${TG:-128}; REPS=${REPS:-3}
OUR_RUNS=${OUR_RUNS:-auto:exact auto:q8 avx2:q8}; MAX_LOAD=${MAX_LOAD:-1.5}; WAIT_S=${WAIT_S:-600}
EXTRA_LLAMA_BENCH=${EXTRA_LLAMA_BENCH:-}; EXTRA_OURS=${EXTRA_OURS:-}
mkdir -p "$OUT"
n=0
wait_quiet() {
  local waited=0
  while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg && [ $waited -lt "$WAIT_S" ]; do
    sleep 15; waited=$((waited + 15))
  done
}
run() { # name cmd...
  local name=$1; shift
  n=$((n + 1))
  local log; log=$(printf '%s/%02d-%s.log' "$OUT" "$n" "$name")
  wait_quiet
  { echo "# $(date -u +%FT%TZ) load before: $(cat /proc/loadavg)"; echo "# $*"; } > "$log"
  "$@" >> "$log" 2>&1 || echo "# exit $?" >> "$log"
  echo "# $(date -u +%FT%TZ) load after: $(cat /proc/loadavg)" >> "$log"
  grep -E '^\|.*(pp|tg)[0-9]+' "$log" | sed "s|^|$name: |" || true
}
for r in $(seq 1 "$ROUNDS"); do
  for t in ${THREADS//,/ }; do
    # shellcheck disable=SC2086
    run "bitnetcpp-t$t" "$BN/build/bin/llama-bench" -m "$MODEL" -p "$PP" -n "$TG" -t "$t" -r "$REPS" \
      $EXTRA_LLAMA_BENCH
    for spec in $OUR_RUNS; do
      lvl=${spec%%:*}; head=${spec#*:}
      envs=(); [ "$lvl" = auto ] || envs=(BITNET_CPU_KERNEL="$lvl")
      # shellcheck disable=SC2086
      run "ours-$lvl-$head-t$t" env "${envs[@]}" "$OURS" bench --model "$MODEL" --device cpu \
        --lm-head "$head" -p "$PP" -n "$TG" -t "$t" -r "$REPS" --idle-seconds 0 $EXTRA_OURS
    done
  done
done
