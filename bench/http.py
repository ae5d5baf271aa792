"""HTTP benchmark: the real uvicorn server answering held-out image queries, on a 60k and a 1M index.

Run by ``make bench-http``; writes ``bench/results/http.json``. The queries are the 10,000 Fashion-MNIST
**test** images, as their own PNG bytes, posted as raw bodies (``POST /api/search?k=10``). They are never
ingested into, embedded into or indexed by the collections served here, so no answer can be the query
itself. Two collections, each in its own local-storage data dir under ``bench/cache`` and indexed by the
product's own ``reindex`` with default settings (``auto`` picks the kind, the recall gate picks nprobe):

- **fmnist_train_60k**: the stored embeddings of the 60,000 **train** images of the benchmark collection
  (:mod:`bench.collection`; a row is a train image when its catalogue record's source is
  ``fashion-mnist/train/...``), copied into new shards as they are (never embedded again).
- **grown_1m**: those 60,000 real rows plus 940,000 **grown** rows. Growth, per class: the class's train
  embeddings are power-normalised (the index's ``power``, 0.5) and L2-normalised in the full 1280-d space,
  split by spherical k-means into :data:`COMPONENTS` components, and each component becomes a Gaussian
  with its mean and a low-rank plus diagonal covariance (its top :data:`RANK` principal directions, and
  the residual variance of each dimension). Draws (940,000 in all, split over the classes and their
  components in proportion to the train rows they hold) are clipped at 0 (the real features are
  non-negative), L2-normalised, and labelled with the class they were grown from. They are stored
  as raw embeddings whose power normalisation gives back the draw (``sign(y) * |y| ** (1 / power)``),
  so the index sees exactly the grown unit vectors. Ids are sha256 hex strings of a seeded counter;
  each grown row takes its top ImageNet classes from a random real row of its component (text search is
  not measured here). How close the grown rows are to real ones is in the JSON (``growth.check``): the
  mean cosine of held-out test embeddings to their 1st / 10th neighbour, and their exact precision@10,
  among the real train rows and among as many grown rows.

Each collection is served by ``clusterlens serve`` in its own process (the app's own code, uvicorn on
127.0.0.1). The first 2,000 queries run one at a time (concurrency 1: all 10,000 would take about 5
minutes a collection on 2 shared cores), then all 10,000 from 8 client threads at once, each with its
own keep-alive connection; precision@10 over all 10,000 is that run's. Reported per run: client-side
latency p50 / p99 / mean, throughput, errors (any non-200 or failed connection: must be 0), the server's
own split of each request (``timing_ms``: decode, embed, search, total) as p50 / p99, and precision@10:
the share of a query's 10 results whose label is the query's true class (a grown row counts by its
grown label); for the 1M collection also the share of results that are real rows. The client runs on
the same machine as the server, so at concurrency 8 both share its cores. ``server_peak_rss_mb`` is the
serving process's peak resident memory over both runs; ``bench_peak_rss_mb`` this process's (growing,
writing and indexing included).

The 1M collection's shards (~5 GB) and index are built once and reused (``--rebuild`` starts again).
This is a benchmark, not a test: about 35 minutes on 2 CPU cores the first time (growing and indexing
the 1M collection is ~15 of them), once the 70k collection is embedded.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.collection import real_embeddings
from bench.collection import settings as bench_settings
from bench.embed import device
from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, png_bytes
from job.embeddings import EmbeddingSet, EmbeddingStore, shard_table
from job.index_build import IndexParams
from job.reindex import ReindexResult, reindex
from shared.catalog import Catalog
from shared.features import normalize, power_normalize
from shared.index import read_manifest
from shared.storage import EMBEDDINGS, LocalStorage

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "cache"
K = 10
TRAIN_SOURCE = "fashion-mnist/train/"
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
GROWN_TOTAL = 1_000_000
COMPONENTS = 32  # k-means components per class
RANK = 32  # principal directions per component
SEED = 0
SHARDS_DONE = "shards.done"
CHECK_QUERIES = 1000  # test embeddings the growth check searches with
LATENCY_QUERIES = 2000  # test images posted one at a time (all of them at concurrency 8)
COLLECTIONS = {"fmnist_train_60k": "http-train60k", "grown_1m": "http-grown1m"}  # name -> data dir under CACHE


# -- the collections ------------------------------------------------------------------------------


def take(emb: EmbeddingSet, rows: np.ndarray) -> EmbeddingSet:
    """The rows ``rows`` (int indices) of an :class:`EmbeddingSet`."""
    return EmbeddingSet(
        [emb.ids[r] for r in rows],
        emb.vectors[rows],
        emb.top_class[rows],
        emb.top_prob[rows],
        emb.shards,
        [emb.labels[r] for r in rows],
        [emb.captions[r] for r in rows],
        emb.ingested[rows],
        emb.unrecorded[rows],
    )


def split_collection() -> tuple[str, EmbeddingSet, EmbeddingSet]:
    """The benchmark collection's encoder version and its stored train and test rows.

    Raises:
        RuntimeError: if the collection does not hold exactly 60,000 train and 10,000 test images.
    """
    _, storage, encoder, emb = real_embeddings()
    sources = {r.id: r.source for r in Catalog(storage).records()}
    split = np.array([sources.get(i, "") for i in emb.ids])
    train = np.flatnonzero(np.char.startswith(split.astype(str), TRAIN_SOURCE))
    test = np.flatnonzero(np.char.startswith(split.astype(str), "fashion-mnist/test/"))
    if len(train) != TRAIN_IMAGES or len(test) != TEST_IMAGES:
        raise RuntimeError(f"the collection holds {len(train)} train and {len(test)} test rows, not 60,000 / 10,000")
    return encoder.version, take(emb, train), take(emb, test)


def write_shards(storage: LocalStorage, encoder_version: str, parts: Iterator[EmbeddingSet]) -> int:
    """Store each part as one embedding shard (the columns the embed job writes); returns the rows written."""
    import pyarrow.parquet as pq

    store = EmbeddingStore(storage, encoder_version)
    rows = 0
    for part in parts:
        buf = io.BytesIO()
        pq.write_table(shard_table(encoder_version, part), buf, compression="zstd")
        storage.put(EMBEDDINGS, store.shard_name(len(part.ids)), buf.getvalue(), overwrite=False)
        rows += len(part.ids)
    return rows


def served_collection(
    data_dir: Path, encoder_version: str, parts: Callable[[], Iterator[EmbeddingSet]], rebuild: bool
) -> tuple[ReindexResult, dict[str, Any]]:
    """A data dir holding the rows ``parts()`` yields as shards, indexed by the product's ``reindex``
    (default settings).

    The shards are written once (a stamp file marks them complete); ``reindex`` rebuilds only when they
    changed. Returns the reindex result and the published version's manifest, as JSON.
    """
    if rebuild or not (data_dir / SHARDS_DONE).is_file():
        shutil.rmtree(data_dir, ignore_errors=True)
        storage = LocalStorage(data_dir)
        t0 = time.perf_counter()
        rows = write_shards(storage, encoder_version, parts())
        print(f"{data_dir.name}: {rows:,} rows written as shards in {time.perf_counter() - t0:.0f} s", flush=True)
        (data_dir / SHARDS_DONE).write_text(f"{rows}\n")
    storage = LocalStorage(data_dir)
    settings = bench_settings(data_dir)
    built = reindex(storage, settings, encoder_version)
    manifest = read_manifest(storage, built.version)
    print(
        f"{data_dir.name}: index {built.version} {built.mode}, {built.count:,} rows, {manifest.factory}, "
        f"nprobe {built.nprobe}",
        flush=True,
    )
    return built, manifest.to_json()


def index_summary(built: ReindexResult, manifest: dict[str, Any]) -> dict[str, Any]:
    recall = manifest.get("recall") or {}
    return {
        "images": built.count,
        "kind": built.kind,
        "factory": manifest["factory"],
        "nlist": built.nlist,
        "nprobe": built.nprobe,
        "gate_recall_at_10": recall.get("at_10"),
        "build_s": manifest.get("build_seconds"),
    }


# -- growing -------------------------------------------------------------------------------------


@dataclass
class Component:
    """One Gaussian of a class: weight (train rows it holds), mean, low-rank factor and residual spread."""

    rows: np.ndarray  # int (m,) the train rows it was fitted to
    mean: np.ndarray  # float32 (d,)
    factor: np.ndarray  # float32 (r, d): principal directions scaled by their standard deviations
    residual_std: np.ndarray  # float32 (d,)


def fit_class(y: np.ndarray, rows: np.ndarray, components: int, rank: int, seed: int) -> list[Component]:
    """Gaussians with low-rank + diagonal covariance over one class's unit vectors.

    Args:
        y: float32 (n, d) power- and L2-normalised train embeddings (all classes).
        rows: int (m,) this class's rows of ``y``.

    Returns:
        one :class:`Component` per k-means cluster holding at least 2 rows.
    """
    x = np.ascontiguousarray(y[rows])
    km = faiss.Kmeans(x.shape[1], components, niter=20, seed=seed, spherical=True)
    km.train(x)
    _, assign = km.index.search(x, 1)
    out = []
    for c in range(components):
        members = rows[assign[:, 0] == c]
        if len(members) < 2:
            continue
        m = y[members].astype(np.float64)
        mean = m.mean(0)
        centred = m - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        r = min(rank, len(members) - 1)
        factor = (s[:r, None] / np.sqrt(len(members) - 1)) * vt[:r]
        residual = centred - (centred @ vt[:r].T) @ vt[:r]
        out.append(
            Component(
                members,
                mean.astype(np.float32),
                factor.astype(np.float32),
                residual.std(0, ddof=1).astype(np.float32),
            )
        )
    return out


def draw(comp: Component, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (n, d) unit vectors from one component, clipped at 0."""
    z = rng.standard_normal((n, len(comp.factor)), dtype=np.float32)
    noise = rng.standard_normal((n, len(comp.mean)), dtype=np.float32)
    x = comp.mean + z @ comp.factor + noise * comp.residual_std
    return normalize(np.maximum(x, 0))


