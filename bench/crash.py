"""Crash trials: SIGKILL the worker at random points inside embed, reindex and retrain jobs.

Run with ``python -m bench.crash --trials 10``; writes ``bench/results/crash.json``. A local data
dir is filled with real Fashion-MNIST images uploaded through :func:`shared.uploads.accept_upload`
(so real embedding jobs exist), and the worker runs as a real subprocess
(``python -m tools.cli worker --until-idle``) with the 64-px encoder, the shortest visibility
timeout (2 s), no retry delay and small embedding shards. For each job kind:

- one unkilled calibration run measures how long the job takes;
- each trial queues the work (embed: new uploads; reindex: a forced reindex; retrain: new labels,
  then a retrain job), starts a worker, waits until the job's record says running (embed: shows its
  embedding loop begun, see :data:`CLOCK_STAGE`), waits a random share of the calibrated duration
  and SIGKILLs the worker's whole process group. Where it died is read from storage after the kill
  (shards written; index or classifier version claimed, written or published). Workers are then
  started again until the queues are empty. A kill that came after the job had finished (it ran
  faster than calibrated) does not count: the trial is run again with a shorter delay.

After each trial every catalogued image must have exactly one embedding row across all raw shards
of the encoder version (counted from the shards themselves: ``EmbeddingStore.load`` drops repeats),
every submitted label must be current, every job must have succeeded (none poisoned), the index
pointer must name a complete version that loads and covers every embedded image, every version
listed as complete must hold its files, and a retrain must have published a classifier. Throughout,
a thread queries a :class:`shared.search.SearchService` by stored id every ~50 ms and checks that
the pointer and every listed version are complete: not one query may fail, nor a refresh log an
error.

Random moments rarely land in the few milliseconds between two writes that matter, so every run
also kills the worker right before the writes of :data:`KNOWN_POINTS` (where a kill once lost work),
and ``--sweep`` adds a write-by-write pass: an unkilled run of each kind is traced, then the work is
queued again once per write and the worker (:mod:`bench.crash_worker`) SIGKILLs itself right before
that write.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.embed import device
from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, png_bytes
from job.embeddings import EmbeddingStore
from shared.catalog import Catalog
from shared.index import FILES, current_version, list_versions, load_current
from shared.jobs import FINISHED, JobMessage, JobStore, api_job, enqueue
from shared.queues import JobQueue, JobQueues, open_job_queues, open_queue
from shared.refine import CODEC_FILE, CODES_FILE, RAW_CODEC_FILE, RAW_CODES_FILE
from shared.settings import Settings
from shared.storage import EMBEDDINGS, INDEX, JOBS, MODELS, Storage, open_storage
from shared.versions import list_versions as list_versioned

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("embed", "reindex", "retrain")
CLASSIFIERS = "classifiers/"
# What the worker subprocess runs with: fast, small, and failing over quickly after a kill.
WORKER_ENV = {
    "CLUSTERLENS_STORAGE_BACKEND": "local",
    "CLUSTERLENS_IMAGE_SIZE": "64",
    "CLUSTERLENS_JOB_VISIBILITY_SECONDS": "2",  # the minimum: a killed job's message is back within 2 s
    "CLUSTERLENS_JOB_RETRY_SECONDS": "0",
    "CLUSTERLENS_JOB_POLL_SECONDS": "0.1",
    "CLUSTERLENS_EMBED_BATCH_SECONDS": "1",
    "CLUSTERLENS_EMBED_BATCH_SIZE": "4",
    "CLUSTERLENS_EMBED_SHARD_SIZE": "4",  # many shard writes to be killed between
    "CLUSTERLENS_RETRAIN_AFTER_LABELS": "0",  # the trials queue their own retrains
    "LOKY_MAX_CPU_COUNT": "1",  # LightGBM: one thread beside the bench's query thread (see bench.active_learning)
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
# Where a kill's clock starts, when not at "running": an embedding job first loads the encoder and
# lists what is embedded (a third of its time, writing nothing); its record shows stage "embed" as
# the embedding loop begins, and kills spread over that loop land between shard writes.
CLOCK_STAGE = {"embed": "embed"}
# Kills right before writes where a kill once lost work; every run places one at each.
KNOWN_POINTS = (
    (
        "embed",
        r"^send jobs reindex-after-",
        1,
        "every image embedded, the follow-up reindex's record written, its message not sent: the retry "
        "embeds nothing, and once queued no reindex, leaving the images unindexed and that record queued forever",
    ),
    (
        "reindex",
        r"^delete index v\d{6}/",
        3,
        "a prune cut short: it once left a version listed as complete (a rollback target) without its files",
    ),
)


class CrashTrialError(RuntimeError):
    """The harness itself could not go on (a worker that never took the job, or never finished)."""


# -- what must hold -----------------------------------------------------------------------------


def version_problem(storage: Storage, version: str) -> str | None:
    """What a version lacks (None: its manifest and every file a version of its kind has are there)."""
    if not storage.exists(INDEX, f"{version}/manifest.json"):
        return f"index {version} has no manifest"
    try:
        manifest = storage.get_json(INDEX, f"{version}/manifest.json")
    except Exception:  # noqa: BLE001 - deleted since: the caller sees the manifest gone
        return f"index {version} has no manifest"
    expected = [
        f
        for f in FILES
        if (f not in (CODES_FILE, CODEC_FILE) or manifest.get("kind") == "ivf_pq")  # re-ranking codes: IVF-PQ only
        and (f not in (RAW_CODES_FILE, RAW_CODEC_FILE) or manifest.get("raw_rerank"))  # raw codes: with PCA only
    ]
    missing = [f for f in expected if not storage.exists(INDEX, f"{version}/{f}")]
    return f"index {version} lacks {', '.join(missing)}" if missing else None


def index_problems(storage: Storage) -> list[str]:
    """Why the pointer, or a version listed as complete (a rollback target), is not a complete version.

    A version whose manifest disappears while it is checked is being pruned, and no longer listed:
    not a problem (a prune deletes the manifest first).
    """
    out = []
    version = current_version(storage)
    if version is None:
        out.append("no index pointer")
    elif problem := version_problem(storage, version):
        out.append(f"pointer: {problem}")
    for listed in list_versions(storage):
        problem = version_problem(storage, listed)
        if problem and storage.exists(INDEX, f"{listed}/manifest.json"):
            out.append(f"listed: {problem}")
    return out


def embedding_rows(storage: Storage, encoder_version: str) -> Counter[str]:
    """Rows per image id across every raw shard of ``encoder_version`` (repeats counted, not dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: Counter[str] = Counter()
    for name in EmbeddingStore(storage, encoder_version).shards():
        data = storage.get(EMBEDDINGS, name)
        owned = pa.allocate_buffer(len(data))  # memory Arrow owns (see EmbeddingStore._read_table)
        np.frombuffer(owned, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        table = pq.read_table(pa.BufferReader(owned), columns=["id"], use_threads=False)
        rows.update(table.column("id").to_pylist())
    return rows


@dataclass
class Answer:
    """One probe query: when (wall clock), which index version answered (None: it failed)."""

    at: float
    version: str | None


class QueryProbe:
    """Queries a :class:`SearchService` by a stored id every ``interval`` s in a thread.

    Each round it also checks :func:`index_problems`, and it counts errors the service logs while
    refreshing (the service keeps serving the index it has then, so they would otherwise be hidden).
    """

    def __init__(self, settings: Settings, storage: Storage, image_id: str, interval: float = 0.05):
        from shared.search import SearchService

        self.service = SearchService(settings.model_copy(update={"index_refresh_seconds": 0.0}), storage)
        self.storage, self.image_id, self.interval = storage, image_id, interval
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.index_problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="query-probe", daemon=True)
        self._handler = _ErrorCollector(self.errors)

    def __enter__(self) -> QueryProbe:
        logging.getLogger("shared.search").addHandler(self._handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        logging.getLogger("shared.search").removeHandler(self._handler)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.time()
            try:
                version: str | None = str(self.service.search_id(self.image_id, k=5)["index_version"])
            except Exception as exc:  # noqa: BLE001 - every failure is counted; none may happen
                self.errors.append(f"query: {type(exc).__name__}: {exc}")
                version = None
            self.answers.append(Answer(now, version))
            self.index_problems.extend(index_problems(self.storage))

    @property
    def failures(self) -> int:
        return len(self.errors) + len(self.index_problems)

    def between(self, start: float, end: float) -> tuple[int, dict[str, int]]:
        """(answered queries, answers per index version) asked within [start, end] (wall clock)."""
        got = Counter(a.version for a in list(self.answers) if start <= a.at <= end and a.version is not None)
        return sum(got.values()), dict(sorted(got.items()))


class _ErrorCollector(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(level=logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"log {record.name}: {record.getMessage()}")


# -- the lab ------------------------------------------------------------------------------------


@dataclass
class KillPoint:
    """Where one trial's worker died, and what the recovery took."""

    trial: int
    job_id: str
    delay_s: float  # after the job's record said running (embed: showed its embedding loop begun)
    fraction: float  # of the calibrated duration
    landed: bool  # the job was still unfinished when the worker died
    state: str  # what storage showed after the kill (shards written, version claimed/written/published)
    stage: str | None  # the job record's progress stage at the kill (saved at most every 2 s)
    attempts: int = 0  # tries the job took in the end
    published: str | None = None  # what it published: reindex the index version, retrain the classifier's
    recovery_s: float = 0.0  # from the kill until the queues were empty again
    queries: int = 0  # answered while the job was unfinished
    versions: dict[str, int] = field(default_factory=dict)  # index versions that answered them

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CrashLab:
    """A data dir, its queues, the worker subprocesses and the checks of one crash run.

    Args:
        workdir: where the data dir and the worker logs go (created).
        seed: seeds the kill delays, the image order and the labels picked.
    """

    def __init__(self, workdir: Path, seed: int = 0):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**WORKER_ENV, "CLUSTERLENS_DATA_DIR": str(self.data_dir)}
        overrides: dict[str, Any] = {
            k[len("CLUSTERLENS_") :].lower(): v for k, v in self.env.items() if k.startswith("CLUSTERLENS_")
        }
        self.settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
        self.storage = open_storage(self.settings)
        self.queues: JobQueues = open_job_queues(self.settings)  # embed on one, reindex and retrain on the other
        self.poison: JobQueue = open_queue(self.settings, self.settings.poison_queue_name)
        self.jobs = JobStore(self.storage)
        self.rng = random.Random(seed)
        self.encoder_version = _encoder_version(self.settings)
        self.truth: dict[str, str] = {}  # image id -> its Fashion-MNIST class
        self.submitted: dict[str, str] = {}  # image id -> the label submitted last
        self._images = self._image_stream(seed)
        self._runs = 0

    def define_labels(self) -> None:
        """The label set: the ten Fashion-MNIST classes."""
        from shared.labels import LabelLog

        LabelLog(self.storage).define(list(FASHION_MNIST_CLASSES), user="crash-bench")

    # -- work ---------------------------------------------------------------------------------

    def _image_stream(self, seed: int) -> Iterator[tuple[bytes, str, str]]:
        images, labels = load_fashion_mnist(self.settings.fashion_mnist_dir, "train")
        for i in random.Random(seed).sample(range(len(images)), len(images)):
            yield png_bytes(images[i]), f"fashion-mnist/train/{i:05d}", FASHION_MNIST_CLASSES[int(labels[i])]

    def upload(self, n: int) -> str:
        """Upload ``n`` new images in one batching window; returns their embedding job's id.

        Raises:
            CrashTrialError: if one was not added, or they did not all land in one job.
        """
        from shared.uploads import accept_upload

        now = datetime.now(UTC)  # one window for all: one job
        jobs = set()
        for _ in range(n):
            data, source, label = next(self._images)
            got = accept_upload(self.storage, self.queues, self.settings, data, source=f"crash:{source}", now=now)
            if got.job is None or got.result.status != "added":
                raise CrashTrialError(f"upload of {source} was {got.result.status}")
            self.truth[got.result.id] = label
            jobs.add(got.job.job_id)
        if len(jobs) != 1:
            raise CrashTrialError(f"uploads landed in {len(jobs)} jobs")
        return jobs.pop()

    def queue_job(self, kind: str, params: dict[str, Any] | None = None) -> str:
        """Queue a job as the API does; returns its id."""
        message: JobMessage = api_job(kind, params or {})  # type: ignore[arg-type]
        enqueue(self.storage, self.queues, message)
        return message.job_id

    def label(self, n: int) -> list[tuple[str, str]]:
        """Submit the true class of ``n`` embedded, not yet labelled images through ``submit_labels``.

        Raises:
            CrashTrialError: if there are not ``n`` such images, or the batch was not taken whole.
        """
        from shared.labelling import submit_labels
        from shared.search import SearchService

        embedded = EmbeddingStore(self.storage, self.encoder_version).embedded_ids()
        pool = sorted(i for i in embedded if i in self.truth and i not in self.submitted)
        if len(pool) < n:
            raise CrashTrialError(f"only {len(pool)} unlabelled images left to label: upload more")
        batch = [(i, self.truth[i]) for i in self.rng.sample(pool, n)]
        service = SearchService(self.settings, self.storage)
        status, body = submit_labels(service.live, None, {"labels": [{"id": i, "label": lab} for i, lab in batch]})
        if status != 200 or body["accepted"] != len(batch):
            raise CrashTrialError(f"labels not taken: {status} {body.get('errors')}")
        self.submitted.update(batch)
        return batch

    def work(self, kind: str, *, images: int, labels: int) -> str:
        """Queue one job of ``kind`` (embed: new uploads; reindex: forced; retrain: after new labels)."""
        if kind == "embed":
            return self.upload(images)
        if kind == "reindex":
            return self.queue_job("reindex", {"force": True})
        self.label(labels)
        return self.queue_job("retrain")

    # -- workers ------------------------------------------------------------------------------

    def start_worker(
        self, *, kill_before: str | None = None, occurrence: int = 1, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker subprocess in its own process group (killed whole), logging to ``logs/``.

        Args:
            kill_before: run :mod:`bench.crash_worker`, which SIGKILLs itself right before the
                ``occurrence``-th write whose description matches this regular expression.
            env: settings that differ from :data:`WORKER_ENV`.
        """
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")}
        full_env.update(self.env)
        full_env.update(env or {})
        worker = ["worker", "--until-idle", "--idle-timeout", "30"]
        if kill_before is None:
            command = [sys.executable, "-m", "tools.cli", *worker]
        else:
            hook = ["--kill-before", kill_before, "--occurrence", str(occurrence)]
            command = [sys.executable, "-m", "bench.crash_worker", *hook, "--", *worker]
        self._runs += 1
        with open(self.logs / f"worker-{self._runs:03d}.log", "wb") as out:
            return subprocess.Popen(
                command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def trace(self, job_id: str) -> list[str]:
        """Run the queues with a worker left alone, recording its writes (see :mod:`bench.crash_worker`).

        Raises:
            CrashTrialError: if the worker fails or ``job_id`` does not succeed.
        """
        path = self.logs / f"trace-{job_id}.txt"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")}
        full_env.update(self.env)
        command = [sys.executable, "-m", "bench.crash_worker", "--trace", str(path), "--", "worker", "--until-idle"]
        with open(self.logs / f"trace-{job_id}.log", "wb") as out:
            rc = subprocess.run(command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
        record = self.jobs.find(job_id)
        if rc.returncode != 0 or record is None or record.status != "succeeded":
            raise CrashTrialError(f"traced run of {job_id} failed: see {self.logs}")
        return path.read_text().splitlines()

    def drain(self, timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
        """Run workers until the queues are empty (each takes both and exits when they are).

        Raises:
            CrashTrialError: if a worker fails or the queues are not empty within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while self.queues.approximate_count():
            proc = self.start_worker(env=env)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(proc)
                raise CrashTrialError(f"the queues were not empty after {timeout:.0f} s") from None
            if rc != 0:
                raise CrashTrialError(f"worker exited with {rc}: see {self.logs}")

    def wait_running(
        self, job_id: str, proc: subprocess.Popen[bytes], stage: str | None = None, timeout: float = 60.0
    ) -> float:
        """Wait until the job's record says running (and, given ``stage``, shows that progress stage);
        returns that moment (wall clock).

        Raises:
            CrashTrialError: if the worker exits or the job finishes first, or after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.jobs.find(job_id)
            if record is not None and record.status == "running" and stage in (None, record.progress.get("stage")):
                return time.time()
            if record is not None and record.status in FINISHED:
                raise CrashTrialError(f"job {job_id} finished before it was seen running")
            if proc.poll() is not None:
                raise CrashTrialError(f"the worker exited (rc {proc.returncode}) before running {job_id}")
            time.sleep(0.003)
        kill_group(proc)
        raise CrashTrialError(f"job {job_id} was not running after {timeout:.0f} s")

    def run_unkilled(self, job_id: str, stage: str | None = None) -> float:
        """Run ``job_id`` in a worker left alone, then empty the queues; returns the job's duration (s):
        from when its record said running (or showed ``stage``) until it said succeeded.

        Raises:
            CrashTrialError: if it does not succeed.
        """
        proc = self.start_worker()
        started = self.wait_running(job_id, proc, stage)
        while (record := self.jobs.find(job_id)) is None or record.status not in FINISHED:
            if proc.poll() is not None:
                raise CrashTrialError(f"the worker exited before {job_id} finished")
            time.sleep(0.003)
        duration = time.time() - started
        proc.wait(timeout=120)
        self.drain()
        if record.status != "succeeded":
            raise CrashTrialError(f"job {job_id} {record.status}: {record.error}")
        return duration

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a kill could have changed: shards, index and classifier versions and pointers."""
        index_claims = {n.split("/")[0] for n in self.storage.list(INDEX, "v") if n.endswith("/claim.json")}
        clf_claims = {n.split("/")[1] for n in self.storage.list(MODELS, CLASSIFIERS + "v") if n.endswith("claim.json")}
        return {
            "shards": len(EmbeddingStore(self.storage, self.encoder_version).shards()),
            "index_claims": index_claims,
            "index_complete": set(list_versions(self.storage)),
            "index_current": current_version(self.storage),
            "clf_claims": clf_claims,
            "clf_complete": set(list_versioned(self.storage, MODELS, CLASSIFIERS)),
            "clf_current": _classifier_pointer(self.storage),
        }

    @staticmethod
    def describe(kind: str, before: dict[str, Any], after: dict[str, Any]) -> str:
        """Where a kill landed, from storage: ``3 shards written``, ``index version claimed, ...``."""
        shards = after["shards"] - before["shards"]
        if kind == "embed":
            return f"{shards} shards written"
        prefix, what = ("index", "index") if kind == "reindex" else ("clf", "classifier")
        if after[f"{prefix}_current"] != before[f"{prefix}_current"]:
            where = "published"
        elif after[f"{prefix}_complete"] - before[f"{prefix}_complete"]:
            where = "written, pointer not swapped"
        elif after[f"{prefix}_claims"] - before[f"{prefix}_claims"]:
            where = "version claimed, files being written"
        else:
            where = "before publishing"
        return f"{what} {where}" + (f" ({shards} straggler shards)" if shards else "")

    def check(self) -> dict[str, Any]:
        """Every invariant the trials keep (run with the queues empty); each count must be 0."""
        from shared.classifier import ClassifierView
        from shared.labels import LabelLog

        rows = embedding_rows(self.storage, self.encoder_version)
        catalog = Catalog(self.storage)
        deleted = catalog.deleted_ids()
        catalogued = set(catalog.ids()) - deleted
        unfinished = []
        for name in self.storage.list(JOBS, "records/"):
            record = self.jobs.find(name[len("records/") : -len(".json")])
            if record is not None and record.status != "succeeded":
                unfinished.append(f"{record.job_id}: {record.status}")
        labels = LabelLog(self.storage)
        labels.refresh()
        current = labels.current()
        lost_labels = sorted(i for i, lab in self.submitted.items() if i not in current or current[i].label != lab)
        index = load_current(self.storage, self.data_dir / "cache" / "index-check")
        classifier = _classifier_pointer(self.storage)
        if classifier is not None:
            ClassifierView(self.storage, classifier)  # loads: every file of the version is there
        return {
            "duplicated": sum(1 for n in rows.values() if n > 1),
            "missing_embeddings": len(catalogued - set(rows)),
            "unfinished_jobs": unfinished,
            "poisoned": self.poison.approximate_count(),
            "lost_labels": len(lost_labels),
            "index_problems": index_problems(self.storage),
            "index_version": index.manifest.version,
            "index_missing": len((set(rows) - deleted) - set(index.ids.tolist())),
            "classifier": classifier,
            "embedded": len(rows),
            "catalogued": len(catalogued),
        }


def _encoder_version(settings: Settings) -> str:
    from shared.encoder import ImageEncoder

    return ImageEncoder.from_settings(settings).version


def _classifier_pointer(storage: Storage) -> str | None:
    from shared.classifier import current_classifier_version

    return current_classifier_version(storage)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and everything it started (its own process group), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def lost(check: dict[str, Any]) -> int:
    """What a check found lost: images without an embedding, labels not current, jobs not succeeded."""
    return int(check["missing_embeddings"] + len(check["unfinished_jobs"]) + check["poisoned"] + check["lost_labels"])


def problems(check: dict[str, Any]) -> list[str]:
    """Each invariant a check found broken, in words (empty: all held)."""
    out = [f"{k}: {check[k]}" for k in ("duplicated", "missing_embeddings", "poisoned", "lost_labels") if check[k]]
    out += [f"unfinished job {j}" for j in check["unfinished_jobs"]]
    out += check["index_problems"]
    if check["index_missing"]:
        out.append(f"{check['index_missing']} embedded images not in the published index")
    return out


# -- trials -------------------------------------------------------------------------------------


def kill_trial(
    lab: CrashLab, probe: QueryProbe, kind: str, job_id: str, trial: int, share: float, calibration: float
) -> KillPoint:
    """Start a worker, SIGKILL it ``share * calibration`` s into ``job_id`` (from its :data:`CLOCK_STAGE`,
    or from when it said running), recover.

    Raises:
        CrashTrialError: if a worker never runs the job or the queues do not empty.
    """
    before = lab.state()
    proc = lab.start_worker()
    running_at = lab.wait_running(job_id, proc, CLOCK_STAGE.get(kind))
    delay = share * calibration
    time.sleep(max(0.0, running_at + delay - time.time()))
    record = lab.jobs.find(job_id)
    kill_group(proc)
    killed_at = time.time()
    after = lab.jobs.find(job_id)
    landed = after is not None and after.status == "running"
    point = KillPoint(
        trial=trial,
        job_id=job_id,
        delay_s=round(delay, 3),
        fraction=round(share, 3),
        landed=landed,
        state=lab.describe(kind, before, lab.state()) if landed else "job already finished",
        stage=record.progress.get("stage") if record else None,
    )
    lab.drain()
    done = lab.jobs.find(job_id)
    point.recovery_s = round(time.time() - killed_at, 2)
    point.attempts = done.attempts if done else 0
    result = done.result if done else {}
    point.published = result.get({"reindex": "version", "retrain": "classifier_version"}.get(kind, "reindex_job"))
    end = done.finished_at.timestamp() if done and done.finished_at else time.time()
    point.queries, point.versions = probe.between(running_at, end)
    return point


def kill_before_write(lab: CrashLab, kind: str, job_id: str, pattern: str, occurrence: int = 1) -> dict[str, Any]:
    """Run ``job_id`` in a worker that SIGKILLs itself right before a chosen write, recover, check.

    Returns:
        ``killed`` (False: no such write happened), ``state`` (from storage), ``attempts``,
        ``problems`` (what the check after recovery found broken).

    Raises:
        CrashTrialError: if the queues do not empty.
    """
    before = lab.state()
    proc = lab.start_worker(kill_before=pattern, occurrence=occurrence)
    try:
        rc = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CrashTrialError(f"the worker killing before {pattern!r} ran past 180 s") from None
    state = lab.describe(kind, before, lab.state())
    lab.drain()
    done = lab.jobs.find(job_id)
    return {
        "killed": rc == -signal.SIGKILL,
        "state": state,
        "attempts": done.attempts if done else 0,
        "problems": problems(lab.check()),
    }


def write_patterns(trace: list[str]) -> list[tuple[str, int]]:
    """Each traced write as (regular expression, occurrence) that finds the same write in another run:
    times, ids, hashes and version numbers (runs of hex digits holding a digit, or eight long) become wildcards."""
    variable = re.compile(r"[0-9a-fA-FT]*[0-9][0-9a-fA-FT]*|[0-9a-f]{8,}")
    seen: Counter[str] = Counter()
    out = []
    for line in trace:
        parts, last = [], 0
        for match in variable.finditer(line):
            parts.append(re.escape(line[last : match.start()]) + "[0-9a-fA-FT]+")
            last = match.end()
        pattern = "^" + "".join(parts) + re.escape(line[last:]) + "$"
        seen[pattern] += 1
        out.append((pattern, seen[pattern]))
    return out


def sweep(lab: CrashLab, kind: str, queue_work: Callable[[], str]) -> list[dict[str, Any]]:
    """Kill the worker right before each write an unkilled run of ``kind`` makes (follow-up jobs
    included), one fresh job per write, and check after each recovery.

    Raises:
        CrashTrialError: if a run fails or the queues do not empty.
    """
    trace = lab.trace(queue_work())
    out = []
    for line, (pattern, occurrence) in zip(trace, write_patterns(trace), strict=True):
        point = kill_before_write(lab, kind, queue_work(), pattern, occurrence)
        out.append({"before": line, **point})
    return out


def run_crash(
    workdir: Path,
    trials_per_kind: int = 10,
    seed: int = 0,
    images: int = 600,
    *,
    labels_per_trial: int = 20,
    with_sweep: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """SIGKILL the worker at random points inside embed, reindex and retrain jobs; check nothing is lost.

    Args:
        workdir: an empty folder for the data dir and worker logs.
        trials_per_kind: killed trials of each job kind.
        seed: seeds the kill delays, the images and the labels picked.
        images: about how many images are uploaded, split evenly over the embedding jobs (the
            unkilled calibration run, which also publishes the first index, and the embed trials).
        labels_per_trial: labels submitted before each retrain.
        with_sweep: also kill right before each write of each kind (see :func:`sweep`; minutes).
        progress: called with a short description after each step (the CLI's progress bar).

    Returns:
        ``crash_trials``, ``crash_lost`` (images without an embedding, labels not current, jobs that
        did not succeed or were poisoned, embedded images the final index lacks),
        ``crash_duplicated`` (images with more than one embedding row), ``queries``,
        ``queries_during_rebuild`` (answered while a killed job was unfinished), ``query_failures``
        (failed queries, refresh errors, moments the pointer or a listed version was incomplete),
        ``index_stale`` (trials after which embedded images were missing from the published index),
        ``missed_kills`` (kills that came after the job had finished; tried again), per-kind detail
        under ``kinds`` (calibrated seconds, kill points, seconds), ``known_points`` (kills right
        before the writes of :data:`KNOWN_POINTS`), the final ``checks``, and with ``with_sweep``
        the ``sweep`` points and ``sweep_failures``.

    Raises:
        CrashTrialError: if the harness cannot go on (a worker that never takes or finishes a job).
    """
    step = progress or (lambda what: None)
    t_start = time.perf_counter()
    lab = CrashLab(workdir, seed)
    per_embed = max(8, images // (trials_per_kind + 1))
    lab.define_labels()
    # The first embedding job is the embed calibration, and its reindex publishes the first index:
    # from here on no query may fail.
    calibrations = {"embed": lab.run_unkilled(lab.upload(per_embed), CLOCK_STAGE["embed"])}
    step("embed calibration")
    kinds: dict[str, dict[str, Any]] = {}
    trials = missed = during_rebuild = 0
    stale: list[str] = []
    broken: list[str] = []
    known: list[dict[str, Any]] = []
    swept: dict[str, list[dict[str, Any]]] = {}

    def record(kind: str, what: str) -> None:
        check = lab.check()
        if check["index_missing"]:
            stale.append(f"{kind} {what}: {check['index_missing']} embedded images not indexed")
        for problem in problems(check):
            if problem not in broken:
                log.error("%s %s: %s", kind, what, problem)
                broken.append(problem)

    with QueryProbe(lab.settings, lab.storage, sorted(lab.truth)[0]) as probe:
        for kind in KINDS:
            t_kind = time.perf_counter()
            if kind not in calibrations:
                job_id = lab.work(kind, images=per_embed, labels=labels_per_trial)
                calibrations[kind] = lab.run_unkilled(job_id, CLOCK_STAGE.get(kind))
                step(f"{kind} calibration")
            points: list[KillPoint] = []
            for trial in range(trials_per_kind):
                share = 1.0
                for _ in range(4):  # a kill that came after the job had finished is tried again, sooner
                    job_id = lab.work(kind, images=per_embed, labels=labels_per_trial)
                    delay = lab.rng.uniform(0.0, share)
                    point = kill_trial(lab, probe, kind, job_id, trial, delay, calibrations[kind])
                    points.append(point)
                    during_rebuild += point.queries
                    if point.landed:
                        break
                    missed += 1
                    share /= 2
                record(kind, f"trial {trial}")
                if point.published is None and f"{kind} trial {trial} published nothing" not in broken:
                    broken.append(f"{kind} trial {trial} published nothing")
                trials += 1
                step(f"{kind} trial {trial + 1}")
            kinds[kind] = {
                "trials": trials_per_kind,
                "calibration_seconds": round(calibrations[kind], 3),
                "kill_points": [p.to_json() for p in points],
                "landed": sum(p.landed for p in points),
                "seconds": round(time.perf_counter() - t_kind, 1),
            }
        for kind, pattern, occurrence, why in KNOWN_POINTS:
            got = kill_before_write(lab, kind, lab.work(kind, images=8, labels=5), pattern, occurrence)
            known.append({"kind": kind, "before": pattern, "occurrence": occurrence, "why": why, **got})
            record(kind, f"kill before {pattern}")
        step("known crash points")
        if with_sweep:
            for kind in KINDS:
                swept[kind] = sweep(lab, kind, partial(lab.work, kind, images=8, labels=5))
                step(f"{kind} sweep")
        lab.run_unkilled(lab.queue_job("reindex"))  # a final reindex, unkilled: it covers every embedded image
        final = lab.check()
        step("final reindex")
    versions = Counter(a.version for a in probe.answers if a.version is not None)
    out: dict[str, Any] = {
        "crash_trials": trials,
        "crash_lost": lost(final) + final["index_missing"],
        "crash_duplicated": final["duplicated"],
        "queries": len(probe.answers),
        "queries_during_rebuild": during_rebuild,
        "query_failures": probe.failures,
        "query_errors": (probe.errors + probe.index_problems)[:20],
        "index_versions_seen": len(versions),
        "index_stale": len(stale),
        "index_stale_detail": stale,
        "problems_seen": broken,
        "missed_kills": missed,
        "known_points": known,
        "images": final["catalogued"],
        "labels": len(lab.submitted),
        "checks": final,
        "kinds": kinds,
        "worker_env": {k: v for k, v in lab.env.items() if k != "CLUSTERLENS_DATA_DIR"},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if with_sweep:
        out["sweep"] = swept
        out["sweep_points"] = sum(len(points) for points in swept.values())
        out["sweep_failures"] = [
            f"{kind}: before {p['before']}: {p['problems']}"
            for kind, points in swept.items()
            for p in points
            if p["problems"]
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="killed trials per job kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=600, help="images uploaded in all (about)")
    parser.add_argument("--sweep", action="store_true", help="also kill right before each write (adds minutes)")
    parser.add_argument("--workdir", type=Path, help="keep the data dir and worker logs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crash.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=3 * (args.trials + 1) + 2 + (3 if args.sweep else 0), desc="crash trials", unit="step") as bar:

        def advance(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update(1)

        def run(workdir: Path) -> dict[str, Any]:
            return run_crash(workdir, args.trials, args.seed, args.images, with_sweep=args.sweep, progress=advance)

        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            result = run(args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="clusterlens-crash-") as tmp:
                result = run(Path(tmp))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["device"] = device()
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0 if not (result["crash_lost"] or result["crash_duplicated"] or result["query_failures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
