"""Mixed traffic against the real server at a fixed concurrency for a fixed time, with its memory watched.

Each of ``concurrency`` clients loops until the time is up, picking by weight: search by a stored id
(JSON), search by an uploaded image (multipart), fetch a stored image, the labelling queue, and
label an image (a write, with the key). Every answer must be a 2xx: anything else, or a transport
error, is an error. The server's resident memory is sampled once a second; growth is the median of
the last tenth of the run minus the median of the second tenth (the first is warm-up).

``python -m bench.load URL --key KEY --pid PID --seconds 60 --concurrency 32`` prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np

# (name, weight): what a browsing, searching and labelling crowd does.
MIX = (("search_id", 40), ("search_image", 15), ("image", 25), ("label_queue", 10), ("label", 10))


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None


async def _client(
    client: httpx.AsyncClient,
    deadline: float,
    ids: list[str],
    images: list[bytes],
    classes: list[str],
    key: str,
    rng: random.Random,
    out: dict[str, Any],
) -> None:
    names = [n for n, _ in MIX]
    weights = [w for _, w in MIX]
    while time.monotonic() < deadline:
        kind = rng.choices(names, weights)[0]
        image_id = rng.choice(ids)
        t0 = time.perf_counter()
        try:
            if kind == "search_id":
                resp = await client.post("/api/search", json={"id": image_id, "k": 10})
            elif kind == "search_image":
                files = {"image": ("q.png", rng.choice(images), "image/png")}
                resp = await client.post("/api/search", files=files, data={"k": "10"})
            elif kind == "image":
                resp = await client.get(f"/api/images/{image_id}")
            elif kind == "label_queue":
                resp = await client.get("/api/label-queue", params={"n": 20})
            else:
                body = {"labels": [{"id": image_id, "label": rng.choice(classes)}], "user": "load"}
                resp = await client.post("/api/labels", json=body, headers={"X-API-Key": key})
            ok = 200 <= resp.status_code < 300
            status = str(resp.status_code)
        except httpx.HTTPError as exc:
            ok, status = False, type(exc).__name__
        out["latencies"].append((time.perf_counter() - t0) * 1000)
        out["kinds"][kind] += 1
        if not ok:
            out["errors"][f"{kind}:{status}"] += 1


async def _run(
    url: str, key: str, seconds: float, concurrency: int, pid: int | None, ids: list[str], images: list[bytes]
) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "kinds": Counter(), "errors": Counter()}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        label_set = (await client.get("/api/label-set")).json()["label_set"]
        classes = label_set["classes"] if label_set else ["a"]
        memory: list[tuple[float, float]] = []

        async def watch(deadline: float) -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                rss = _rss_mb(pid)
                if rss is not None:
                    memory.append((time.monotonic() - start, rss))
                await asyncio.sleep(1.0)

        deadline = time.monotonic() + seconds
        rng = random.Random(0)
        t0 = time.perf_counter()
        await asyncio.gather(
            watch(deadline),
            *(
                _client(client, deadline, ids, images, classes, key, random.Random(rng.random()), out)
                for _ in range(concurrency)
            ),
        )
        elapsed = time.perf_counter() - t0
    lat = np.asarray(out["latencies"])
    tenth = max(1, len(memory) // 10)
    warm = [m for _, m in memory[tenth : 2 * tenth]] or [m for _, m in memory]
    last = [m for _, m in memory[-tenth:]]
    return {
        "load_requests": len(lat),
        "load_errors": sum(out["errors"].values()),
        "load_error_kinds": dict(out["errors"]),
        "load_p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "load_p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "load_rps": round(len(lat) / elapsed, 1),
        "load_seconds": round(elapsed, 1),
        "load_concurrency": concurrency,
        "load_mix": dict(out["kinds"]),
        "load_rss_mb_warm": round(statistics.median(warm), 1) if memory else None,
        "load_rss_mb_end": round(statistics.median(last), 1) if memory else None,
        "load_rss_growth_mb": round(statistics.median(last) - statistics.median(warm), 1) if memory else None,
        "load_rss_mb_max": round(max(m for _, m in memory), 1) if memory else None,
    }


def run_load(
    url: str,
    key: str,
    *,
    seconds: float = 60,
    concurrency: int = 32,
    pid: int | None = None,
    ids: list[str],
    images: list[bytes],
) -> dict[str, Any]:
    """Drive mixed traffic at ``url`` for ``seconds`` with ``concurrency`` clients; stops by itself.

    Args:
        key: the write key (for the label requests).
        pid: the server's process, to sample its memory (None: no memory figures).
        ids: stored image ids to search by, fetch and label.
        images: encoded images to search with.

    Returns:
        ``load_requests``, ``load_errors`` (non-2xx answers and transport errors), ``load_p50_ms``,
        ``load_p99_ms``, ``load_rps``, memory figures (``load_rss_growth_mb``: end minus warm median).
    """
    if not ids or not images:
        raise ValueError("the load needs stored ids and query images")
    return asyncio.run(_run(url, key, seconds, concurrency, pid, ids, images))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--pid", type=int)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    ids = [r["id"] for r in httpx.get(f"{args.url}/api/label-queue", params={"n": 200}).json()["items"]]
    images = [httpx.get(f"{args.url}/api/images/{i}").content for i in ids[:20]]
    out = run_load(
        args.url, args.key, seconds=args.seconds, concurrency=args.concurrency, pid=args.pid, ids=ids, images=images
    )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
