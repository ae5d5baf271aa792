"""Queues, job ids, triggers and the worker loop, on the local backend and on Azurite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

from functions import blob_ingest, timers
from job.datasets import fashion_mnist_items
from job.worker import JobContext, Worker, install_signal_handlers
from shared.catalog import Catalog
from shared.jobs import JobKind, JobMessage, JobRecord, JobStore, api_job, enqueue, schedule_job, timer_slot
from shared.queues import JobQueue, LostMessage, QueueMessage
from tests.jobs_support import Backend, make_backend

BACKENDS = ["local", pytest.param("azure", marks=pytest.mark.integration)]
ROOT = Path(__file__).resolve().parent.parent
KINDS: tuple[JobKind, ...] = ("embed", "reindex", "train_head", "retrain", "analyse")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    azurite = request.getfixturevalue("azurite") if request.param == "azure" else None
    return make_backend(request.param, tmp_path, azurite, job_retry_seconds=0, job_max_attempts=3)


HOLD = 3  # s: visibility timeouts and delays below; Azure Storage counts them in whole seconds


def _poll(receive: Callable[[], QueueMessage | None], what: str, timeout: float = 60) -> tuple[QueueMessage, float]:
    """Receive until a message comes; returns it and how long that took. Fails after ``timeout`` s."""
    started = time.monotonic()
    while (got := receive()) is None:
        assert time.monotonic() - started < timeout, f"{what}: nothing after {timeout} s"
        time.sleep(0.05)
    return got, time.monotonic() - started


def test_queue_hides_taken_messages_and_honours_only_the_latest_receipt(backend: Backend) -> None:
    """Claims and delays are checked by polling against deadlines, not by sleeping a fixed time: a slow
    machine only makes the polls fewer, and a message handed out before its time is up always fails."""
    q = backend.queue
    q.send("a")
    taken = time.monotonic()
    first = q.receive(visibility_timeout=HOLD)
    assert first is not None and first.content == "a" and first.dequeue_count == 1
    # Hidden while held; once the holder "died" (never renewed) it comes back, and not sooner.
    second, _ = _poll(lambda: q.receive(visibility_timeout=30), "a claim whose holder died")
    held = time.monotonic() - taken
    assert held >= HOLD - 1, f"handed out again after {held:.2f} s of a {HOLD} s claim"
    assert second.content == "a" and second.dequeue_count == 2
    with pytest.raises(LostMessage):
        q.delete(first)  # the first claim is gone
    renewed = q.extend(second, 30)
    with pytest.raises(LostMessage):
        q.extend(second, 30)  # a receipt works once
    q.delete(renewed)
    assert q.approximate_count() == 0
    sent = time.monotonic()
    q.send("later", delay=HOLD)
    assert q.approximate_count() == 1  # counted while it waits
    late, _ = _poll(lambda: q.receive(visibility_timeout=5), "a delayed message")
    waited = time.monotonic() - sent
    assert waited >= HOLD - 1, f"a message sent with a {HOLD} s delay came after {waited:.2f} s"
    assert late.content == "later"


def _blob_event(name: str, data: bytes, metadata: dict[str, str] | None = None) -> func.blob.InputStream:
    """What the Functions host hands the blob trigger for an Event Grid BlobCreated event."""
    return func.blob.InputStream(
        data=data, name=f"uploads/{name}", length=len(data), uri=f"https://x/uploads/{name}", metadata=metadata or {}
    )


def test_same_blob_event_three_times_gives_one_record_and_one_job(backend: Backend, use_env: Any) -> None:
    use_env(backend)
    item = next(iter(fashion_mnist_items(backend.settings.fashion_mnist_dir, "train", limit=1)))
    for _ in range(3):
        blob_ingest.ingest_blob(_blob_event("shirt.png", item.data, {"label": str(item.label), "caption": "a top"}))
    assert backend.record_count() == 1
    assert len(backend.job_ids()) == 1 and backend.job_ids()[0].startswith("embed-batch-")
    assert backend.queues.gpu.approximate_count() == 1 and backend.queue.approximate_count() == 0  # embed: GPU
    job = JobStore(backend.storage).get(backend.job_ids()[0])
    record = next(Catalog(backend.storage).records())
    assert JobStore(backend.storage).items(job.job_id) == [record.id]
    assert record.label == item.label and record.caption == "a top" and record.job == job.job_id


def test_timer_firings_queue_one_job_per_schedule_slot(backend: Backend, use_env: Any) -> None:
    schedule = "0 */5 * * * *"
    at = datetime(2026, 11, 22, 10, 5, 0, 300_000, tzinfo=UTC)
    assert timer_slot(schedule, at) == datetime(2026, 11, 22, 10, 5, tzinfo=UTC)
    assert timer_slot(schedule, datetime(2026, 11, 22, 10, 4, 59, 500_000, tzinfo=UTC)).minute == 5  # a bit early
    first, queued = schedule_job(backend.storage, backend.queues, "reindex", schedule, at)
    assert queued
    _, again = schedule_job(backend.storage, backend.queues, "reindex", schedule, at.replace(second=1))  # duplicate
    late = datetime(2026, 11, 22, 10, 8, tzinfo=UTC)  # past due: still the 10:05 slot
    _, past_due = schedule_job(backend.storage, backend.queues, "reindex", schedule, late)
    assert not again and not past_due and backend.queue.approximate_count() == 1
    _, next_slot = schedule_job(backend.storage, backend.queues, "reindex", schedule, at.replace(minute=10))
    assert next_slot and backend.queue.approximate_count() == 2
    # The real handlers, fired twice in one slot (as a restarted host does): one more job each.
    use_env(backend)
    before = set(backend.job_ids())
    for past in (False, True):
        timers.reindex_timer(func.timer.TimerRequest(past_due=past))
        timers.retrain_timer(func.timer.TimerRequest(past_due=past))
    added = set(backend.job_ids()) - before
    assert len(added) == 2 and {j.split("-")[0] for j in added} == {"reindex", "retrain"}
    assert backend.queue.approximate_count() == 4 and backend.queues.gpu.approximate_count() == 0  # CPU kinds


def test_an_enqueue_that_died_before_sending_is_completed_by_the_next(backend: Backend) -> None:
    message = JobMessage(job_id="reindex-api-x1", kind="reindex", origin="api", created_at=datetime.now(UTC))
    assert JobStore(backend.storage).create(JobRecord.for_message(message))  # ... and then the process died
    _, queued = enqueue(backend.storage, backend.queues, message)
    assert queued and backend.queue.approximate_count() == 1
    _, queued = enqueue(backend.storage, backend.queues, message)
    assert not queued and backend.queue.approximate_count() == 1


def test_a_message_that_always_fails_ends_in_the_poison_queue_with_its_error(backend: Backend) -> None:
    """A reindex with nothing embedded fails each try; after job_max_attempts it is poisoned."""
    message = JobMessage(job_id="reindex-api-doomed", kind="reindex", origin="api", created_at=datetime.now(UTC))
    enqueue(backend.storage, backend.queues, message)
    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison)
    stats = worker.run(until_idle=True, idle_timeout=30)
    assert stats.outcomes == {"retrying": 2, "failed": 1}
    assert backend.queue.approximate_count() == 0
    poisoned = backend.poison.peek()
    assert len(poisoned) == 1
    body = json.loads(poisoned[0])
    assert body["job_id"] == "reindex-api-doomed" and body["attempts"] == 3
    assert body["error"]["code"] == "no_embeddings" and "embed" in body["error"]["message"]
    assert JobMessage.from_text(body["message"]) == message  # the original, to replay after a fix
    record = JobStore(backend.storage).get("reindex-api-doomed")
    assert record.status == "failed" and [e.attempt for e in record.errors] == [1, 2, 3]
    assert record.error is not None and record.error.code == "no_embeddings"


def test_invalid_messages_and_finished_jobs_are_not_run(backend: Backend) -> None:
    calls: list[str] = []

    def handler(ctx: JobContext) -> dict[str, Any]:
        calls.append(ctx.message.job_id)
        return {"ok": True}

    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers={"reindex": handler})
    backend.queue.send("{not json")
    backend.queue.send(json.dumps({"version": 99, "job_id": "reindex-api-v99", "kind": "reindex"}))
    message = JobMessage(job_id="reindex-api-once", kind="reindex", origin="api", created_at=datetime.now(UTC))
    enqueue(backend.storage, backend.queues, message)
    backend.queue.send(message.to_text())  # the same job delivered twice
    stats = worker.run(until_idle=True, idle_timeout=30)
    assert calls == ["reindex-api-once"]
    assert stats.outcomes == {"poisoned": 2, "succeeded": 1, "duplicate": 1}
    assert all(json.loads(p)["error"]["code"] == "invalid_message" for p in backend.poison.peek())


def test_a_long_job_keeps_its_message_hidden_until_it_is_done(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat renews the claim: a job three times longer than the visibility timeout is never
    handed to a second worker, and its message is gone once the result is written.

    The job runs until three visibility timeouts have passed by the clock (however slow the machine),
    and the renewals are counted: it is the heartbeat that kept the message hidden.
    """
    backend.settings.job_visibility_seconds = HOLD  # renewed every second: 2 s of slack for each renewal
    seen: list[str] = []
    renewals: list[float] = []
    extend = backend.queue.extend

    def counted_extend(message: QueueMessage, visibility: int) -> QueueMessage:
        renewed = extend(message, visibility)
        renewals.append(time.monotonic())
        return renewed

    monkeypatch.setattr(backend.queue, "extend", counted_extend)

    def slow(ctx: JobContext) -> dict[str, Any]:
        deadline = time.monotonic() + 3 * HOLD
        while time.monotonic() < deadline:
            stolen = backend.queue.receive(visibility_timeout=30)  # a second worker polling
            if stolen is not None:
                seen.append(stolen.content)
            time.sleep(0.25)
        return {"slept": 3 * HOLD}

    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers={"reindex": slow})
    message = JobMessage(job_id="reindex-api-slow", kind="reindex", origin="api", created_at=datetime.now(UTC))
    enqueue(backend.storage, backend.queues, message)
    assert worker.run(max_jobs=1).outcomes == {"succeeded": 1}
    assert seen == []
    assert len(renewals) >= 2, renewals  # 9 s on a 3 s claim: it could not have survived without them
    assert backend.queue.approximate_count() == 0
    assert JobStore(backend.storage).get("reindex-api-slow").result == {"slept": 3 * HOLD}


