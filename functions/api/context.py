"""What every route gets: the settings, the query side (loaded on first use), the job queue, the
access guards, and links to resources (the one place URLs are built)."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from shared.access import API_KEY_HEADER, check_access
from shared.classify import Classifier
from shared.queues import JobQueue, open_queue
from shared.search import SearchService
from shared.settings import Settings

KEY_COOKIE = "clusterlens-key"  # the page's key for <img> requests; read level only
WRITE_KEY = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="writeKey",
    auto_error=False,
    description="The write/admin key (CLUSTERLENS_API_KEY); in Azure also an Entra ID app role",
)


class Context:
    """One per app; the service, queue and classifier are built on first use (injectable for tests)."""

    def __init__(self, settings: Settings, service: SearchService | None = None, queue: JobQueue | None = None):
        self.settings = settings
        self._service, self._queue = service, queue

    @cached_property
    def service(self) -> SearchService:
        return self._service or SearchService(self.settings)

    @cached_property
    def queue(self) -> JobQueue:
        return self._queue or open_queue(self.settings, self.settings.queue_name)

    @cached_property
    def classifier(self) -> Classifier:
        return Classifier(self.service.storage, self.settings)


def _context(request: Request) -> Context:
    context: Context = request.app.state.context
    return context


Ctx = Annotated[Context, Depends(_context)]


async def _read(request: Request, ctx: Ctx) -> None:
    check_access(ctx.settings, request.headers, "read", request.cookies.get(KEY_COOKIE))


async def _write(request: Request, ctx: Ctx, _key: str | None = Security(WRITE_KEY)) -> None:
    check_access(ctx.settings, request.headers, "write")  # the Security() documents the key in the schema


READ, WRITE = [Depends(_read)], [Depends(_write)]


def image_url(image_id: str) -> str:
    return f"/api/images/{image_id}"


def job_url(job_id: str) -> str:
    return f"/api/jobs/{job_id}"


def linked(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items that name an image (``id``), each with the image's ``url``."""
    return [{**item, "url": image_url(item["id"])} for item in items]
