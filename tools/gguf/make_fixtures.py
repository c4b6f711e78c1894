#!/usr/bin/env python3
"""Generates tests/fixtures/gguf-tiny/: one small random BitNet b1.58 model (the 2B4T
architecture: ReLU^2 FFN, attention and FFN sub-norms, GQA, tied embedding) written four ways:

  model.safetensors + config.json   the Hugging Face folder format (packed uint8, autobitlinear)
  model-tq2_0.gguf                  TQ2_0, BF16 embedding, architecture "bitnet" (llama.cpp's
                                    name: llama.cpp computes it with SiLU, see the tests)
  model-tq1_0.gguf                  TQ1_0, Q8_0 embedding, architecture "bitnet-25" (the name
                                    bitnet.cpp's converter writes)
  model-i2_s.gguf                   I2_S (x86 layout), F16 embedding, architecture "bitnet-b1.58"

plus q6_k-blocks.bin / q6_k-values.npy (random Q6_K blocks and the gguf package's
dequantization of them, for the Q6_K decoder), and the reference logits of the float64 numpy forward of tools/fixtures/numpy_forward.py (the
independent implementation of the spec that gen_fixtures.py checks against transformers;
transformers and torch cannot be installed here, so they are not run for this fixture).

Shapes are multiples of 256 because TQ1_0/TQ2_0 pack rows in 256-weight blocks (the tiny-*
fixtures have hidden 64, which no TQ file can hold). One layer keeps the files small.

TQ1_0 / TQ2_0 are quantized by the `gguf` package (PyPI, gguf.quants) and written by its
GGUFWriter. I2_S is not in that package: it is packed here, by `pack_i2_s_x86` below, following
bitnet.cpp's x86 layout as documented in src/gguf/types.rs (bitnet.cpp's own quantizer is C++ in
its llama.cpp fork, which is not built here), and written by the small GGUF writer below.

Every value is chosen to be exact in every format it is stored in, so the GGUF and safetensors
versions hold the same numbers: weight scales representable in bf16 and f16 (TQ blocks store
their scale as f16), embedding values q * 2^-9 with |q| <= 127 (exact in bf16, f16 and Q8_0 with
d = 2^-9, written block by block here rather than by the Q8_0 quantizer, which would pick
d = max|x|/127), norms bf16 (stored as F32 in the GGUF files, as converters do).

    python3 -m venv tools/gguf/.venv && tools/gguf/.venv/bin/pip install gguf numpy
    tools/gguf/.venv/bin/python tools/gguf/make_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "fixtures"))
import numpy_forward  # noqa: E402

SRC_TOK = ROOT / "tests" / "fixtures" / "tiny-autobitlinear"
OUT = ROOT / "tests" / "fixtures" / "gguf-tiny"

H, I, L, NH, NKV = 256, 256, 1, 4, 2
HD = H // NH
VOCAB = 380
MAXPOS = 128
SEED = 1606
PROMPT_LEN, N_GREEDY, PROMPT_TRIES = 20, 12, 40
BOS_ID, EOS_ID, EOT_ID = 377, 378, 379
I2S_TYPE = 36  # bitnet.cpp's GGML_TYPE_I2_S

PROJ = {  # HF name -> (GGUF name, [out, in])
    "self_attn.q_proj": ("attn_q", (NH * HD, H)),
    "self_attn.k_proj": ("attn_k", (NKV * HD, H)),
    "self_attn.v_proj": ("attn_v", (NKV * HD, H)),
    "self_attn.o_proj": ("attn_output", (H, NH * HD)),
    "mlp.gate_proj": ("ffn_gate", (I, H)),
    "mlp.up_proj": ("ffn_up", (I, H)),
    "mlp.down_proj": ("ffn_down", (H, I)),
}
NORMS = {  # HF name -> (GGUF name, length)
    "input_layernorm": ("attn_norm", H),
    "post_attention_layernorm": ("ffn_norm", H),
    "self_attn.attn_sub_norm": ("attn_sub_norm", H),
    "mlp.ffn_sub_norm": ("ffn_sub_norm", I),
}


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def bf16_bytes(x: np.ndarray) -> bytes:
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def pack_hf(w: np.ndarray) -> np.ndarray:
    """transformers' packed layout: B[p, c] bits 2i..2i+1 = W[i*P + p, c] + 1."""
    out, inn = w.shape
    p = out // 4
    codes = (w.astype(np.int16) + 1).astype(np.uint8).reshape(4, p, inn)
    b = np.zeros((p, inn), dtype=np.uint8)
    for i in range(4):
        b |= codes[i] << (2 * i)
    return b