def test_recent_jobs_are_the_newest_whatever_their_names(backend: Backend) -> None:
    """Listing is by creation time: record names sort by id, which says nothing about age."""
    start = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    for i in range(110):  # older jobs with names that sort last, more than any read-everything cap
        old = JobMessage(job_id=f"train_head-api-{i:03d}", kind="train_head", origin="api", created_at=start)
        enqueue(backend.storage, backend.queues, old)
    for i in range(3):
        new = JobMessage(
            job_id=f"embed-batch-{i:03d}", kind="embed", origin="api", created_at=start.replace(hour=9, minute=i)
        )
        enqueue(backend.storage, backend.queues, new)
    recent = JobStore(backend.storage).recent(3)
    assert [r.job_id for r in recent] == ["embed-batch-002", "embed-batch-001", "embed-batch-000"]
    assert len(JobStore(backend.storage).recent(200)) == 113


def test_a_worker_stopped_mid_job_with_requeue_queues_the_job_again_at_once(backend: Backend) -> None:
    """`clusterlens demo`'s worker (`--requeue-on-stop`): a stop signal interrupts the running job,
    which is queued again as new (visible now, its try not counted); the next worker runs it."""
    calls: list[int] = []

    def analyse(ctx: JobContext) -> dict[str, Any]:
        calls.append(ctx.record.attempts)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the user stops the demo
            time.sleep(30)  # interrupted: the test would take 30 s more otherwise
        return {"ran": len(calls)}

    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers={"analyse": analyse})
    message = JobMessage(job_id="analyse-api-stopped", kind="analyse", origin="api", created_at=datetime.now(UTC))
    enqueue(backend.storage, backend.queues, message)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        install_signal_handlers(worker, requeue=True)
        t0 = time.monotonic()
        assert worker.run().outcomes == {"handed_back": 1}  # and the loop stopped
        assert time.monotonic() - t0 < 10
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    record = JobStore(backend.storage).get("analyse-api-stopped")
    assert record.status == "queued" and record.progress == {"stage": "interrupted, queued again"}
    again = backend.queue.receive(visibility_timeout=30)
    assert again is not None and again.dequeue_count == 1 and JobMessage.from_text(again.content) == message
    following = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers={"analyse": analyse})
    assert following.process(backend.queue, again) == "succeeded"
    assert calls == [1, 1] and backend.queue.approximate_count() == 0
    assert JobStore(backend.storage).get("analyse-api-stopped").result == {"ran": 2}


