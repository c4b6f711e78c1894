#!/usr/bin/env bash
# Build bitnet.cpp (microsoft/BitNet @ 4645960, 2024-11-08) with its llama.cpp
# submodule pinned to Eddie-Wang1120/llama.cpp @ 406a5036 (the commit that
# BitNet@4645960 records), I2_S kernels on x86 (TL2 off).
#
# Usage: build.sh DEST
#   BITNET_SRC  git repo (URL or local path) of microsoft/BitNet
#               default https://github.com/microsoft/BitNet.git
#   LLAMA_SRC   git repo (URL or local path) of the Eddie-Wang1120/llama.cpp fork
#               default https://github.com/Eddie-Wang1120/llama.cpp.git
#   BITNET_COMMIT (default 4645960), LLAMA_COMMIT (default 406a5036f9a8aaee9ec5e96e652f61691340fe95)
#   CC/CXX (default clang/clang++, as upstream's setup_env.py expects), JOBS (default 2)
#   NICE (default "nice -n 19")
# Result: DEST/build/bin/{llama-bench,llama-quantize,llama-cli}
set -euo pipefail
DEST=${1:?usage: build.sh DEST}
JOBS=${JOBS:-2}
NICE=${NICE:-nice -n 19}
export CC=${CC:-clang} CXX=${CXX:-clang++}
# shellcheck source=assemble.sh
source "$(dirname "$0")/assemble.sh"
assemble_tree "$DEST"

cd "$DEST"
# The fork's ggml lists include/bitnet-lut-kernels.h as a source and
# ggml-bitnet-lut.cpp includes it unconditionally; its contents are guarded by
# GGML_BITNET_X86_TL2, so for an I2_S-only build any generated header will do.
# Use the shipped preset (what setup_env.py --use-pretuned copies).
if [ ! -f include/bitnet-lut-kernels.h ]; then
  cp preset_kernels/bitnet_b1_58-3B/bitnet-lut-kernels-tl2.h include/bitnet-lut-kernels.h
  cp preset_kernels/bitnet_b1_58-3B/kernel_config_tl2.ini include/kernel_config.ini
fi

$NICE cmake -B build -DCMAKE_BUILD_TYPE=Release -DBITNET_X86_TL2=OFF \
  -DLLAMA_CURL=OFF 2>&1 | tee build-configure.log
$NICE cmake --build build --config Release -j "$JOBS" \
  --target llama-bench llama-quantize llama-cli 2>&1 | tee build-compile.log
ls -l build/bin/
