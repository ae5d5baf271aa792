"""HTTP benchmark: the real uvicorn server on 127.0.0.1 answering image queries against the 70k index.

Run by ``make bench-http``; writes ``bench/results/http.json``. The server is ``clusterlens serve``
in its own process over the benchmark collection (:mod:`bench.collection`, indexed by the product's
``reindex`` with default settings). The queries are 1,000 Fashion-MNIST test images flipped left to
right (new bytes: never ingested, so nothing is found by its hash), posted as raw PNG bodies
(``POST /api/search?k=10``), first one at a time (concurrency 1), then by 8 client threads at once,
each with its own keep-alive connection.

Reported per concurrency: client-side latency p50 / p99 / mean, throughput, errors (any non-200 or
a failed connection: must be 0), and the server's own split of each request (``timing_ms``:
decode, embed, search, total) as p50 / p99. The client runs on the same machine as the server, so
at concurrency 8 both share its cores. precision@10 (results sharing the query's class) is reported
as a sanity check that the answers are real.

This is a benchmark, not a test: a few minutes once the collection is built.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.collection import DATA_DIR, ensure_collection
from bench.embed import device
from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, png_bytes
from job.reindex import reindex

ROOT = Path(__file__).resolve().parent.parent
K = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``clusterlens serve`` on 127.0.0.1:port over ``data_dir``; returns once it answers /api/health."""
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


def run_queries(port: int, bodies: list[bytes], labels: list[str], concurrency: int) -> dict[str, Any]:
    """Post every body once with ``concurrency`` client threads; latency, errors and server timings."""
    local = threading.local()
    results: list[tuple[float, int, dict[str, Any] | None, str]] = [(0.0, 0, None, "")] * len(bodies)

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
            body = json.loads(payload) if resp.status == 200 else None
            results[i] = (ms, resp.status, body, labels[i])
        except (OSError, http.client.HTTPException) as exc:
            local.conn = None
            results[i] = ((time.perf_counter() - t0) * 1000, 0, None, f"{type(exc).__name__}")

    for i in range(min(20, len(bodies))):  # warm-up: model and index loaded, connections open
        one(i)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(bodies))))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    ok = [r for r in results if r[1] == 200 and r[2] is not None]
    server = {
        part: [float(r[2]["timing_ms"][part]) for r in ok if r[2] is not None]
        for part in ("decode", "embed", "search", "total")
    }
    precision = [
        np.mean([res["label"] == r[3] for res in r[2]["results"]]) for r in ok if r[2] is not None and r[2]["results"]
    ]
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": len(bodies) - len(ok),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mean_ms": round(float(lat.mean()), 2),
        "requests_per_s": round(len(bodies) / wall, 1),
        "server_ms": {
            part: {
                "p50": round(float(np.percentile(v, 50)), 3),
                "p99": round(float(np.percentile(v, 99)), 3),
            }
            for part, v in server.items()
            if v
        },
        "precision_at_10": round(float(np.mean(precision)), 4) if precision else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http.json")
    args = parser.parse_args(argv)

    settings, storage, encoder = ensure_collection()
    built = reindex(storage, settings, encoder.version)  # the product's own index over the collection
    print(f"index {built.version}: {built.count} images, {built.kind}, nprobe {built.nprobe} ({built.mode})")
    x_test, y_test = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    picks = np.random.default_rng(3).choice(len(x_test), args.queries, replace=False)
    bodies = [png_bytes(np.ascontiguousarray(x_test[i][:, ::-1])) for i in picks]
    labels = [FASHION_MNIST_CLASSES[int(y_test[i])] for i in picks]

    port = _free_port()
    proc = start_server(DATA_DIR, port)
    try:
        runs = []
        for c in args.concurrency:
            run = run_queries(port, bodies, labels, c)
            print(json.dumps(run))
            runs.append(run)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "index": {"images": built.count, "kind": built.kind, "nlist": built.nlist, "nprobe": built.nprobe},
        "encoder": encoder.version,
        "queries": args.queries,
        "k": K,
        "runs": runs,
        "errors_total": sum(r["errors"] for r in runs),
        "device": device(),
        "note": "client and server share the machine's cores; server_ms is the server's own timing_ms",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors_total"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