# -- two queues: the GPU kinds on one, the rest on the other ---------------------------------------


def _kinds(queue: JobQueue) -> list[str]:
    """The kinds of the job messages visible on a queue."""
    return sorted(JobMessage.from_text(text).kind for text in queue.peek())


def _recorder(calls: list[str]) -> dict[str, Callable[[JobContext], dict[str, Any]]]:
    """A handler for every kind that notes the kind it ran (the jobs themselves are tested elsewhere)."""

    def handler(ctx: JobContext) -> dict[str, Any]:
        calls.append(ctx.message.kind)
        return {"ran": ctx.message.kind}

    return dict.fromkeys(KINDS, handler)


def test_each_kind_is_sent_to_its_queue(backend: Backend) -> None:
    """embed and train_head to the GPU queue; reindex, retrain and analyse to the CPU queue."""
    prefix = backend.settings.container_prefix
    assert (backend.queues.cpu.name, backend.queues.gpu.name) == (f"{prefix}jobs", f"{prefix}jobs-gpu")
    for kind in KINDS:
        enqueue(backend.storage, backend.queues, api_job(kind, {}))
    assert _kinds(backend.queues.gpu) == ["embed", "train_head"]
    assert _kinds(backend.queues.cpu) == ["analyse", "reindex", "retrain"]
    assert backend.queues.approximate_count() == 5
    assert backend.poison.approximate_count() == 0


