#!/usr/bin/env python3
"""Side-by-side logits of llama.cpp and bitnet on the same GGUF file and token ids.

    python3 tools/anchors/compare_llama_cpp.py --llama-cpp /path/to/llama.cpp \
        [--bitnet target/release/bitnet] [--model tests/fixtures/gguf-tiny/model-tq2_0.gguf]

--llama-cpp is a llama.cpp source tree built with CMake (`cmake -B build && cmake --build build
--target llama`; upstream's source also ships in the llama-cpp-python sdist under
vendor/llama.cpp). The script compiles tools/anchors/llama_logits.c against its libllama, feeds
both engines the fixture's prompt ids (so tokenizers play no part) and prints, per position, the
largest logit difference relative to the logit range and whether the top-1 tokens agree.

The engines do not compute the same function, so equality is not expected: llama.cpp quantizes
activations for a TQ2_0 / TQ1_0 matmul to Q8_K (one scale per 256 values) where BitNet b1.58 uses
one absmax scale per token row. What the comparison checks is everything else: that both read the
file's ternary codes, block scales, norms and embedding the same way and run the same graph (for
llama.cpp's `bitnet` architecture: SiLU-gated FFN, sub-norms, NeoX RoPE). A layout or graph
mismatch shows as differences of the order of the logit range and disagreeing top-1 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def build_anchor(tree: Path, out: Path) -> Path:
    libdir = tree / "build" / "bin"
    if not (libdir / "libllama.so").exists():
        sys.exit(f"{libdir}/libllama.so not found: build llama.cpp first (cmake --build build --target llama)")
    exe = out / "llama_logits"
    subprocess.run(
        ["cc", "-O2", str(ROOT / "tools/anchors/llama_logits.c"), "-o", str(exe),
         "-I", str(tree / "include"), "-I", str(tree / "ggml/include"),
         "-L", str(libdir), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{libdir}"],
        check=True,
    )
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--bitnet", type=Path, default=ROOT / "target/release/bitnet")
    ap.add_argument("--model", type=Path, default=ROOT / "tests/fixtures/gguf-tiny/model-tq2_0.gguf")
    ap.add_argument("--ids", type=Path, default=ROOT / "tests/fixtures/gguf-tiny/reference.json",
                    help="a JSON file whose prompt_ids are fed to both engines")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--bitnet-arg", action="append", default=[],
                    help="an extra argument for `bitnet logits` (repeatable), e.g. --bitnet-arg=--ffn-activation=relu2")
    a = ap.parse_args()
    ids = json.loads(a.ids.read_text())["prompt_ids"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = build_anchor(a.llama_cpp, tmp)
        run = subprocess.run([str(exe), str(a.model), *map(str, ids)], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"llama.cpp failed:\n{run.stderr[-2000:]}")
        anchor = np.array([[float(x) for x in line.split()] for line in run.stdout.splitlines()])
        ours_path = tmp / "ours.npy"
        subprocess.run(
            [str(a.bitnet), "logits", "--device", "cpu", "--model", str(a.model),
             "--tokens", ",".join(map(str, ids)), "--out", str(ours_path), *a.bitnet_arg],
            check=True,
        )
        ours = np.load(ours_path).astype(np.float64)

    if anchor.shape != ours.shape:
        sys.exit(f"shapes differ: llama.cpp {anchor.shape}, bitnet {ours.shape}")
    rng = anchor.max(axis=1) - anchor.min(axis=1)
    rel = np.abs(ours - anchor).max(axis=1) / rng
    top1 = ours.argmax(axis=1) == anchor.argmax(axis=1)
    for p in range(len(ids)):
        print(f"position {p:3d}: max |bitnet - llama.cpp| / range = {rel[p]:.2e}   top-1 {'same' if top1[p] else 'DIFFERENT'}")
    summary = {
        "model": str(a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT) else a.model),
        "bitnet_args": a.bitnet_arg,
        "positions": len(ids),
        "max_rel_diff": float(rel.max()),
        "mean_rel_diff": float(rel.mean()),
        "top1_agreement": float(top1.mean()),
    }
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
