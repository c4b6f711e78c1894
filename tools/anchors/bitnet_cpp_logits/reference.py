#!/usr/bin/env python3
"""A float64 numpy reference of llama.cpp's `bitnet` graph on the F16 file from ../bitnet_cpp/make_model.py
(whose projections are exactly ±s / 0, i.e. what I2_S stores), with BitNet's per-token-row int8
absmax activation quantization before every ternary projection (as bitnet.cpp's
quantize_row_i8_s and our CPU path do), to tell which engine is nearer an exact computation.

    python3 reference.py [--llama-cpp LLAMA_CPP] MODEL-f16.gguf ID,ID,... OUT.npy [--ggml-f16]

--ggml-f16 additionally rounds to f16 where ggml's CPU graph does when its operand is F16:
Q and K (KQ with an F16 K cache), V (the F16 V cache; the softmax probabilities stay f32), and
the final normed hidden state (the F16 tied-embedding head; ggml's 1-token path rounds it, its
batched path does not: add --head-f32 for a batch). Without it the only roundings are the int8
activation codes (and float64 arithmetic).
"""
import argparse, sys
from pathlib import Path
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("ids"); ap.add_argument("out")
ap.add_argument("--llama-cpp", type=Path,
                help="use this checkout's gguf-py instead of the installed `gguf` package (the fork's "
                     "October-2024 reader fails under numpy 2: memmap.newbyteorder)")
ap.add_argument("--ggml-f16", action="store_true")
ap.add_argument("--head-f32", action="store_true",
                help="with --ggml-f16: keep the final hidden state f32 for the head (ggml's batched F16 head)")
ap.add_argument("--no-act-quant", action="store_true", help="skip int8 activation quantization")
a = ap.parse_args()
if a.llama_cpp:
    sys.path.insert(0, str(a.llama_cpp / "gguf-py"))
try:
    import sentencepiece  # noqa: F401
except ImportError:  # gguf-py imports it at top level; unused here (as in make_model.py)
    import types
    _stub = types.ModuleType("sentencepiece"); _stub.SentencePieceProcessor = None
    sys.modules["sentencepiece"] = _stub
import gguf

r = gguf.GGUFReader(a.model)
def kv(name):
    f = r.fields[name]
    return f.parts[f.data[0]][0]
arch = "bitnet"
H = int(kv(f"{arch}.embedding_length")); L = int(kv(f"{arch}.block_count"))
NH = int(kv(f"{arch}.attention.head_count")); NKV = int(kv(f"{arch}.attention.head_count_kv"))
eps = float(kv(f"{arch}.attention.layer_norm_rms_epsilon")); base = float(kv(f"{arch}.rope.freq_base"))
HD = H // NH
T = {t.name: np.array(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape.tolist())])
     for t in r.tensors}
f16 = (lambda x: x.astype(np.float16).astype(np.float64)) if a.ggml_f16 else (lambda x: x)

def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

def bitlinear(x, W):
    # W is exactly s * codes; x quantized per row: round(x * 127 / max|x|) clamped to [-128, 127]
    if a.no_act_quant:
        return x @ W.T
    s = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    q = np.clip(np.rint(x * s), -128, 127)  # nearest_int: round half to even like rint
    return (q @ W.T) / s

def rope(x, pos):  # NEOX: x [n, heads, hd]
    half = HD // 2
    inv = base ** (-np.arange(half) * 2.0 / HD)
    ang = pos[:, None] * inv[None, :]
    c, s_ = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)

import os
def dump(name, t):  # REF_DUMP=1: first row's rms and first values, to line up with DUMP=1 of bitnet_cpp_logits
    if os.environ.get("REF_DUMP"):
        r0 = np.asarray(t).reshape(len(ids), -1)[int(os.environ.get("DUMP_ROW", "0"))]
        print(f"REF {name:<20} rms0 {np.sqrt((r0 * r0).mean()):.9g}  v " + " ".join(f"{v:.9g}" for v in r0[:4]), file=sys.stderr)

ids = [int(t) for t in a.ids.split(",")]
n = len(ids); pos = np.arange(n, dtype=np.float64)
E = T["token_embd.weight"]
x = E[ids].copy()
mask = np.triu(np.full((n, n), -np.inf), 1)
for il in range(L):
    b = f"blk.{il}."
    h = rms(x, T[b + "attn_norm.weight"]); dump(f"attn_norm-{il}", h)
    q = f16(rope(bitlinear(h, T[b + "attn_q.weight"]).reshape(n, NH, HD), pos))
    k = f16(rope(bitlinear(h, T[b + "attn_k.weight"]).reshape(n, NKV, HD), pos))
    v = f16(bitlinear(h, T[b + "attn_v.weight"]).reshape(n, NKV, HD))
    att = np.empty((n, NH, HD))
    for hh in range(NH):
        g = hh // (NH // NKV)
        sc = q[:, hh, :] @ k[:, g, :].T / np.sqrt(HD) + mask
        p = np.exp(sc - sc.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        att[:, hh, :] = p @ v[:, g, :]  # p stays f32 in ggml's KQV here (checked with DUMP_ROW=1)
    dump(f"Qcur-{il}", q); dump(f"Kcur-{il}", k); dump(f"Vcur-{il}", v); dump(f"kqv_out-{il}", att)
    o = rms(att.reshape(n, H), T[b + "attn_sub_norm.weight"]); dump(f"attn_sub_norm-{il}", o)
    ao = bitlinear(o, T[b + "attn_output.weight"]); dump(f"attn_o_out-{il}", ao)
    x = x + ao
    h = rms(x, T[b + "ffn_norm.weight"]); dump(f"ffn_norm-{il}", h)
    gt = bitlinear(h, T[b + "ffn_gate.weight"]); up = bitlinear(h, T[b + "ffn_up.weight"])
    dump(f"ffn_gate-{il}", gt); dump(f"ffn_up-{il}", up)
    f = rms(gt / (1 + np.exp(-gt)) * up, T[b + "ffn_sub_norm.weight"]); dump(f"ffn_sub_norm-{il}", f)
    dn = bitlinear(f, T[b + "ffn_down.weight"]); dump(f"ffn_down-{il}", dn)
    x = x + dn; dump(f"l_out-{il}", x)
hid = rms(x, T["output_norm.weight"])
hid = hid if a.head_f32 else f16(hid)
np.save(a.out, (hid @ E.T).astype(np.float64))
print(f"wrote {a.out} {n}x{E.shape[0]}", file=sys.stderr)
