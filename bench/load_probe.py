"""A fresh process that opens a saved index and answers queries, as a serving worker would.

``python -m bench.load_probe SYSTEM PATH QUERIES.npy [--ef N] [--params P] [--serve]``

- ``clusterlens``: PATH is a local store; the published version is loaded as the app loads it
  (:func:`shared.index.load_current`, memory-mapped) and searched with raw embeddings.
- ``hnswlib``: PATH is a saved ``hnswlib.Index`` (inner product), searched at ``--ef``. With ``--raw DIR``
  (a clusterlens version folder) its best ``K * --raw-rerank`` are re-ranked by raw cosine from that
  folder's ``raw.npy`` (read per query, as clusterlens reads it beyond its budget); QUERIES then holds
  each query's index-space vector and raw vector side by side.
- ``faiss``: PATH is a FAISS index file (autofaiss's), opened memory-mapped where FAISS allows it,
  with ``--params`` (FAISS ``ParameterSpace`` string, e.g. ``nprobe=16,efSearch=32``).

Without ``--serve`` it answers the first query and prints its rows as JSON: :mod:`bench.search` times
this from process start (first answer: imports, open, one query), so it imports nothing else. With
``--serve`` it answers every query one at a time and prints the rows of the first query with the
process's memory (RSS, PSS, USS from psutil) before opening the index (its libraries already imported,
so the difference is the index's) and after the last answer. With ``--time`` it answers every query
once untimed (the pages they touch get mapped), then again one at a time, timed, and prints the p50 /
p99 ms (:mod:`bench.search_repeat`); ``--transform STORE`` gives hnswlib raw queries, put into its space
by that clusterlens store's index (PCA and the raw space's normalisation), inside the timing, as
:mod:`bench.search` times it.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

K = 10
LIBRARIES = {
    "clusterlens": ["faiss", "shared.index", "shared.storage"],
    "hnswlib": ["hnswlib", "shared.refine", "shared.rows"],
    "faiss": ["faiss"],
}


def open_index(
    system: str,
    path: Path,
    dim: int,
    ef: int,
    params: str,
    raw: Path | None = None,
    raw_rerank: int = 5,
    transform: Path | None = None,
) -> Any:
    """A function (nq, d) float32 -> int64 (nq, K) rows, over the index saved at ``path``."""
    if system == "clusterlens":
        from shared.index import load_current
        from shared.storage import LocalStorage

        index = load_current(LocalStorage(path), path / "cache")
        return lambda q: index.search(q, K).rows
    if system == "hnswlib":
        import hnswlib

        if raw is not None:
            from shared.refine import RAW_CODEC_FILE, RAW_CODES_FILE, RefineCodec
            from shared.rows import FileRows

            codes, codec = FileRows(raw / RAW_CODES_FILE), RefineCodec.from_array(np.load(raw / RAW_CODEC_FILE))
            if transform is None:  # each query holds its index-space vector, then its raw one
                dim -= codes.shape[1]
        prepare = None
        if transform is not None:  # raw queries, transformed here (inside each timed search)
            from shared.index import load_current
            from shared.storage import LocalStorage

            prepare = load_current(LocalStorage(transform), transform / "cache").prepare
            dim = int(prepare(np.ones((1, dim), np.float32))[0].shape[1])
        h = hnswlib.Index(space="ip", dim=dim)
        h.load_index(str(path))
        h.set_ef(ef)
        if raw is None:
            return lambda q: h.knn_query(q, k=K, num_threads=1)[0].astype(np.int64)

        def reranked(q: np.ndarray) -> np.ndarray:
            from shared.refine import rerank_scores

            xt, xr = prepare(q) if prepare is not None else (q[:, :dim], q[:, dim:])
            assert xr is not None  # the store re-ranks in the raw space
            rows = h.knn_query(xt, k=K * raw_rerank, num_threads=1)[0].astype(np.int64)
            scores = rerank_scores(codec, codes, rows, xr, unit=True)
            return np.take_along_axis(rows, np.argsort(-scores, axis=1)[:, :K], 1)

        return reranked
    if system == "faiss":
        import faiss

        try:
            f = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # not every index type can be mapped
            f = faiss.read_index(str(path))
        if params:
            space: Any = faiss.ParameterSpace()  # its stubs type the parameter string as int
        space.set_index_parameters(f, params)
        return lambda q: f.search(q, K)[1]
    raise ValueError(f"unknown system {system!r}")


def memory() -> dict[str, int]:
    """This process's RSS, PSS and USS in bytes."""
    import psutil

    info = psutil.Process().memory_full_info()
    return {"rss": int(info.rss), "pss": int(info.pss), "uss": int(info.uss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=["clusterlens", "hnswlib", "faiss"])
    parser.add_argument("path", type=Path)
    parser.add_argument("queries", type=Path)
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument("--params", default="")
    parser.add_argument("--raw", type=Path, default=None, help="hnswlib: re-rank by raw cosine from this folder")
    parser.add_argument("--raw-rerank", type=int, default=5)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--time", action="store_true", help="time every query, once warm")
    parser.add_argument("--transform", type=Path, default=None, help="hnswlib: raw queries, this store's transform")
    args = parser.parse_args(argv)
    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    before = None
    if args.serve:
        for name in LIBRARIES[args.system]:
            importlib.import_module(name)
        before = memory()
    search = open_index(
        args.system, args.path, queries.shape[1], args.ef, args.params, args.raw, args.raw_rerank, args.transform
    )
    first = search(queries[:1])[0].tolist()
    if args.time:
        import time

        for q in queries:  # untimed: the pages the queries touch get mapped
            search(q[None])
        ms = []
        for q in queries:
            t0 = time.perf_counter()
            search(q[None])
            ms.append((time.perf_counter() - t0) * 1000)
        p50, p99 = (float(np.percentile(ms, p)) for p in (50, 99))
        print(json.dumps({"rows": first, "queries": len(queries), "p50_ms": round(p50, 4), "p99_ms": round(p99, 4)}))
        return 0
    if not args.serve:
        print(json.dumps(first))
        return 0
    for q in queries:
        search(q[None])
    print(json.dumps({"rows": first, "queries": len(queries), "before": before, "after": memory()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
