#!/usr/bin/env bash
# Side-by-side pp/tg timing of bitnet.cpp's llama-bench and `bitnet bench` on the same I2_S GGUF,
# run alternately (A B B' B'' A B B' B'' ...) so that drift in machine load hits both; optionally
# with upstream llama.cpp's llama-bench on a TQ2_0/TQ1_0 file of the same weights in the same
# alternation (A L B B' B'' A L B ...; LLAMA_CPP_DIR / LLAMA_CPP_MODEL below).
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
#   LLAMA_CPP_DIR, LLAMA_CPP_MODEL  optional third engine: upstream llama.cpp (../llama_cpp/build.sh)
#             and its TQ2_0 (or TQ1_0) file(s) (../llama_cpp/quantize.sh). When both are set, each
#             round and thread count runs bitnet.cpp, then llama.cpp's llama-bench on each file
#             of LLAMA_CPP_MODEL (space-separated; an entry LABEL=PATH names its runs
#             llamacpp-LABEL, else the file's base name is the label), then ours. Unset: as before.
#   EXTRA_LLAMA_CPP  extra llama-bench arguments for llama.cpp (default EXTRA_LLAMA_BENCH)
#   TL2_DIR, TL2_MODEL  optional: bitnet.cpp's TL2 build (build_tl2.sh) and its TL2 file of the
#             same weights (make_tl2_model.py); when both are set, each round and thread count runs
#             it right after bitnet.cpp's I2_S run (runs bitnetcpp-tl2)
#   OURS_ON_LLAMA_MODEL=1  also run each OUR_RUNS spec on each LLAMA_CPP_MODEL file
#             (runs ours-LABEL-LEVEL-HEAD), e.g. to check that ours reads TQ2_0 as fast as I2_S
# Every run's stdout/stderr goes to OUTDIR/NN-<name>-t<threads>.log with the engine, the model
# and the load average before and after. Names: bitnetcpp (bitnet.cpp's llama-bench, MODEL),
# llamacpp-LABEL (upstream llama.cpp's llama-bench), ours-LEVEL-HEAD (`bitnet bench`, MODEL).
set -euo pipefail
BN=${1:?usage: run_bench.sh BITNET_CPP_DIR MODEL.gguf BITNET_BIN OUTDIR}
MODEL=${2:?}; OURS=${3:?}; OUT=${4:?}
THREADS=${THREADS:-2}; ROUNDS=${ROUNDS:-2}; PP=${PP:-512}; TG=${TG:-128}; REPS=${REPS:-3}
OUR_RUNS=${OUR_RUNS:-auto:exact auto:q8 avx2:q8}; MAX_LOAD=${MAX_LOAD:-1.5}; WAIT_S=${WAIT_S:-600}
EXTRA_LLAMA_BENCH=${EXTRA_LLAMA_BENCH:-}; EXTRA_OURS=${EXTRA_OURS:-}
LLAMA_CPP_DIR=${LLAMA_CPP_DIR:-}; LLAMA_CPP_MODEL=${LLAMA_CPP_MODEL:-}
EXTRA_LLAMA_CPP=${EXTRA_LLAMA_CPP:-$EXTRA_LLAMA_BENCH}; OURS_ON_LLAMA_MODEL=${OURS_ON_LLAMA_MODEL:-0}
TL2_DIR=${TL2_DIR:-}; TL2_MODEL=${TL2_MODEL:-}
if [ -n "$TL2_DIR" ] || [ -n "$TL2_MODEL" ]; then
  [ -n "$TL2_DIR" ] && [ -n "$TL2_MODEL" ] ||
    { echo "set both TL2_DIR and TL2_MODEL (or neither)" >&2; exit 2; }
  [ -x "$TL2_DIR/build/bin/llama-bench" ] ||
    { echo "no $TL2_DIR/build/bin/llama-bench (build_tl2.sh)" >&2; exit 2; }
  [ -f "$TL2_MODEL" ] || { echo "no such file: $TL2_MODEL" >&2; exit 2; }