def pack_i2_s_x86(w: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp I2_S, x86 layout: flattened codes (w + 1) in blocks of 128; byte k of block b
    holds elements 128b + k (bits 7:6), +32 (5:4), +64 (3:2), +96 (1:0); then the f32 scale,
    the tensor padded to n/4 + 32 bytes."""
    codes = (w.reshape(-1).astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(struct.pack("<f", scale), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def q8_0_exact(q: np.ndarray, d: float) -> np.ndarray:
    """Q8_0 blocks [rows, cols/32 * 34] holding exactly d*q (d an f16, q int8)."""
    rows, cols = q.shape
    blocks = q.reshape(rows, cols // 32, 32).astype(np.int8)
    dbytes = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    out = np.empty((rows, cols // 32, 34), dtype=np.uint8)
    out[:, :, :2] = dbytes
    out[:, :, 2:] = blocks.view(np.uint8)
    return out.reshape(rows, -1)


def make_weights():
    rng = np.random.default_rng(SEED)
    emb_q = np.clip(np.round(rng.standard_normal((VOCAB, H)) * 25), -127, 127).astype(np.int8)
    emb = emb_q.astype(np.float32) * np.float32(2.0**-9)
    norm = lambda n: bf16_round((1 + 0.2 * rng.standard_normal(n)).astype(np.float32))  # noqa: E731
    w = {"embed": emb, "embed_q": emb_q, "final_norm": norm(H), "layers": []}
    for _ in range(L):
        layer = {"norms": {k: norm(n) for k, (_, n) in NORMS.items()}, "proj": {}}
        for k, (name, (_, shape)) in enumerate(PROJ.items()):
            lo, hi = (0.15, 0.3) if name in ("self_attn.q_proj", "self_attn.k_proj") else (0.5, 2.0)
            # a scale exact in bf16 and in f16 (TQ blocks store f16)
            s = float(bf16_round(np.array([rng.uniform(lo, hi)], dtype=np.float32))[0])
            assert float(np.float16(s)) == s
            probs = [0.25, 0.5, 0.25] if k % 2 else [1 / 3, 1 / 3, 1 / 3]
            codes = (rng.choice(3, size=shape, p=probs) - 1).astype(np.int8)
            layer["proj"][name] = (codes, s)
        w["layers"].append(layer)
    return w


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]):
    header, blobs, off = {}, [], 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def write_folder(w, folder: Path):
    t = {"model.embed_tokens.weight": ("BF16", [VOCAB, H], bf16_bytes(w["embed"])),
         "model.norm.weight": ("BF16", [H], bf16_bytes(w["final_norm"]))}
    for n, layer in enumerate(w["layers"]):
        p = f"model.layers.{n}."
        for k, v in layer["norms"].items():
            t[p + k + ".weight"] = ("BF16", [len(v)], bf16_bytes(v))
        for k, (codes, s) in layer["proj"].items():
            packed = pack_hf(codes)
            t[p + k + ".weight"] = ("U8", list(packed.shape), packed.tobytes())
            t[p + k + ".weight_scale"] = ("BF16", [1], bf16_bytes(np.array([s], dtype=np.float32)))
    write_safetensors(folder / "model.safetensors", t)
    cfg = json.loads((SRC_TOK / "config.json").read_text())
    cfg.update(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
               num_key_value_heads=NKV, max_position_embeddings=MAXPOS, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC_TOK / f, folder / f)


def tokenizer_meta():
    """tokenizer.ggml.* as llama.cpp's converter writes them for a byte-level BPE."""
    tj = json.loads((SRC_TOK / "tokenizer.json").read_text())
    tc = json.loads((SRC_TOK / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {a["id"]: a["content"] for a in tj["added_tokens"]}
    tokens, types = [], []
    inv = {i: s for s, i in vocab.items()}
    for i in range(VOCAB):
        if i in special:
            tokens.append(special[i])
            types.append(3)  # CONTROL
        else:
            tokens.append(inv[i])
            types.append(1)  # NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    return tokens, types, merges, tc["chat_template"]


def gguf_tensors(w, ternary: str, embed: str):
    """(name, kind, data) in GGUF naming; kind says how to store."""
    out = [("token_embd.weight", embed, None), ("output_norm.weight", "f32", w["final_norm"])]
    for n, layer in enumerate(w["layers"]):
        for k, v in layer["norms"].items():
            out.append((f"blk.{n}.{NORMS[k][0]}.weight", "f32", v))
        for k, (codes, s) in layer["proj"].items():
            out.append((f"blk.{n}.{PROJ[k][0]}.weight", ternary, (codes, s)))
    return out


def set_meta(wr: gguf.GGUFWriter, arch: str):
    tokens, types, merges, template = tokenizer_meta()
    wr.add_name("gguf-tiny")
    wr.add_context_length(MAXPOS)
    wr.add_embedding_length(H)
    wr.add_feed_forward_length(I)
    wr.add_block_count(L)
    wr.add_head_count(NH)
    wr.add_head_count_kv(NKV)
    wr.add_rope_dimension_count(HD)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(VOCAB)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("llama-bpe")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_bos_token_id(BOS_ID)
    wr.add_eos_token_id(EOS_ID)
    wr.add_eot_token_id(EOT_ID)
    wr.add_add_bos_token(True)
    wr.add_chat_template(template)


def write_gguf_pkg(w, path: Path, arch: str, ttype: QT, embed: str):
    """TQ files through the gguf package: its quantizer and writer."""
    wr = gguf.GGUFWriter(str(path), arch)
    set_meta(wr, arch)
    for name, kind, data in gguf_tensors(w, "tq", embed):
        if name == "token_embd.weight":
            if kind == "bf16":
                raw = (w["embed"].view(np.uint32) >> 16).astype(np.uint16)
                wr.add_tensor(name, raw, raw_shape=[VOCAB, H], raw_dtype=QT.BF16)
            else:
                wr.add_tensor(name, q8_0_exact(w["embed_q"], 2.0**-9), raw_dtype=QT.Q8_0)
        elif kind == "f32":
            wr.add_tensor(name, np.asarray(data, dtype=np.float32))
        else:
            codes, s = data
            x = codes.astype(np.float32) * np.float32(s)
            q = quants.quantize(x, ttype)
            back = quants.dequantize(q, ttype)
            assert np.array_equal(back, x), f"{name}: {ttype.name} does not hold the weights exactly"
            wr.add_tensor(name, q, raw_dtype=ttype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---- a minimal GGUF v3 writer (for I2_S, which the gguf package does not know) --------------

def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, v) -> bytes:
    if isinstance(v, bool):
        return _s(key) + struct.pack("<IB", 7, int(v))
    if isinstance(v, int):
        return _s(key) + struct.pack("<II", 4, v)
    if isinstance(v, float):
        return _s(key) + struct.pack("<If", 6, v)
    if isinstance(v, str):
        return _s(key) + struct.pack("<I", 8) + _s(v)
    if isinstance(v, list) and all(isinstance(e, str) for e in v):
        return _s(key) + struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_s(e) for e in v)
    if isinstance(v, list):
        return _s(key) + struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", e) for e in v)
    raise TypeError(key)


def write_gguf_i2s(w, path: Path, arch: str):
    tokens, types, merges, template = tokenizer_meta()
    a = arch
    kv = {
        "general.architecture": a, "general.name": "gguf-tiny", "general.alignment": 32,
        f"{a}.context_length": MAXPOS, f"{a}.embedding_length": H, f"{a}.feed_forward_length": I,
        f"{a}.block_count": L, f"{a}.attention.head_count": NH, f"{a}.attention.head_count_kv": NKV,
        f"{a}.rope.dimension_count": HD, f"{a}.rope.freq_base": 10000.0,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5, f"{a}.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID, "tokenizer.ggml.eot_token_id": EOT_ID,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": template,
    }
    infos, blobs, off = [], [], 0
    for name, kind, data in gguf_tensors(w, "i2s", "f16"):
        if name == "token_embd.weight":
            dims, ty, blob = [H, VOCAB], 1, w["embed"].astype("<f2").tobytes()
        elif kind == "f32":
            dims, ty, blob = [len(data)], 0, np.asarray(data, dtype="<f4").tobytes()
        else:
            codes, s = data
            dims, ty, blob = [codes.shape[1], codes.shape[0]], I2S_TYPE, pack_i2_s_x86(codes, s).tobytes()
        infos.append(_s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", ty, off))
        pad = -len(blob) % 32
        blobs.append(blob + b"\0" * pad)
        off += len(blob) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(_kv(k, v) for k, v in kv.items())
    head += b"".join(infos)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + b"".join(blobs))


def choose_prompt(npm):
    best = None
    for k in range(PROMPT_TRIES):
        rng = np.random.default_rng(SEED * 10 + k)
        prompt = [BOS_ID] + [int(x) for x in rng.integers(0, 377, PROMPT_LEN - 1)]
        margins: list[float] = []
        greedy, gap = npm.greedy(prompt, N_GREEDY, margins)
        if gap >= 0.05 and (best is None or min(margins) > best[3]):
            best = (prompt, greedy, gap, min(margins), SEED * 10 + k)
    assert best is not None
    return best


def write_q6_k_vectors(folder: Path):
    """Random Q6_K blocks and the gguf package's dequantization of them: the Q6_K decoder is
    checked against a third-party implementation (the model files use no Q6_K)."""
    rng = np.random.default_rng(SEED + 1)
    n_blocks = 4
    raw = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
    for b in range(n_blocks):  # a finite f16 d per block
        raw[b, 208:210] = np.frombuffer(np.float16(rng.uniform(-0.02, 0.02)).tobytes(), dtype=np.uint8)
    want = quants.dequantize(raw.reshape(-1), QT.Q6_K).astype(np.float32)
    (folder / "q6_k-blocks.bin").write_bytes(raw.tobytes())
    np.save(folder / "q6_k-values.npy", want.reshape(1, -1))


def main():
    if "--q6k-only" in sys.argv:
        write_q6_k_vectors(OUT)
        return
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    w = make_weights()
    write_folder(w, OUT)
    write_gguf_pkg(w, OUT / "model-tq2_0.gguf", "bitnet", QT.TQ2_0, "bf16")
    write_gguf_pkg(w, OUT / "model-tq1_0.gguf", "bitnet-25", QT.TQ1_0, "q8_0")
    write_gguf_i2s(w, OUT / "model-i2_s.gguf", "bitnet-b1.58")

    write_q6_k_vectors(OUT)
    npm = numpy_forward.Model(OUT)
    prompt, greedy, gap, ulps, pseed = choose_prompt(npm)
    logits = npm.forward(prompt)
    np.save(OUT / "logits.npy", logits.astype(np.float32))
    ref = {
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "greedy_min_gap": gap,
        "min_int8_rounding_margin_row_ulps": ulps,
        "prompt_seed": pseed,
        "weight_seed": SEED,
        "reference_setup": "tools/fixtures/numpy_forward.py (float64) on the safetensors folder",
        "numpy_version": np.__version__,
        "gguf_package_version": getattr(gguf, "__version__", "see pip"),
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.name:24s} {f.stat().st_size:8d} bytes")
    print(f"greedy gap {gap:.4f}, min int8 margin {ulps:.1f} row-ulps, prompt seed {pseed}")


if __name__ == "__main__":
    main()
