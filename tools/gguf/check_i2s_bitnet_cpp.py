#!/usr/bin/env python3
"""Checks the I2_S bytes of tests/fixtures/gguf-tiny/model-i2_s.gguf against bitnet.cpp's own
quantizers, run from a checkout of microsoft/BitNet:

    git clone https://github.com/microsoft/BitNet && git -C BitNet checkout 16da220
    python3 -m venv /tmp/venv-i2s && /tmp/venv-i2s/bin/pip install numpy
    /tmp/venv-i2s/bin/python tools/gguf/check_i2s_bitnet_cpp.py --bitnet-src BitNet

(only the checkout's files are read: utils/convert-hf-to-gguf-bitnet.py, src/ggml-bitnet-mad.cpp,
include/gemm-config.h; its llama.cpp submodule is not needed.) Nothing of microsoft/BitNet is
copied into this repository: the script imports their code from the given checkout.

Our fixture was packed by `pack_i2_s_x86` in tools/gguf/make_fixtures.py. For every I2_S tensor in
the fixture's GGUF, the same weights are taken from the fixture's safetensors folder (packed uint8
codes in the Hugging Face BitNet layout + a bf16 `weight_scale`; config says autobitlinear, so
weight = code * weight_scale) and quantized by:

  1. `quantize_to_i2_s` of utils/convert-hf-to-gguf-bitnet.py (pure numpy), two ways:
     a. offline path, exactly as `BitnetModel.write_tensors` calls it for an offline-quantized
        HF checkpoint: the unpacked codes {-1,0,1} as float, override_scale = weight_scale;
     b. value path: w = weight_scale * code (float32), scale taken from the data.
     The converter module imports torch, gguf (the fork's gguf-py, with I2_S and
     MODEL_ARCH.BITNET_B158, which PyPI's gguf lacks) and `convert` (utils/convert.py, which
     needs sentencepiece) at top level. None of them is used by `quantize_to_i2_s`, so stub
     modules are put in sys.modules for the import: every attribute of a stub is another stub
     (class bodies such as `model_arch = gguf.MODEL_ARCH.BITNET_B158` only store it). The script
     then asserts that the only global `quantize_to_i2_s` references is `np`, the real numpy,
     so the stubs cannot affect its output.
  2. `quantize_i2_s` of src/ggml-bitnet-mad.cpp (the C++ quantizer that bitnet.cpp's llama.cpp
     fork calls for GGML_TYPE_I2_S), when a C++ compiler is available: the function's text is cut
     out of the checkout at run time, compiled with a small shim (ggml_row_size, GGML_TYPE_I2_S,
     QK_I2_S as the file's top defines it) into a temporary shared library, and called through
     ctypes on w = weight_scale * code. Default variant: x86 (-mssse3, QK_I2_S 128) with the
     checkout's include/gemm-config.h, which as shipped defines ACT_PARALLEL. Two more variants
     are run for information, not for the verdict: x86 without ACT_PARALLEL (the config
     utils/tune_gemm_config.py can write) and the __ARM_NEON branch (QK_I2_S 64), compared with
     our documented ARM layout (src/gguf/types.rs).

Compared per tensor: the n/4 packed code bytes byte for byte, and the f32 scale in the first 4
bytes of the 32-byte tail (and, for the Python quantizer, the whole tail). The GGUF is parsed by
hand (PyPI's gguf.GGUFReader rejects type id 36). Exits 1 on any difference in a verdict row.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import inspect
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "fixtures"))
from numpy_forward import read_safetensors, unpack_ternary  # noqa: E402

I2S_TYPE = 36
# HF projection -> GGUF name (llama.cpp / bitnet.cpp tensor naming; BitnetModel does not permute q/k,
# and neither did make_fixtures.py for the I2_S file)
PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# ---- bitnet.cpp's Python quantizer, imported with stubs -----------------------------------------

class _Stub:
    """Stands in for anything the converter's top level touches in torch / gguf / convert."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "_Stub":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self._name}.{attr}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"stub {self._name} called: this code path needs the real module")

    def __repr__(self) -> str:
        return f"<stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Stub:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")


