"""The batch side at scale (issue 21). So far three parts: can the embed loader feed a GPU, how fast does
`clusterlens ingest` take in a folder, and how fast does `clusterlens ingest --container` register a Blob
container in place (and with how many requests per image)?

Run with ``make bench-scale`` (``python -m bench.scale``); writes ``bench/results/scale.json``.

``loader``: images per second that ``job.embeddings.embed_pending`` delivers to an encoder that does
nothing (so the loader alone is measured), reading real Fashion-MNIST images (28 px PNGs, decoded and
resized to 64 px) from a local storage folder with **20 ms added to every storage request**
(:class:`LatencyStorage`, standing in for Blob Storage's round trip), on this machine's cores. The same
code is run with 2 fetch threads, what the loader had before (it read each image with three requests one
after another in each of 2 threads: about 33 img/s at this latency), as the baseline in the same run,
then with the default settings, three times (median and spread: the target is met narrowly on 2 cores).
Every request is counted, and the most in flight at once recorded.

``ingest``: images per second ``shared.ingest.ingest_items`` (what ``clusterlens ingest`` runs) takes in
from a folder of real Fashion-MNIST PNGs, one at a time (``--workers 1``) and with the default 16 in
flight: on the local backend as it is (a 20,000-image folder: validation and hashing on this machine's
cores), and with 20 ms added to every storage request (a smaller folder), where the round trips dominate.

``ingest.container``: images per second ``shared.ingest.ingest_container`` (what ``clusterlens ingest
--container`` and the ``ingest_container`` job run) registers in place from a Blob container of real
Fashion-MNIST PNGs (class folders) on Azurite (in memory, on this machine: its own CPU time is in the
figure), one at a time and 16 in flight, into a fresh catalogue each. Every request the Azure SDK sends
is counted by price class (:class:`bench.cost.RequestCounter`), and the uploads container is checked to
be empty after (nothing copied). A few thousand images at most: in-memory Azurite slows down beyond ~2k.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.embed import device
from shared.encoder import Embeddings
from shared.imaging import preprocess
from shared.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LATENCY_S = 0.020
TARGET_IMG_S = 800.0


class LatencyStorage(LocalStorage):
    """A local storage folder whose every request takes ``latency`` seconds longer, like a remote store's
    round trip; counts requests and the most in flight at once."""

    def __init__(self, root: Path, latency: float = LATENCY_S):
        super().__init__(root)
        self.latency = latency
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_kind: Counter[str] = Counter()  # "get embeddings/vectors", "delete embeddings/pending", ...
        self.trace: list[str] | None = None  # set to a list to record every request ("get index/v000001/x.npy")
        self._lock = threading.Lock()

    def _wait(self, op: str = "", container: str = "", name: str = "") -> None:
        with self._lock:
            self.requests += 1
            folder = name.split("/", 1)[0] if "/" in name else ""
            self.by_kind[f"{op} {container}/{folder}".rstrip("/")] += 1
            if self.trace is not None:
                self.trace.append(f"{op} {container}/{name}")
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency)
        finally:
            with self._lock:
                self.in_flight -= 1

    def get(self, container: str, name: str) -> bytes:
        self._wait("get", container, name)
        return super().get(container, name)

    def put(self, container: str, name: str, data: bytes, **kwargs: Any) -> bool:
        self._wait("put", container, name)
        return super().put(container, name, data, **kwargs)

    def exists(self, container: str, name: str) -> bool:
        self._wait("exists", container, name)
        return super().exists(container, name)

    def list(self, container: str, prefix: str = "") -> Iterator[str]:
        self._wait("list", container, prefix)
        return super().list(container, prefix)

    def sizes(self, container: str, prefix: str) -> dict[str, int]:
        self._wait("list", container, prefix)
        return super().sizes(container, prefix)

    def delete(self, container: str, name: str) -> bool:
        self._wait("delete", container, name)
        return super().delete(container, name)

    def delete_many(self, container: str, names: Sequence[str]) -> int:
        """Like Blob Storage's batch delete: one request (and one latency) per 256 names."""
        for start in range(0, len(names), 256):
            self._wait("delete_many", container, names[start])
        return sum(LocalStorage.delete(self, container, name) for name in names)

    def upload_file(self, container: str, name: str, path: Path) -> None:
        self._wait("put", container, name)
        super().upload_file(container, name, path)

    def download_file(self, container: str, name: str, dest: Path) -> Path:
        self._wait("get", container, name)
        return super().download_file(container, name, dest)

    def reset(self) -> None:
        with self._lock:
            self.requests, self.max_in_flight = 0, 0
            self.by_kind.clear()


