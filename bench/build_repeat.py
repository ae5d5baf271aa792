"""Build time of the last ``make bench-search`` run's 1M systems again, in fresh processes.

``python -m bench.build_repeat [--collection grown-1M] [--runs 3]``; a ``make bench-search`` run must have
left its grown vectors and indexes under ``bench/cache/search`` (it does). hnswlib's build time varied from
142 to 263 s between runs on this noisy 2-core machine, so one build of each is not a ratio to trust. Each
run builds, one new process per system, the systems' order turning from run to run:

- clusterlens ``ivf_flat`` and ``ivf_pq``: :func:`job.index_build.build_index` over the memory-mapped
  1280-d vectors with the run's parameters (PCA, k-means, lists, codes, raw codes and the recall gate with
  its exact truth: everything the run's ``build_s`` counts), the vector file in the page cache first;
- hnswlib (M 16, ef_construction 100, all threads): ``add_items`` over the same vectors in the PCA space
  the run gave it (read into memory first, not timed), as :func:`bench.search.measure_hnswlib` times it.

The build times, medians and spreads (max - min) go into ``search.json`` (``build_repeats`` of the
collection), and the build bar uses the ratio of the medians from then on (:func:`bench.search.bars`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.search import CHUNK, HNSW_EF_CONSTRUCTION, HNSW_M, ROOT, WORK, bars, prefetch

OUT = ROOT / "bench" / "results" / "search.json"


def build_once(system: str, vectors: Path, space: Path) -> dict[str, Any]:
    """Build one system in this process and time it (what ``--one`` prints)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    if system == "hnswlib":
        import hnswlib

        x = np.load(space)
        n, dim = x.shape
        h = hnswlib.Index(space="ip", dim=dim)
        h.init_index(max_elements=n, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=1)
        t0 = time.perf_counter()
        for start in range(0, n, CHUNK):
            h.add_items(x[start : start + CHUNK], np.arange(start, min(n, start + CHUNK)), num_threads=threads)
        return {"build_s": round(time.perf_counter() - t0, 1), "threads": threads}
    from bench.collection import DATA_DIR, settings
    from job.index_build import IndexParams, build_index

    v = np.load(vectors, mmap_mode="r")
    n = len(v)
    ids = [f"{i:064x}" for i in range(n)]
    kind = system.removeprefix("clusterlens ").removesuffix(" (auto)")
    params = replace(IndexParams.from_settings(settings(DATA_DIR)), power=1.0, kind=kind)  # as bench.search builds it
    t0 = time.perf_counter()
    built = build_index(v, ids, [None] * n, encoder_version="bench", params=params)
    build_s = time.perf_counter() - t0
    m = built.manifest
    assert m.recall is not None
    chose = {"nprobe": built.nprobe, "rerank": built.rerank, "raw_rerank": built.raw_rerank}
    return {"build_s": round(build_s, 1), "threads": threads, "gate_recall": m.recall.at_10, "chose": chose}


def space_file(name: str, vectors: Path) -> Path:
    """The vectors in the run's PCA space (its IVF-Flat index's transform, as hnswlib got them), saved once."""
    path = WORK / f"{name}-space.npy"
    if path.is_file():
        return path
    from shared.index import load_current
    from shared.storage import LocalStorage

    store = WORK / f"{name}-ivf_flat"
    index = load_current(LocalStorage(store), store / "cache")
    v = np.load(vectors, mmap_mode="r")
    out = np.lib.format.open_memmap(path.with_suffix(".part.npy"), "w+", np.float32, (len(v), int(index.ivf.d)))
    for start in range(0, len(v), CHUNK):
        out[start : start + CHUNK] = index.transform(np.asarray(v[start : start + CHUNK]))
    out.flush()
    del out
    path.with_suffix(".part.npy").rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", default="grown-1M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("SYSTEM", "VECTORS", "SPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(build_once(args.one[0], Path(args.one[1]), Path(args.one[2]))), flush=True)
        return 0
    result = json.loads(OUT.read_text())
    c = result["collections"][args.collection]
    vectors = WORK / c["file"]
    space = space_file(args.collection, vectors)
    names = [r["system"] for r in c["systems"] if r["system"].startswith("clusterlens") or r["system"] == "hnswlib"]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for run in range(args.runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for n in order:
            prefetch([vectors] if n.startswith("clusterlens") else [space])
            cmd = [sys.executable, "-m", "bench.build_repeat", "--one", n, str(vectors), str(space)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"{n} build failed: {done.stderr[-2000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            runs[n].append(got)
            print(f"run {run + 1}: {n}: build {got['build_s']} s", flush=True)
    systems = {}
    for n, got in runs.items():
        times = [g["build_s"] for g in got]
        systems[n] = {
            "build_s": times,
            "median": sorted(times)[len(times) // 2],
            "spread": round(max(times) - min(times), 1),
            **({"chose": [g["chose"] for g in got]} if "chose" in got[0] else {}),
        }
    c["build_repeats"] = {
        "runs": args.runs,
        "method": "one fresh process per system and run (bench.build_repeat --one), the order turning; "
        "clusterlens: build_index with its recall gate; hnswlib: add_items over the PCA space",
        "systems": systems,
    }
    result["bars"] = bars(result["collections"])
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(systems, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
