"""The Azure path end to end on Azurite: blob events -> trigger -> queue -> worker process -> index -> HTTP.

The worker runs as its own process (`python -m job`, the container job's entry point) and the API
as a real uvicorn server, both configured only through environment variables, as in Azure.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import numpy as np
import pytest
from azure.storage.blob import BlobServiceClient
from PIL import Image

from functions import blob_ingest
from job.datasets import fashion_mnist_items
from job.embeddings import EmbeddingStore
from shared.catalog import Catalog
from shared.encoder import ImageEncoder
from shared.ingest import IngestItem
from shared.jobs import JobStore
from shared.storage import QUARANTINE
from shared.uploads import accept_upload
from tests.azurite import Azurite
from tests.jobs_support import Backend, make_backend
from tests.servers import running_server

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _backend(tmp_path: Path, azurite: Azurite, **overrides: object) -> Backend:
    options: dict[str, object] = {"embed_batch_seconds": 2, "index_refresh_seconds": 0, **overrides}
    return make_backend("azure", tmp_path, azurite, **options)


def _upload_and_trigger(backend: Backend, items: list[IngestItem]) -> list[str]:
    """Put each image in the uploads container, then hand the trigger what the host would read."""
    service = BlobServiceClient.from_connection_string(str(backend.settings.azure_storage_connection_string))
    container = service.get_container_client(f"{backend.settings.container_prefix}uploads")
    names = []
    for i, item in enumerate(items):
        name = f"incoming/{i:04d}.png"
        metadata = {"label": item.label} if item.label else {}
        container.upload_blob(name, item.data, metadata=metadata)
        blob = container.get_blob_client(name)
        props = blob.get_blob_properties()
        blob_ingest.ingest_blob(
            func.blob.InputStream(
                data=blob.download_blob().readall(),
                name=f"uploads/{name}",
                length=props.size,
                uri=blob.url,
                metadata=dict(props.metadata),
            )
        )
        names.append(name)
    return names


def _worker(backend: Backend, log: Path) -> subprocess.Popen[bytes]:
    """The container job's entry point in its own process, its output to a file (a pipe can fill and block it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "job", "--idle-timeout", "60"],
        cwd=ROOT,
        env={**os.environ, **backend.env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _run_worker(backend: Backend, timeout: float = 240) -> str:
    log = Path(str(backend.settings.data_dir)).parent / "worker.log"
    proc = _worker(backend, log)
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _shard_ids(backend: Backend, encoder: ImageEncoder) -> list[str]:
    """Every id in every stored shard, repeats included."""
    store = EmbeddingStore(backend.storage, encoder.version)
    ids: list[str] = []
    for name in store.shards():
        ids.extend(store._read_table(name, ["id"]).column("id").to_pylist())
    return ids


def test_fifty_uploads_are_searchable_by_their_own_bytes(
    tmp_path: Path, azurite: Azurite, use_env: Any, encoder: ImageEncoder
) -> None:
    backend = _backend(tmp_path, azurite)
    use_env(backend)
    items = list(fashion_mnist_items(backend.settings.fashion_mnist_dir, "train", limit=50))
    t0 = time.monotonic()
    _upload_and_trigger(backend, items)
    windows = (time.monotonic() - t0) / backend.settings.embed_batch_seconds
    assert backend.record_count() == 50
    jobs = backend.job_ids()
    assert all(j.startswith("embed-batch-") for j in jobs)
    assert 1 <= len(jobs) <= windows + 2 < 50  # batched: one job per window, not one per image
    out = _run_worker(backend)
    assert "done" in out
    store = JobStore(backend.storage)
    finished = {j: store.get(j) for j in backend.job_ids()}
    assert all(r.status == "succeeded" for r in finished.values()), {j: r.error for j, r in finished.items()}
    assert any(j.startswith("reindex-after-") for j in finished)  # embedding hands on to the reindex
    assert sum(r.result.get("embedded", 0) for r in finished.values()) == 50
    with running_server(backend.env, "--no-worker") as url:
        health = httpx.get(f"{url}/api/health").json()
        assert health["index"]["count"] == 50
        job = httpx.get(f"{url}/api/jobs/{jobs[0]}").json()
        assert job["status"] == "succeeded" and job["seconds"]["total"] > 0
        for item in items:
            r = httpx.post(f"{url}/api/search", files={"image": ("q.png", item.data, "image/png")}, data={"k": "1"})
            assert r.status_code == 200, r.text
            top = r.json()["results"][0]
            assert top["id"] == hashlib.sha256(item.data).hexdigest() and top["score"] > 0.999
            assert top["label"] == item.label


def _odd_blobs() -> list[IngestItem]:
    good = list(fashion_mnist_items(Path("/usr/share/datasets/fashion-mnist"), "train", limit=12, offset=100))
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(buf, format="PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    bad = [
        IngestItem(data=truncated, source="corrupt"),
        IngestItem(data=b"", source="empty"),
        IngestItem(data=b"%PDF-1.4 this is not an image\n" * 20, source="not-image"),
    ]
    return [*good[:6], *bad, *good[6:]]


def test_bad_blobs_go_to_quarantine_and_the_good_ones_in_the_batch_are_embedded(
    tmp_path: Path, azurite: Azurite, use_env: Any, encoder: ImageEncoder
) -> None:
    backend = _backend(tmp_path, azurite)
    use_env(backend)
    items = _odd_blobs()
    _upload_and_trigger(backend, items)
    reasons = {}
    for name in backend.storage.list(QUARANTINE):
        if name.endswith(".json"):
            entry = backend.storage.get_json(QUARANTINE, name)
            reasons[entry["source"]] = entry
    assert set(reasons) == {
        "blob:uploads/incoming/0006.png",
        "blob:uploads/incoming/0007.png",
        "blob:uploads/incoming/0008.png",
    }
    assert all(e["code"] and e["reason"] for e in reasons.values())
    assert reasons["blob:uploads/incoming/0008.png"]["code"] == "unsupported_media_type"
    _run_worker(backend)
    good = {hashlib.sha256(i.data).hexdigest() for i in items if i.source not in ("corrupt", "empty", "not-image")}
    assert len(good) == 12
    assert set(_shard_ids(backend, encoder)) == good


def test_a_worker_killed_mid_batch_loses_nothing_and_embeds_each_image_once(
    tmp_path: Path, azurite: Azurite, use_env: Any, encoder: ImageEncoder
) -> None:
    # Small shards so the killed run leaves some work durable; a short visibility timeout so the
    # message comes back soon after its worker stops renewing it.
    backend = _backend(
        tmp_path, azurite, embed_shard_size=8, embed_batch_size=8, job_visibility_seconds=4, embed_decode_workers=1
    )
    use_env(backend)
    items = list(fashion_mnist_items(backend.settings.fashion_mnist_dir, "train", limit=120, offset=500))
    # All 120 uploads are stamped with one moment, so they land in one batch window and one job of
    # 15 shards whatever the machine's speed (the blob trigger's own batching is the test above):
    # the kill below, after the first shard, then lands inside that job, not between two.
    now = datetime.now(UTC)
    jobs = set()
    for i, item in enumerate(items):
        accepted = accept_upload(
            backend.storage, backend.queues, backend.settings, item.data, source=f"kill/{i}", label=item.label, now=now
        )
        assert accepted.result.status == "added" and accepted.job is not None
        jobs.add(accepted.job.job_id)
    assert len(jobs) == 1
    store = EmbeddingStore(backend.storage, encoder.version)
    proc = _worker(backend, tmp_path / "killed-worker.log")
    deadline = time.monotonic() + 120
    while not store.shards():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker wrote no shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_shard_ids(backend, encoder))
    assert 0 < partial < 120, partial  # killed in the middle
    left = [JobStore(backend.storage).get(j).status for j in backend.job_ids()]
    assert left.count("running") == 1  # as the killed worker left it
    _run_worker(backend)  # waits out the visibility timeout, then finishes the batch
    ids = _shard_ids(backend, encoder)
    expected = {hashlib.sha256(i.data).hexdigest() for i in items}
    assert len(ids) == len(set(ids)) == 120 and set(ids) == expected  # each image once, none lost
    records = [JobStore(backend.storage).get(j) for j in backend.job_ids()]
    assert all(r.status == "succeeded" for r in records)
    assert max(r.attempts for r in records if r.kind == "embed") >= 2  # the killed try counted
    assert {r.id for r in Catalog(backend.storage).records()} == expected
