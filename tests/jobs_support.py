"""A storage + queues backend for job tests: the local folder, or Azure Storage on Azurite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.catalog import Catalog
from shared.queues import JobQueue, JobQueues, open_job_queues, open_queue
from shared.settings import Settings
from shared.storage import JOBS, Storage, open_storage
from tests.azurite import Azurite
from tests.conftest import make_settings


@dataclass
class Backend:
    settings: Settings
    storage: Storage
    queues: JobQueues
    poison: JobQueue
    env: dict[str, str]

    @property
    def queue(self) -> JobQueue:
        """The CPU queue: reindex, retrain and analyse jobs (with the default settings)."""
        return self.queues.cpu

    def job_ids(self) -> list[str]:
        return [n[len("records/") : -len(".json")] for n in self.storage.list(JOBS, "records/")]

    def record_count(self) -> int:
        return sum(1 for _ in Catalog(self.storage).ids())


def make_backend(kind: str, tmp_path: Path, azurite: Azurite | None, **overrides: object) -> Backend:
    env = {"CLUSTERLENS_DATA_DIR": str(tmp_path / "data"), "CLUSTERLENS_STORAGE_BACKEND": kind}
    if kind == "azure":
        assert azurite is not None
        env["CLUSTERLENS_AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
        env["CLUSTERLENS_CONTAINER_PREFIX"] = azurite.fresh_prefix()
    for name, value in overrides.items():
        env[f"CLUSTERLENS_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    settings = make_settings(
        Path(env["CLUSTERLENS_DATA_DIR"]),
        storage_backend=kind,
        azure_storage_connection_string=env.get("CLUSTERLENS_AZURE_STORAGE_CONNECTION_STRING"),
        container_prefix=env.get("CLUSTERLENS_CONTAINER_PREFIX", ""),
        **overrides,
    )
    storage = open_storage(settings)
    return Backend(
        settings,
        storage,
        open_job_queues(settings),
        open_queue(settings, settings.poison_queue_name),
        env,
    )
