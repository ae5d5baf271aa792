"""What the function app's triggers share per worker process: settings, storage, the job queue.

Created on first use (no work at import time), cached, and cleared by tests with
``get_runtime.cache_clear()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from shared.queues import JobQueue, open_queue
from shared.settings import Settings, get_settings
from shared.storage import Storage, open_storage


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    storage: Storage
    queue: JobQueue


@lru_cache(maxsize=1)
def get_runtime() -> Runtime:
    """The process's runtime, built from the settings on first call."""
    settings = get_settings()
    return Runtime(settings, open_storage(settings), open_queue(settings, settings.queue_name))
