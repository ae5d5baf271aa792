"""A backfill shared by parallel job replicas: every pending image, split into disjoint units of work.

``embed`` with ``{"backfill": true}`` (``clusterlens embed --backfill``, ``POST /api/jobs``) lists the
pending markers once, sorts their ids and cuts them into units of ``settings.embed_unit_size``
consecutive ids. Each unit's ids (with the job each was queued in: where its marker lies) go into ONE
blob, and one ``embed`` job per unit is queued, so whichever replica takes a unit's message embeds
exactly its ids; the queue's visibility timeout, renewed by the worker's heartbeat, is the lease. A
replica that dies mid-unit costs that unit's retry only, and the retry skips the images whose shard
was stored (their markers are gone).

In the ``jobs`` container, for backfill ``<id>`` (the splitting job's id)::

    backfills/<id>/manifest.json     the units: job id, first and last image id, image count
    backfills/<id>/units/<n>.json    one unit's ids, grouped by the job each marker belongs to
    backfills/<id>/done/<n>          written when unit n has embedded its ids
    backfills/live/<id>              while the backfill runs (stragglers look here)

Retried splits do not duplicate units: the manifest is written once (create-if-absent) before any unit
is queued, a retry reuses it instead of listing the markers again, and unit job ids are deterministic
(``embed-unit-<backfill>.<n>``), so :func:`shared.jobs.enqueue` skips units already sent.

One reindex follows the backfill, queued by the unit that finds every unit done (a deterministic id,
so two units finishing together queue it once). Not a reindex per unit, nor the two-second window of
upload jobs: units of a long backfill finish minutes apart, so a window would coalesce nothing and a
backfill of 1,000 units would queue 1,000 full rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_right
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.catalog import NO_JOB, Catalog
from shared.errors import NotFound
from shared.jobs import FINISHED, JobMessage, JobStore, enqueue
from shared.queues import JobQueues
from shared.storage import JOBS, Storage

log = logging.getLogger(__name__)

BACKFILLS = "backfills/"
LIVE = f"{BACKFILLS}live/"
ENQUEUE_THREADS = 16  # unit jobs queued at once (each a few storage and queue round trips)


@dataclass(frozen=True)
class Unit:
    """One unit of a backfill: consecutive pending ids (sorted), each with the job its marker is under."""

    index: int
    jobs: dict[str | None, list[str]]  # marker job (None: no job) -> ids

    @property
    def ids(self) -> list[str]:
        return sorted(i for ids in self.jobs.values() for i in ids)

    def job_of(self) -> dict[str, str | None]:
        """Each id's marker job, what :func:`job.embeddings.embed_pending` takes as ``job``."""
        return {i: job for job, ids in self.jobs.items() for i in ids}


def plan_units(pending: Mapping[str | None, list[str]], size: int) -> list[Unit]:
    """Cut the pending images into units of ``size`` consecutive ids in sorted order.

    Deterministic (the same markers give the same units), disjoint and complete: every id is in
    exactly one unit (an id with markers in two jobs' folders keeps one of them, as the catalogue's
    record decides at embedding).

    Raises:
        ValueError: if ``size`` is not positive.
    """
    if size < 1:
        raise ValueError("a unit holds at least one image")
    job_of = {i: job for job in sorted(pending, key=lambda j: j or "") for i in pending[job]}
    ordered = sorted(job_of)
    units = []
    for index, start in enumerate(range(0, len(ordered), size)):
        jobs: dict[str | None, list[str]] = {}
        for image_id in ordered[start : start + size]:
            jobs.setdefault(job_of[image_id], []).append(image_id)
        units.append(Unit(index, jobs))
    return units


def _suffix(backfill_id: str) -> str:
    """What names a backfill's units and reindex: its job id without the kind (hashed if too long)."""
    tail = backfill_id.split("-", 1)[-1]
    return tail if len(tail) <= 60 else hashlib.sha256(tail.encode()).hexdigest()[:24]


def unit_job_id(backfill_id: str, index: int) -> str:
    return f"embed-unit-{_suffix(backfill_id)}.{index:05d}"


def reindex_job_id(backfill_id: str) -> str:
    return f"reindex-backfill-{_suffix(backfill_id)}"


def _folder(backfill_id: str) -> str:
    return f"{BACKFILLS}{backfill_id}/"


def unit_blob(backfill_id: str, index: int) -> str:
    return f"{_folder(backfill_id)}units/{index:05d}.json"


