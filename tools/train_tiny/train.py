#!/usr/bin/env python3
"""Trains the tiny BitNet b1.58 model shipped in assets/tiny-bitnet (CPU, PyTorch).

Run from the repository root (see tools/train_tiny/README.md):

    /work/pyenv/bin/python tools/train_tiny/train.py            # data + tokenizer + training
    /work/pyenv/bin/python tools/train_tiny/export.py           # packed export + reference.json

Steps:
  1. Corpus: Jane Austen's six novels from the Debian package r-cran-janeaustenr 1.0.0-1
     (`apt-get download`, sha256 pinned; see data.py). The last ~48 KB of "Persuasion" is held out
     and written to assets/heldout.txt; it is never trained on (neither model nor tokenizer).
  2. Tokenizer: byte-level BPE (LLaMA-3 split regex + ByteLevel, 4093 learned tokens) trained with
     `tokenizers` on the training text, then <|begin_of_text|>, <|end_of_text|>, <|eot_id|> appended
     as ids 4093..4095; the post-processor puts <|begin_of_text|> in front (like LLaMA-3).
  3. Token stream: every novel is encoded as <|begin_of_text|> text <|end_of_text|>, concatenated.
  4. Training: TinyBitNet (model.py; BitLinear fake-quant with STE: absmean ternary weights, per-token
     absmax int8 activations), random windows of seq_len+1 tokens; half the rows of every batch start
     with <|begin_of_text|> followed by a random window (so prompts with bos are in-distribution).
     AdamW (betas 0.9/0.95, eps 1e-8), linear warm-up then cosine decay to 10% of the peak LR;
     weight decay 0.1 on the BitLinear weights during the first half, 0 in the second half (the
     two-stage schedule of the b1.58 recipe); gradient clipping at 1.0; fixed seed.
  5. Writes <work>/ckpt.pt (fp32 state dict + config + run info), <work>/tokenizer.json,
     <work>/train_log.jsonl.

Everything is deterministic for a given seed and library versions (up to floating-point
non-associativity across CPU kernels / thread counts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
from model import Config, TinyBitNet, BitLinear  # noqa: E402

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(train_text: str, vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_learned = vocab_size - 3
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    paras = train_text.split("\n\n")
    tok.train_from_iterator(["\n\n".join(paras[i : i + 50]) for i in range(0, len(paras), 50)], trainer=trainer)
    assert tok.get_vocab_size() == n_learned, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, EOT)])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos)],
            ),
        ]
    )
    assert tok.get_vocab_size() == vocab_size
    return tok


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(model, ids: np.ndarray, seq: int, max_windows: int | None = None) -> float:
    """Mean next-token NLL over non-overlapping windows of seq+1 tokens (no bos)."""
    model.eval()
    n = (len(ids) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    tot, cnt = 0.0, 0
    for i in range(0, n, 8):
        rows = [ids[j * seq : j * seq + seq + 1] for j in range(i, min(n, i + 8))]
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        logits = model(x[:, :-1])
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(HERE / "work"), help="scratch folder (deb, tokenizer, checkpoint)")
    ap.add_argument("--heldout-out", default=str(REPO / "assets" / "heldout.txt"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 3x slower on CPU)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1. corpus
    book_texts, heldout_text = data.build_corpus(work)
    train_text = "\n\n".join(book_texts)
    Path(args.heldout_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.heldout_out).write_text(heldout_text, encoding="utf-8")
    print(f"corpus: train {len(train_text.encode())} bytes, held-out {len(heldout_text.encode())} bytes", flush=True)

    # 2. tokenizer (trained on the training text only)
    tok = build_tokenizer(train_text, args.vocab)
    tok.save(str(work / "tokenizer.json"), pretty=True)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)

    # 3. token stream: <|begin_of_text|> novel <|end_of_text|>, concatenated
    stream = []
    for text in book_texts:
        stream += [bos] + tok.encode(text, add_special_tokens=False).ids + [eos]
    stream = np.array(stream, dtype=np.int64)
    held_ids = np.array(tok.encode(heldout_text, add_special_tokens=False).ids, dtype=np.int64)
    print(f"tokens: train {len(stream)}, held-out {len(held_ids)}", flush=True)

    # 4. model + training
    cfg = Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
    model = TinyBitNet(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_tern = sum(m.weight.numel() for m in model.bitlinears().values())
    print(f"params {n_params} (ternary {n_tern})", flush=True)
    decay = [m.weight for m in model.bitlinears().values()]
    decay_ids = {id(p) for p in decay}
    other = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    # torch.compile fuses the many elementwise ops of the fake quantization (needs a C++ compiler);
    # evaluation runs the plain eager module (same parameters).
    fwd = model if args.no_compile else torch.compile(model)
    gen = torch.Generator().manual_seed(args.seed)
    T, B = args.seq, args.batch
    log = open(work / "train_log.jsonl", "w")
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.param_groups[0]["weight_decay"] = args.weight_decay if step < args.steps // 2 else 0.0
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen).numpy()
        rows = [stream[s : s + T + 1] for s in starts]
        for r in range(B // 2):  # half the rows: bos + window
            rows[r] = np.concatenate([[bos], rows[r][:T]])
        x = torch.from_numpy(np.stack(rows))
        logits = fwd(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        rec = {"step": step + 1, "loss": round(lv, 4), "ema": round(ema, 4), "lr": lr, "gnorm": round(gn, 3),
               "elapsed_s": round(time.time() - t_train, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rec["heldout_loss"] = round(eval_loss(model, held_ids, T, max_windows=16), 4)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % 10 == 0 or "heldout_loss" in rec:
            print(json.dumps(rec), flush=True)
    train_s = time.time() - t_train

    final_train = eval_loss(model, stream[: 48 * (T + 1) * 4], T, max_windows=192)
    final_held = eval_loss(model, held_ids, T)
    info = {
        "seed": args.seed, "steps": args.steps, "batch": B, "seq_len": T, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "train_tokens": int(len(stream)), "heldout_tokens": int(len(held_ids)),
        "tokens_seen": int(args.steps * B * T), "compiled": not args.no_compile, "params": n_params, "ternary_params": n_tern,
        "final_train_loss_ema": ema, "final_train_loss_eval": final_train, "final_heldout_loss": final_held,
        "train_wall_s": train_s, "total_wall_s": time.time() - t_start, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "args": vars(args),
    }
    torch.save({"config": asdict(cfg), "state_dict": model.state_dict(), "info": info}, work / "ckpt.pt")
    (work / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2), flush=True)


if __name__ == "__main__":
    main()
