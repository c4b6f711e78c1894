#!/usr/bin/env bash
# Build upstream llama.cpp (ggml-org) as a speed anchor for its ternary types TQ2_0 / TQ1_0.
# The source is the llama.cpp vendored in the llama-cpp-python sdist (the GitHub repository is
# too large to fetch here); 0.3.36 vendors ggml-org/llama.cpp@0c1e5709 (2026-10-01).
#
# Usage: build.sh DEST
#   SDIST      a llama_cpp_python-*.tar.gz to unpack (default: download SDIST_URL)
#   SDIST_URL  default the 0.3.36 sdist on pypi.org (tools/anchors/README.md)
#   LLAMA_SRC  a llama.cpp source directory to copy instead of an sdist (SDIST is then ignored)
#   CC/CXX     default clang/clang++ (as bitnet_cpp/build.sh, so both anchors share a compiler)
#   JOBS (default 2), NICE (default "nice -n 10")
#   TARGETS    default "llama-bench llama-quantize llama-completion". Upstream's llama-cli now
#              lives in tools/cli and is only configured with LLAMA_BUILD_SERVER=ON (it links the
#              server); llama-completion is the former llama-cli (one-shot generation,
#              system_info). BUILD_SERVER=ON adds the server and llama-cli.
# Result: DEST = the llama.cpp source tree, DEST/build/bin/{llama-bench,llama-quantize,...},
#         DEST/ANCHOR_COMMITS (which llama.cpp), DEST/build-{configure,compile}.log
set -euo pipefail
DEST=${1:?usage: build.sh DEST}
SDIST_URL=${SDIST_URL:-https://pypi.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz}
JOBS=${JOBS:-2}
NICE=${NICE:-nice -n 10}
BUILD_SERVER=${BUILD_SERVER:-OFF}
TARGETS=${TARGETS:-llama-bench llama-quantize llama-completion}
[ "$BUILD_SERVER" = ON ] && TARGETS="$TARGETS llama-cli"
export CC=${CC:-clang} CXX=${CXX:-clang++}

if [ ! -f "$DEST/CMakeLists.txt" ]; then
  mkdir -p "$DEST"
  if [ -n "${LLAMA_SRC:-}" ]; then
    # a plain source directory (or a checkout): copy it without any earlier build
    tar -C "$LLAMA_SRC" --exclude=./build -cf - . | tar -C "$DEST" -xf -
    commit=$(git -C "$LLAMA_SRC" rev-parse HEAD 2>/dev/null || echo unknown)
    echo "llama.cpp=$commit source=$LLAMA_SRC" > "$DEST/ANCHOR_COMMITS"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if [ -z "${SDIST:-}" ]; then
      SDIST=$tmp/$(basename "$SDIST_URL")
      curl -fsSL -o "$SDIST" "$SDIST_URL"
    fi
    tar -xzf "$SDIST" -C "$tmp"
    top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'llama_cpp_python-*' | head -1)
    [ -f "$top/vendor/llama.cpp/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }
    version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$top/llama_cpp/__init__.py")
    # The sdist carries the submodule's (shallow) git directory: move it next to the tree so
    # that llama.cpp's build-info (and llama-bench's "build:" line) names the commit.
    rm -f "$top/vendor/llama.cpp/.git"
    tar -C "$top/vendor/llama.cpp" -cf - . | tar -C "$DEST" -xf -
    gitdir=$top/.git/modules/vendor/llama.cpp
    if [ -f "$gitdir/HEAD" ]; then
      mv "$gitdir" "$DEST/.git"
      git config --file "$DEST/.git/config" --unset core.worktree || true
      # drop the CI runner's credential includes recorded in the sdist's config
      awk '/^\[/{skip = ($0 ~ /^\[includeIf /)} !skip' "$DEST/.git/config" > "$DEST/.git/config.new"
      mv "$DEST/.git/config.new" "$DEST/.git/config"
      # the anchor's own files must not make the build-info say "-dirty"
      printf '%s\n' ANCHOR_COMMITS 'build-*.log' build-compiler.txt >> "$DEST/.git/info/exclude"
      commit=$(cat "$DEST/.git/HEAD")
    else
      commit=unknown
    fi
    echo "llama.cpp=$commit llama-cpp-python=$version sdist=$(basename "$SDIST")" > "$DEST/ANCHOR_COMMITS"
  fi
fi
cat "$DEST/ANCHOR_COMMITS"

cd "$DEST"
$NICE cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER="$BUILD_SERVER" -DLLAMA_BUILD_APP=OFF 2>&1 | tee build-configure.log
# shellcheck disable=SC2086
$NICE cmake --build build --config Release -j "$JOBS" --target $TARGETS 2>&1 | tee build-compile.log
"$CXX" --version | head -1 > build-compiler.txt; cat build-compiler.txt
ls -l build/bin/
