#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one prepared script for the device machine (an
# NVIDIA H200 when a task is lent one; see README.md beside this file for how to call it).
# Runs the carried release binary `.gpu/bitnet` on the synthetic 2B4T shape (PRESET=tiny for a
# dry run on lavapipe) and writes every
# result under $OUT (JSON from `bitnet bench -o json`, plus the text of `bitnet info`). Each run
# has its own timeout so that one slow case cannot eat the whole lease; a failed run leaves its
# log and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/bitnet-gpu-out}"
mkdir -p "$OUT"
# The Vulkan loader, when the machine lacks one (carried as .gl/*.deb).
if ! ldconfig -p | grep -q libvulkan; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
BIN=.gpu/bitnet
chmod +x "$BIN"
run() { # name, seconds, command...
    local name=$1 secs=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.json" 2>>"$OUT/log.txt"
    echo "   rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
}
"$BIN" info >"$OUT/info.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,power.draw,clocks.sm --format=csv >>"$OUT/info.txt" 2>&1
B=("$BIN" bench --synthetic "${PRESET:-2b4t}" --device gpu -o json --idle-seconds 2)
# issue 13: decode, exact and q8 heads, with NVML energy; issue 14: an 8-token step (pp8, a batched
# decode's shape); issue 15: prefill 512 / 2048, depth 4096
run decode_exact 170 "${B[@]}" -p 8,512,2048 -n 128 -r 3 -d 0,4096
run decode_q8 90 "${B[@]}" --lm-head q8 -p 512 -n 128 -r 3 -d 0,4096
# A/B of the design choices that lavapipe could not decide (one depth, fewer repetitions)
# (the discrete-GPU defaults, src/backend/wgpu/tiles.rs: 1 prologue block, k-step 8, 4 tokens per
# thread; `bitnet info` above shows what was chosen)
BITNET_GPU_NO_PROLOGUE=1 run ab_no_prologue 50 "${B[@]}" -p 512 -n 128 -r 2
BITNET_GPU_NO_SUBGROUPS=1 run ab_no_subgroups 50 "${B[@]}" -p 512 -n 128 -r 2
BITNET_GPU_PRO_BLOCKS=4 run ab_pro_blocks_4 30 "${B[@]}" -p 0 -n 128 -r 2
run ab_kv_f32 50 "${B[@]}" --kv-cache f32 -p 512 -n 128 -r 2 -d 4096
BITNET_GPU_TILE_K=4 run ab_tile_k4 40 "${B[@]}" -p 512,2048 -n 0 -r 2
BITNET_GPU_TILE_TJ=2 run ab_tile_tj2 30 "${B[@]}" -p 512,2048 -n 0 -r 2
ls -la "$OUT"
