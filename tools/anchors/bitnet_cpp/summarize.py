#!/usr/bin/env python3
"""Summarizes run_bench.sh logs: per (engine/config, threads, test) the range of the per-run means,
and the ratios ours / bitnet.cpp (min/min .. max/max of the run means), plus ours / llama.cpp and
llama.cpp / bitnet.cpp when the logs include upstream llama.cpp runs (LLAMA_CPP_DIR).

    python3 summarize.py OUTDIR [OUTDIR ...]

Reads the llama-bench-style markdown rows of every NN-<name>.log (bitnet.cpp's and llama.cpp's
llama-bench and `bitnet bench` all print `| model | ... | threads | test | t/s ± sd | ...`), plus
the load before each run. The engine is the name's prefix: bitnetcpp = bitnet.cpp (microsoft/BitNet,
I2_S), bitnetcpp-tl2 = its TL2 build, llamacpp-LABEL = upstream llama.cpp (ggml-org; TQ2_0/TQ1_0), ours-... = `bitnet bench`.
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

# first cell (model as the engine prints it), then ... | threads | test | t/s ± sd |
ROW = re.compile(r"^\|\s*([^|]*?)\s*\|.*?\|\s*(\d+)\s*\|\s*((?:pp|tg)\d+)\s*\|\s*([\d.]+)\s*±\s*([\d.]+)\s*\|",
                 re.M)


def engine(name: str) -> str:
    if name.startswith("bitnetcpp-tl2"):
        return "bitnet.cpp TL2"
    if name.startswith("bitnetcpp"):
        return "bitnet.cpp"
    if name.startswith("llamacpp"):
        return "llama.cpp"
    if name.startswith("ours"):
        return "ours"
    return "?"


def main() -> int:
    runs: dict[tuple[str, int, str], list[tuple[float, float, str]]] = defaultdict(list)
    models: dict[str, set[str]] = defaultdict(set)
    for d in sys.argv[1:]:
        for log in sorted(Path(d).glob("*.log")):
            name = re.sub(r"^\d+-", "", log.stem)
            name = re.sub(r"-t\d+$", "", name)
            text = log.read_text(errors="replace")
            m = re.search(r"load before: ([\d.]+)", text)
            load = m.group(1) if m else "?"
            for model, t, test, mean, sd in ROW.findall(text):
                runs[(name, int(t), test)].append((float(mean), float(sd), load))
                models[name].add(model)
    key = lambda kv: (kv[0][1], kv[0][2], engine(kv[0][0]) != "bitnet.cpp", kv[0][0])  # noqa: E731
    print("| engine | config | model (as printed) | threads | test | t/s (each run: mean ± sd over reps) "
          "| range of means | load before |")
    print("|---|---|---|---:|---|---|---|---|")
    for (name, t, test), v in sorted(runs.items(), key=key):
        means = [m for m, _, _ in v]
        each = ", ".join(f"{m:.2f} ± {s:.2f}" for m, s, _ in v)
        print(f"| {engine(name)} | {name} | {'; '.join(sorted(models[name]))} | {t} | {test} | {each} | "
              f"{min(means):.2f}–{max(means):.2f} | {', '.join(l for _, _, l in v)} |")
    print()

    def ratio(v, ref) -> str:
        if not v or not ref:
            return "—"
        lo = min(m for m, _, _ in v) / max(m for m, _, _ in ref)
        hi = max(m for m, _, _ in v) / min(m for m, _, _ in ref)
        return f"{lo:.2f}–{hi:.2f}×"

    llama = sorted({n for n, _, _ in runs if engine(n) == "llama.cpp"})
    tl2 = sorted({n for n, _, _ in runs if engine(n) == "bitnet.cpp TL2"})
    if not llama and not tl2:
        # bitnet.cpp and ours only: the table as before
        print("| ours config | threads | test | ours / bitnet.cpp |")
        print("|---|---:|---|---|")
        for (name, t, test), v in sorted(runs.items(), key=key):
            if engine(name) == "bitnet.cpp" or not runs.get(("bitnetcpp", t, test)):
                continue
            print(f"| {name} | {t} | {test} | {ratio(v, runs[('bitnetcpp', t, test)])} |")
        return 0
    refs = ["bitnetcpp"] + tl2 + llama
    print("| config | threads | test | " + " | ".join(f"/ {r}" for r in refs) + " |")
    print("|---|---:|---|" + "---|" * len(refs))
    for (name, t, test), v in sorted(runs.items(), key=key):
        if name == "bitnetcpp":
            continue
        cells = ["—" if r == name else ratio(v, runs.get((r, t, test))) for r in refs]
        print(f"| {name} | {t} | {test} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
