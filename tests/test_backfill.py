"""A backfill shared by parallel workers: the split into units, and two worker processes sharing one."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from job.backfill import claimed, finish_unit, plan_units, read_unit, reindex_job_id, split, unit_blob, unit_job_id
from job.datasets import fashion_mnist_items
from job.worker import stragglers
from shared.catalog import Catalog
from shared.ingest import ingest_items
from shared.jobs import JobMessage, JobRequest, JobStore, api_job, enqueue
from shared.storage import EMBEDDINGS, JOBS
from tests.azurite import Azurite
from tests.jobs_support import Backend, make_backend
from tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def _fake_pending(backend: Backend, count: int, jobs: tuple[str | None, ...]) -> dict[str, str | None]:
    """Pending markers for ``count`` made-up image ids, spread over ``jobs``; id -> its marker's job."""
    out: dict[str, str | None] = {}
    for i in range(count):
        image_id = hashlib.sha256(str(i).encode()).hexdigest()[:32]
        job = jobs[i % len(jobs)]
        backend.storage.put_json(EMBEDDINGS, Catalog.pending_name(image_id, job), {"id": image_id})
        out[image_id] = job
    return out


def test_plan_units_is_deterministic_disjoint_and_complete() -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(103)]
    pending: dict[str | None, list[str]] = {None: ids[:50], "embed-batch-1": ids[50:]}
    units = plan_units(pending, 10)
    assert [len(u.ids) for u in units] == [10] * 10 + [3]
    flat = [i for u in units for i in u.ids]
    assert flat == sorted(ids)  # complete, disjoint, consecutive in id order
    assert units == plan_units({"embed-batch-1": ids[50:][::-1], None: ids[:50][::-1]}, 10)  # any listing order
    assert all(u.job_of()[i] == (None if i in ids[:50] else "embed-batch-1") for u in units for i in u.ids)
    with pytest.raises(ValueError):
        plan_units(pending, 0)


def test_split_writes_one_blob_per_unit_and_a_retry_queues_nothing_new(tmp_path: Path) -> None:
    backend = make_backend("local", tmp_path, None)
    marked = _fake_pending(backend, 95, (None, "embed-batch-20250101T000000"))
    backfill = "embed-api-0123456789abcdef"
    manifest = split(backend.storage, backend.queues, backfill, 20)
    assert manifest["images"] == 95 and len(manifest["units"]) == 5
    assert len(list(backend.storage.list(JOBS, f"backfills/{backfill}/units/"))) == 5  # one blob per unit
    seen: list[str] = []
    for index in range(5):
        unit, units = read_unit(backend.storage, backfill, index)
        assert units == 5 and unit.job_of() == {i: marked[i] for i in unit.ids}
        seen += unit.ids
    assert sorted(seen) == sorted(marked)
    messages = [JobMessage.from_text(m) for m in backend.queues.gpu.peek()]
    assert sorted(m.job_id for m in messages) == [unit_job_id(backfill, i) for i in range(5)]
    assert all(m.kind == "embed" and m.params == {"backfill_id": backfill, "unit": m.params["unit"]} for m in messages)

    # The split's message delivered again, after more images arrived: the same units, none queued twice.
    _fake_pending(backend, 120, (None,))
    assert split(backend.storage, backend.queues, backfill, 20) == manifest
    assert backend.queues.gpu.approximate_count() == 5
    assert backend.storage.exists(JOBS, unit_blob(backfill, 4))


