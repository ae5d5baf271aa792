"""Work queues with Azure Storage Queue semantics: at-least-once delivery under a visibility timeout.

A received message is hidden for ``visibility_timeout`` seconds and comes back if it is not
deleted by then (its worker died or stalled); every receive counts one more ``dequeue_count`` and
hands out a new pop receipt, and only the latest receipt can extend or delete the message. That is
the contract the worker relies on, and both implementations keep it:

- ``AzureJobQueue``: Azure Storage Queue (or Azurite), what the Container Apps job's KEDA rule watches.
- ``LocalJobQueue``: one JSON file per message in a folder, changed under a file lock, so
  ``clusterlens worker`` processes and the local API can share it.

Jobs travel on two queues (:class:`JobQueues`): the kinds that want a GPU (embed, train_head) on
one, the rest on the other, so that in Azure a GPU job and a CPU job each scale on their own queue.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.errors import ClusterlensError
from shared.settings import JobKind, Settings

Serve = Literal["cpu", "gpu", "all"]  # which queues a worker takes
SERVE_CHOICES: tuple[Serve, ...] = ("cpu", "gpu", "all")

MAX_MESSAGE_BYTES = 48 * 1024  # Azure's limit is 64 KiB of (encoded) text


class LostMessage(ClusterlensError):
    """The pop receipt is stale: the message timed out and was taken again (or deleted)."""

    code = "message_lost"
    status = 409


@dataclass(frozen=True)
class QueueMessage:
    """A received message. ``pop_receipt`` proves the holder's claim until it is renewed."""

    id: str
    content: str
    pop_receipt: str
    dequeue_count: int


class JobQueue(ABC):
    """A named queue of text messages."""

    name: str

    @abstractmethod
    def send(self, content: str, *, delay: float = 0) -> None:
        """Add a message, hidden for ``delay`` seconds first.

        Raises:
            ValueError: if the message is over the size limit.
        """

    @abstractmethod
    def receive(self, *, visibility_timeout: int) -> QueueMessage | None:
        """Take the next visible message (hiding it for ``visibility_timeout`` s), or None."""

    @abstractmethod
    def extend(self, message: QueueMessage, visibility_timeout: int) -> QueueMessage:
        """Hide a held message ``visibility_timeout`` s from now; returns it with its new receipt.

        Raises:
            LostMessage: if the receipt is no longer valid.
        """

    @abstractmethod
    def delete(self, message: QueueMessage) -> None:
        """Remove a held message for good.

        Raises:
            LostMessage: if the receipt is no longer valid (someone else holds it now).
        """

    @abstractmethod
    def approximate_count(self) -> int:
        """Messages in the queue, hidden ones included."""

    @abstractmethod
    def peek(self, max_messages: int = 32) -> list[str]:
        """Contents of visible messages, without taking them."""

    @staticmethod
    def _check_size(content: str) -> None:
        if len(content.encode()) > MAX_MESSAGE_BYTES:
            raise ValueError(f"queue message over {MAX_MESSAGE_BYTES} bytes")


