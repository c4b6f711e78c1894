#!/usr/bin/env python3
"""Writes a random BitNet b1.58 F16 GGUF for bitnet.cpp's llama-quantize (→ I2_S): 2B4T's shape by
default, other dimensions by option (the small models of ../bitnet_cpp_logits/).

    python make_model.py --llama-cpp BITNET_CPP/3rdparty/llama.cpp OUT.gguf [--seed N]
        [--tokenizer tokenizer.json]

Uses the gguf-py of the given llama.cpp checkout (bitnet.cpp's fork, imported by path; nothing of
it is copied here) and numpy. Architecture `bitnet` (llama.cpp's LLM_ARCH_BITNET, 1bitLLM lineage:
attention and FFN sub-norms, SiLU-gated FFN, tied embeddings), which is what the November-2024
fork knows; the dimensions are 2B4T's: hidden 2560, intermediate 6912, 30 layers, 20 heads,
5 KV heads (head_dim 128), vocab 128256, RoPE theta 500000. 2B4T itself computes ReLU² in the FFN
(architecture `bitnet-b1.58` / `bitnet-25` in later forks); the matmul shapes, which dominate the
time, are the same.

Every projection is random ternary: codes uniform over {-1, 0, +1} times one f16 scale s per
tensor (so the F16 values are exactly {-s, 0, +s}; bitnet.cpp's quantize_i2_s takes max|w| = s as
the tensor scale and the sign of every nonzero as the code). Scales as in
tools/fixtures/gen_2b4t_shaped.py (q/k 0.1-0.2, gate/up 0.08-0.16, v/o/down 1-3) to keep the
activations finite. Embeddings f16 N(0, 0.02), norms f32 1 + 0.05 N(0, 1). Tokenizer: the
Llama 3 byte-level BPE (tokenizer.ggml.model gpt2, pre llama-bpe) from a tokenizer.json, padded
to 128256 entries (2B4T's vocabulary is Llama 3's: 128000 + 256 added tokens).

Tensors are generated and written one at a time (add_tensor_info, then write_tensor_data), so
peak memory stays ~0.3 GB. The file is ~4.8 GB; quantize it with quantize.sh and delete it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 128256
DEFAULT_TOKENIZER = "/work/shared/data/llama3-tokenizer/tokenizer.json"


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options every random-model script here shares: tokenizer, seed and dimensions."""
    ap.add_argument("--tokenizer", type=Path, default=Path(DEFAULT_TOKENIZER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=6912)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=5)


def import_gguf(gguf_py: Path):
    """The gguf-py package at `gguf_py` (a llama.cpp checkout's), imported by path."""
    sys.path.insert(0, str(gguf_py))
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        # gguf-py's vocab.py imports it at top level; it is only used for SPM vocabularies,
        # which these scripts do not read.
        import types as _types
        stub = _types.ModuleType("sentencepiece")
        stub.SentencePieceProcessor = None
        sys.modules["sentencepiece"] = stub
    import gguf  # noqa: E402
    return gguf


def add_header(w, gguf, args, name: str, file_type: int) -> None:
    """The hyperparameters of `args`' dimensions and the Llama 3 tokenizer of `args.tokenizer`."""
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

    w.add_name(name)
    w.add_context_length(4096)
    w.add_embedding_length(args.hidden)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(args.inter)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(args.hidden // args.heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)
    w.add_add_bos_token(True)


def tensor_plan(args) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape [rows=out, cols=in], kind) of every tensor, in file and draw order."""
    hidden, inter = args.hidden, args.inter
    kv = args.kv_heads * (hidden // args.heads)
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (VOCAB, hidden), "embd")]
    for i in range(args.layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (hidden,), "norm"),
            (b + "attn_q.weight", (hidden, hidden), "qk"),
            (b + "attn_k.weight", (kv, hidden), "qk"),
            (b + "attn_v.weight", (kv, hidden), "big"),
            (b + "attn_sub_norm.weight", (hidden,), "norm"),
            (b + "attn_output.weight", (hidden, hidden), "big"),
            (b + "ffn_norm.weight", (hidden,), "norm"),
            (b + "ffn_gate.weight", (inter, hidden), "gu"),
            (b + "ffn_up.weight", (inter, hidden), "gu"),
            (b + "ffn_sub_norm.weight", (inter,), "norm"),
            (b + "ffn_down.weight", (hidden, inter), "big"),
        ]
    plan.append(("output_norm.weight", (hidden,), "norm"))
    return plan


SCALE_RANGE = {"qk": (0.1, 0.2), "gu": (0.08, 0.16), "big": (1.0, 3.0)}


def draw(rng, shape: tuple[int, ...], kind: str):
    """One tensor's random values, drawn in a fixed order (the same file from the same seed):
    a norm's f32 values, the embedding's f16 values, or a projection's (int8 codes in {-1, 0, 1},
    f16 scale)."""
    if kind == "norm":
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "embd":
        t = np.empty(shape, np.float16)
        for r in range(0, shape[0], 8192):
            t[r:r + 8192] = (0.02 * rng.standard_normal((min(8192, shape[0] - r), shape[1]),
                                                        dtype=np.float32)).astype(np.float16)
        return t
    lo, hi = SCALE_RANGE[kind]
    s = np.float16(rng.uniform(lo, hi))
    return rng.integers(-1, 2, size=shape, dtype=np.int8), s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp checkout whose gguf-py is used (bitnet.cpp's 3rdparty/llama.cpp)")
    add_model_args(ap)
    args = ap.parse_args()
    gguf = import_gguf(args.llama_cpp / "gguf-py")  # the fork's gguf-py

    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    w = gguf.GGUFWriter(args.out, "bitnet")
    add_header(w, gguf, args, f"random-bitnet-{args.hidden}x{args.layers}", gguf.LlamaFileType.MOSTLY_F16)
    plan = tensor_plan(args)
    for name, shape, kind in plan:
        dt = np.float32 if kind == "norm" else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    for name, shape, kind in plan:
        t = draw(rng, shape, kind)
        if isinstance(t, tuple):  # a projection: exactly {-s, 0, +s}
            codes, s = t
            t = codes.astype(np.float16) * s
        w.write_tensor_data(t)
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB, {len(plan)} tensors) "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