def grow(
    train: EmbeddingSet,
    total: int,
    power: float,
    *,
    components: int = COMPONENTS,
    rank: int = RANK,
    seed: int = SEED,
) -> tuple[Iterator[EmbeddingSet], dict[str, Any]]:
    """The grown rows, one :class:`EmbeddingSet` per class, and how they were grown.

    Args:
        train: the real train rows (raw embeddings, labelled).
        total: grown rows to draw in all.
        power: the index's power normalisation (the rows are stored so that it gives back each draw).
    """
    y = power_normalize(train.vectors, power)
    labels = np.array(train.labels)
    classes = [c for c in FASHION_MNIST_CLASSES if (labels == c).any()]
    t0 = time.perf_counter()
    model = {c: fit_class(y, np.flatnonzero(labels == c), components, rank, seed) for c in classes}
    fit_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    weights = np.array([len(comp.rows) for c in classes for comp in model[c]], dtype=np.float64)
    counts = rng.multinomial(total, weights / weights.sum())
    info = {
        "method": "per class: power + L2 normalised 1280-d train embeddings, spherical k-means into components, "
        "each a Gaussian with its mean and a low-rank (top principal directions) plus diagonal (residual "
        "variance per dimension) covariance; draws split over components by their train rows, clipped at 0, "
        "L2-normalised, labelled with their class; stored as raw embeddings whose power normalisation "
        "gives back the draw",
        "grown": total,
        "components_per_class": components,
        "rank": rank,
        "components": int(len(weights)),
        "fit_s": round(fit_s, 1),
        "seed": seed,
    }

    def parts() -> Iterator[EmbeddingSet]:
        at, counter = 0, 0
        for c in classes:
            chunks, donors = [], []
            for comp in model[c]:
                m = int(counts[at])
                at += 1
                chunks.append(draw(comp, m, rng))
                donors.append(rng.choice(comp.rows, m))
            grown = np.concatenate(chunks)
            del chunks
            np.power(grown, np.float32(1 / power), out=grown)  # draws are >= 0: power normalisation undoes this
            donor = np.concatenate(donors)
            n = len(grown)
            ids = [hashlib.sha256(f"grown:{seed}:{counter + i}".encode()).hexdigest() for i in range(n)]
            counter += n
            yield EmbeddingSet(
                ids,
                grown,
                train.top_class[donor],
                train.top_prob[donor],
                [],
                [c] * n,
                [None] * n,
                np.full(n, int(train.ingested.max()), np.int64),
                np.zeros(n, bool),
            )

    return parts(), info


