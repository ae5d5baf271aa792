"""The embed loader keeps many storage reads in flight and decodes on threads sized to the cores (issue 21).

Structural checks, not timings: how many requests were in flight at once behind a storage that makes every
request slow, how many requests an image costs, and that batches come out whole and in order whatever
order the reads finish in. The speed itself is `make bench-scale` (bench/results/scale.json).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.scale import LatencyStorage, NoOpEncoder, fill
from job.embeddings import EmbeddingStore, Loaded, decode_workers, embed_pending, job_tag, prefetch_batches
from shared.catalog import Catalog
from tests.conftest import make_settings


def test_many_reads_in_flight_two_reads_per_image_every_image_once(tmp_path: Path) -> None:
    storage = LatencyStorage(tmp_path, latency=0.03)
    ids = fill(storage, 48)
    settings = make_settings(tmp_path, embed_io_workers=16, embed_batch_size=8, embed_shard_size=20)
    encoder = NoOpEncoder()
    storage.reset()
    stats = embed_pending(storage, settings, encoder, only=ids)  # type: ignore[arg-type]
    assert stats.embedded == 48 and not stats.failed
    # the old loader read one image at a time in each of 2 threads: never more than 2 in flight
    assert storage.max_in_flight >= 12, storage.max_in_flight
    # per image: two reads (its pending marker, which holds its record, and its bytes); per shard (24
    # images each): its write and one batch delete of its images' markers. No shard is read, nothing listed.
    assert storage.by_kind == Counter(
        {
            "get embeddings/pending": 48,
            "get uploads": 48,
            "delete_many embeddings/pending": 2,
            "put embeddings/vectors": 2,
        }
    ), storage.by_kind
    embedded = EmbeddingStore(storage, encoder.version).load()
    assert sorted(embedded.ids) == sorted(ids) and len(embedded.ids) == 48
    assert encoder.batches == 6  # whole batches of 8
    # the shards carry the records' catalogue fields: a rebuild needs no request per image
    assert not embedded.unrecorded.any() and (embedded.ingested > 1.7e9).all()

    # Again: every image is found done from its missing marker and its record; no shard is read.
    storage.reset()
    again = embed_pending(storage, settings, encoder, only=ids)  # type: ignore[arg-type]
    assert (again.embedded, again.done, again.failed) == (0, 48, [])
    assert storage.by_kind == Counter({"get embeddings/pending": 48, "get embeddings/records": 48})


def test_batches_come_out_in_order_whatever_order_the_reads_finish(tmp_path: Path) -> None:
    items = [f"item-{i:03d}" for i in range(50)]
    rng = random.Random(7)
    delays = {item: rng.uniform(0, 0.02) for item in items}

    def fetch(item: str) -> str:
        time.sleep(delays[item])
        return item

    def decode(item: str) -> Loaded:
        if item.endswith("7"):  # skipped ones (a removed record, undecodable bytes) are listed as failed
            return Loaded(item, None)
        return Loaded(item, np.full((3, 2, 2), int(item[-3:]), np.float32))

    batches = list(prefetch_batches(items, fetch, decode, 8, io_workers=10, decode_workers=2))
    assert [len(b.ids) + len(b.failed) for b in batches] == [8] * 6 + [2]
    assert [i for b in batches for i in b.ids] == [i for i in items if not i.endswith("7")]
    assert [i for b in batches for i in b.failed] == [i for i in items if i.endswith("7")]
    for batch in batches:
        assert [int(p[0, 0, 0]) for p in batch.pixels] == [int(i[-3:]) for i in batch.ids]


def test_decode_threads_default_to_the_cores_this_process_may_use(tmp_path: Path) -> None:
    assert decode_workers(make_settings(tmp_path)) == len(os.sched_getaffinity(0))
    assert decode_workers(make_settings(tmp_path, embed_decode_workers=3)) == 3


def test_ingest_with_many_in_flight_keeps_order_and_stores_each_image_once(tmp_path: Path) -> None:
    """`clusterlens ingest --workers N`: round trips overlap, results come in the items' order, and two
    copies of the same bytes in flight at once give one image (one added, one duplicate)."""
    from job.datasets import load_fashion_mnist, png_bytes
    from shared.catalog import Catalog
    from shared.ingest import IngestItem, ingest_items

    settings = make_settings(tmp_path)
    pixels, _ = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    data = [png_bytes(pixels[i]) for i in range(30)]
    items = [IngestItem(data=d, source=f"i{i}") for i, d in enumerate(data)]
    items.insert(1, IngestItem(data=data[0], source="again-0"))  # in flight beside its twin
    items.append(IngestItem(data=b"not an image", source="junk"))
    storage = LatencyStorage(tmp_path, latency=0.02)
    results = list(ingest_items(storage, settings, items, workers=8))
    assert [r.source for r in results] == [item.source for item in items]
    assert storage.max_in_flight >= 4, storage.max_in_flight  # one at a time would be 1
    outcomes = [r.status for r in results]
    assert outcomes.count("added") == 30 and outcomes.count("duplicate") == 1 and outcomes[-1] == "quarantined"
    assert sorted(outcomes[:2]) == ["added", "duplicate"] and results[0].id == results[1].id
    assert len(list(Catalog(storage).ids())) == 30


def test_an_image_whose_bytes_are_gone_is_quarantined_not_retried_forever(tmp_path: Path) -> None:
    """Its record points at bytes no longer stored: it goes to quarantine with the reason and leaves the
    catalogue (else every later embed would try it again); the others embed."""
    from shared.catalog import Catalog
    from shared.storage import QUARANTINE, UPLOADS

    storage = LatencyStorage(tmp_path, latency=0.0)
    ids = fill(storage, 6)
    catalog = Catalog(storage)
    storage.delete(UPLOADS, catalog.get(ids[2]).blob)
    stats = embed_pending(storage, make_settings(tmp_path), NoOpEncoder(), only=ids)  # type: ignore[arg-type]
    assert stats.embedded == 5 and stats.failed == [ids[2]]
    assert not catalog.exists(ids[2])
    assert "missing" in storage.get_json(QUARANTINE, f"{ids[2]}.json")["reason"]


def test_stragglers_are_the_pending_images_of_finished_or_missing_jobs_swept_at_most_so_often(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from job.worker import stragglers
    from shared.catalog import Catalog
    from shared.jobs import JobMessage, JobRecord, JobStore

    storage = LatencyStorage(tmp_path, latency=0.0)
    ids = fill(storage, 4)  # ingested with no job: pending under "none"
    catalog, jobs = Catalog(storage), JobStore(storage)
    moved = {}
    for image_id, job in zip(ids[1:], ["embed-batch-live", "embed-batch-done", "embed-batch-gone"], strict=True):
        record = catalog.get(image_id)  # queue it in a job instead: its marker moves to that job's folder
        catalog.remove(record)
        catalog.add(type(record)(**{**record.to_json(), "job": job}))
        moved[image_id] = job
    for job, status in [("embed-batch-live", "running"), ("embed-batch-done", "succeeded")]:
        message = JobMessage(job_id=job, kind="embed", origin="test", created_at=datetime.now(UTC))
        jobs.create(JobRecord.for_message(message).model_copy(update={"status": status}))
    storage.reset()
    found = stragglers(storage)
    live = next(i for i, j in moved.items() if j == "embed-batch-live")
    assert found == {ids[0]: None, **{i: j for i, j in moved.items() if i != live}}
    # one listing of the markers, one lookup per job, one listing of the live backfills: no shard, no record read
    expected = {"list embeddings/pending": 1, "get jobs/records": 3, "list jobs/backfills": 1}
    assert storage.by_kind == Counter(expected), storage.by_kind

    settings = make_settings(tmp_path, straggler_sweep_seconds=600)
    assert len(stragglers(storage, settings)) == 3  # the first sweep runs
    assert stragglers(storage, settings) == {}  # the next, within 10 minutes, does not
    # embedding them drops their markers: the next sweep finds nothing
    embed_pending(storage, settings, NoOpEncoder(), only=sorted(found), job=found)  # type: ignore[arg-type]
    assert stragglers(storage) == {}
    assert catalog.pending_by_job() == {"embed-batch-live": [live]}


def test_a_retried_job_skips_what_its_killed_try_stored_though_the_markers_were_left(tmp_path: Path) -> None:
    storage = LatencyStorage(tmp_path, latency=0.0)
    ids = fill(storage, 12)
    settings = make_settings(tmp_path, embed_batch_size=4, embed_shard_size=4)
    encoder = NoOpEncoder()
    store = EmbeddingStore(storage, encoder.version)
    # the killed try: a shard of its first 4 images stored, the process gone before their markers went
    first = sorted(ids)[:4]
    records = [Catalog(storage).get(i) for i in first]
    store.write_shard(first, np.zeros((4, 1280), np.float32), np.zeros((4, 1000), np.float32), records, "embed-x")
    store.write_shard(first[:1], np.zeros((1, 1280), np.float32), np.zeros((1, 1000), np.float32), None, "other")
    storage.trace = []
    stats = embed_pending(storage, settings, encoder, only=ids, tag="embed-x")  # type: ignore[arg-type]
    assert (stats.embedded, stats.done) == (8, 4)
    # only its own earlier shard was read (not another job's), and every marker is gone
    reads = [t for t in storage.trace if t.startswith("get embeddings/vectors")]
    assert len(reads) == 1 and job_tag("embed-x") in reads[0], reads
    assert Catalog(storage).pending_by_job() == {}
    rows = [i for name in store.shards() if job_tag("other") not in name for i in store.load([name]).ids]
    assert sorted(rows) == sorted(ids)  # each image once across this job's shards
