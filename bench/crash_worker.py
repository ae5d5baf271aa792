"""The clusterlens worker, SIGKILLing itself right before a chosen write: crash points placed exactly.

``python -m bench.crash_worker [--kill-before REGEX [--occurrence K]] [--trace FILE] -- worker ARGS``
runs ``tools.cli`` with ``ARGS`` after wrapping every write the worker makes: the local storage's
``put``, ``delete`` and ``upload_file``, and the local queue's ``send`` and ``delete``. Each write
is described as ``<operation> <container or queue> <blob name or job id>`` (for example
``put index v000004/manifest.json`` or ``send jobs reindex-after-20261122T101500``); with
``--trace`` one line per write is appended to FILE, and with ``--kill-before`` the process kills
itself (SIGKILL: no cleanup, no ``finally``) right before the K-th write whose description matches
REGEX. :mod:`bench.crash` uses it for its write-by-write sweep; random kill times rarely land in the
few milliseconds between two writes that matter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from shared.queues import LocalJobQueue
from shared.storage import LocalStorage


def describe(operation: str, target: str, item: Any) -> str:
    """One write as the trace shows it: ``put index v000004/manifest.json``."""
    if operation == "send":  # a queue message: name its job
        try:
            item = json.loads(item).get("job_id", "?")
        except (ValueError, AttributeError):
            item = "?"
    elif operation == "dequeue":
        try:
            item = json.loads(item.content).get("job_id", "?")
        except (ValueError, AttributeError):
            item = "?"
    return f"{operation} {target} {item}"


class WriteHook:
    """Counts the writes, traces them, and kills the process before the chosen one."""

    def __init__(self, pattern: str | None, occurrence: int = 1, trace: str | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.occurrence, self.trace = occurrence, trace
        self.seen = 0
        self._lock = threading.Lock()

    def before(self, what: str) -> None:
        with self._lock:
            if self.trace:
                with open(self.trace, "a") as fh:
                    fh.write(what + "\n")
            if self.pattern is not None and self.pattern.search(what):
                self.seen += 1
                if self.seen == self.occurrence:
                    sys.stderr.write(f"crash_worker: SIGKILL before {what}\n")
                    sys.stderr.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        def storage_op(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(store: LocalStorage, container: str, blob: str, *args: Any, **kwargs: Any) -> Any:
                self.before(describe(name, container, blob))
                return original(store, container, blob, *args, **kwargs)

            return wrapped

        def queue_op(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(queue: LocalJobQueue, item: Any, *args: Any, **kwargs: Any) -> Any:
                self.before(describe("dequeue" if name == "delete" else name, queue.name, item))
                return original(queue, item, *args, **kwargs)

            return wrapped

        for name in ("put", "delete", "upload_file"):
            setattr(LocalStorage, name, storage_op(name, getattr(LocalStorage, name)))
        for name in ("send", "delete"):
            setattr(LocalJobQueue, name, queue_op(name, getattr(LocalJobQueue, name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-before", help="regular expression matched against each write's description")
    parser.add_argument("--occurrence", type=int, default=1, help="kill before the K-th matching write")
    parser.add_argument("--trace", help="append one line per write to this file")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the tools.cli arguments")
    args = parser.parse_args(argv)
    WriteHook(args.kill_before, args.occurrence, args.trace).install()
    from tools.cli import main as cli_main

    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())