class LocalJobQueue(JobQueue):
    """A queue in a folder: ``<root>/<name>/<enqueue time>-<id>.json``, changed under ``flock``."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.dir / ".lock"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.json"))

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = json.loads(path.read_text())
            return value
        except FileNotFoundError:
            return None

    @staticmethod
    def _write(path: Path, value: dict[str, Any]) -> None:
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "w") as fh:
            json.dump(value, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def send(self, content: str, *, delay: float = 0) -> None:
        self._check_size(content)
        now = time.time()
        message_id = uuid.uuid4().hex
        value = {"id": message_id, "content": content, "dequeue_count": 0, "visible_at": now + delay, "receipt": ""}
        with self._locked():
            self._write(self.dir / f"{time.time_ns():020d}-{message_id}.json", value)

    def receive(self, *, visibility_timeout: int) -> QueueMessage | None:
        with self._locked():
            now = time.time()
            for path in self._files():
                value = self._read(path)
                if value is None or value["visible_at"] > now:
                    continue
                value["dequeue_count"] += 1
                value["visible_at"] = now + visibility_timeout
                value["receipt"] = uuid.uuid4().hex
                self._write(path, value)
                return QueueMessage(f"{path.stem}", value["content"], value["receipt"], int(value["dequeue_count"]))
        return None

    def _held(self, message: QueueMessage) -> tuple[Path, dict[str, Any]]:
        path = self.dir / f"{message.id}.json"
        value = self._read(path)
        if value is None or value["receipt"] != message.pop_receipt:
            raise LostMessage(f"message {message.id} is no longer held with this receipt")
        return path, value

    def extend(self, message: QueueMessage, visibility_timeout: int) -> QueueMessage:
        with self._locked():
            path, value = self._held(message)
            value["visible_at"] = time.time() + visibility_timeout
            value["receipt"] = uuid.uuid4().hex
            self._write(path, value)
        return QueueMessage(message.id, message.content, value["receipt"], message.dequeue_count)

    def delete(self, message: QueueMessage) -> None:
        with self._locked():
            path, _ = self._held(message)
            path.unlink()

    def approximate_count(self) -> int:
        return len(self._files())

    def peek(self, max_messages: int = 32) -> list[str]:
        now = time.time()
        found = []
        for path in self._files():
            value = self._read(path)
            if value is not None and value["visible_at"] <= now:
                found.append(str(value["content"]))
                if len(found) >= max_messages:
                    break
        return found


class AzureJobQueue(JobQueue):
    """An Azure Storage queue (or Azurite's). Messages are plain text (JSON), not base64.

    Args:
        connection_string: an account connection string; or
        account_url: ``https://<account>.queue.core.windows.net`` with ``credential``
            (``DefaultAzureCredential`` when None).
        create: create the queue if it is missing.
    """

    def __init__(
        self,
        name: str,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        create: bool = True,
    ):
        from azure.storage.queue import QueueClient

        self.name = name
        if connection_string:
            self.client = QueueClient.from_connection_string(connection_string, name)
        elif account_url:
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            self.client = QueueClient(account_url, name, credential=credential)
        else:
            raise ValueError("AzureJobQueue needs a connection string or an account URL")
        if create:
            from azure.core.exceptions import HttpResponseError, ResourceExistsError

            try:
                self.client.create_queue()
            except ResourceExistsError:
                pass
            except HttpResponseError:  # no right to create: the infrastructure made it
                pass

    def send(self, content: str, *, delay: float = 0) -> None:
        self._check_size(content)
        self.client.send_message(content, visibility_timeout=int(max(0, round(delay))) or None, time_to_live=-1)

    def receive(self, *, visibility_timeout: int) -> QueueMessage | None:
        for msg in self.client.receive_messages(max_messages=1, visibility_timeout=visibility_timeout):
            return QueueMessage(msg.id, str(msg.content), str(msg.pop_receipt), int(msg.dequeue_count or 1))
        return None

    def extend(self, message: QueueMessage, visibility_timeout: int) -> QueueMessage:
        from azure.core.exceptions import HttpResponseError

        try:
            updated = self.client.update_message(
                message.id, pop_receipt=message.pop_receipt, visibility_timeout=visibility_timeout
            )
        except HttpResponseError as exc:
            raise LostMessage(f"message {message.id} is no longer held: {exc.reason}") from None
        return QueueMessage(message.id, message.content, str(updated.pop_receipt), message.dequeue_count)

    def delete(self, message: QueueMessage) -> None:
        from azure.core.exceptions import HttpResponseError

        try:
            self.client.delete_message(message.id, message.pop_receipt)
        except HttpResponseError as exc:
            raise LostMessage(f"message {message.id} is no longer held: {exc.reason}") from None

    def approximate_count(self) -> int:
        return int(self.client.get_queue_properties().approximate_message_count or 0)

    def peek(self, max_messages: int = 32) -> list[str]:
        return [str(m.content) for m in self.client.peek_messages(max_messages=min(max_messages, 32))]


def open_queue(settings: Settings, name: str) -> JobQueue:
    """The queue ``name`` on the backend the settings choose (prefixed like the containers)."""
    full = f"{settings.container_prefix}{name}"
    if settings.storage_backend == "local":
        return LocalJobQueue(settings.data_dir / "queues", full)
    account_url = settings.azure_storage_account_url
    return AzureJobQueue(
        full,
        connection_string=settings.azure_storage_connection_string,
        account_url=account_url.replace(".blob.", ".queue.") if account_url else None,
    )


class JobQueues:
    """Where each job kind's messages go: the GPU kinds to the GPU queue, every other kind to the CPU queue.

    In Azure one Container Apps job (GPU profile) takes the GPU queue and another (Consumption CPU
    profile, a slim image with torch's CPU wheel) the CPU queue; locally one worker takes both. The two
    may be one queue (the same name): then every job goes through it.

    Args:
        cpu: the queue of every kind not in ``gpu_kinds``.
        gpu: the queue of ``gpu_kinds`` (may be ``cpu`` itself).
        gpu_kinds: the kinds that go to ``gpu``.
    """

    def __init__(self, cpu: JobQueue, gpu: JobQueue, gpu_kinds: Iterable[JobKind]):
        self.cpu, self.gpu = cpu, gpu
        self.gpu_kinds: frozenset[JobKind] = frozenset(gpu_kinds)

    def for_kind(self, kind: JobKind) -> JobQueue:
        """The queue a job of ``kind`` is sent to."""
        return self.gpu if kind in self.gpu_kinds else self.cpu

    def serving(self, which: Serve = "all") -> list[JobQueue]:
        """The queues a worker taking ``which`` polls: the CPU queue, the GPU queue, or both (``all``);
        a queue named twice (both are one) is listed once.

        ``all`` lists the GPU queue first: its kinds come before the work that follows them (an embed
        before the reindex of its images), so a worker on both that finds each queue holding a message
        starts upstream. Order across the queues is not promised beyond that.
        """
        chosen = {"cpu": [self.cpu], "gpu": [self.gpu], "all": [self.gpu, self.cpu]}[which]
        out: list[JobQueue] = []
        for queue in chosen:
            if all(queue.name != seen.name for seen in out):
                out.append(queue)
        return out

    def distinct(self) -> list[JobQueue]:
        """Every queue, once."""
        return self.serving("all")

    def approximate_count(self) -> int:
        """Messages in all the queues, hidden ones included."""
        return sum(queue.approximate_count() for queue in self.distinct())


def open_job_queues(settings: Settings) -> JobQueues:
    """The CPU and GPU job queues the settings name (one queue when both names are the same)."""
    cpu = open_queue(settings, settings.queue_name)
    gpu = cpu if settings.gpu_queue_name == settings.queue_name else open_queue(settings, settings.gpu_queue_name)
    return JobQueues(cpu, gpu, settings.gpu_job_kinds)