fi
ll_labels=(); ll_models=()
if [ -n "$LLAMA_CPP_DIR" ] || [ -n "$LLAMA_CPP_MODEL" ]; then
  [ -n "$LLAMA_CPP_DIR" ] && [ -n "$LLAMA_CPP_MODEL" ] ||
    { echo "set both LLAMA_CPP_DIR and LLAMA_CPP_MODEL (or neither)" >&2; exit 2; }
  [ -x "$LLAMA_CPP_DIR/build/bin/llama-bench" ] ||
    { echo "no $LLAMA_CPP_DIR/build/bin/llama-bench (../llama_cpp/build.sh)" >&2; exit 2; }
  for e in $LLAMA_CPP_MODEL; do
    if [[ $e == *=* ]]; then lab=${e%%=*}; path=${e#*=}; else path=$e; lab=$(basename "$e" .gguf); fi
    [ -f "$path" ] || { echo "no such file: $path" >&2; exit 2; }
    ll_labels+=("$lab"); ll_models+=("$path")
  done
fi
commits() { [ -f "$1/ANCHOR_COMMITS" ] && tr '\n' ' ' < "$1/ANCHOR_COMMITS" || echo "?"; }
BN_DESC="bitnet.cpp $(commits "$BN")"
LL_DESC=""; [ -z "$LLAMA_CPP_DIR" ] || LL_DESC="llama.cpp (ggml-org) $(commits "$LLAMA_CPP_DIR")"
mkdir -p "$OUT"
n=0
wait_quiet() {
  local waited=0
  while awk -v m="$MAX_LOAD" '{exit !($1 >= m)}' /proc/loadavg && [ $waited -lt "$WAIT_S" ]; do
    sleep 15; waited=$((waited + 15))
  done
}
run() { # name engine model cmd...
  local name=$1 engine=$2 model=$3; shift 3
  n=$((n + 1))
  local log; log=$(printf '%s/%02d-%s.log' "$OUT" "$n" "$name")
  wait_quiet
  { echo "# $(date -u +%FT%TZ) load before: $(cat /proc/loadavg)"
    echo "# engine: $engine"; echo "# model: $model"; echo "# $*"; } > "$log"
  "$@" >> "$log" 2>&1 || echo "# exit $?" >> "$log"
  echo "# $(date -u +%FT%TZ) load after: $(cat /proc/loadavg)" >> "$log"
  grep -E '^\|.*(pp|tg)[0-9]+' "$log" | sed "s|^|$name: |" || true
}
ours_runs() { # label-prefix model threads
  local pre=$1 model=$2 t=$3 spec lvl head envs
  for spec in $OUR_RUNS; do
    lvl=${spec%%:*}; head=${spec#*:}
    envs=(); [ "$lvl" = auto ] || envs=(BITNET_CPU_KERNEL="$lvl")
    # shellcheck disable=SC2086
    run "ours-$pre$lvl-$head-t$t" "ours (bitnet-wgpu) $OURS" "$model" env "${envs[@]}" "$OURS" bench \
      --model "$model" --device cpu --lm-head "$head" -p "$PP" -n "$TG" -t "$t" -r "$REPS" \
      --idle-seconds 0 $EXTRA_OURS
  done
}
for r in $(seq 1 "$ROUNDS"); do
  for t in ${THREADS//,/ }; do
    # shellcheck disable=SC2086
    run "bitnetcpp-t$t" "$BN_DESC" "$MODEL" "$BN/build/bin/llama-bench" -m "$MODEL" -p "$PP" \
      -n "$TG" -t "$t" -r "$REPS" $EXTRA_LLAMA_BENCH
    if [ -n "$TL2_DIR" ]; then
      # shellcheck disable=SC2086
      run "bitnetcpp-tl2-t$t" "bitnet.cpp TL2 $(commits "$TL2_DIR")" "$TL2_MODEL" \
        "$TL2_DIR/build/bin/llama-bench" -m "$TL2_MODEL" -p "$PP" -n "$TG" -t "$t" -r "$REPS" \
        $EXTRA_LLAMA_BENCH
    fi
    for i in "${!ll_models[@]}"; do
      # shellcheck disable=SC2086
      run "llamacpp-${ll_labels[$i]}-t$t" "$LL_DESC" "${ll_models[$i]}" \
        "$LLAMA_CPP_DIR/build/bin/llama-bench" -m "${ll_models[$i]}" -p "$PP" -n "$TG" -t "$t" \
        -r "$REPS" $EXTRA_LLAMA_CPP
    done
    ours_runs "" "$MODEL" "$t"
    if [ "$OURS_ON_LLAMA_MODEL" = 1 ]; then
      for i in "${!ll_models[@]}"; do ours_runs "${ll_labels[$i]}-" "${ll_models[$i]}" "$t"; done
    fi
  done
done