def load_python_quantizer(bitnet_src: Path):
    path = bitnet_src / "utils" / "convert-hf-to-gguf-bitnet.py"
    stubbed = ("torch", "gguf", "convert")
    saved = {m: sys.modules.get(m) for m in stubbed}
    saved_env = os.environ.get("NO_LOCAL_GGUF")
    saved_path = list(sys.path)
    try:
        for m in stubbed:
            sys.modules[m] = _StubModule(m)
        os.environ["NO_LOCAL_GGUF"] = "1"  # keep it from putting utils/gguf-py on sys.path
        spec = importlib.util.spec_from_file_location("bitnet_convert_hf_to_gguf", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v
        if saved_env is None:
            os.environ.pop("NO_LOCAL_GGUF", None)
        else:
            os.environ["NO_LOCAL_GGUF"] = saved_env
        sys.path[:] = saved_path
    fn = mod.quantize_to_i2_s
    globs = inspect.getclosurevars(fn).globals
    assert set(globs) == {"np"} and globs["np"] is np, f"quantize_to_i2_s uses more than numpy: {globs}"
    return fn


# ---- bitnet.cpp's C++ quantizer, compiled from the checkout -------------------------------------

C_SHIM = """\
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <assert.h>
#include <cmath>
enum {{ GGML_TYPE_I2_S = 36 }};
static inline size_t ggml_row_size(int type, int64_t n) {{ (void)type; return (size_t)n; }}
{config}
#define QK_I2_S {qk}
extern "C" {function}
"""

# name -> (config lines, QK_I2_S, compiler flags, reference layout for the information rows, or
# None: the variant is in the verdict and compared with the fixture's bytes)
C_VARIANTS = {
    "x86, gemm-config.h as shipped": ('#include "gemm-config.h"', 128, ["-mssse3"], None),
    "x86, ACT_PARALLEL off": ("", 128, ["-mssse3"], "rows4"),
    "ARM (__ARM_NEON branch)": ("#define __ARM_NEON 1", 64, ["-mno-ssse3", "-mno-avx"], "arm"),
}


def extract_c_function(text: str, signature: str) -> str:
    start = text.index(signature)
    depth = 0
    for k in range(text.index("{", start), len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[start : k + 1]
    raise ValueError(f"unbalanced braces after {signature!r}")


def build_c_quantizers(bitnet_src: Path, workdir: Path, cxx: str):
    text = (bitnet_src / "src" / "ggml-bitnet-mad.cpp").read_text()
    func = extract_c_function(text, "size_t quantize_i2_s(const float * src")
    out = {}
    for i, (name, (config, qk, flags, ref)) in enumerate(C_VARIANTS.items()):
        src = workdir / f"q{i}.cpp"
        lib = workdir / f"libq{i}.so"
        src.write_text(C_SHIM.format(config=config, qk=qk, function=func))
        cmd = [cxx, "-O1", "-shared", "-fPIC", "-w", *flags, "-I", str(bitnet_src / "include"),
               "-o", str(lib), str(src)]
        subprocess.run(cmd, check=True)
        f = ctypes.CDLL(str(lib)).quantize_i2_s
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

        def run(w: np.ndarray, f=f) -> np.ndarray:
            w = np.ascontiguousarray(w, dtype=np.float32)
            nrow, n_per_row = w.shape
            dst = np.zeros(w.size // 4 + 32, dtype=np.uint8)
            f(w.ctypes.data, dst.ctypes.data, nrow, n_per_row, None)
            return dst

        out[name] = (run, ref)
    return out


# ---- the fixture --------------------------------------------------------------------------------

def read_gguf_tensors(path: Path) -> dict[str, tuple[list[int], int, bytes]]:
    """name -> (dims, type id, bytes from the tensor's offset to the end of the data section)."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("Q")
        s = raw[pos : pos + n].decode()
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"GGUF value type {t}")

    assert raw[:4] == b"GGUF", "not a GGUF file"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    assert version == 3, version
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = kv.get("general.alignment", 32)
    data = pos + (-pos % align)
    return {name: (dims, ty, raw[data + off :]) for name, dims, ty, off in infos}


def pack_documented(codes: np.ndarray, scale: float, qk: int) -> np.ndarray:
    """Our documented I2_S layout (src/gguf/types.rs) with block size qk (128 x86, 64 ARM)."""
    q = (codes.reshape(-1).astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, qk // 4)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(struct.pack("<f", scale), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def pack_rows4(codes: np.ndarray, scale: float) -> np.ndarray:
    """A layout we do not read: rows in groups of 4, byte (g, c) holds column c of rows 4g (bits
    7:6), 4g+1, 4g+2, 4g+3 (1:0); then the scale tail as above."""
    q = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, codes.shape[1])
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(struct.pack("<f", scale), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


REFERENCES = {  # reference layouts of the information rows: (description, packer)
    "arm": ("our documented ARM layout (blocks of 64 in 16 bytes)", lambda c, s: pack_documented(c, s, 64)),
    "rows4": ("4 rows per byte (byte [g, c] = rows 4g..4g+3 of column c)", pack_rows4),
}


def compare(got: np.ndarray, want: np.ndarray, n: int, whole_tail: bool) -> str:
    """'' if equal, else what differs."""
    got, want = np.asarray(got, dtype=np.uint8), np.asarray(want, dtype=np.uint8)
    nb = n // 4
    problems = []
    if len(got) < nb + 4:
        return f"only {len(got)} bytes, want {nb + 32}"
    diff = np.nonzero(got[:nb] != want[:nb])[0]
    if len(diff):
        k = int(diff[0])
        problems.append(f"codes differ in {len(diff)} of {nb} bytes, first at offset {k} "
                        f"(got 0x{got[k]:02x}, fixture 0x{want[k]:02x})")
    gs, ws = got[nb : nb + 4].view("<f4")[0], want[nb : nb + 4].view("<f4")[0]
    if got[nb : nb + 4].tobytes() != want[nb : nb + 4].tobytes():
        problems.append(f"scale {float(gs)!r} (0x{got[nb:nb+4].view('<u4')[0]:08x}) vs fixture {float(ws)!r} "
                        f"(0x{want[nb:nb+4].view('<u4')[0]:08x})")
    if whole_tail and (len(got) != nb + 32 or got[nb + 4 :].tobytes() != want[nb + 4 : nb + 32].tobytes()):
        problems.append(f"tail padding differs (length {len(got)}, want {nb + 32})")
    return "; ".join(problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bitnet-src", type=Path, required=True, help="checkout of microsoft/BitNet")
    ap.add_argument("--fixture", type=Path, default=ROOT / "tests" / "fixtures" / "gguf-tiny")
    ap.add_argument("--c-quantizer", choices=("auto", "yes", "no"), default="auto",
                    help="also compile and run src/ggml-bitnet-mad.cpp's quantize_i2_s (auto: if c++ is found)")
    args = ap.parse_args()

    rev = subprocess.run(["git", "-C", str(args.bitnet_src), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    print(f"microsoft/BitNet checkout: {args.bitnet_src} (commit {rev})")
    print(f"fixture: {args.fixture / 'model-i2_s.gguf'}")
    quantize_to_i2_s = load_python_quantizer(args.bitnet_src)

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if args.c_quantizer == "yes" and not cxx:
        sys.exit("no C++ compiler found (set CXX)")
    tmp = tempfile.TemporaryDirectory()
    c_quant = build_c_quantizers(args.bitnet_src, Path(tmp.name), cxx) if args.c_quantizer != "no" and cxx else {}
    if not c_quant:
        print("C quantize_i2_s: not run (no compiler or --c-quantizer no)")

    st = read_safetensors(args.fixture / "model.safetensors")
    gg = read_gguf_tensors(args.fixture / "model-i2_s.gguf")
    i2s = [name for name, (_, ty, _) in gg.items() if ty == I2S_TYPE]
    assert i2s, "no I2_S tensor in the fixture"
    hf_of = {f"blk.{b}.{g}.weight": f"model.layers.{b}.{h}"
             for b in range(64) for h, g in PROJ.items()}

    failures, info = 0, {}
    for name in i2s:
        dims, _, blob = gg[name]
        hf = hf_of[name]
        codes = unpack_ternary(st[hf + ".weight"][1])  # [out, in] int8
        scale = np.float32(st[hf + ".weight_scale"][1].reshape(-1)[0])  # bf16 widened exactly
        assert dims == [codes.shape[1], codes.shape[0]], f"{name}: GGUF dims {dims} vs HF {codes.shape}"
        n = codes.size
        want = np.frombuffer(blob[: n // 4 + 32], dtype=np.uint8)
        w = codes.astype(np.float32) * scale
        print(f"\n{name}  ({hf}, out {codes.shape[0]} x in {codes.shape[1]}, "
              f"weight_scale {float(scale)}, {n // 4} code bytes + 32-byte tail)")
        rows = [
            ("python quantize_to_i2_s, offline path (codes, override_scale=weight_scale)",
             quantize_to_i2_s(codes.astype(np.float32), override_scale=float(scale)), True, True),
            ("python quantize_to_i2_s, value path (w = weight_scale*code)",
             quantize_to_i2_s(w), True, True),
        ]
        for vname, (run, ref) in c_quant.items():
            got = run(w)
            if ref is None:
                rows.append((f"C quantize_i2_s ({vname})", got, False, True))
            else:
                d_ref = compare(got, REFERENCES[ref][1](codes, float(scale)), n, False)
                d_fix = compare(got, want, n, False)
                st_ = info.setdefault(vname, {"ref_equal": 0, "fix_equal": 0, "first": []})
                st_["ref_equal"] += not d_ref
                st_["fix_equal"] += not d_fix
                if d_fix:
                    st_["first"].append(d_fix.split(" (got")[0])
        for label, got, whole_tail, _ in rows:
            d = compare(got, want, n, whole_tail)
            failures += bool(d)
            print(f"  {label:78s} {'equal' if not d else 'DIFFERS: ' + d}")

    if info:
        print("\nfor information (not in the verdict): other builds of bitnet.cpp's C quantizer")
        for vname, st_ in info.items():
            desc = REFERENCES[C_VARIANTS[vname][3]][0]
            print(f"  {vname}: equal to {desc} in {st_['ref_equal']}/{len(i2s)} tensors; "
                  f"equal to the fixture in {st_['fix_equal']}/{len(i2s)}"
                  + (f" (e.g. {st_['first'][0]})" if st_["first"] else ""))
    n_rows = 2 + sum(1 for _, r in c_quant.values() if r is None)
    print(f"\nverdict: {'PASS' if not failures else 'FAIL'}: {len(i2s)} I2_S tensors x {n_rows} "
          f"bitnet.cpp quantizer runs, {failures} differing from the fixture's bytes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
