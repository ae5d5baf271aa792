"""The job worker: take a message, run its job with the shared library, delete it when the result is durable.

One loop for both homes: the Azure Container Apps jobs (``python -m job``, KEDA starts executions
while their queue has messages) and ``clusterlens worker`` on the local backend. Jobs travel on two
queues (:class:`shared.queues.JobQueues`): in Azure the GPU job runs ``--queues gpu`` and the CPU job
``--queues cpu``; locally one worker takes both, polling them in turn. A message found on a queue
whose worker does not serve its kind (queued by older code, or before a settings change) is sent on
to its kind's queue and deleted here, never run on the wrong image.

Delivery is at least once, so every job is idempotent: embedding skips images already embedded,
reindex skips an index already built from the same inputs, and a message whose job already
finished is dropped. While a job runs, a heartbeat thread keeps its message hidden; a worker that
dies (or is killed) stops renewing it, and the message comes back after ``job_visibility_seconds``
for another try. A failed try is retried after a growing delay; after ``job_max_attempts`` tries
(failed or died) the message goes to the poison queue with its error and the job is marked failed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from shared.errors import BadRequest, ClusterlensError, NotFound
from shared.jobs import FINISHED, JobError, JobKind, JobMessage, JobRecord, JobStore, enqueue, follow_up_reindex
from shared.queues import JobQueue, JobQueues, LostMessage, QueueMessage, Serve
from shared.settings import Settings
from shared.storage import JOBS, Storage

if TYPE_CHECKING:
    from job.embeddings import EmbedStats
    from shared.encoder import ImageEncoder

log = logging.getLogger(__name__)


class JobInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an error, not an Exception
    """Raised in a running job to stop it now: the worker puts the job back on the queue and stops."""


class PermanentJobError(ClusterlensError):
    """A job that cannot succeed however often it is tried: failed at once, not retried."""

    code = "job_not_possible"
    status = 422


@dataclass
class JobContext:
    """What a job handler gets: the message, storage, settings, and a way to report progress."""

    message: JobMessage
    record: JobRecord
    storage: Storage
    settings: Settings
    queues: JobQueues  # where follow-up jobs are queued (each on its kind's queue)
    store: JobStore
    encoder_factory: Callable[[], ImageEncoder]
    _saved_at: float = 0.0

    def progress(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        """Record progress; written to the job record at most every two seconds."""
        self.record.progress.update({"done": done, **({"total": total} if total is not None else {})})
        if stage:
            self.record.progress["stage"] = stage
        now = time.monotonic()
        if now - self._saved_at >= 2.0:
            self._saved_at = now
            self.store.save(self.record)


Handler = Callable[[JobContext], dict[str, Any]]


def run_embed(ctx: JobContext) -> dict[str, Any]:
    """Embed the job's images (those its uploads listed), or every pending image with ``params.all``;
    with ``params.backfill``, split every pending image into units for the replicas (:mod:`job.backfill`);
    with ``params.unit``, embed that unit of a backfill."""
    if ctx.message.params.get("backfill"):
        return run_backfill_split(ctx)
    if "unit" in ctx.message.params:
        return run_backfill_unit(ctx)
    ids = None if ctx.message.params.get("all") else ctx.store.items(ctx.message.job_id)
    stats = _embed(ctx, ids, ctx.message.job_id)
    out: dict[str, Any] = {
        "images": None if ids is None else len(ids),
        "embedded": stats.embedded,
        "failed": len(stats.failed),
        "shards": stats.shards,
        "seconds": stats.seconds,
    }
    # A retry queues the reindex too: an earlier try may have embedded every image and died before
    # (or while) queuing it, and then this try embeds nothing.
    if stats.embedded or ctx.record.attempts > 1:
        follow, delay = _follow_up(ctx)
        enqueue(ctx.storage, ctx.queues, follow, delay=delay)
        out["reindex_job"] = follow.job_id
    return out


def run_backfill_split(ctx: JobContext) -> dict[str, Any]:
    """List the pending images once, cut them into units, queue one embed job per unit."""
    from job.backfill import split

    ctx.progress(0, None, "split")
    manifest = split(ctx.storage, ctx.queues, ctx.message.job_id, ctx.settings.embed_unit_size)
    return {"images": manifest["images"], "units": len(manifest["units"]), "unit_size": manifest["unit_size"]}


def run_backfill_unit(ctx: JobContext) -> dict[str, Any]:
    """Embed one unit of a backfill: exactly its ids (those embedded already are skipped); the unit
    that finds every unit done queues the backfill's one reindex."""
    from job.backfill import finish_unit, read_unit

    backfill_id, index = str(ctx.message.params["backfill_id"]), int(ctx.message.params["unit"])
    unit, units = read_unit(ctx.storage, backfill_id, index)
    stats = _embed(ctx, unit.ids, unit.job_of())
    reindex_job = finish_unit(ctx.storage, ctx.queues, backfill_id, index, units)
    return {
        "backfill": backfill_id,
        "unit": index,
        "images": len(unit.ids),
        "embedded": stats.embedded,
        "done_before": stats.done,
        "failed": len(stats.failed),
        "shards": stats.shards,
        "seconds": stats.seconds,
        **({"reindex_job": reindex_job} if reindex_job else {}),
    }


