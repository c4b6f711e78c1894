# Sourced by build.sh and build_tl2.sh: the source tree of bitnet.cpp (microsoft/BitNet) with its
# llama.cpp fork in 3rdparty/llama.cpp, assembled from two git repositories (URLs or local paths;
# env BITNET_SRC, LLAMA_SRC, BITNET_COMMIT, LLAMA_COMMIT, see build.sh).
BITNET_SRC=${BITNET_SRC:-https://github.com/microsoft/BitNet.git}
LLAMA_SRC=${LLAMA_SRC:-https://github.com/Eddie-Wang1120/llama.cpp.git}
BITNET_COMMIT=${BITNET_COMMIT:-4645960}
LLAMA_COMMIT=${LLAMA_COMMIT:-406a5036f9a8aaee9ec5e96e652f61691340fe95}

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

assemble_tree() { # dest : the two commits' trees in dest, unless dest already holds one
  local dest=$1
  if [ ! -f "$dest/CMakeLists.txt" ]; then
    fetch_tree "$BITNET_SRC" "$BITNET_COMMIT" "$dest"
    rm -rf "$dest/3rdparty/llama.cpp"
    fetch_tree "$LLAMA_SRC" "$LLAMA_COMMIT" "$dest/3rdparty/llama.cpp"
    echo "bitnet=$BITNET_COMMIT llama.cpp-fork=$LLAMA_COMMIT" > "$dest/ANCHOR_COMMITS"
  fi
}