class NoOpEncoder:
    """The encoder's interface without the model: real preprocessing, zeros out."""

    def __init__(self, size: int = 64, dim: int = 1280, classes: int = 1000):
        self.size, self.dim, self.classes = size, dim, classes
        self.version = f"noop@{size}px"
        self.batches = 0

    def preprocess(self, images: list[Any]) -> np.ndarray:
        return preprocess(images, self.size)

    def encode_array(self, batch: np.ndarray) -> Embeddings:
        self.batches += 1
        n = len(batch)
        return Embeddings(np.zeros((n, self.dim), np.float32), np.zeros((n, self.classes), np.float32))


def fill(storage: LatencyStorage, count: int, offset: int = 0) -> list[str]:
    """Ingest ``count`` real Fashion-MNIST images (no latency while filling); their ids."""
    from job.datasets import load_fashion_mnist, png_bytes
    from shared.ingest import IngestItem, ingest_bytes
    from shared.settings import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    pixels, _ = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    latency, storage.latency = storage.latency, 0.0
    try:
        return [
            ingest_bytes(storage, settings, IngestItem(data=png_bytes(pixels[i]), source=f"scale:{i}")).id
            for i in range(offset, offset + count)
        ]
    finally:
        storage.latency = latency


def loader_run(root: Path, images: int, **overrides: Any) -> dict[str, Any]:
    """Embed ``images`` fresh images with the no-op encoder through ``embed_pending``; its rate and requests."""
    from job.embeddings import decode_workers, embed_pending
    from shared.settings import Settings

    storage = LatencyStorage(root)
    ids = fill(storage, images)
    settings = Settings(_env_file=None, data_dir=root, **overrides)  # type: ignore[call-arg]
    encoder = NoOpEncoder()
    storage.reset()
    start = time.perf_counter()
    stats = embed_pending(storage, settings, encoder, only=ids)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    assert stats.embedded == images, stats
    return {
        "images": images,
        "seconds": round(seconds, 2),
        "img_s": round(images / seconds, 1),
        "requests": storage.requests,
        "requests_per_image": round(storage.requests / images, 3),
        "max_in_flight": storage.max_in_flight,
        "io_workers": settings.embed_io_workers,
        "decode_workers": decode_workers(settings),
        "stage_seconds": stats.seconds,
    }


def write_folder(folder: Path, count: int) -> Path:
    """``count`` real Fashion-MNIST PNGs in ``folder/<class>/``, as a user's ImageFolder would hold them."""
    from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, png_bytes
    from shared.settings import Settings

    pixels, labels = load_fashion_mnist(Settings(_env_file=None).fashion_mnist_dir, "train")  # type: ignore[call-arg]
    for i in range(count):
        path = folder / FASHION_MNIST_CLASSES[int(labels[i])].replace("/", "-") / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(pixels[i]))
    return folder


def ingest_run(folder: Path, root: Path, workers: int, latency: float = 0.0) -> dict[str, Any]:
    """Ingest every image of ``folder`` into a fresh store under ``root``; its rate."""
    from shared.ingest import IngestSummary, folder_items, ingest_items, scan_folder
    from shared.settings import Settings

    storage = LatencyStorage(root, latency=latency)
    settings = Settings(_env_file=None, data_dir=root)  # type: ignore[call-arg]
    files = scan_folder(folder)
    summary = IngestSummary()
    start = time.perf_counter()
    for result in ingest_items(storage, settings, folder_items(files), workers=workers):
        summary.count(result)
    seconds = time.perf_counter() - start
    assert summary.added == len(files), summary
    return {
        "images": len(files),
        "workers": workers,
        "latency_ms": latency * 1000,
        "seconds": round(seconds, 2),
        "img_s": round(len(files) / seconds, 1),
        "requests_per_image": round(storage.requests / len(files), 2),
        "max_in_flight": storage.max_in_flight,
    }