def _follow_up(ctx: JobContext) -> tuple[JobMessage, float]:
    """The reindex that publishes an embedding job's images, and how long to hide its message.

    Embedding jobs finishing within two seconds of each other share one reindex. The id is saved
    in the job's record before it is queued, and a retry queues that same id again, so an enqueue
    cut short between its record and its message is completed (:func:`shared.jobs.enqueue`)
    instead of leaving a job that stays queued forever.
    """
    chosen = ctx.record.progress.get("reindex_job")
    if isinstance(chosen, str):
        origin = f"job:{ctx.message.job_id}"
        return JobMessage(job_id=chosen, kind="reindex", origin=origin, created_at=datetime.now(UTC)), 0.0
    follow, delay = follow_up_reindex(datetime.now(UTC), 2, ctx.message.job_id)
    ctx.record.progress["reindex_job"] = follow.job_id
    ctx.store.save(ctx.record)
    return follow, delay


def _embed(ctx: JobContext, ids: list[str] | None, job: str | None | dict[str, str | None] = None) -> EmbedStats:
    """Embed ``ids`` (None: every pending image), queued in ``job`` (or each id's), reporting progress."""
    from job.embeddings import embed_pending

    done = [0]
    total: list[int | None] = [None]

    def on_total(n: int) -> None:
        total[0] = n
        ctx.progress(0, n, "embed")

    def step(n: int) -> None:
        done[0] += n
        ctx.progress(done[0], total[0], "embed")

    encoder = ctx.encoder_factory()
    return embed_pending(
        ctx.storage, ctx.settings, encoder, progress=step, on_total=on_total, only=ids, job=job, tag=ctx.message.job_id
    )


SWEEP_STAMP = "sweeps/stragglers.json"


def stragglers(storage: Storage, settings: Settings | None = None) -> dict[str, str | None]:
    """Images not embedded yet whose embedding job is not going to do it (finished, lost, or none),
    each with the job it was queued in.

    Lists the pending markers (what is left to embed, grouped by job) and looks up each job once;
    no shard is read. With ``settings``, a sweep that ran less than ``settings.straggler_sweep_seconds``
    ago is not repeated (an empty answer): during a long backfill the markers number in millions, and
    every reindex (one per upload window) would list them all.
    """
    from shared.catalog import Catalog

    now = time.time()
    if settings is not None and settings.straggler_sweep_seconds > 0:
        try:
            last = float(storage.get_json(JOBS, SWEEP_STAMP).get("at", 0))
        except NotFound:
            last = 0.0
        if now - last < settings.straggler_sweep_seconds:
            return {}
        storage.put_json(JOBS, SWEEP_STAMP, {"at": now})
    store = JobStore(storage)
    out: dict[str, str | None] = {}
    for job, ids in Catalog(storage).pending_by_job().items():
        if job is not None:
            record = store.find(job)
            if record is not None and record.status not in FINISHED:
                continue  # its job is live and will embed it
        out.update(dict.fromkeys(ids, job))
    if out:  # nor those a running backfill's units will embed
        from job.backfill import claimed, unclaimed

        out = unclaimed(out, claimed(storage))
    return out


