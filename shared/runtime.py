"""What the function app's functions share per worker process: settings, storage, the job queues, and
the query side (search, classify), each made on first use.

Nothing is built at import time. The triggers take the process's runtime (:func:`get_runtime`, cleared
by tests with ``get_runtime.cache_clear()``); the HTTP app holds one made with whatever a test injects.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

from shared.classify import Classifier
from shared.queues import JobQueues, open_job_queues
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.storage import Storage, open_storage


class Runtime:
    """Settings and the parts made from them, built on first use; any of them may be given ready."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage | None = None,
        queues: JobQueues | None = None,
        service: SearchService | None = None,
    ):
        self.settings = settings
        self._storage, self._queues, self._service = storage, queues, service

    @cached_property
    def storage(self) -> Storage:
        if self._service is not None:
            return self._service.storage
        return self._storage or open_storage(self.settings)

    @cached_property
    def service(self) -> SearchService:
        return self._service or SearchService(self.settings, self.storage)

    @cached_property
    def queues(self) -> JobQueues:
        """The job queues: :func:`shared.jobs.enqueue` sends each job to its kind's."""
        return self._queues or open_job_queues(self.settings)

    @cached_property
    def classifier(self) -> Classifier:
        return Classifier(self.storage, self.settings)


@lru_cache(maxsize=1)
def get_runtime() -> Runtime:
    """The process's runtime, made from the settings on first call."""
    return Runtime(get_settings())
