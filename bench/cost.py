"""What an image costs in Azure: storage requests, bytes and seconds per image, counted on real runs.

Run with ``make bench-cost`` (``python -m bench.cost``); writes ``bench/results/cost.json``, which
``make figures`` turns into the cost section of docs/figures.md and the table in docs/deploy.md
("What it costs"), with the arithmetic to 1,000,000 images.

Real Fashion-MNIST images go through the real code against Azurite (the Azure Storage emulator), as in
Azure: each image is uploaded to ``uploads/``, the Event Grid blob trigger's handler (``ingest_blob``)
takes it, and a worker (``job.worker``, both queues) runs the embed job and the reindex it queues.
Every HTTP request the Azure SDK sends is counted where it is sent (azure-core's ``RequestsTransport``),
so a count is a count of billed storage transactions, sorted into the classes the price list has (blob
writes, reads, lists, deletes; queue operations) and into the step that made it (upload, ingest, each job
kind, the worker's polling). The Functions host's own read of the blob for the trigger binding is not
made here (the handler is given the bytes): it is added as one read per image.

Two collections are built, a small and a larger one, and then the same number of new images is added
to each: the per-image cost of that addition is what an upload costs in steady state, and comparing it
across the two sizes shows what grows with the collection rather than with the batch. Stored bytes are
listed per container at the end of each run. The seconds are this machine's (CPU only, Azurite on
loopback): the ingest handler's time per image bounds a Flex Consumption execution from below, and the
embed rate is the CPU's, not a GPU's (the GPU rates in the cost table are cited, with their source).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.embed import device

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Cited throughput of the image encoder on each serverless GPU (images/s), for the GPU-seconds arithmetic.
# EfficientNet-Lite0 is EfficientNet-B0 without squeeze-excitation and swish (0.41 vs 0.39 GFLOPs at
# 224 px); NVIDIA publishes B0 inference throughput for the A100 and the V100, not the T4.
GPU_RATES = {
    "Consumption-GPU-NC24-A100": {
        "img_s": 4656,
        "how": "EfficientNet-B0, batch 64, TF32, A100 80GB (NVIDIA DeepLearningExamples, PyTorch EfficientNet README)",
        "source": "https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/efficientnet",
        "vcpu": 24,
        "gib": 220,
    },
    "Consumption-GPU-NC8as-T4": {
        "img_s": 1415,
        "how": "estimated: the V100's FP32 EfficientNet-B0 rate at batch 64 (2,743 img/s, same README) scaled by "
        "FP32 peak, T4 8.1 / V100 15.7 TFLOPS",
        "source": "https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/efficientnet",
        "vcpu": 8,
        "gib": 56,
    },
}
# Per-request latency assumed for the loader-bound rate (same-region Blob Storage, small blobs): an
# assumption of the arithmetic, not measured here (Azurite on loopback answers in well under 1 ms).
ASSUMED_REQUEST_MS = 10.0


class RequestCounter:
    """Counts the Azure SDK's HTTP requests by step and by price class, while installed."""

    def __init__(self, blob_port: int):
        self.blob_port = blob_port
        self.step = "setup"
        self.counts: dict[str, Counter[str]] = {}
        self.lock = threading.Lock()

    def classify(self, method: str, url: str) -> str:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.port != self.blob_port:
            return "queue"
        if "list" in query.get("comp", []):
            return "blob_list"
        if method in ("GET", "HEAD"):
            return "blob_read"
        if method == "DELETE":
            return "blob_delete"
        return "blob_write"

    def record(self, method: str, url: str) -> None:
        with self.lock:
            self.counts.setdefault(self.step, Counter())[self.classify(method, url)] += 1

    @contextmanager
    def installed(self) -> Iterator[RequestCounter]:
        from azure.core.pipeline.transport import RequestsTransport

        original = RequestsTransport.send
        counter = self

        def send(transport: Any, request: Any, **kwargs: Any) -> Any:
            counter.record(request.method, request.url)
            return original(transport, request, **kwargs)

        RequestsTransport.send = send
        try:
            yield self
        finally:
            RequestsTransport.send = original

    def take(self) -> dict[str, dict[str, int]]:
        """The counts so far, by step, and start again."""
        with self.lock:
            out = {step: dict(c) for step, c in self.counts.items()}
            self.counts = {}
        return out


def _stored_bytes(connection_string: str, prefix: str) -> dict[str, int]:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(connection_string)
    sizes: dict[str, int] = {}
    for container in service.list_containers(name_starts_with=prefix):
        client = service.get_container_client(container.name)
        sizes[container.name[len(prefix) :]] = sum(b.size for b in client.list_blobs())
    return sizes