def test_a_worker_on_both_queues_runs_every_kind(backend: Backend) -> None:
    calls: list[str] = []
    for kind in KINDS:
        enqueue(backend.storage, backend.queues, api_job(kind, {}))
    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers=_recorder(calls))
    assert [q.name for q in worker.serving] == [backend.queues.gpu.name, backend.queues.cpu.name]
    assert worker.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 5}
    assert sorted(calls) == sorted(KINDS)
    assert backend.queues.approximate_count() == 0


def test_a_cpu_worker_moves_a_gpu_job_to_the_gpu_queue_without_running_it(backend: Backend) -> None:
    """A train_head message on the CPU queue (queued by older code, or before a settings change): the
    CPU worker (no torch in its image) sends it to the GPU queue and deletes its copy; the GPU worker
    runs it. Nothing is run on the wrong worker and nothing is lost."""
    calls: list[str] = []
    stray = api_job("train_head", {"epochs": 3})
    assert JobStore(backend.storage).create(JobRecord.for_message(stray))
    backend.queues.cpu.send(stray.to_text())  # where the old code put every job
    enqueue(backend.storage, backend.queues, api_job("reindex", {}))
    cpu = Worker(
        backend.storage, backend.settings, backend.queues, backend.poison, serve="cpu", handlers=_recorder(calls)
    )
    assert [q.name for q in cpu.serving] == [backend.queues.cpu.name]
    assert cpu.run(until_idle=True, idle_timeout=30).outcomes == {"rerouted": 1, "succeeded": 1}
    assert calls == ["reindex"]
    assert backend.queues.cpu.approximate_count() == 0
    assert [JobMessage.from_text(m) for m in backend.queues.gpu.peek()] == [stray]  # the same message, once
    assert JobStore(backend.storage).get(stray.job_id).status == "queued"
    gpu = Worker(
        backend.storage, backend.settings, backend.queues, backend.poison, serve="gpu", handlers=_recorder(calls)
    )
    assert gpu.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 1}
    assert calls == ["reindex", "train_head"]
    assert JobStore(backend.storage).get(stray.job_id).status == "succeeded"
    assert backend.queues.approximate_count() == 0 and backend.poison.approximate_count() == 0