def growth_check(
    train: EmbeddingSet, test: EmbeddingSet, grown: np.ndarray, grown_labels: list[str], power: float
) -> dict[str, Any]:
    """Held-out test embeddings against the real train rows and against as many grown rows, by exact search in
    the power + L2 space: mean cosine to the 1st / 10th neighbour, and precision@10 by label.

    Args:
        grown: float32 (m, d) grown unit vectors (as the index sees them); grown_labels: their m labels.
    """
    rows = np.random.default_rng(5).choice(len(test.ids), min(CHECK_QUERIES, len(test.ids)), replace=False)
    q = power_normalize(test.vectors[rows], power)
    q_labels = np.array(test.labels)[rows]
    out: dict[str, Any] = {"queries": len(rows), "space": f"power {power} + L2, {q.shape[1]}-d, exact search"}
    for name, base, labels in (
        (f"real_train_{len(train.ids)}", power_normalize(train.vectors, power), np.array(train.labels)),
        (f"grown_{len(grown)}", grown, np.array(grown_labels)),
    ):
        sims, idx = faiss.knn(q, base, K, metric=faiss.METRIC_INNER_PRODUCT)
        out[name] = {
            "nn1": round(float(sims[:, 0].mean()), 4),
            "nn10": round(float(sims[:, K - 1].mean()), 4),
            "exact_precision_at_10": round(float((labels[idx] == q_labels[:, None]).mean()), 4),
        }
    return out


