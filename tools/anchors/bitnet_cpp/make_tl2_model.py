#!/usr/bin/env python3
"""Writes a random BitNet b1.58 2B4T-shaped **TL2** GGUF for a bitnet.cpp tree built by build_tl2.sh.

    python make_tl2_model.py --bitnet-cpp BITNET_CPP_TL2_DIR OUT.gguf [--seed N] [--tokenizer tokenizer.json]

Same model as make_model.py (architecture `bitnet`, hidden 2560, intermediate 6912, 30 layers,
20 heads, 5 KV heads, vocab 128256, the Llama 3 tokenizer) and, for the same --seed and
dimensions, the **same weights**: this script draws from numpy's generator in exactly
make_model.py's order (norms, F16 embedding, one f16 scale + uniform ternary codes per projection),
so the TL2 file and `quantize.sh`'s I2_S file of make_model.py's output hold the same ternary
codes and per-tensor scales. token_embd (the tied head) is F16, as in the I2_S file.

The projections go straight to TL2 (there is no F16 -> TL2 path in llama-quantize; upstream makes
TL2 files only with utils/convert-hf-to-gguf-bitnet.py --outtype tl2). The TL2 byte layout is made
by that converter's own `preprocess_weights_tl2` (and its two helpers), loaded at run time from
BITNET_CPP_TL2_DIR/utils/convert-hf-to-gguf-bitnet.py (the three functions are extracted with
`ast`, so torch, which the converter imports at top level, is not needed) and run in
BITNET_CPP_TL2_DIR, where it reads include/kernel_config.ini, the tile sizes build_tl2.sh gave
codegen_tl2.py. Every projection shape must have a section there. The per-tensor scale is written
as the converter does, as a hidden `<name>_scale` F32 tensor right after the codes, which the fork's
gguf-py keeps out of the tensor index and which ggml_bitnet_transform_tensor reads after the padded
codes. Nothing of bitnet.cpp is copied here. Numpy only (+ tqdm, pyyaml for the fork's gguf-py);
~1.3 GB file, a few minutes on 2 vCPUs.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import sys
import time
import typing
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model import add_header, add_model_args, draw, import_gguf, tensor_plan  # noqa: E402
TL2_FUNCS = ("preprocess_two_weights_tl2", "preprocess_three_weights_tl2", "preprocess_weights_tl2")
LLAMA_FTYPE_MOSTLY_TL2 = 39  # the fork's include/llama.h (its gguf-py has no name for it)


def load_tl2_preprocess(bitnet: Path):
    path = bitnet / "utils" / "convert-hf-to-gguf-bitnet.py"
    tree = ast.parse(path.read_text(), str(path))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in TL2_FUNCS]
    assert sorted(f.name for f in funcs) == sorted(TL2_FUNCS), f"{path}: TL2 functions not found"
    ns: dict = {"np": np, "Tuple": typing.Tuple}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(path), "exec"), ns)
    return ns["preprocess_weights_tl2"]


def tl2_nbytes(m: int, k: int) -> int:
    # the size the converter pads to and the fork's ggml_nbytes(TL2) assumes (before its +32 scale slot)
    return (k - 256) * m // 3 * 5 // 8 + 256 * m // 2 * 4 // 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bitnet-cpp", type=Path, required=True,
                    help="bitnet.cpp tree built by build_tl2.sh (its gguf-py, converter and kernel_config.ini)")
    add_model_args(ap)
    args = ap.parse_args()
    bitnet = args.bitnet_cpp.resolve()
    out = args.out.resolve()
    # the fork's gguf-py: hides *_scale tensors from the index
    gguf = import_gguf(bitnet / "3rdparty" / "llama.cpp" / "gguf-py")

    preprocess_weights_tl2 = load_tl2_preprocess(bitnet)
    plan = tensor_plan(args)  # make_model.py's: the same draws in the same order
    cfg = configparser.ConfigParser()
    cfg.read(bitnet / "include" / "kernel_config.ini")
    have = {(int(cfg[s]["m"]), int(cfg[s]["k"])) for s in cfg.sections()}
    need = {shape for _, shape, kind in plan if kind not in ("norm", "embd")}
    if not need <= have:
        sys.exit(f"{bitnet}/include/kernel_config.ini lacks TL2 kernels for (M, K) {sorted(need - have)}; "
                 "rebuild with build_tl2.sh TL2_SHAPES=...")

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    w = gguf.GGUFWriter(out, "bitnet")
    add_header(w, gguf, args, f"random-bitnet-{args.hidden}x{args.layers}-tl2", LLAMA_FTYPE_MOSTLY_TL2)
    for name, shape, kind in plan:
        if kind == "norm":
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        elif kind == "embd":
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
        else:  # TL2 codes (numpy shape [M, K] -> ggml ne {K, M}), then the hidden f32 scale
            w.add_tensor_info(name, shape, np.dtype(np.uint8), tl2_nbytes(*shape),
                              raw_dtype=gguf.GGMLQuantizationType.TL2)
            w.add_tensor_info(name + "_scale", (1,), np.dtype(np.float32), 4,
                              raw_dtype=gguf.GGMLQuantizationType.F32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    cwd = os.getcwd()
    os.chdir(bitnet)  # preprocess_weights_tl2 reads include/kernel_config.ini relative to the cwd
    n_tl2 = 0
    for name, shape, kind in plan:
        t = draw(rng, shape, kind)
        if not isinstance(t, tuple):
            w.write_tensor_data(t)
            continue
        codes, s = t
        # the converter's transform_to_tl2: codes = sign(w), scale = max|w| (f32) = s here
        data = preprocess_weights_tl2(codes.astype(np.float32))
        assert data.dtype == np.uint8 and data.nbytes == tl2_nbytes(*shape), (name, data.nbytes)
        w.write_tensor_data(data)
        w.write_tensor_data(np.array([s], dtype=np.float32))
        n_tl2 += 1
        if n_tl2 % 35 == 0:
            print(f"  {n_tl2} TL2 tensors, {time.time() - t0:.0f} s", file=sys.stderr)
    os.chdir(cwd)
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB, {len(plan)} tensors, {n_tl2} TL2) "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
