"""Crash trials: the worker SIGKILLed inside embed, reindex and retrain jobs loses and doubles nothing.

The quick part of ``python -m bench.crash``: one random kill per job kind, kills placed right before
the writes that once lost work, and prunes cut short between any two deletes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.crash import run_crash
from shared.storage import INDEX, LocalStorage
from shared.versions import ABANDONED_AFTER, claim_next, list_versions, prune, read_pointer, swap_pointer

FILES = ("a.npy", "b.npy", "index.faiss")


def test_kills_inside_each_job_kind_lose_and_double_nothing(tmp_path: Path) -> None:
    """One random kill inside each job kind, and kills right before the writes where one once lost
    work (the follow-up reindex's message; a prune's third delete)."""
    result = run_crash(tmp_path, trials_per_kind=1, seed=1, images=80, labels_per_trial=10)
    assert result["crash_trials"] == 3
    assert result["crash_lost"] == 0 and result["crash_duplicated"] == 0, result["checks"]
    assert result["query_failures"] == 0, result["query_errors"]
    assert result["index_stale"] == 0 and result["problems_seen"] == []
    for kind, detail in result["kinds"].items():
        point = detail["kill_points"][-1]
        # The kill landed inside the job: it was running, and it took a second try to finish.
        assert point["landed"] and point["attempts"] == 2, (kind, point)
        assert point["queries"] > 0, (kind, point)  # queries were answered while it was unfinished
    for point in result["known_points"]:
        assert point["killed"] and point["problems"] == [], point
    embed, prune_ = result["known_points"]
    assert embed["state"] == "2 shards written" and embed["attempts"] == 2
    assert prune_["state"] == "index published"
    retrains = 1 + len(result["kinds"]["retrain"]["kill_points"])  # the calibration run, then each try
    assert result["labels"] == 10 * retrains
    assert result["kinds"]["retrain"]["kill_points"][-1]["published"] == result["checks"]["classifier"] is not None
    assert result["checks"]["embedded"] == result["images"] == result["checks"]["catalogued"]


def _version(storage: LocalStorage, *, claimed: datetime | None = None, complete: bool = True) -> str:
    version = claim_next(storage, INDEX)
    if claimed is not None:
        storage.put_json(INDEX, f"{version}/claim.json", {"at": claimed.isoformat()})
    for name in FILES:
        storage.put(INDEX, f"{version}/{name}", b"x")
    if complete:
        storage.put_json(INDEX, f"{version}/manifest.json", {"version": version})
        swap_pointer(storage, INDEX, version)
    return version


class _Killed(BaseException):
    pass


class _DiesOnDelete(LocalStorage):
    """Local storage whose process 'dies' (raises past every handler) at its n-th delete."""

    def __init__(self, root: Path, n: int):
        super().__init__(root)
        self.left = n

    def delete(self, container: str, name: str) -> bool:
        self.left -= 1
        if self.left < 0:
            raise _Killed
        return super().delete(container, name)


@pytest.mark.parametrize("deletes", range(len(FILES) + 2))
def test_a_prune_cut_short_never_leaves_a_listed_version_without_its_files(tmp_path: Path, deletes: int) -> None:
    storage = LocalStorage(tmp_path)
    for _ in range(3):
        _version(storage)
    with pytest.raises(_Killed):
        prune(_DiesOnDelete(tmp_path, deletes), INDEX, keep=2, current="v000003")
    for version in list_versions(storage, INDEX):  # what rollback may point readers at
        assert all(storage.exists(INDEX, f"{version}/{name}") for name in FILES), (deletes, version)
    _version(storage)
    # The next prune clears what was left (a claim left behind, when cut short right after the
    # manifest went, is cleared once it is ABANDONED_AFTER old).
    later = datetime.now(UTC) + (ABANDONED_AFTER if deletes == 1 else timedelta(0))
    prune(storage, INDEX, keep=2, current="v000004", now=later)
    assert list_versions(storage, INDEX) == ["v000003", "v000004"]
    assert sorted({n.split("/")[0] for n in storage.list(INDEX, "v")}) == ["v000003", "v000004"]


def test_prune_clears_versions_a_killed_builder_left_but_not_one_being_built(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    now = datetime.now(UTC)
    _version(storage)
    dead = _version(storage, claimed=now - ABANDONED_AFTER - timedelta(minutes=1), complete=False)
    building = _version(storage, claimed=now - timedelta(minutes=30), complete=False)
    current = _version(storage)
    prune(storage, INDEX, keep=3, current=current, now=now)
    folders = {n.split("/")[0] for n in storage.list(INDEX, "v")}
    assert dead not in folders and building in folders and read_pointer(storage, INDEX) == current
    assert list_versions(storage, INDEX) == ["v000001", current]
