"""A storage + queue backend for job tests: the local folder, or Azure Storage on Azurite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.catalog import Catalog
from shared.queues import JobQueue, open_queue
from shared.settings import Settings
from shared.storage import JOBS, Storage, open_storage
from tests.azurite import Azurite
from tests.conftest import make_settings


@dataclass
class Backend:
    settings: Settings
    storage: Storage
    queue: JobQueue
    poison: JobQueue
    env: dict[str, str]

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
        env[f"CLUSTERLENS_{name.upper()}"] = str(value)
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
        open_queue(settings, settings.queue_name),
        open_queue(settings, settings.poison_queue_name),
        env,
    )
