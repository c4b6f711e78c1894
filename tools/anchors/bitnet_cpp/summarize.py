#!/usr/bin/env python3
"""Summarizes run_bench.sh logs: per (engine/config, threads, test) the range of the per-run means,
and the ratios ours / bitnet.cpp (min/min .. max/max of the run means).

    python3 summarize.py OUTDIR [OUTDIR ...]

Reads the llama-bench-style markdown rows of every NN-<name>.log (bitnet.cpp's llama-bench and
`bitnet bench` both print `| ... | threads | test | t/s ± sd | ...`), plus the load before each run.
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

ROW = re.compile(r"\|\s*(\d+)\s*\|\s*((?:pp|tg)\d+)\s*\|\s*([\d.]+)\s*±\s*([\d.]+)\s*\|")


def main() -> int:
    runs: dict[tuple[str, int, str], list[tuple[float, float, str]]] = defaultdict(list)
    for d in sys.argv[1:]:
        for log in sorted(Path(d).glob("*.log")):
            name = re.sub(r"^\d+-", "", log.stem)
            name = re.sub(r"-t\d+$", "", name)
            text = log.read_text(errors="replace")
            m = re.search(r"load before: ([\d.]+)", text)
            load = m.group(1) if m else "?"
            for t, test, mean, sd in ROW.findall(text):
                runs[(name, int(t), test)].append((float(mean), float(sd), load))
    print("| config | threads | test | t/s (each run: mean ± sd over reps) | range of means | load before |")
    print("|---|---:|---|---|---|---|")
    for (name, t, test), v in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        means = [m for m, _, _ in v]
        each = ", ".join(f"{m:.2f} ± {s:.2f}" for m, s, _ in v)
        print(f"| {name} | {t} | {test} | {each} | {min(means):.2f}–{max(means):.2f} | "
              f"{', '.join(l for _, _, l in v)} |")
    print()
    print("| ours config | threads | test | ours / bitnet.cpp |")
    print("|---|---:|---|---|")
    for (name, t, test), v in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if name.startswith("bitnetcpp"):
            continue
        ref = runs.get(("bitnetcpp", t, test))
        if not ref:
            continue
        lo = min(m for m, _, _ in v) / max(m for m, _, _ in ref)
        hi = max(m for m, _, _ in v) / min(m for m, _, _ in ref)
        print(f"| {name} | {t} | {test} | {lo:.2f}–{hi:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