def split(storage: Storage, queues: JobQueues, backfill_id: str, unit_size: int) -> dict[str, Any]:
    """Split every pending image into units and queue one ``embed`` job per unit.

    A retry (of a split that died after writing its manifest) queues the same units again and
    ``enqueue`` skips those already sent; it never lists the markers a second time.

    Returns:
        The manifest: ``units`` (job id, first and last id, image count of each) and ``images``.
    """
    name = f"{_folder(backfill_id)}manifest.json"
    try:
        manifest = storage.get_json(JOBS, name)
    except NotFound:
        units = plan_units(Catalog(storage).pending_by_job(), unit_size)
        for unit in units:  # no unit is queued before the manifest exists: rewriting these is safe
            body = {job or NO_JOB: ids for job, ids in unit.jobs.items()}
            storage.put_json(JOBS, unit_blob(backfill_id, unit.index), {"units": len(units), "jobs": body})
        manifest = {
            "backfill": backfill_id,
            "unit_size": unit_size,
            "images": sum(len(u.ids) for u in units),
            "units": [
                {"job": unit_job_id(backfill_id, u.index), "first": u.ids[0], "last": u.ids[-1], "images": len(u.ids)}
                for u in units
            ],
        }
        if units:
            storage.put(JOBS, f"{LIVE}{backfill_id}", b"", overwrite=False)
        if not storage.put_json(JOBS, name, manifest, overwrite=False):
            manifest = storage.get_json(JOBS, name)  # another try of this split got there first
    now = datetime.now(UTC)

    def send(index: int) -> bool:
        params = {"backfill_id": backfill_id, "unit": index}
        job_id, origin = unit_job_id(backfill_id, index), f"job:{backfill_id}"
        message = JobMessage(job_id=job_id, kind="embed", origin=origin, params=params, created_at=now)
        return enqueue(storage, queues, message)[1]

    with ThreadPoolExecutor(max_workers=ENQUEUE_THREADS, thread_name_prefix="enqueue") as pool:
        queued = sum(pool.map(send, range(len(manifest["units"]))))
    count = len(manifest["units"])
    log.info("backfill %s: %d images in %d units (%d queued now)", backfill_id, manifest["images"], count, queued)
    return manifest


def read_unit(storage: Storage, backfill_id: str, index: int) -> tuple[Unit, int]:
    """Unit ``index`` of a backfill, and how many units the backfill has."""
    value = storage.get_json(JOBS, unit_blob(backfill_id, index))
    jobs = {None if job == NO_JOB else job: list(ids) for job, ids in value["jobs"].items()}
    return Unit(index, jobs), int(value["units"])


def finish_unit(storage: Storage, queues: JobQueues, backfill_id: str, index: int, units: int) -> str | None:
    """Note unit ``index`` as done; if every unit is, queue the backfill's one reindex.

    Returns:
        The reindex's job id when this call found the backfill complete (a repeated call queues
        nothing new), else None.
    """
    folder = _folder(backfill_id)
    storage.put(JOBS, f"{folder}done/{index:05d}", b"", overwrite=False)
    if sum(1 for _ in storage.list(JOBS, f"{folder}done/")) < units:
        return None
    message = JobMessage(
        job_id=reindex_job_id(backfill_id), kind="reindex", origin=f"job:{backfill_id}", created_at=datetime.now(UTC)
    )
    enqueue(storage, queues, message)
    storage.delete(JOBS, f"{LIVE}{backfill_id}")
    log.info("backfill %s: all %d units done, reindex %s queued", backfill_id, units, message.job_id)
    return message.job_id


def claimed(storage: Storage) -> list[tuple[str, str]]:
    """The id ranges (first, last) of units that a live backfill's replicas still hold or will take.

    A unit stops holding its ids when it is done, or when its job has failed for good (then its
    images are stragglers like any other). Costs one listing, plus for each live backfill its manifest,
    one listing and one job record per unit not done: a straggler sweep's price while a backfill runs.
    """
    store = JobStore(storage)
    ranges: list[tuple[str, str]] = []
    for live in list(storage.list(JOBS, LIVE)):
        backfill_id = live[len(LIVE) :]
        folder = _folder(backfill_id)
        try:
            manifest = storage.get_json(JOBS, f"{folder}manifest.json")
        except NotFound:
            continue  # split in progress: no unit queued yet, nothing promised
        done = {int(n.rsplit("/", 1)[1]) for n in storage.list(JOBS, f"{folder}done/")}
        splitter = store.find(backfill_id)
        split_failed = splitter is not None and splitter.status == "failed"
        for index, unit in enumerate(manifest["units"]):
            if index in done:
                continue
            record = store.find(unit["job"])
            if record is None and split_failed:
                continue  # never queued, and never will be
            if record is None or record.status not in FINISHED:
                ranges.append((unit["first"], unit["last"]))
    return sorted(ranges)


def unclaimed(ids: Mapping[str, str | None], ranges: list[tuple[str, str]]) -> dict[str, str | None]:
    """``ids`` without those inside one of ``ranges`` (sorted, disjoint, inclusive)."""
    if not ranges:
        return dict(ids)
    firsts = [first for first, _ in ranges]

    def held(image_id: str) -> bool:
        at = bisect_right(firsts, image_id) - 1
        return at >= 0 and image_id <= ranges[at][1]

    return {i: job for i, job in ids.items() if not held(i)}
