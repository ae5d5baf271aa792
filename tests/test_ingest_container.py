"""Backfill in place: `clusterlens ingest --container` and the ``ingest_container`` job register the images
already in a Blob container without copying them, on the local backend and on Azurite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from job.datasets import fashion_mnist_items
from job.embeddings import EmbeddingStore, embed_pending
from job.worker import Worker
from shared.catalog import Catalog
from shared.encoder import ImageEncoder
from shared.errors import BadRequest, NotFound
from shared.ingest import (
    IngestItem,
    IngestSummary,
    content_id,
    ingest_bytes,
    ingest_container,
    open_container,
    withdraw,
)
from shared.jobs import JobStore, api_job, enqueue
from shared.storage import QUARANTINE, UPLOADS, AzureBlobStorage, LocalStorage
from tests.conftest import AUTH
from tests.jobs_support import Backend, make_backend

BACKENDS = ["local", pytest.param("azure", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    azurite = request.getfixturevalue("azurite") if request.param == "azure" else None
    return make_backend(request.param, tmp_path, azurite, job_retry_seconds=0, job_max_attempts=2)


def _images(n: int, offset: int = 0) -> list[IngestItem]:
    return list(fashion_mnist_items(Path("/usr/share/datasets/fashion-mnist"), "test", n, offset))


def _source(backend: Backend, blobs: dict[str, bytes]) -> str:
    """A user's container holding ``blobs`` (a folder under the storage root locally), outside the app's prefix."""
    name = f"src-{uuid.uuid4().hex[:8]}"
    storage = backend.storage
    if isinstance(storage, LocalStorage):
        for blob, data in blobs.items():
            (storage.root / name / blob).parent.mkdir(parents=True, exist_ok=True)
            (storage.root / name / blob).write_bytes(data)
    else:
        assert isinstance(storage, AzureBlobStorage)
        container = storage.service.create_container(name)
        for blob, data in blobs.items():
            container.upload_blob(blob, data)
    return name


def _register(backend: Backend, container: str, prefix: str = "", workers: int = 4) -> IngestSummary:
    summary = IngestSummary()
    blobs = open_container(backend.storage, container, prefix)
    for result in ingest_container(backend.storage, backend.settings, blobs, workers=workers):
        summary.count(result)
    return summary


def test_registers_in_place_without_copying(backend: Backend) -> None:
    items = _images(6)
    blobs = {f"shoes/{i}.png": item.data for i, item in enumerate(items[:4])}
    blobs.update({"loose 5.png": items[4].data, "notes.txt": b"not an image name: never read"})
    container = _source(backend, blobs)
    source = open_container(backend.storage, container)
    results = list(ingest_container(backend.storage, backend.settings, source, workers=3))
    assert [r.status for r in results] == ["added"] * 5 and (source.listed, source.skipped) == (6, 1)
    assert list(backend.storage.list(UPLOADS)) == []  # nothing copied
    catalog = Catalog(backend.storage)
    records = {r.blob: r for r in catalog.records()}
    assert set(records) == {"shoes/0.png", "shoes/1.png", "shoes/2.png", "shoes/3.png", "loose 5.png"}
    assert all(r.container == container and r.in_place for r in records.values())
    assert records["shoes/0.png"].label == "shoes" and records["loose 5.png"].label is None
    assert records["shoes/0.png"].source == f"{container}/shoes/0.png"
    assert catalog.image_bytes(records["loose 5.png"]) == items[4].data
    # A prefix picks a part of the container.
    assert _register(backend, container, prefix="shoes/1").duplicate == 1


def test_dedupes_against_known_images(backend: Backend) -> None:
    items = _images(4)
    ingest_bytes(backend.storage, backend.settings, items[0])  # uploaded before: stays in uploads
    container = _source(backend, {f"{i}.png": item.data for i, item in enumerate(items)} | {"copy.png": items[1].data})
    first = _register(backend, container)
    assert (first.added, first.duplicate, first.quarantined) == (3, 2, 0)
    assert Catalog(backend.storage).get(_id(items[0])).container is None
    again = _register(backend, container)
    assert (again.added, again.duplicate) == (0, 5)
    assert backend.record_count() == 4


def _id(item: IngestItem) -> str:
    return content_id(item.data)


def test_bad_blobs_are_quarantined_with_reasons_and_left_in_place(backend: Backend) -> None:
    good = _images(1)[0].data
    big = b"\x89PNG" + bytes(backend.settings.max_upload_bytes)
    container = _source(backend, {"good.png": good, "broken.png": good[:40], "fake.jpg": b"not a jpeg", "big.png": big})
    summary = _register(backend, container)
    assert (summary.added, summary.quarantined) == (1, 3)
    reasons = {p.source.rsplit("/", 1)[1]: p.reason or "" for p in summary.problems}
    assert reasons["big.png"].startswith("payload_too_large")  # from the listing's size: never read
    assert reasons["fake.jpg"].startswith("unsupported_media_type") and "invalid_image" in reasons["broken.png"]
    kept = [n for n in backend.storage.list(QUARANTINE) if n.endswith(".bin")]
    assert len(kept) == 3 and all(backend.storage.get(QUARANTINE, n) == b"" for n in kept)  # not copied
    assert backend.storage.get_source(container, "broken.png") == good[:40]


def test_own_and_missing_containers_are_refused(backend: Backend) -> None:
    prefix = backend.settings.container_prefix
    for own in ("uploads", "embeddings", f"{prefix}uploads", f"{prefix}jobs", "azure-webjobs-hosts"):
        with pytest.raises(BadRequest) as refused:
            open_container(backend.storage, own)
        assert refused.value.code in ("own_container", "invalid_container"), own
    for bad in ("../uploads", "Photos", "a", "ab--c", "x" * 64):
        with pytest.raises(BadRequest):
            open_container(backend.storage, bad)
    with pytest.raises(NotFound) as missing:
        open_container(backend.storage, f"src-missing-{uuid.uuid4().hex[:6]}")
    assert missing.value.code == "container_not_found"


def test_registered_images_are_embedded_from_their_container(backend: Backend, encoder: ImageEncoder) -> None:
    items = _images(5)
    container = _source(backend, {f"{i}.png": item.data for i, item in enumerate(items)})
    assert _register(backend, container).added == 5
    stats = embed_pending(backend.storage, backend.settings, encoder)
    assert stats.embedded == 5 and not stats.failed
    assert EmbeddingStore(backend.storage, encoder.version).embedded_ids() == {_id(i) for i in items}


def test_delete_and_withdraw_leave_the_original(backend: Backend) -> None:
    items = _images(2)
    container = _source(backend, {"a.png": items[0].data, "b.png": items[1].data})
    _register(backend, container)
    catalog = Catalog(backend.storage)
    deleted = catalog.delete(_id(items[0]))
    assert deleted.in_place and backend.storage.get_source(container, "a.png") == items[0].data
    assert _id(items[0]) in catalog.deleted_ids() and not catalog.exists(_id(items[0]))
    withdraw(backend.storage, catalog.get(_id(items[1])), code="invalid_image", reason="test")
    assert backend.storage.get_source(container, "b.png") == items[1].data and not catalog.exists(_id(items[1]))
    assert "left in place" in backend.storage.get_json(QUARANTINE, f"{_id(items[1])}.json")["reason"]


def test_the_job_kind_runs_through_the_worker_and_queues_the_embedding(backend: Backend) -> None:
    items = _images(3)
    container = _source(backend, {f"in/{i}.png": item.data for i, item in enumerate(items)} | {"out.png": b"x"})
    message = api_job("ingest_container", {"container": container, "prefix": "in/"})
    enqueue(backend.storage, backend.queues, message)
    assert backend.queues.cpu.approximate_count() == 1 and backend.queues.gpu.approximate_count() == 0
    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, serve="cpu")
    assert worker.run(until_idle=True, idle_timeout=5).outcomes == {"succeeded": 1}
    record = JobStore(backend.storage).get(message.job_id)
    embed_id = f"embed-after-{message.job_id}"
    assert record.result["added"] == 3 and record.result["embed_job"] == embed_id
    assert sorted(JobStore(backend.storage).items(embed_id)) == sorted(_id(i) for i in items)
    assert backend.queues.gpu.approximate_count() == 1  # the embedding, on the GPU queue
    assert {r.job for r in Catalog(backend.storage).records()} == {embed_id}
    # One of the app's own containers: failed at once, not retried.
    refused = api_job("ingest_container", {"container": f"{backend.settings.container_prefix}uploads"})
    enqueue(backend.storage, backend.queues, refused)
    assert worker.run(until_idle=True, idle_timeout=5).outcomes == {"failed": 1}
    assert JobStore(backend.storage).get(refused.job_id).error.code == "own_container"  # type: ignore[union-attr]


def test_the_api_starts_the_job_and_refuses_own_containers(backend: Backend, encoder: ImageEncoder) -> None:
    from functions.http_api import create_app
    from shared.search import SearchService

    container = _source(backend, {"a.png": _images(1)[0].data})
    service = SearchService(backend.settings, backend.storage, encoder=encoder)
    app = create_app(service, backend.settings, backend.queues)
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        ok = client.post("/api/jobs", json={"kind": "ingest_container", "params": {"container": container}})
        assert ok.status_code == 202 and ok.json()["job"]["kind"] == "ingest_container", ok.text
        own = client.post("/api/jobs", json={"kind": "ingest_container", "params": {"container": "uploads"}})
        assert own.status_code == 400 and own.json()["error"]["code"] == "own_container"
        gone = client.post("/api/jobs", json={"kind": "ingest_container", "params": {"container": "nope-nope"}})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "container_not_found"
        bad = client.post("/api/jobs", json={"kind": "ingest_container", "params": {"container": "../x"}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_params"


def test_cli_prints_the_summary(backend: Backend, use_env, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from tools.cli import main

    use_env(backend)
    items = _images(3)
    container = _source(backend, {"a.png": items[0].data, "b.png": items[1].data, "c.png": b"junk", "d.txt": b""})
    ingest_bytes(backend.storage, backend.settings, items[1])
    assert main(["ingest", "--container", container, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "added 1, already known 1, quarantined 1" in out
    assert f"quarantined {container}/c.png: unsupported_media_type" in out and "skipped 1 of 4 blobs" in out
    assert main(["ingest", "--container", "uploads"]) == 1
    assert "own containers" in capsys.readouterr().err
    assert main(["ingest", "--prefix", "x", "somewhere"]) == 2