def run_collection(azurite: Any, images: list[bytes], base: int, added: int) -> dict[str, Any]:
    """Build a collection of ``base`` images, then add ``added`` more; count each phase."""
    import azure.functions as func

    from functions.blob_ingest import ingest_blob
    from job.worker import open_worker
    from shared import runtime as runtime_module
    from shared.jobs import JobMessage
    from shared.settings import Settings, get_settings

    prefix = azurite.fresh_prefix()
    env = {
        "CLUSTERLENS_STORAGE_BACKEND": "azure",
        "CLUSTERLENS_AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string,
        "CLUSTERLENS_CONTAINER_PREFIX": prefix,
        "CLUSTERLENS_EMBED_BATCH_SECONDS": "1",
        "CLUSTERLENS_JOB_POLL_SECONDS": "0.2",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    runtime_module.get_runtime.cache_clear()
    settings: Settings = get_settings()
    counter = RequestCounter(azurite.blob_port)
    from shared.storage import open_storage

    storage = open_storage(settings)
    worker = open_worker(settings, storage)
    original_process = worker.process

    def process(source: Any, message: Any) -> str:
        # One message at a time: every request until it is done (its loader's and heartbeat's threads
        # included) is the job's.
        counter.step = JobMessage.from_text(message.content).kind
        try:
            return original_process(source, message)
        finally:
            counter.step = "poll"

    worker.process = process  # type: ignore[method-assign]
    phases: list[dict[str, Any]] = []
    with counter.installed():
        for name, batch in (("build", images[:base]), ("add", images[base : base + added])):
            counter.take()
            ingest_s: list[float] = []
            for i, data in enumerate(batch):
                blob_name = f"{name}-{i:06d}.png"
                counter.step = "upload"
                storage.put("uploads", blob_name, data)
                counter.step = "ingest"
                start = time.perf_counter()
                event = func.blob.InputStream(
                    data=data, name=f"uploads/{blob_name}", length=len(data), uri=f"https://x/uploads/{blob_name}"
                )
                ingest_blob(event)
                ingest_s.append(time.perf_counter() - start)
            counter.step = "poll"
            start = time.perf_counter()
            stats = worker.run(until_idle=True, idle_timeout=30)
            worker_s = time.perf_counter() - start
            counts = counter.take()
            counts.setdefault("ingest", {})["blob_read"] = counts.get("ingest", {}).get("blob_read", 0) + len(batch)
            phases.append(
                {
                    "phase": name,
                    "images": len(batch),
                    "requests": counts,
                    "ingest_ms_p50": round(1000 * statistics.median(ingest_s), 2),
                    "ingest_ms_p90": round(1000 * statistics.quantiles(ingest_s, n=10)[-1], 2),
                    "worker_s": round(worker_s, 1),
                    "jobs": dict(stats.outcomes),
                }
            )
    stored = _stored_bytes(azurite.connection_string, prefix)
    for key in env:
        os.environ.pop(key, None)
    get_settings.cache_clear()
    runtime_module.get_runtime.cache_clear()
    return {"base": base, "added": added, "phases": phases, "stored_bytes": stored, "images_total": base + added}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600], help="collection sizes to build")
    parser.add_argument("--added", type=int, default=50, help="new images added to each collection")
    parser.add_argument("--out", type=Path, default=RESULTS / "cost.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    from job.datasets import load_fashion_mnist, png_bytes
    from shared.settings import Settings
    from tests.azurite import start as start_azurite

    pixels, _ = load_fashion_mnist(Settings(_env_file=None).fashion_mnist_dir, "train")  # type: ignore[call-arg]
    need = max(args.sizes) + args.added
    images = [png_bytes(pixels[i]) for i in range(need)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        azurite = start_azurite(Path(tmp))
        try:
            for size in args.sizes:
                print(f"cost: building {size:,} images, then adding {args.added}", flush=True)
                runs.append(run_collection(azurite, images, size, args.added))
        finally:
            azurite.stop()
    out = {
        "runs": runs,
        "image_bytes_mean": round(statistics.mean(len(b) for b in images), 1),
        "gpu_rates": GPU_RATES,
        "assumed_request_ms": ASSUMED_REQUEST_MS,
        "flex_instance_mb": 2048,
        "index_keep_versions": Settings(_env_file=None).index_keep_versions,  # type: ignore[call-arg]
        "embed_io_workers": Settings(_env_file=None).embed_io_workers,  # type: ignore[call-arg]
        "device": device(),
        "date": datetime.now(UTC).date().isoformat(),
        "note": "Azure SDK requests counted against Azurite; the host's read of each blob for the trigger added "
        "as one blob read per image; seconds are this machine's (CPU, loopback)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