def grown_collection(
    train: EmbeddingSet, test: EmbeddingSet, total: int, power: float, info_path: Path
) -> Callable[[], Iterator[EmbeddingSet]]:
    """A factory of the grown collection's rows for :func:`served_collection`: the real train rows, then
    ``total - len(train)`` grown ones; once all are yielded, the growth (with :func:`growth_check` on a
    sample of as many grown rows as there are real ones) is written to ``info_path``."""

    def parts() -> Iterator[EmbeddingSet]:
        yield train
        grown_parts, info = grow(train, total - len(train.ids), power)
        sample_rng = np.random.default_rng(6)
        per_class = len(train.ids) // len(FASHION_MNIST_CLASSES)
        sample: list[np.ndarray] = []
        sample_labels: list[str] = []
        for part in grown_parts:
            rows = np.sort(sample_rng.choice(len(part.ids), min(per_class, len(part.ids)), replace=False))
            sample.append(power_normalize(part.vectors[rows], power))
            sample_labels += [part.labels[r] or "" for r in rows]
            yield part
        info["check"] = growth_check(train, test, np.concatenate(sample), sample_labels, power)
        info_path.write_text(json.dumps(info, indent=2) + "\n")

    return parts


# -- querying over HTTP ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``clusterlens serve`` on 127.0.0.1:port over ``data_dir``; returns once it answers /api/health.

    Raises:
        RuntimeError: if the server exits or does not answer within 120 s.
    """
    env = {**os.environ, "CLUSTERLENS_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not come up in 120 s")


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory (``VmHWM``) in MB, or None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_queries(
    port: int, bodies: list[bytes], labels: list[str], concurrency: int, real_ids: set[str] | None = None
) -> dict[str, Any]:
    """Post every body once with ``concurrency`` client threads; latency, errors, server timings and
    precision@10 (results whose label is the query's; with ``real_ids``, also the share of results that are
    real rows)."""
    local = threading.local()
    results: list[tuple[float, int, dict[str, Any] | None]] = [(0.0, 0, None)] * len(bodies)

    def one(i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/api/search?k={K}", body=bodies[i], headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            payload = resp.read()
            ms = (time.perf_counter() - t0) * 1000
            results[i] = (ms, resp.status, json.loads(payload) if resp.status == 200 else None)
        except (OSError, http.client.HTTPException):
            local.conn = None
            results[i] = ((time.perf_counter() - t0) * 1000, 0, None)

    for i in range(min(20, len(bodies))):  # warm-up: model and index loaded, connections open
        one(i)
    load_before = os.getloadavg()[0]  # other work on the machine slows both client and server
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(bodies))))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    ok = [(r[2], labels[i]) for i, r in enumerate(results) if r[1] == 200 and r[2] is not None]
    server = {part: [float(b["timing_ms"][part]) for b, _ in ok] for part in ("decode", "embed", "search", "total")}
    hits = [b["results"] for b, _ in ok]
    precision = [np.mean([res["label"] == label for res in b["results"]]) for b, label in ok if b["results"]]
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": len(bodies) - len(ok),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mean_ms": round(float(lat.mean()), 2),
        "requests_per_s": round(len(bodies) / wall, 1),
        "server_ms": {
            part: {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3)}
            for part, v in server.items()
            if v
        },
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "results_per_query": round(float(np.mean([len(h) for h in hits])), 2) if hits else None,
        "precision_at_10": round(float(np.mean(precision)), 4) if precision else None,
    }
    if real_ids is not None:
        out["real_share_of_results"] = round(float(np.mean([r["id"] in real_ids for h in hits for r in h])), 4)
    return out


def serve_and_query(
    data_dir: Path, bodies: list[bytes], labels: list[str], sizes: dict[int, int], real_ids: set[str] | None
) -> tuple[list[dict[str, Any]], float | None]:
    """One server over ``data_dir``; for each concurrency in ``sizes``, in turn, its first that many queries.
    Returns the runs and the server's peak RSS in MB."""
    port = _free_port()
    proc = start_server(data_dir, port)
    try:
        runs = []
        for c, n in sizes.items():
            run = run_queries(port, bodies[:n], labels[:n], c, real_ids)
            print(json.dumps(run), flush=True)
            runs.append(run)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return runs, rss


