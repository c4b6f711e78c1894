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
import json
import os
import sys
import time
import typing
from pathlib import Path

import numpy as np

VOCAB = 128256
DEFAULT_TOKENIZER = "/work/shared/data/llama3-tokenizer/tokenizer.json"
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
    ap.add_argument("--tokenizer", type=Path, default=Path(DEFAULT_TOKENIZER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=6912)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=5)
    args = ap.parse_args()
    HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = args.hidden, args.inter, args.layers, args.heads, args.kv_heads
    HEAD_DIM = HIDDEN // HEADS
    bitnet = args.bitnet_cpp.resolve()
    out = args.out.resolve()

    sys.path.insert(0, str(bitnet / "3rdparty" / "llama.cpp" / "gguf-py"))
    try:
        import sentencepiece  # noqa: F401
    except ImportError:  # gguf-py's vocab.py imports it at top level; unused here
        import types as _types
        stub = _types.ModuleType("sentencepiece")
        stub.SentencePieceProcessor = None
        sys.modules["sentencepiece"] = stub
    import gguf  # noqa: E402  (the fork's gguf-py: hides *_scale tensors from the index)

    preprocess_weights_tl2 = load_tl2_preprocess(bitnet)
    kv = KV_HEADS * HEAD_DIM
    cfg = configparser.ConfigParser()
    cfg.read(bitnet / "include" / "kernel_config.ini")
    have = {(int(cfg[s]["m"]), int(cfg[s]["k"])) for s in cfg.sections()}
    need = {(HIDDEN, HIDDEN), (kv, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)}
    if not need <= have:
        sys.exit(f"{bitnet}/include/kernel_config.ini lacks TL2 kernels for (M, K) {sorted(need - have)}; "
                 "rebuild with build_tl2.sh TL2_SHAPES=...")

    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    # ---- tokenizer (Llama 3 BPE), as make_model.py ----
    tj = json.loads(args.tokenizer.read_text())
    vocab: dict[str, int] = tj["model"]["vocab"]
    tokens = [""] * VOCAB
    types = [gguf.TokenType.NORMAL] * VOCAB
    for tok, i in vocab.items():
        tokens[i] = tok
    for at in tj.get("added_tokens", []):
        if at["id"] < VOCAB:
            tokens[at["id"]] = at["content"]
            types[at["id"]] = gguf.TokenType.CONTROL if at.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(VOCAB):
        if tokens[i] == "":
            tokens[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
    merges = tj["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    w = gguf.GGUFWriter(out, "bitnet")
    w.add_name(f"random-bitnet-{HIDDEN}x{LAYERS}-tl2")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(LLAMA_FTYPE_MOSTLY_TL2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)
    w.add_add_bos_token(True)

    # ---- tensor plan: exactly make_model.py's (order matters for the random draws) ----
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (VOCAB, HIDDEN), "embd")]
    for i in range(LAYERS):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (HIDDEN,), "norm"),
            (b + "attn_q.weight", (HIDDEN, HIDDEN), "qk"),
            (b + "attn_k.weight", (kv, HIDDEN), "qk"),
            (b + "attn_v.weight", (kv, HIDDEN), "big"),
            (b + "attn_sub_norm.weight", (HIDDEN,), "norm"),
            (b + "attn_output.weight", (HIDDEN, HIDDEN), "big"),
            (b + "ffn_norm.weight", (HIDDEN,), "norm"),
            (b + "ffn_gate.weight", (INTER, HIDDEN), "gu"),
            (b + "ffn_up.weight", (INTER, HIDDEN), "gu"),
            (b + "ffn_sub_norm.weight", (INTER,), "norm"),
            (b + "ffn_down.weight", (HIDDEN, INTER), "big"),
        ]
    plan.append(("output_norm.weight", (HIDDEN,), "norm"))

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
    scale_range = {"qk": (0.1, 0.2), "gu": (0.08, 0.16), "big": (1.0, 3.0)}
    n_tl2 = 0
    for name, shape, kind in plan:
        if kind == "norm":
            w.write_tensor_data((1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32))
        elif kind == "embd":
            t = np.empty(shape, np.float16)
            for r in range(0, shape[0], 8192):
                t[r:r + 8192] = (0.02 * rng.standard_normal((min(8192, shape[0] - r), shape[1]),
                                                            dtype=np.float32)).astype(np.float16)
            w.write_tensor_data(t)
            del t
        else:
            lo, hi = scale_range[kind]
            s = np.float16(rng.uniform(lo, hi))
            codes = rng.integers(-1, 2, size=shape, dtype=np.int8)
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