def run_reindex(ctx: JobContext) -> dict[str, Any]:
    """Embed stragglers, then build and publish the index (skipped when nothing changed)."""
    from job.reindex import reindex

    encoder = ctx.encoder_factory()
    missing = stragglers(ctx.storage, ctx.settings)
    embedded = _embed(ctx, sorted(missing), missing).embedded if missing else 0
    ctx.progress(0, None, "index")
    result = reindex(ctx.storage, ctx.settings, encoder.version, force=bool(ctx.message.params.get("force")))
    return {
        "version": result.version,
        "mode": result.mode,
        "count": result.count,
        "kind": result.kind,
        "nlist": result.nlist,
        "nprobe": result.nprobe,
        "recall_at_10": result.recall_at_10,
        "build_seconds": result.seconds,
        "stragglers_embedded": embedded,
    }


def run_train_head(ctx: JobContext) -> dict[str, Any]:
    """Train the projection head on the labelled images (torch: job side only)."""
    from job.train_head import train_on_collection

    params = ctx.message.params
    options = {k: params[k] for k in ("epochs", "batch_size", "lr", "seed") if k in params}
    ctx.progress(0, None, "train")
    trained, version = train_on_collection(ctx.storage, ctx.settings, ctx.encoder_factory().version, **options)
    return {"head_version": version, "train": trained.manifest.train, "rows_held_max": trained.rows_held_max}


def run_retrain(ctx: JobContext) -> dict[str, Any]:
    """Retrain what learns from labels: the label classifier (publishing predictions and labelling
    queues for every image); also the projection head, and a reindex, when searching in its space."""
    from job.retrain import train_and_publish

    out: dict[str, Any] = {}
    if ctx.settings.index_space == "head":
        out.update(run_train_head(ctx))
        out["reindex"] = run_reindex(ctx)

    def stage(name: str) -> None:
        ctx.progress(0, None, name)

    result = train_and_publish(ctx.storage, ctx.settings, ctx.encoder_factory().version, progress=stage)
    out.update(result.to_json())
    return out


def run_analyse(ctx: JobContext) -> dict[str, Any]:
    """Cluster, map, classify and review the collection; publish the report (see :mod:`job.analysis`)."""
    from job.run_analysis import run_analysis, summary
    from shared.errors import NotReady

    params = ctx.message.params
    updates = {
        name: params[key] for key, name in (("k", "analysis_k"), ("map_sample", "analysis_map_sample")) if key in params
    }
    settings = ctx.settings.model_copy(update=updates)

    def stage(name: str, done: int, total: int) -> None:
        ctx.progress(done, total, name)

    try:
        metrics = run_analysis(ctx.storage, settings, ctx.encoder_factory().version, progress=stage)
    except NotReady as exc:  # nothing embedded: trying again will not help until images arrive
        raise PermanentJobError(exc.message, code=exc.code) from exc
    return summary(metrics)


def run_ingest_container(ctx: JobContext) -> dict[str, Any]:
    """Register a Blob container's images in place, then queue their embedding (see :mod:`job.container_ingest`)."""
    from job.container_ingest import register_container
    from shared.ingest import open_container

    params = ctx.message.params
    try:
        blobs = open_container(ctx.storage, params.get("container", ""), params.get("prefix") or "")
    except (BadRequest, NotFound) as exc:  # no such container, or one of ours: retrying will not help
        raise PermanentJobError(exc.message, code=exc.code) from exc
    retry = ctx.record.attempts > 1
    return register_container(
        ctx.storage, ctx.settings, ctx.queues, ctx.message.job_id, blobs, retry=retry, progress=ctx.progress
    )


def run_dedupe(ctx: JobContext) -> dict[str, Any]:
    """Calibrate the near-duplicate threshold and publish the groups (see :mod:`job.duplicates`)."""
    from job.duplicates import run_dedupe as dedupe
    from shared.errors import NotReady

    try:
        result = dedupe(
            ctx.storage,
            ctx.settings,
            ctx.encoder_factory(),
            seed=int(ctx.message.params.get("seed", 0)),
            progress=lambda name: ctx.progress(0, None, name),
        )
    except NotReady as exc:  # no index yet: trying again will not help until one is built
        raise PermanentJobError(exc.message, code=exc.code) from exc
    return {
        "version": result.version,
        "threshold": result.calibration["threshold"],
        "expected_precision": result.calibration["expected_precision"],
        "expected_recall": result.calibration["expected_recall"],
        "groups": result.groups,
        "images": result.images,
        "seconds": result.seconds,
    }