# -- the benchmark -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=TEST_IMAGES, help="test images posted per run")
    parser.add_argument(
        "--latency-queries", type=int, default=LATENCY_QUERIES, help="of those, posted at concurrency 1 (the first)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=list(COLLECTIONS))
    parser.add_argument("--grown", type=int, default=GROWN_TOTAL, help="rows of the grown collection, real included")
    parser.add_argument("--rebuild", action="store_true", help="write the collections' shards again")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    encoder_version, train, test = split_collection()
    settings = bench_settings()
    power = IndexParams.from_settings(settings).power
    x_test, y_test = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    bodies = [png_bytes(x_test[i]) for i in range(args.queries)]
    labels = [FASHION_MNIST_CLASSES[int(y_test[i])] for i in range(args.queries)]
    sizes = {c: min(args.latency_queries, args.queries) if c == 1 else args.queries for c in args.concurrency}
    real_ids = set(train.ids)
    collections: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for name in args.collections:
        data_dir = CACHE / COLLECTIONS[name]
        extra: dict[str, Any] = {}
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)
        if name == "grown_1m":
            info_path = data_dir / "growth.json"
            parts = grown_collection(train, test, args.grown, power, info_path)
            built, manifest = served_collection(data_dir, encoder_version, parts, args.rebuild)
            extra = {"real_images": len(train.ids), "grown_images": built.count - len(train.ids)}
            extra["growth"] = json.loads(info_path.read_text())
        else:
            built, manifest = served_collection(data_dir, encoder_version, lambda: iter([train]), args.rebuild)
        runs, rss = serve_and_query(data_dir, bodies, labels, sizes, real_ids if extra else None)
        collections.append(
            {"name": name, "index": index_summary(built, manifest), **extra, "runs": runs, "server_peak_rss_mb": rss}
        )
        result = {
            "what": "held-out Fashion-MNIST test images (never ingested or indexed) posted as PNG bodies to the real "
            "server (`clusterlens serve`), against the 60,000 train images' embeddings and against those plus "
            "grown rows; precision@10 = share of results with the query's class",
            "encoder": encoder_version,
            "queries": args.queries,
            "queries_at_concurrency_1": sizes.get(1),
            "k": K,
            "collections": collections,
            "errors_total": sum(r["errors"] for c in collections for r in c["runs"]),
            "device": device(),
            "bench_seconds": round(time.perf_counter() - started, 1),
            "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "note": "client and server share the machine's cores; server_ms is the server's own timing_ms",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each collection: a late failure keeps it
    return 0 if result.get("errors_total") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
