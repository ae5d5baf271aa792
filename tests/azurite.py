"""Azurite, the Azure Storage emulator, started for the tests on free ports of 127.0.0.1.

Installed by `make test` (`make azurite`: npm, pinned). Not found is a failure, not a skip.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every installation): not a secret.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # noqa: E501  # pragma: allowlist secret


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Azurite:
    proc: subprocess.Popen[bytes]
    blob_port: int
    queue_port: int
    log: Path

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint=http://127.0.0.1:{self.queue_port}/{ACCOUNT};"
        )

    @staticmethod
    def fresh_prefix() -> str:
        """A container and queue name prefix no other test uses."""
        return f"t{uuid.uuid4().hex[:8]}-"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(workdir: Path) -> Azurite:
    """Start Azurite (blob, queue) in memory and wait until it listens."""
    if not BINARY.exists():
        pytest.fail(f"Azurite is not installed at {BINARY}: run `make azurite` (make test does)")
    blob, queue, table = free_port(), free_port(), free_port()
    log = workdir / "azurite.log"
    proc = subprocess.Popen(
        [
            str(BINARY),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--inMemoryPersistence",
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(blob),
            "--queueHost",
            "127.0.0.1",
            "--queuePort",
            str(queue),
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(table),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    deadline = time.monotonic() + 60
    while not (_listening(blob) and _listening(queue)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Azurite did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return Azurite(proc, blob, queue, log)
