#!/usr/bin/env bash
# F16 GGUF (from make_model.py) -> I2_S GGUF with bitnet.cpp's own llama-quantize.
# Usage: quantize.sh BITNET_CPP_DIR IN-f16.gguf OUT-i2_s.gguf [--keep]
# The trailing "1" is the thread count, as upstream's setup_env.py passes it: with one thread
# the fork quantizes each tensor in one chunk, so quantize_i2_s writes one scale per tensor.
# The tied token_embd (the LM head) stays F16, the fork's default for I2_S.
# Name the output so it does not start with a digit: llama-quantize first tries to parse its
# second argument as a type (stoi("2b4t...") = 2 = Q4_0) and then fails on "I2_S" as nthread.
# QUANT_ARGS: extra llama-quantize options before the file names, e.g.
#   QUANT_ARGS="--output-tensor-type q8_0" for a Q8_0 tied head/embedding instead of F16.
# The F16 input (~4.8 GB) is deleted afterwards unless --keep is given.
set -euo pipefail
BN=${1:?usage: quantize.sh BITNET_CPP_DIR IN.gguf OUT.gguf [--keep]}
IN=${2:?}; OUT=${3:?}
# shellcheck disable=SC2086
nice -n 19 "$BN/build/bin/llama-quantize" ${QUANT_ARGS:-} "$IN" "$OUT" I2_S 1
if [ "${4:-}" != "--keep" ]; then rm -f "$IN"; fi
ls -l "$OUT"
