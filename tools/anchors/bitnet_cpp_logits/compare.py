#!/usr/bin/env python3
"""Compares bitnet.cpp's logits (text rows from bitnet_cpp_logits.c) with ours (.npy).

    python3 compare.py THEIRS.txt OURS.npy [--json OUT.json]   (either may be .txt rows or .npy;
    the first is the one whose per-row logit range normalizes)

Per position: max |ours - theirs| / (theirs max - theirs min), mean |Δ| / range, top-1 agreement.
"""
import argparse, json, sys
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("theirs"); ap.add_argument("ours"); ap.add_argument("--json")
a = ap.parse_args()
def load(p):
    return np.load(p).astype(np.float64) if p.endswith(".npy") else np.loadtxt(p, dtype=np.float64, ndmin=2)
theirs = load(a.theirs)
ours = load(a.ours)
if theirs.shape != ours.shape:
    sys.exit(f"shapes differ: bitnet.cpp {theirs.shape}, ours {ours.shape}")
rng = theirs.max(axis=1) - theirs.min(axis=1)
d = np.abs(ours - theirs)
rel_max = d.max(axis=1) / rng
rel_mean = d.mean(axis=1) / rng
t1, o1 = theirs.argmax(axis=1), ours.argmax(axis=1)
top1 = t1 == o1
# top-5 overlap too
t5 = np.argsort(-theirs, axis=1)[:, :5]; o5 = np.argsort(-ours, axis=1)[:, :5]
ov5 = np.array([len(set(x) & set(y)) / 5 for x, y in zip(t5, o5)])
print("| pos | logit range | max abs Δ | max abs Δ / range | mean abs Δ / range | top-1 theirs | top-1 ours | top-5 overlap |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
for p in range(len(rng)):
    print(f"| {p} | {rng[p]:.4f} | {d[p].max():.2e} | {rel_max[p]:.2e} | {rel_mean[p]:.2e} | {t1[p]} | {o1[p]} {'' if top1[p] else '**≠**'} | {ov5[p]:.1f} |")
s = {"positions": int(len(rng)), "max_rel_diff": float(rel_max.max()), "mean_of_max_rel_diff": float(rel_max.mean()),
     "mean_rel_abs_diff": float(rel_mean.mean()), "top1_agreement": float(top1.mean()), "top5_overlap": float(ov5.mean()),
     "mean_logit_range": float(rng.mean())}
print(json.dumps(s, indent=1))
if a.json:
    open(a.json, "w").write(json.dumps(s, indent=1) + "\n")