HANDLERS: dict[str, Handler] = {
    "embed": run_embed,
    "reindex": run_reindex,
    "train_head": run_train_head,
    "retrain": run_retrain,
    "analyse": run_analyse,
    "ingest_container": run_ingest_container,
    "dedupe": run_dedupe,
}


class Heartbeat:
    """Keeps a held message hidden while its job runs, renewing every third of the timeout."""

    def __init__(self, queue: JobQueue, message: QueueMessage, visibility: int):
        self.queue, self.message, self.visibility = queue, message, visibility
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(max(1.0, self.visibility / 3)):
            with self._lock:
                try:
                    self.message = self.queue.extend(self.message, self.visibility)
                except LostMessage:
                    log.warning("lost the claim on message %s: another worker may run it", self.message.id)
                    return
                except Exception:  # noqa: BLE001 - a failed renewal is retried on the next beat
                    log.warning("could not renew message %s", self.message.id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def current(self) -> QueueMessage:
        with self._lock:
            return self.message


@dataclass
class WorkerStats:
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @property
    def processed(self) -> int:
        return sum(self.outcomes.values())


class Worker:
    """Takes job messages from the queues it serves, in turn, and runs them; failures past the limit go
    to ``poison``.

    Args:
        queues: the job queues (where each kind belongs).
        poison: the one poison queue, for messages from any queue.
        serve: which queues to take: ``cpu``, ``gpu`` or ``all`` (both). A message of a kind that
            belongs on a queue not served here is moved there, never run.
        encoder: an image encoder to use (default: loaded on first need from the settings).
        handlers: job kind -> handler (injectable).
    """

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        queues: JobQueues,
        poison: JobQueue,
        *,
        serve: Serve = "all",
        encoder: ImageEncoder | None = None,
        handlers: dict[str, Handler] | None = None,
        worker_id: str | None = None,
    ):
        self.storage, self.settings, self.queues, self.poison = storage, settings, queues, poison
        self.serving: list[JobQueue] = queues.serving(serve)
        self.store = JobStore(storage)
        self.handlers = handlers or HANDLERS
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._encoder = encoder
        self._turn = 0  # the served queue polled first on the next receive
        self.stop = threading.Event()
        self.in_job = False  # a handler is running: what a signal may interrupt

    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            from shared.encoder import ImageEncoder

            self._encoder = ImageEncoder.from_settings(self.settings, verify="sha256")  # once per job process
            log.info("image encoder %s on %s", self._encoder.version, self._encoder.providers[0])
        return self._encoder

    def describe(self) -> str:
        """The queues served, for the log: ``jobs-gpu, jobs``."""
        return ", ".join(queue.name for queue in self.serving)

    def serves(self, kind: JobKind) -> bool:
        """Whether this worker runs jobs of ``kind``: its kind's queue is one it takes."""
        target = self.queues.for_kind(kind)
        return any(queue.name == target.name for queue in self.serving)

    def receive(self) -> tuple[JobQueue, QueueMessage] | None:
        """The next visible message of the served queues, taken in turn (round robin: after a message
        from one queue the next receive asks the next queue first, so a busy queue starves none)."""
        count = len(self.serving)
        for step in range(count):
            queue = self.serving[(self._turn + step) % count]
            message = queue.receive(visibility_timeout=self.settings.job_visibility_seconds)
            if message is not None:
                self._turn = (self._turn + step + 1) % count
                return queue, message
        return None

    def pending(self) -> int:
        """Messages in the served queues, hidden ones included."""
        return sum(queue.approximate_count() for queue in self.serving)

    def run(
        self, *, until_idle: bool = False, idle_timeout: float | None = None, max_jobs: int | None = None
    ) -> WorkerStats:
        """Process messages until stopped.

        Args:
            until_idle: return once every served queue is empty (hidden messages count: a batch window
                still open, a retry waiting) or nothing arrived for ``idle_timeout`` seconds.
            max_jobs: return after this many messages.
        """
        stats = WorkerStats()
        idle_since = time.monotonic()
        while not self.stop.is_set():
            got = self.receive()
            if got is None:
                idle = time.monotonic() - idle_since
                if until_idle and (self.pending() == 0 or (idle_timeout is not None and idle >= idle_timeout)):
                    break
                self.stop.wait(self.settings.job_poll_seconds)
                continue
            stats.count(self.process(*got))
            idle_since = time.monotonic()
            if max_jobs is not None and stats.processed >= max_jobs:
                break
        return stats

    def process(self, source: JobQueue, message: QueueMessage) -> str:
        """Run one message's job; ``source`` is the queue it was taken from (it is renewed, retried,
        handed back and deleted there).

        Returns:
            The outcome: succeeded, duplicate, retrying, failed, poisoned, rerouted (a kind this worker
            does not serve: sent to its kind's queue, not run), or handed_back (interrupted by
            :class:`JobInterrupted`: the job is queued again, as new, for the next worker).
        """
        try:
            job = JobMessage.from_text(message.content)
        except ClusterlensError as exc:
            self._poison(message, None, exc.code, exc.message, message.dequeue_count)
            source.delete(message)
            return "poisoned"
        if not self.serves(job.kind):
            return self._reroute(source, message, job)
        record = self.store.find(job.job_id) or JobRecord.for_message(job)
        if record.status in FINISHED:
            log.info("job %s already %s: dropping a repeated message", job.job_id, record.status)
            self._delete(source, message)
            return "duplicate"
        attempt = message.dequeue_count
        if attempt > self.settings.job_max_attempts:  # earlier tries died without reporting
            last = record.error.message if record.error else "the worker stopped without reporting (killed?)"
            return self._give_up(source, message, job, record, "worker_lost", last, attempt - 1)
        record.status, record.attempts, record.worker = "running", attempt, self.worker_id
        record.started_at = record.started_at or datetime.now(UTC)
        record.error = None
        self.store.save(record)
        ctx = JobContext(job, record, self.storage, self.settings, self.queues, self.store, self.encoder)
        handler = self.handlers.get(job.kind)
        t0 = time.perf_counter()
        result: dict[str, Any] = {}
        error: Exception | None = None
        interrupted = False
        with Heartbeat(source, message, self.settings.job_visibility_seconds) as beat:
            try:
                if handler is None:
                    raise PermanentJobError(f"no handler for job kind {job.kind!r}")
                self.in_job = True
                try:
                    result = handler(ctx)
                finally:
                    self.in_job = False
            except JobInterrupted:
                interrupted = True
            except Exception as exc:  # noqa: BLE001 - a job's failure is recorded, never kills the worker
                error = exc
        held = beat.current()  # the heartbeat has stopped: this receipt is the last one
        record.seconds["total"] = round(time.perf_counter() - t0, 3)
        if interrupted:
            return self._hand_back(source, held, job, record)
        if error is not None:
            return self._failed(source, held, job, record, error, attempt)
        record.status, record.result, record.finished_at = "succeeded", result, datetime.now(UTC)
        record.progress["stage"] = "done"
        self.store.save(record)  # durable first ...
        self._delete(source, held)  # ... then the message goes
        log.info("job %s succeeded in %.1f s", job.job_id, record.seconds["total"])
        return "succeeded"

    def _reroute(self, source: JobQueue, message: QueueMessage, job: JobMessage) -> str:
        """Move a message of a kind not served here to its kind's queue: a copy goes first, then the
        held one is deleted (a worker dying in between leaves two, and the second finds the job done).
        """
        target = self.queues.for_kind(job.kind)
        target.send(message.content)
        self._delete(source, message)
        log.warning("job %s (%s) was on queue %s: moved to %s", job.job_id, job.kind, source.name, target.name)
        return "rerouted"

    def _failed(
        self, source: JobQueue, held: QueueMessage, job: JobMessage, record: JobRecord, exc: Exception, attempt: int
    ) -> str:
        if isinstance(exc, ClusterlensError):
            code, text = exc.code, exc.message
            log.warning("job %s try %d failed: %s (%s)", job.job_id, attempt, text, code)
        else:
            code, text = "internal_error", f"{type(exc).__name__} (see the worker's log)"
            log.exception("job %s try %d failed", job.job_id, attempt)
        detail = "".join(traceback.format_exception_only(exc)).strip()[:2000]
        record.errors.append(JobError(attempt=attempt, code=code, message=text, at=datetime.now(UTC)))
        record.error = record.errors[-1]
        if isinstance(exc, PermanentJobError) or attempt >= self.settings.job_max_attempts:
            return self._give_up(source, held, job, record, code, text, attempt, detail)
        record.status = "retrying"
        self.store.save(record)
        delay = min(self.settings.job_retry_seconds * 2 ** (attempt - 1), 3600.0)
        try:
            source.extend(held, int(round(delay)))  # back on its queue after the delay
        except LostMessage:
            pass
        return "retrying"

    def _hand_back(self, source: JobQueue, held: QueueMessage, job: JobMessage, record: JobRecord) -> str:
        """Queue an interrupted job again at once, as a fresh message on the queue it came from (its
        tries so far not counted: stopping a worker is not the job's failure), then let go of the held one.

        A copy goes first: if the worker dies in between, the job is delivered twice and the second
        delivery finds it finished; never lost.
        """
        record.status, record.worker = "queued", None
        for key in ("done", "total"):
            record.progress.pop(key, None)
        record.progress["stage"] = "interrupted, queued again"
        self.store.save(record)
        source.send(held.content)
        self._delete(source, held)
        log.warning("job %s interrupted after %.1f s: queued again", job.job_id, record.seconds["total"])
        return "handed_back"

    def _give_up(
        self,
        source: JobQueue,
        message: QueueMessage,
        job: JobMessage,
        record: JobRecord,
        code: str,
        text: str,
        attempts: int,
        detail: str | None = None,
    ) -> str:
        record.status, record.finished_at = "failed", datetime.now(UTC)
        if record.error is None or record.error.code != code:
            record.error = JobError(attempt=attempts, code=code, message=text, at=datetime.now(UTC))
            record.errors.append(record.error)
        self.store.save(record)
        self._poison(message, job.job_id, code, text, attempts, detail)
        self._delete(source, message)
        log.error("job %s failed after %d tries: %s", job.job_id, attempts, text)
        return "failed"

    def _poison(
        self,
        message: QueueMessage,
        job_id: str | None,
        code: str,
        text: str,
        attempts: int,
        detail: str | None = None,
    ) -> None:
        self.poison.send(
            json.dumps(
                {
                    "job_id": job_id,
                    "attempts": attempts,
                    "error": {"code": code, "message": text, "detail": detail},
                    "message": message.content[: 32 * 1024],
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        )

    @staticmethod
    def _delete(source: JobQueue, message: QueueMessage) -> None:
        try:
            source.delete(message)
        except LostMessage:  # taken again meanwhile: that worker will find the job finished
            log.warning("message %s was taken again before it could be deleted", message.id)


def install_signal_handlers(worker: Worker, *, requeue: bool = False) -> None:
    """SIGTERM/SIGINT stop the loop after the current job (a killed job's message comes back anyway).

    Args:
        requeue: stop at once instead: the running job is interrupted and queued again, for the next
            worker to run from the start. For a worker beside something interactive (``clusterlens
            demo``'s), where Ctrl-C should neither wait minutes for an analysis nor lose it.
    """

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop.set()
        if requeue and worker.in_job:
            log.info("signal %d: interrupting the current job, it goes back on the queue", signum)
            raise JobInterrupted
        log.info("signal %d: stopping after the current job", signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def open_worker(settings: Settings, storage: Storage | None = None, serve: Serve = "all") -> Worker:
    """A worker on the queues and storage the settings choose, taking the ``serve`` queues (cpu, gpu, all)."""
    from shared.queues import open_job_queues, open_queue
    from shared.storage import open_storage

    return Worker(
        storage or open_storage(settings),
        settings,
        open_job_queues(settings),
        open_queue(settings, settings.poison_queue_name),
        serve=serve,
    )
