"""POST /api/images and the jobs API on the local backend: upload, the worker embeds, search finds it."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from job.datasets import fashion_mnist_items
from job.embeddings import EmbeddingStore
from job.worker import HANDLERS, JobContext, Worker, run_embed
from shared.encoder import ImageEncoder
from shared.index import current_version, load_version
from shared.jobs import JobStore
from shared.queues import open_job_queues, open_queue
from shared.search import SearchService
from shared.storage import QUARANTINE, LocalStorage
from shared.uploads import accept_upload
from tests.conftest import AUTH, make_settings


@pytest.fixture
def app(tmp_path: Path, encoder: ImageEncoder) -> tuple[TestClient, Worker]:
    settings = make_settings(tmp_path, embed_batch_seconds=1, index_refresh_seconds=0, job_retry_seconds=0)
    storage = LocalStorage(settings.data_dir)
    queues = open_job_queues(settings)
    service = SearchService(settings, storage, encoder=encoder)
    worker = Worker(storage, settings, queues, open_queue(settings, settings.poison_queue_name), encoder=encoder)
    return TestClient(create_app(service, settings, queues), headers=AUTH), worker


def test_uploaded_images_are_embedded_by_the_worker_and_found(app: tuple[TestClient, Worker]) -> None:
    client, worker = app
    items = list(fashion_mnist_items(worker.settings.fashion_mnist_dir, "train", limit=30, offset=2000))
    jobs = set()
    for item in items[:20]:
        r = client.post("/api/images", files={"image": ("x.png", item.data, "image/png")}, data={"label": item.label})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["status"] == "added" and body["id"] == hashlib.sha256(item.data).hexdigest()
        jobs.add(body["job"]["id"])
    for item in items[20:]:  # raw bytes, label and caption as query parameters
        r = client.post(
            "/api/images", content=item.data, headers={"Content-Type": "image/png"}, params={"caption": "from curl"}
        )
        assert r.status_code == 201, r.text
        jobs.add(r.json()["job"]["id"])
    again = client.post("/api/images", files={"image": ("x.png", items[0].data, "image/png")})
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert len(jobs) < len(items)  # batched
    job = client.get(f"/api/jobs/{sorted(jobs)[0]}").json()
    assert job["status"] == "queued" and job["kind"] == "embed"
    assert worker.queues.gpu.approximate_count() == len(jobs) and worker.queues.cpu.approximate_count() == 0
    stats = worker.run(until_idle=True, idle_timeout=30)  # on both queues: the embed jobs, then their reindex
    assert stats.outcomes.get("succeeded", 0) >= len(jobs) + 1  # the embed jobs and a reindex
    for item in items:
        r = client.post("/api/search", files={"image": ("q.png", item.data, "image/png")}, data={"k": "1"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == hashlib.sha256(item.data).hexdigest()
    done = client.get(f"/api/jobs/{sorted(jobs)[0]}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["result"]["embedded"] > 0
    listed = client.get("/api/jobs", params={"limit": 50}).json()["jobs"]
    assert {j["job_id"] for j in listed} >= jobs and any(j["kind"] == "reindex" for j in listed)


def test_bad_uploads_are_answered_and_quarantined(app: tuple[TestClient, Worker]) -> None:
    client, worker = app
    r = client.post("/api/images", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
    assert "quarantine" in r.json()["error"]["message"]
    r = client.post("/api/images", files={"image": ("x.txt", b"hello there", "text/plain")})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert len([n for n in worker.storage.list(QUARANTINE) if n.endswith(".json")]) == 2
    cases = [
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty_upload"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type"),
        ({"data": {"label": "x"}, "files": {"other": ("a", b"a")}}, 400, "missing_image"),
        ({"files": {"image": ("x.png", b"x", "image/png")}, "data": {"label": "a\x00b"}}, 400, "invalid_label"),
        ({"files": {"image": ("x.png", b"x", "image/png")}, "data": {"label": "y" * 101}}, 400, "invalid_label"),
    ]
    for kwargs, status, code in cases:
        r = client.post("/api/images", **kwargs)  # type: ignore[arg-type]
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (kwargs, r.text)
    big = b"\x89PNG" + b"0" * (worker.settings.max_upload_bytes + 10)
    r = client.post("/api/images", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_jobs_api_validates_and_is_idempotent_with_a_key(app: tuple[TestClient, Worker]) -> None:
    client, worker = app
    bad = [
        ({"kind": "nope"}, "invalid_kind"),
        ({"kind": "reindex", "params": {"force": "yes"}}, "invalid_params"),
        ({"kind": "reindex", "params": {"rm": True}}, "invalid_params"),
        ({"kind": "train_head", "params": {"epochs": 10_000}}, "invalid_params"),
        ({"kind": "reindex", "params": []}, "invalid_params"),
        ({"kind": "reindex", "idempotency_key": 5}, "invalid_idempotency_key"),
    ]
    for body, code in bad:
        r = client.post("/api/jobs", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
    assert client.post("/api/jobs", content=b"[1]", headers={"Content-Type": "application/json"}).status_code == 400
    first = client.post("/api/jobs", json={"kind": "reindex"}, headers={"Idempotency-Key": "nightly-42"})
    second = client.post("/api/jobs", json={"kind": "reindex"}, headers={"Idempotency-Key": "nightly-42"})
    assert first.status_code == second.status_code == 202
    assert first.json()["queued"] and not second.json()["queued"]
    assert first.json()["job"]["job_id"] == second.json()["job"]["job_id"]
    assert first.headers["location"] == f"/api/jobs/{first.json()['job']['job_id']}"
    assert worker.queues.cpu.approximate_count() == 1 and worker.queues.gpu.approximate_count() == 0
    assert client.get("/api/jobs/reindex-api-unknown").json()["error"]["code"] == "job_not_found"
    assert client.get("/api/jobs/..%2Fetc").status_code in (400, 404)
    assert client.get("/api/jobs/BAD ID").json()["error"]["code"] == "invalid_job_id"
    assert client.get("/api/jobs", params={"limit": 0}).json()["error"]["code"] == "invalid_limit"
    # Nothing is embedded: the reindex fails each try and is reported, not hidden.
    worker.run(until_idle=True, idle_timeout=30)
    job = client.get(first.json()["job"]["url"]).json()
    assert job["status"] == "failed" and job["error"]["code"] == "no_embeddings"
    assert len(job["errors"]) == worker.settings.job_max_attempts


def test_two_workers_share_the_queue_without_writing_the_same_output(tmp_path: Path, encoder: ImageEncoder) -> None:
    """Parallel replicas: each embedding job is taken by one worker, every image is embedded once, and
    the index both of them feed ends up holding every image."""
    settings = make_settings(tmp_path, embed_batch_seconds=1, job_visibility_seconds=30, embed_batch_size=8)
    storage = LocalStorage(settings.data_dir)
    queues = open_job_queues(settings)
    items = list(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=48, offset=3000))
    start = datetime.now(UTC) - timedelta(seconds=30)  # six past windows: six jobs, visible at once
    for i, item in enumerate(items):
        accept_upload(storage, queues, settings, item.data, source="test", now=start + timedelta(seconds=i // 8))
    assert queues.gpu.approximate_count() == 6
    # Each worker's first embedding job waits until the other has one too, so the two really run
    # at once (left alone, one thread can take all six short jobs before the other polls).
    both_busy = threading.Barrier(2, timeout=60)
    first = threading.local()

    def embed_together(ctx: JobContext) -> dict[str, Any]:
        if not getattr(first, "done", False):
            first.done = True
            both_busy.wait()
        return run_embed(ctx)

    workers = [
        Worker(
            storage,
            settings,
            queues,
            open_queue(settings, settings.poison_queue_name),
            encoder=encoder,
            worker_id=w,
            handlers={**HANDLERS, "embed": embed_together},
        )
        for w in ("a", "b")
    ]
    threads = [threading.Thread(target=w.run, kwargs={"until_idle": True, "idle_timeout": 20}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    records = JobStore(storage).recent(50)
    embeds = [r for r in records if r.kind == "embed"]
    assert len(embeds) == 6 and all(r.status == "succeeded" and r.attempts == 1 for r in embeds)
    assert {r.worker for r in embeds} == {"a", "b"}  # both took work
    store = EmbeddingStore(storage, encoder.version)
    ids = [i for name in store.shards() for i in store._read_table(name, ["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 48
    assert len(set(store.shards())) == len(store.shards()) >= 6
    version = current_version(storage)
    assert version is not None
    assert load_version(storage, version, tmp_path / "cache").count == 48


def test_gpu_worker_embeds_and_its_reindex_waits_on_the_cpu_queue(tmp_path: Path, encoder: ImageEncoder) -> None:
    """As in Azure, a worker per queue: the GPU one runs the embedding job, whose follow-up reindex goes
    to the CPU queue (not run there by the GPU worker); the CPU worker publishes the index."""
    settings = make_settings(tmp_path, embed_batch_seconds=1, index_refresh_seconds=0, job_retry_seconds=0)
    storage = LocalStorage(settings.data_dir)
    queues = open_job_queues(settings)
    poison = open_queue(settings, settings.poison_queue_name)
    start = datetime.now(UTC) - timedelta(seconds=30)  # a past window: the job is visible at once
    for item in fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=12, offset=4000):
        accept_upload(storage, queues, settings, item.data, source="test", now=start)
    assert (queues.gpu.approximate_count(), queues.cpu.approximate_count()) == (1, 0)
    gpu = Worker(storage, settings, queues, poison, serve="gpu", encoder=encoder)
    assert gpu.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 1}
    assert current_version(storage) is None  # nothing published by the GPU worker
    assert (queues.gpu.approximate_count(), queues.cpu.approximate_count()) == (0, 1)
    [embed] = [r for r in JobStore(storage).recent(10) if r.kind == "embed"]
    reindex_id = embed.result["reindex_job"]
    assert JobStore(storage).get(reindex_id).status == "queued"
    cpu = Worker(storage, settings, queues, poison, serve="cpu", encoder=encoder)
    assert cpu.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 1}
    assert JobStore(storage).get(reindex_id).status == "succeeded"
    version = current_version(storage)
    assert version is not None and load_version(storage, version, tmp_path / "cache").count == 12
    assert queues.approximate_count() == 0 and poison.approximate_count() == 0
