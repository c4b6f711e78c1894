#!/usr/bin/env bash
# bitnet.cpp vs bitnet logits on one small random I2_S GGUF (issue #16). Run by hand, never in CI.
#
#   tools/anchors/bitnet_cpp_logits/run.sh BITNET_CPP_DIR BITNET_BIN WORKDIR [../bitnet_cpp/make_model.py options]
#
# BITNET_CPP_DIR: a bitnet.cpp built by tools/anchors/bitnet_cpp/build.sh (microsoft/BitNet 4645960,
# llama.cpp fork 406a5036). BITNET_BIN: our release binary. WORKDIR: where files go (~250 MB).
# PY: a Python with numpy + the `gguf` package (default python3). IDS: the token ids.
set -euo pipefail
BN=${1:?usage: run.sh BITNET_CPP_DIR BITNET_BIN WORKDIR [model options]}
OURS=${2:?}; W=${3:?}; shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
LL=$BN/3rdparty/llama.cpp
LIBS="$BN/build/3rdparty/llama.cpp/src"; GLIBS="$BN/build/3rdparty/llama.cpp/ggml/src"
IDS=${IDS:-"128000 791 4062 14198 39935 35308 927 279 16053 5679 13 578 1917 374 2539 315 29510 323 11782 13"}
CSV=$(echo $IDS | tr ' ' ,)
mkdir -p "$W"
nice -n 19 cc -O2 -Wall "$HERE/bitnet_cpp_logits.c" -o "$W/bitnet_cpp_logits" -I "$LL/include" -I "$LL/ggml/include" \
  -L "$LIBS" -L "$GLIBS" -lllama -lggml -lm -Wl,-rpath,"$LIBS" -Wl,-rpath,"$GLIBS"
# model: F16 with the fork's gguf-py, then I2_S with the fork's llama-quantize (one thread => one scale per tensor)
nice -n 19 "$PY" "$HERE/../bitnet_cpp/make_model.py" --llama-cpp "$LL" "$W/small-f16.gguf" \
    --hidden 256 --inter 768 --layers 2 --heads 4 --kv-heads 2 "$@"
nice -n 19 "$BN/build/bin/llama-quantize" "$W/small-f16.gguf" "$W/small-i2_s.gguf" I2_S 1 > "$W/quantize.log" 2>&1
M=$W/small-i2_s.gguf
# bitnet.cpp: one batch of all ids, every position's logits, 1 thread, default f16 KV cache
# shellcheck disable=SC2086
nice -n 19 "$W/bitnet_cpp_logits" "$M" 1 $IDS > "$W/theirs.txt" 2> "$W/theirs.log"
# ours: CPU, exact (F16) head; the architecture `bitnet` means SiLU; x86 I2_S layout (default)
nice -n 19 "$OURS" logits --device cpu -t 1 --model "$M" --lm-head exact --tokens "$CSV" --out "$W/ours.npy"
# contrasts: a graph bitnet.cpp does not compute (ReLU²), and the other I2_S byte layout
nice -n 19 "$OURS" logits --device cpu -t 1 --model "$M" --lm-head exact --ffn-activation relu2 --tokens "$CSV" --out "$W/ours-relu2.npy"
nice -n 19 "$OURS" logits --device cpu -t 1 --model "$M" --lm-head exact --i2s-layout arm --tokens "$CSV" --out "$W/ours-arm.npy"
# float64 references of llama.cpp's `bitnet` graph from the F16 file: exact, and with ggml's f16 roundings
nice -n 19 "$PY" "$HERE/reference.py" "$W/small-f16.gguf" "$CSV" "$W/ref64.npy"
nice -n 19 "$PY" "$HERE/reference.py" --ggml-f16 --head-f32 "$W/small-f16.gguf" "$CSV" "$W/refggml.npy"
C="$PY $HERE/compare.py"
$C "$W/theirs.txt" "$W/ours.npy" --json "$W/ours_vs_theirs.json" > "$W/ours_vs_theirs.md"
$C "$W/theirs.txt" "$W/ours-relu2.npy" --json "$W/relu2_vs_theirs.json" > "$W/relu2_vs_theirs.md"
$C "$W/theirs.txt" "$W/ours-arm.npy" --json "$W/arm_vs_theirs.json" > "$W/arm_vs_theirs.md"
$C "$W/ref64.npy" "$W/ours.npy" --json "$W/ours_vs_ref64.json" > "$W/ours_vs_ref64.md"
$C "$W/ref64.npy" "$W/theirs.txt" --json "$W/theirs_vs_ref64.json" > "$W/theirs_vs_ref64.md"
$C "$W/refggml.npy" "$W/theirs.txt" --json "$W/theirs_vs_refggml.json" > "$W/theirs_vs_refggml.md"
$C "$W/refggml.npy" "$W/ours.npy" --json "$W/ours_vs_refggml.json" > "$W/ours_vs_refggml.md"
for j in ours_vs_theirs relu2_vs_theirs arm_vs_theirs ours_vs_ref64 theirs_vs_ref64 theirs_vs_refggml ours_vs_refggml; do
  printf '%-20s ' "$j"; "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('max %.2e  mean-of-max %.2e  mean %.2e  top1 %.2f  top5 %.2f' % (d['max_rel_diff'], d['mean_of_max_rel_diff'], d['mean_rel_abs_diff'], d['top1_agreement'], d['top5_overlap']))" "$W/$j.json"
done
