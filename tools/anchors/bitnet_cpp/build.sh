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
BITNET_SRC=${BITNET_SRC:-https://github.com/microsoft/BitNet.git}
LLAMA_SRC=${LLAMA_SRC:-https://github.com/Eddie-Wang1120/llama.cpp.git}
BITNET_COMMIT=${BITNET_COMMIT:-4645960}
LLAMA_COMMIT=${LLAMA_COMMIT:-406a5036f9a8aaee9ec5e96e652f61691340fe95}
JOBS=${JOBS:-2}
NICE=${NICE:-nice -n 19}
export CC=${CC:-clang} CXX=${CXX:-clang++}

fetch_tree() { # repo commit dest : export one commit's tree (no .git) into dest
  local repo=$1 commit=$2 dest=$3 tmp
  mkdir -p "$dest"
  if [ -d "$repo" ] && git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
    # A snapshot may lack some large blobs (the fork's models/ggml-vocab-*.gguf
    # test vocabularies): export every file whose blob is present, list the rest.
    local missing
    missing=$(git -C "$repo" ls-tree -r "$commit" | awk '$2=="blob"{print $3" "$4}' |
      while read -r sha path; do
        git -C "$repo" cat-file -e "$sha" 2>/dev/null || echo "$path"; done)
    if [ -n "$missing" ]; then
      echo "note: blobs absent from $repo, skipped:" $missing >&2
      local excl=(); for m in $missing; do excl+=(":(exclude)$m"); done
      git -C "$repo" archive "$commit" -- . "${excl[@]}" | tar -x -C "$dest"
    else
      git -C "$repo" archive "$commit" | tar -x -C "$dest"
    fi
  else
    tmp=$(mktemp -d)
    git clone --quiet --filter=blob:none --no-checkout "$repo" "$tmp/r"
    git -C "$tmp/r" archive "$commit" | tar -x -C "$dest"
    rm -rf "$tmp"
  fi
}

if [ ! -f "$DEST/CMakeLists.txt" ]; then
  fetch_tree "$BITNET_SRC" "$BITNET_COMMIT" "$DEST"
  rm -rf "$DEST/3rdparty/llama.cpp"
  fetch_tree "$LLAMA_SRC" "$LLAMA_COMMIT" "$DEST/3rdparty/llama.cpp"
  echo "bitnet=$BITNET_COMMIT llama.cpp-fork=$LLAMA_COMMIT" > "$DEST/ANCHOR_COMMITS"
fi

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
