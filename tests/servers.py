"""The real API server (`clusterlens serve`, uvicorn) in its own process on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.keys import API_KEY

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(env: dict[str, str], *args: str) -> Iterator[str]:
    """Start `clusterlens serve` with ``env`` added to this environment (and the tests' write key,
    unless ``env`` sets ``CLUSTERLENS_API_KEY`` itself); yields its base URL.
    """
    with server_process(env, *args) as (url, _pid):
        yield url


@contextmanager
def server_process(env: dict[str, str], *args: str) -> Iterator[tuple[str, int]]:
    """Like :func:`running_server`, yielding the base URL and the server's process id.

    Output goes to a file (a pipe nobody reads can fill up and stall the server).
    """
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="clusterlens-serve-", suffix=".log")[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, "CLUSTERLENS_API_KEY": API_KEY, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the server did not come up in 60 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.unlink(missing_ok=True)
