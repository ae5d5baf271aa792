"""Warm single-query latency of the last ``make bench-search`` run's 1M systems again, in fresh processes.

``python -m bench.search_repeat [--collection grown-1M] [--runs 3]``; a ``make bench-search`` run must have
left its indexes under ``bench/cache/search`` (it does). The p50 bar against hnswlib is met or missed by a
few percent on this noisy 2-core machine, so its two sides are measured again here: each run starts one
new process per system (:mod:`bench.load_probe` ``--time``: open the saved index as the app does, answer
the 1,000 fresh queries once untimed, then again one at a time, timed), the systems' order turning from
run to run, every file of the systems read into the page cache first. The systems and settings are the
ones the run chose: clusterlens ``ivf_flat`` and ``ivf_pq`` at the nprobe and shortlists their recall gate
set, and hnswlib with the same raw re-rank at the ef and width that reached the recall of ``auto``, its
queries put into its space by the same transform (PCA and normalisation) inside each timed search, as in
the run. The medians and spreads (max - min) go into ``search.json`` (``repeats`` of the collection), and
the p50 bar uses the ratio of the medians from then on (:func:`bench.search.bars`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.search import ROOT, WORK, bars, files_under, prefetch

OUT = ROOT / "bench" / "results" / "search.json"


def probe(args: list[str]) -> dict[str, Any]:
    """One fresh timing process's result."""
    done = subprocess.run([sys.executable, "-m", "bench.load_probe", *args, "--time"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"load_probe {args[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def systems(name: str, c: dict[str, Any]) -> dict[str, tuple[list[str], list[Path]]]:
    """The run's systems: (load_probe arguments, files read first) by system name."""
    out: dict[str, tuple[list[str], list[Path]]] = {}
    flat_store = WORK / f"{name}-ivf_flat"
    for r in c["systems"]:
        if r["system"].startswith("clusterlens"):
            store = WORK / f"{name}-{r['kind']}"
            out[r["system"]] = (["clusterlens", str(store), str(store / "queries.npy")], files_under(store))
        elif r["system"] == "hnswlib + raw re-rank":
            folder = WORK / f"{name}-hnswlib"
            width = int(re.search(r"best (\d+)", r["params"]).group(1))  # type: ignore[union-attr]
            version = next(p for p in (flat_store / "index").iterdir() if p.is_dir())
            args = ["hnswlib", str(folder / "index.bin"), str(flat_store / "queries.npy"), "--ef", str(r["ef"])]
            args += ["--raw", str(version), "--raw-rerank", str(width // 10), "--transform", str(flat_store)]
            out[r["system"]] = (args, [folder / "index.bin", version / "raw.npy"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", default="grown-1M")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result = json.loads(OUT.read_text())
    c = result["collections"][args.collection]
    todo = systems(args.collection, c)
    names = list(todo)
    p50: dict[str, list[float]] = {n: [] for n in names}
    for run in range(args.runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for n in order:
            probe_args, files = todo[n]
            prefetch(files)
            got = probe(probe_args)
            p50[n].append(got["p50_ms"])
            print(f"run {run + 1}: {n}: p50 {got['p50_ms']:.3f} ms", flush=True)
    summary = {
        n: {"p50_ms": v, "median": sorted(v)[len(v) // 2], "spread": round(max(v) - min(v), 4)} for n, v in p50.items()
    }
    c["repeats"] = {
        "runs": args.runs,
        "method": "one fresh process per system and run (bench.load_probe --time), 1,000 fresh queries, warm",
        "systems": summary,
    }
    result["bars"] = bars(result["collections"])
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
