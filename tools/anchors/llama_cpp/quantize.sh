#!/usr/bin/env bash
# F16 GGUF (from ../bitnet_cpp/make_model.py: architecture `bitnet`, 2B4T's shape) -> TQ2_0 or
# TQ1_0 with upstream llama.cpp's own llama-quantize.
#
# Usage: quantize.sh LLAMA_DIR IN-f16.gguf OUT.gguf TYPE [--delete]
#   TYPE      TQ2_0 or TQ1_0 (any llama-quantize type name is passed through)
#   HEAD      type of the tied token_embd / LM head (default f16, as bitnet.cpp's I2_S file keeps
#             it, so that the heads match rand2b4t-i2_s.gguf; q8_0 matches
#             rand2b4t-i2_s-q8head.gguf; "auto" = llama-quantize's own choice, Q6_K for a tied
#             embedding under TQ1_0/TQ2_0, which our engine dequantizes to f32)
#   NTHREADS  llama-quantize threads (default 2; TQ1_0/TQ2_0 have one f16 scale per 256-value
#             block, so the chunking does not change the bytes)
#   QUANT_ARGS extra llama-quantize options before the file names
# The F16 input is kept (several types are made from it) unless --delete is given.
#
# Every projection of make_model.py's file is exactly {-s, 0, +s} with one f16 s per tensor, so
# each TQ2_0/TQ1_0 block gets d = s and the codes are exact: the ternary weights are the same
# numbers as in the I2_S file that bitnet_cpp/quantize.sh makes from the same F16 file.
set -euo pipefail
LL=${1:?usage: quantize.sh LLAMA_DIR IN.gguf OUT.gguf TYPE [--delete]}
IN=${2:?}; OUT=${3:?}; TYPE=${4:?TYPE: TQ2_0 or TQ1_0}
HEAD=${HEAD:-f16}; NTHREADS=${NTHREADS:-2}
head_args=(); [ "$HEAD" = auto ] || head_args=(--output-tensor-type "$HEAD" --token-embedding-type "$HEAD")
# shellcheck disable=SC2086
nice -n 10 "$LL/build/bin/llama-quantize" "${head_args[@]}" ${QUANT_ARGS:-} "$IN" "$OUT" "$TYPE" "$NTHREADS"
if [ "${5:-}" = "--delete" ]; then rm -f "$IN"; fi
ls -l "$OUT"