def test_stragglers_leave_a_running_backfills_units_alone_and_its_last_unit_queues_one_reindex(
    tmp_path: Path,
) -> None:
    backend = make_backend("local", tmp_path, None)
    marked = _fake_pending(backend, 60, (None,))  # no job: every one a straggler, were it not for the backfill
    backfill = "embed-api-feedface00000000"
    split(backend.storage, backend.queues, backfill, 20)
    assert len(claimed(backend.storage)) == 3
    assert stragglers(backend.storage) == {}  # every unit is queued: the replicas will embed them
    first, _ = read_unit(backend.storage, backfill, 0)
    assert finish_unit(backend.storage, backend.queues, backfill, 0, 3) is None
    assert stragglers(backend.storage) == dict.fromkeys(first.ids)  # a done unit holds nothing
    failed = JobStore(backend.storage).get(unit_job_id(backfill, 1))
    failed.status = "failed"
    JobStore(backend.storage).save(failed)
    assert len(claimed(backend.storage)) == 1  # a unit failed for good: its images are stragglers again
    assert finish_unit(backend.storage, backend.queues, backfill, 1, 3) is None
    assert finish_unit(backend.storage, backend.queues, backfill, 2, 3) == reindex_job_id(backfill)
    assert finish_unit(backend.storage, backend.queues, backfill, 2, 3) == reindex_job_id(backfill)  # a retry
    assert [JobMessage.from_text(m).job_id for m in backend.queues.cpu.peek()] == [reindex_job_id(backfill)]
    assert claimed(backend.storage) == [] and len(stragglers(backend.storage)) == len(marked)


def test_a_backfill_is_asked_for_over_http_and_from_the_cli(
    tmp_path: Path, use_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    request = JobRequest.model_validate({"kind": "embed", "params": {"backfill": True}})
    assert request.message().params == {"backfill": True}
    backend = make_backend("local", tmp_path, None)
    use_env(backend)
    assert cli_main(["embed", "--backfill"]) == 0
    assert "units of 10,000" in capsys.readouterr().out
    (message,) = [JobMessage.from_text(m) for m in backend.queues.gpu.peek()]
    assert message.kind == "embed" and message.params == {"backfill": True}


@pytest.mark.integration
def test_two_worker_processes_share_one_backfill_and_embed_every_image_once(tmp_path: Path, azurite: Azurite) -> None:
    """Two ``python -m job`` processes on one Azurite account: the backfill of 300 real Fashion-MNIST
    images, in units of 25, is embedded exactly once, both took units, and one reindex publishes it."""
    backend = make_backend(
        "azure",
        tmp_path,
        azurite,
        embed_unit_size=25,
        image_size=64,
        embed_batch_size=25,
        embed_decode_workers=1,
        embed_io_workers=8,
        ort_intra_op_threads=1,
        job_poll_seconds=0.2,
        model_dir=str(ROOT / "models"),
    )
    items = fashion_mnist_items(backend.settings.fashion_mnist_dir, "train", limit=300)
    added = [r.id for r in ingest_items(backend.storage, backend.settings, items, workers=16) if r.status == "added"]
    assert len(added) >= 290
    record, _ = enqueue(backend.storage, backend.queues, api_job("embed", {"backfill": True}))

    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")} | backend.env
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as out:
            command = [sys.executable, "-m", "job", "--queues", "all", "--idle-timeout", "20"]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    started = time.monotonic()
    for proc in procs:
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = [log.read_text() for log in logs]
    assert all(proc.returncode == 0 for proc in procs), text
    print(f"two workers: {time.monotonic() - started:.1f} s")

    store = JobStore(backend.storage)
    split_result = store.get(record.job_id).result
    assert split_result["images"] == len(added) and split_result["units"] == -(-len(added) // 25)
    units = [store.get(unit_job_id(record.job_id, i)) for i in range(split_result["units"])]
    assert all(u.status == "succeeded" for u in units), [u.error for u in units]
    by_worker = Counter(u.worker for u in units)
    assert len(by_worker) == 2, by_worker  # both processes took units

    counts: Counter[str] = Counter()
    for name in backend.storage.list(EMBEDDINGS, "vectors/"):
        table = pq.read_table(io.BytesIO(backend.storage.get(EMBEDDINGS, name)), columns=["id"])
        counts.update(table["id"].to_pylist())
    assert [i for i, n in counts.items() if n > 1] == []  # no image embedded twice
    assert sorted(counts) == sorted(added)  # none missing
    assert Catalog(backend.storage).pending_by_job() == {}  # no marker left
    reindexed = store.get(reindex_job_id(record.job_id))
    assert reindexed.status == "succeeded" and reindexed.result["count"] == len(added), reindexed
    assert [r for r in store.recent(100) if r.kind == "reindex"] == [reindexed]  # one reindex, not one per unit