def test_a_gpu_worker_moves_a_cpu_job_to_the_cpu_queue(backend: Backend) -> None:
    calls: list[str] = []
    stray = api_job("analyse", {})
    assert JobStore(backend.storage).create(JobRecord.for_message(stray))
    backend.queues.gpu.send(stray.to_text())
    gpu = Worker(
        backend.storage, backend.settings, backend.queues, backend.poison, serve="gpu", handlers=_recorder(calls)
    )
    assert gpu.run(until_idle=True, idle_timeout=30).outcomes == {"rerouted": 1}
    assert calls == [] and _kinds(backend.queues.cpu) == ["analyse"] and backend.queues.gpu.approximate_count() == 0


def test_a_busy_queue_does_not_starve_the_other(backend: Backend) -> None:
    """Six GPU jobs and two CPU jobs: a worker on both takes the queues in turn (the GPU queue first),
    so the CPU jobs are among its first four, not after the six."""
    calls: list[str] = []
    for _ in range(6):
        enqueue(backend.storage, backend.queues, api_job("embed", {}))
    for _ in range(2):
        enqueue(backend.storage, backend.queues, api_job("analyse", {}))
    worker = Worker(backend.storage, backend.settings, backend.queues, backend.poison, handlers=_recorder(calls))
    assert worker.run(max_jobs=4).outcomes == {"succeeded": 4}
    assert calls == ["embed", "analyse", "embed", "analyse"]
    assert worker.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 4}
    assert calls[4:] == ["embed"] * 4


def test_one_queue_for_every_kind_when_both_names_are_the_same(tmp_path: Path) -> None:
    backend = make_backend("local", tmp_path, None, gpu_queue_name="jobs")
    assert backend.queues.cpu is backend.queues.gpu and len(backend.queues.distinct()) == 1
    for kind in KINDS:
        enqueue(backend.storage, backend.queues, api_job(kind, {}))
    assert backend.queue.approximate_count() == 5 and _kinds(backend.queue) == sorted(KINDS)
    assert not (tmp_path / "data" / "queues" / "jobs-gpu").exists()
    calls: list[str] = []
    # Either worker takes every kind: there is nowhere else to send one.
    cpu = Worker(
        backend.storage, backend.settings, backend.queues, backend.poison, serve="cpu", handlers=_recorder(calls)
    )
    assert [q.name for q in cpu.serving] == ["jobs"]
    assert cpu.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 5}
    enqueue(backend.storage, backend.queues, api_job("reindex", {}))
    gpu = Worker(
        backend.storage, backend.settings, backend.queues, backend.poison, serve="gpu", handlers=_recorder(calls)
    )
    assert gpu.run(until_idle=True, idle_timeout=30).outcomes == {"succeeded": 1}
    assert sorted(calls[:5]) == sorted(KINDS) and calls[5:] == ["reindex"]
    assert backend.queue.approximate_count() == 0 and backend.poison.approximate_count() == 0


@pytest.mark.parametrize(
    "command",
    [["-m", "job", "--idle-timeout", "30"], ["-m", "tools.cli", "worker", "--until-idle", "--idle-timeout", "30"]],
    ids=["python -m job", "clusterlens worker"],
)
def test_the_worker_commands_take_the_queues_given(tmp_path: Path, command: list[str]) -> None:
    """``--queues cpu`` (the Azure CPU job): the train_head message is moved to the GPU queue, not run."""
    backend = make_backend("local", tmp_path, None)
    stray = api_job("train_head", {})
    assert JobStore(backend.storage).create(JobRecord.for_message(stray))
    backend.queues.cpu.send(stray.to_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")} | backend.env
    proc = subprocess.run(
        [sys.executable, *command, "--queues", "cpu", "--max-jobs", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "queues jobs (" in out and "queues jobs-gpu" not in out, out  # says which it takes: the CPU one
    assert '"rerouted": 1}' in out, out
    assert [JobMessage.from_text(m) for m in backend.queues.gpu.peek()] == [stray]
    assert backend.queues.cpu.approximate_count() == 0
    assert JobStore(backend.storage).get(stray.job_id).status == "queued"