def ingest_part(tmp: Path, images: int, latency_images: int) -> dict[str, Any]:
    folder = write_folder(tmp / "folder", images)
    small = write_folder(tmp / "small", latency_images)
    runs = {
        "local_1": ingest_run(folder, tmp / "i1", 1),
        "local_16": ingest_run(folder, tmp / "i16", 16),
        "latency_1": ingest_run(small, tmp / "l1", 1, LATENCY_S),
        "latency_16": ingest_run(small, tmp / "l16", 16, LATENCY_S),
    }
    runs["speedup_local"] = round(runs["local_16"]["img_s"] / runs["local_1"]["img_s"], 2)
    runs["speedup_latency"] = round(runs["latency_16"]["img_s"] / runs["latency_1"]["img_s"], 2)
    return runs


ENCODER_VERSION = "grown-efficientnet_lite0@1280d"  # the synthesised collections' embedding folder
RSS_BAR_BYTES = 4 * 2**30  # peak RSS of a full reindex at 4M images
REQUESTS_BAR = 0.01  # storage requests per image of a full reindex


def full_reindex_run(root: Path, images: int, shard_rows: int) -> dict[str, Any]:
    """Synthesise ``images`` embedded images (:func:`bench.synth.synthesize_collection`) under ``root``, then
    run a full ``clusterlens reindex`` over them in a fresh process: its seconds, peak RSS and requests."""
    import subprocess
    import sys

    from bench.synth import synthesize_collection

    storage = LatencyStorage(root, latency=0.0)
    synth = synthesize_collection(storage, images, ENCODER_VERSION, seed=0, shard_rows=shard_rows)
    print(f"full_reindex: {images:,} images synthesised in {synth['seconds']} s; reindexing", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--reindex-child", str(root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"the reindex process failed:\n{proc.stderr[-4000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    run["requests_per_image"] = round(run["requests"] / images, 5)
    run["collection"] = synth
    return {"images": images, **run}


def reindex_child(root: Path) -> dict[str, Any]:
    """A full reindex of the collection under ``root`` in this process (run by :func:`full_reindex_run`)."""
    import resource

    from job.reindex import reindex
    from shared.index import read_manifest
    from shared.settings import Settings

    storage = LatencyStorage(root, latency=0.0)
    settings = Settings(_env_file=None, data_dir=root)  # type: ignore[call-arg]
    start = time.perf_counter()
    result = reindex(storage, settings, ENCODER_VERSION)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    manifest = read_manifest(storage, result.version)
    recall = manifest.recall
    return {
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "peak_rss_gb": round(peak / 2**30, 2),
        "requests": storage.requests,
        "requests_by_kind": dict(sorted(storage.by_kind.items())),
        "record_requests": sum(v for k, v in storage.by_kind.items() if k.startswith("get embeddings/records")),
        "mode": result.mode,
        "kind": result.kind,
        "count": result.count,
        "nlist": result.nlist,
        "nprobe": result.nprobe,
        "recall_at_10": recall.at_10 if recall else None,
        "factory": manifest.factory,
        "train": manifest.train,
        "compaction": manifest.source.get("compaction"),
        "shards_after": manifest.source.get("shards"),
    }


def add_run(root: Path, existing: int, new: int, offset: int) -> dict[str, Any]:
    """``new`` real Fashion-MNIST images added to a synthesised collection of ``existing`` images: seconds
    and storage requests per new image for ingest, embed and the incremental reindex, each measured alone."""
    from bench.synth import synthesize_collection
    from job.datasets import fashion_mnist_items
    from job.embeddings import embed_pending
    from job.reindex import reindex
    from shared.encoder import ImageEncoder
    from shared.ingest import ingest_items
    from shared.settings import Settings

    storage = LatencyStorage(root, latency=0.0)
    settings = Settings(_env_file=None, data_dir=root)  # type: ignore[call-arg]
    encoder = ImageEncoder.from_settings(settings)
    t0 = time.perf_counter()
    synth = synthesize_collection(storage, existing, encoder.version, seed=existing, records=True)
    built = reindex(storage, settings, encoder.version)  # the existing collection's index (not measured)
    setup_s = time.perf_counter() - t0
    stages: dict[str, Any] = {}

    def measure(name: str, work: Any) -> Any:
        storage.reset()
        t = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - t
        stages[name] = {
            "seconds": round(seconds, 2),
            "requests": storage.requests,
            "requests_per_image": round(storage.requests / new, 3),
            "requests_by_kind": dict(sorted(storage.by_kind.items())),
        }
        return result

    items = fashion_mnist_items(settings.fashion_mnist_dir, "test", new, offset)
    results = measure("ingest", lambda: list(ingest_items(storage, settings, items, workers=16)))
    ids = [r.id for r in results if r.status == "added"]
    stats = measure("embed", lambda: embed_pending(storage, settings, encoder, only=ids))
    result = measure("reindex", lambda: reindex(storage, settings, encoder.version))
    return {
        "existing": existing,
        "existing_synthesised": synth,
        "new_images": len(ids),
        "embedded": stats.embedded,
        "reindex_mode": result.mode,
        "index": {"kind": built.kind, "count_before": built.count, "count_after": result.count},
        "setup_seconds": round(setup_s, 1),
        "stages": stages,
        "seconds": round(sum(s["seconds"] for s in stages.values()), 2),
        "requests_per_image": round(sum(s["requests"] for s in stages.values()) / new, 3),
    }


def add_part(tmp: Path, sizes: list[int], new: int) -> dict[str, Any]:
    """:func:`add_run` at each size, each in a fresh folder (deleted after), and the time ratio largest/smallest."""
    import shutil

    runs = {}
    for size in sizes:
        print(f"add_{new}: {size:,} existing images", flush=True)
        folder = tmp / f"add-{size}"
        runs[str(size)] = add_run(folder, size, new, offset=0)
        shutil.rmtree(folder, ignore_errors=True)
    small, large = runs[str(min(sizes))], runs[str(max(sizes))]
    return {
        "runs": runs,
        "new": new,
        "time_ratio": round(large["seconds"] / small["seconds"], 3),
        "target_time_ratio": 1.5,
        "met": large["seconds"] / small["seconds"] <= 1.5,
        "requests_per_image": {k: r["requests_per_image"] for k, r in runs.items()},
    }


PARTS = ("loader", "ingest", "ingest.container", "replicas", "add_1000", "full_reindex")
REPLICA_UNIT = 1000  # images per unit in the replicas part: 20 units for 20,000 images


def replica_worker(root: Path) -> int:
    """One job replica (run in its own process): the production worker loop on the GPU queue of the local
    backend under ``root``, with the no-op encoder injected (a worker cannot load one by itself)."""
    from job.worker import Worker
    from shared.queues import open_job_queues, open_queue
    from shared.settings import get_settings
    from shared.storage import open_storage

    settings = get_settings()
    assert settings.data_dir == root, (settings.data_dir, root)
    worker = Worker(
        open_storage(settings),
        settings,
        open_job_queues(settings),
        open_queue(settings, settings.poison_queue_name),
        serve="gpu",  # the reindex after the backfill waits on the CPU queue: counted, not run
        encoder=NoOpEncoder(),  # type: ignore[arg-type]
    )
    stats = worker.run(until_idle=True, idle_timeout=60)
    print(json.dumps({"worker": worker.worker_id, "outcomes": stats.outcomes}), flush=True)
    return 0


def replicas_run(root: Path, workers: int, unit: int = REPLICA_UNIT) -> dict[str, Any]:
    """Queue a backfill of every pending image under ``root`` and let ``workers`` replica processes
    share it; check every image was embedded exactly once."""
    import io
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from job.backfill import reindex_job_id, unit_job_id
    from job.embeddings import EmbeddingStore
    from shared.catalog import Catalog
    from shared.jobs import JobMessage, JobStore, api_job, enqueue
    from shared.queues import open_job_queues
    from shared.settings import Settings
    from shared.storage import EMBEDDINGS

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")} | {
        "CLUSTERLENS_DATA_DIR": str(root),
        "CLUSTERLENS_STORAGE_BACKEND": "local",
        "CLUSTERLENS_EMBED_UNIT_SIZE": str(unit),
        "CLUSTERLENS_JOB_POLL_SECONDS": "0.2",
    }
    settings = Settings(_env_file=None, data_dir=root, embed_unit_size=unit)  # type: ignore[call-arg]
    storage = LocalStorage(root)
    pending = {i for ids in Catalog(storage).pending_by_job().values() for i in ids}
    queues = open_job_queues(settings)
    backfill, _ = enqueue(storage, queues, api_job("embed", {"backfill": True}))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "--replica-worker", str(root)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(workers)
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    wall = time.perf_counter() - start
    assert all(proc.returncode == 0 for proc in procs), outputs
    store = JobStore(storage)
    split = store.get(backfill.job_id)
    units = [store.get(unit_job_id(backfill.job_id, i)) for i in range(split.result["units"])]
    assert all(u.status == "succeeded" for u in units), [u.error for u in units]
    counts: Counter[str] = Counter()  # every id in every shard of the version: each should be there once
    for shard in EmbeddingStore(storage, NoOpEncoder().version).shards():
        table = pq.read_table(io.BytesIO(storage.get(EMBEDDINGS, shard)), columns=["id"])
        counts.update(table["id"].to_pylist())
    reindexes = [JobMessage.from_text(m).job_id for m in queues.cpu.peek()]
    assert split.started_at is not None and all(u.finished_at is not None for u in units)
    last = max(u.finished_at for u in units if u.finished_at is not None)
    seconds = (last - split.started_at).total_seconds()
    taken = Counter(u.worker for u in units)
    return {
        "workers": workers,
        "images": len(pending),
        "unit_size": unit,
        "units": len(units),
        "units_per_worker": sorted(taken.values(), reverse=True),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "missing": len(pending - set(counts)),
        "extra": len(set(counts) - pending),
        "pending_markers_left": sum(len(ids) for ids in Catalog(storage).pending_by_job().values()),
        "reindexes_queued": reindexes.count(reindex_job_id(backfill.job_id)),
        "seconds": round(seconds, 2),
        "img_s": round(len(pending) / seconds, 1),
        "wall_seconds": round(wall, 2),
    }


def replicas_part(tmp: Path, images: int) -> dict[str, Any]:
    """One backfill of ``images`` shared by two replica processes, and by one alone (a copy of the same
    store), on the local backend."""
    import shutil

    from job.datasets import fashion_mnist_items
    from shared.ingest import ingest_items
    from shared.settings import Settings

    root = tmp / "replicas-2"
    settings = Settings(_env_file=None, data_dir=root)  # type: ignore[call-arg]
    items = fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=images)
    added = sum(r.status == "added" for r in ingest_items(LocalStorage(root), settings, items, workers=16))
    shutil.copytree(root, tmp / "replicas-1")
    two = replicas_run(root, 2)
    one = replicas_run(tmp / "replicas-1", 1)
    return {
        "backend": "local (LocalStorage + LocalJobQueue, shared by the processes)",
        "encoder": "no-op (zeros) after real preprocessing to 64 px",
        "image": "Fashion-MNIST 28 px PNG",
        "ingested": added,
        "two_workers": two,
        "one_worker": one,
        "speedup": round(one["seconds"] / two["seconds"], 2),
    }


def container_part(tmp: Path, images: int) -> dict[str, Any]:
    """Register a container of ``images`` Fashion-MNIST PNGs in place on Azurite, 1 and 16 in flight."""
    import logging
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from bench.cost import RequestCounter
    from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, png_bytes
    from shared.ingest import IngestSummary, ingest_container, open_container
    from shared.settings import Settings
    from shared.storage import UPLOADS, AzureBlobStorage
    from tests.azurite import start as start_azurite

    logging.getLogger("azure").setLevel(logging.WARNING)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    pixels, labels = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    azurite = start_azurite(tmp)
    try:
        setup = AzureBlobStorage(connection_string=azurite.connection_string, container_prefix=azurite.fresh_prefix())
        source = setup.service.create_container(f"photos-{uuid.uuid4().hex[:8]}")

        def put(i: int) -> None:
            name = f"{FASHION_MNIST_CLASSES[int(labels[i])].replace('/', '-')}/{i:06d}.png"
            source.upload_blob(name, png_bytes(pixels[i]))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(images)))
        runs: dict[str, Any] = {}
        for workers in (1, 16):
            print(f"ingest.container: {images:,} blobs on Azurite, {workers} in flight", flush=True)
            prefix = azurite.fresh_prefix()
            storage = AzureBlobStorage(connection_string=azurite.connection_string, container_prefix=prefix)
            counter = RequestCounter(azurite.blob_port)
            summary = IngestSummary()
            with counter.installed():
                counter.step = "ingest"
                start = time.perf_counter()
                blobs = open_container(storage, source.container_name)
                for result in ingest_container(storage, settings, blobs, workers=workers):
                    summary.count(result)
                seconds = time.perf_counter() - start
                counts = counter.take().get("ingest", {})
            assert summary.added == images, summary
            copied = sum(1 for _ in storage.list(UPLOADS))
            assert copied == 0, copied
            total = sum(counts.values())
            runs[f"azurite_{workers}"] = {
                "images": images,
                "workers": workers,
                "seconds": round(seconds, 2),
                "img_s": round(images / seconds, 1),
                "requests_per_image": round(total / images, 2),
                "requests_per_image_by_class": {k: round(v / images, 3) for k, v in sorted(counts.items())},
                "blobs_copied_to_uploads": copied,
            }
    finally:
        azurite.stop()
    return {
        "storage": "Azurite (in memory) on this machine",
        "image": "Fashion-MNIST 28 px PNG",
        **runs,
        "speedup": round(runs["azurite_16"]["img_s"] / runs["azurite_1"]["img_s"], 2),
        "device": device(),
        "cores": len(os.sched_getaffinity(0)),
        "date": datetime.now(UTC).date().isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000, help="images for the default loader")
    parser.add_argument("--baseline-images", type=int, default=1000, help="images for the 2-thread baseline")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the default loader (median reported)")
    parser.add_argument("--ingest-images", type=int, default=20000, help="images in the ingest folder")
    parser.add_argument("--ingest-latency-images", type=int, default=500, help="images ingested at 20 ms/request")
    parser.add_argument("--add-sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="existing images")
    parser.add_argument("--add-images", type=int, default=1000, help="new images added (add_1000)")
    parser.add_argument("--replica-images", type=int, default=20000, help="images in the shared backfill")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--replica-worker", type=Path, help=argparse.SUPPRESS)  # a replicas-part child process
    parser.add_argument("--container-images", type=int, default=2000, help="blobs registered in place on Azurite")
    parser.add_argument(
        "--reindex-sizes",
        type=int,
        nargs="*",
        default=[1_000_000, 4_000_000],
        help="collections to reindex (none: summarise the runs stored again)",
    )
    parser.add_argument("--shard-rows", type=int, default=4096, help="rows per synthesised shard (as embedded)")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the synthesised collections")
    parser.add_argument("--reindex-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    if args.replica_worker:
        return replica_worker(args.replica_worker)
    if args.reindex_child:
        print(json.dumps(reindex_child(args.reindex_child)))
        return 0
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    took: dict[str, float] = {}  # each part's seconds: a run of some parts keeps the others' results
    with tempfile.TemporaryDirectory() as tmp:
        if "loader" in args.parts:
            started = time.perf_counter()
            print(f"loader: baseline, 2 fetch threads, {args.baseline_images:,} images", flush=True)
            baseline = loader_run(Path(tmp) / "baseline", args.baseline_images, embed_io_workers=2)
            # a target met narrowly on this noisy 2-core machine: three runs, median and spread
            runs = []
            for i in range(args.repeats):
                print(f"loader: default settings, {args.images:,} images, run {i + 1} of {args.repeats}", flush=True)
                runs.append(loader_run(Path(tmp) / f"default-{i}", args.images))
            rates = sorted(r["img_s"] for r in runs)
            default = sorted(runs, key=lambda r: r["img_s"])[len(runs) // 2]
            out["loader"] = {
                "latency_ms": LATENCY_S * 1000,
                "image": "Fashion-MNIST 28 px PNG, resized to 64 px",
                "encoder": "no-op (zeros): the loader alone",
                "baseline_2_threads": baseline,
                "default": default,
                "default_runs_img_s": [r["img_s"] for r in runs],
                "default_img_s_median": default["img_s"],
                "default_img_s_spread": round(rates[-1] - rates[0], 1),
                "speedup": round(default["img_s"] / baseline["img_s"], 2),
                "target_img_s": TARGET_IMG_S,
                "met": default["img_s"] >= TARGET_IMG_S,
            }
            took["loader"] = round(time.perf_counter() - started, 1)
        if "ingest" in args.parts:
            print(f"ingest: {args.ingest_images:,}-image folder, 1 and 16 in flight", flush=True)
            started = time.perf_counter()
            kept = out.get("ingest", {}).get("container")  # its own part: kept unless it runs too
            out["ingest"] = ingest_part(Path(tmp), args.ingest_images, args.ingest_latency_images)
            if kept is not None:
                out["ingest"]["container"] = kept
            took["ingest"] = round(time.perf_counter() - started, 1)
        if "ingest.container" in args.parts:
            started = time.perf_counter()
            container = container_part(Path(tmp), args.container_images)
            container["bench_seconds"] = round(time.perf_counter() - started, 1)
            out.setdefault("ingest", {})["container"] = container
            took["ingest.container"] = container["bench_seconds"]
        if "replicas" in args.parts:
            print(f"replicas: one backfill of {args.replica_images:,} images, 2 worker processes, then 1", flush=True)
            started = time.perf_counter()
            out["replicas"] = replicas_part(Path(tmp), args.replica_images)
            took["replicas"] = round(time.perf_counter() - started, 1)
        if "add_1000" in args.parts:
            started = time.perf_counter()
            out["add_1000"] = add_part(Path(tmp), sorted(args.add_sizes), args.add_images)
            took["add_1000"] = round(time.perf_counter() - started, 1)
        if "full_reindex" in args.parts:
            started = time.perf_counter()
            # sizes run separately (a 4M run takes most of an hour) are kept: a size run again replaces its own
            by_size = {r["images"]: r for r in out.get("full_reindex", {}).get("runs", [])}
            for images in args.reindex_sizes:
                with tempfile.TemporaryDirectory(dir=args.tmp, prefix="clusterlens-scale-") as folder:
                    by_size[images] = full_reindex_run(Path(folder), images, args.shard_rows)
                print(json.dumps(by_size[images]), flush=True)
            runs = [by_size[k] for k in sorted(by_size)]
            at_4m = [r for r in runs if r["images"] >= 4_000_000]
            out["full_reindex"] = {
                "what": "a full `clusterlens reindex` (train, add, recall gate, compaction, publish) in a fresh "
                "process over an existing collection of synthesised (grown) embeddings, local storage, no latency",
                "runs": runs,
                "bars": {"peak_rss_bytes_at_4M": RSS_BAR_BYTES, "requests_per_image": REQUESTS_BAR},
                "met": {
                    "peak_rss_at_4M": all(r["peak_rss_bytes"] <= RSS_BAR_BYTES for r in at_4m) if at_4m else None,
                    "requests_per_image": all(r["requests_per_image"] <= REQUESTS_BAR for r in runs),
                    "no_record_requests": all(r["record_requests"] == 0 for r in runs),
                },
                "cores": len(os.sched_getaffinity(0)),
                "device": device(),
                "date": datetime.now(UTC).date().isoformat(),
            }
            if args.reindex_sizes:
                took["full_reindex"] = round(time.perf_counter() - started, 1)
    out |= {"cores": len(os.sched_getaffinity(0)), "device": device(), "date": datetime.now(UTC).date().isoformat()}
    out["part_seconds"] = out.get("part_seconds", {}) | took
    if all(part in out["part_seconds"] for part in PARTS):  # the whole's time only while every part's is known
        out["bench_seconds"] = round(sum(out["part_seconds"].values()), 1)
    else:
        out.pop("bench_seconds", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k.split(".")[0]] for k in args.parts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
