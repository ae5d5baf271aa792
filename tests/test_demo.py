"""`clusterlens demo` as a user runs it (a small --limit, 64 px): the page and search answer as soon as
the first images are indexed, the rest of the images, the first classifier and the first analysis
follow as queued jobs on the demo's worker, and stopping the demo while one runs loses nothing: the
next demo runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.jobs import JobStore
from shared.queues import LocalJobQueue
from shared.reports import current_report
from shared.storage import LocalStorage
from tests.conftest import png
from tests.full_collection import ENV
from tests.servers import ROOT, free_port

pytestmark = pytest.mark.integration

LIMIT = 300
FIRST = 100  # indexed before the page is served; the demo's worker embeds the rest


@contextmanager
def demo(env: dict[str, str], log: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`clusterlens demo` in its own process group (as in a terminal, where Ctrl-C reaches the server
    and its worker alike); yields the process and its URL once the page answers."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "demo", "--port", str(port), "--limit", str(LIMIT), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 300, f"the demo's page (log: {log})", proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check: Callable[[], Any], seconds: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + seconds
    while not (value := check()):
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds:g} s")
        time.sleep(0.1)
    return value


def ctrl_c(proc: subprocess.Popen[bytes]) -> float:
    """Stop the demo as Ctrl-C in its terminal does; returns the seconds it took to exit."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) in (0, 130)
    return time.monotonic() - t0


def analyse_jobs(url: str) -> list[dict[str, Any]]:
    return [j for j in httpx.get(url + "/api/jobs?limit=100").json()["jobs"] if j["kind"] == "analyse"]


def test_the_demo_serves_before_its_first_analysis_and_a_stop_in_between_loses_nothing(
    tmp_path: Path,
    fashion_test,  # type: ignore[no-untyped-def]
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERLENS_")}
    env |= {"CLUSTERLENS_DATA_DIR": str(data), "CLUSTERLENS_ANALYSIS_MAPS": '["pca", "tsne"]', **ENV}
    env["PYTHONUNBUFFERED"] = "1"  # its output in the log as it happens
    log = tmp_path / "demo.log"

    with demo(env, log, "--first", str(FIRST)) as (proc, url):
        # Serving on the first images, searching: the analysis not done (it has not even published a report).
        assert httpx.get(url + "/api/reports/latest").json()["error"]["code"] == "no_report"
        [job] = analyse_jobs(url)
        assert job["status"] in ("queued", "running") and job["origin"] == "demo", job
        query = {"image": ("q.png", png(fashion_test[0][0]), "image/png")}  # a held-out image
        found = httpx.post(url + "/api/search", files=query, data={"k": "5"}, timeout=60)
        assert found.status_code == 200 and len(found.json()["results"]) == 5, found.text
        assert httpx.get(url + "/api/health").json()["index"]["count"] == FIRST
        # The worker embeds the rest and indexes them all (and the five photos) while the page serves.
        count = lambda: httpx.get(url + "/api/health").json()["index"]["count"] == LIMIT + 5  # noqa: E731
        wait_for(count, 240, "the rest of the images indexed", proc)

        # Stopped while the analysis runs: at once, and the job goes back on the queue.
        job_url = f"{url}/api/jobs/{job['job_id']}"
        wait_for(lambda: httpx.get(job_url).json()["status"] == "running", 120, "running analysis", proc)
        assert ctrl_c(proc) < 20
    storage = LocalStorage(data)
    record = JobStore(storage).get(job["job_id"])
    assert record.status == "queued" and record.progress["stage"] == "interrupted, queued again", record
    assert current_report(storage) is None
    assert any(job["job_id"] in m for m in LocalJobQueue(data / "queues", "jobs").peek())  # visible now
    first_run = log.read_text()

    with demo(env, log) as (proc, url):
        second_run = log.read_text()[len(first_run) :]
        assert "embedded 0 of 0 pending images" in second_run and "is up to date" in second_run, second_run
        assert f"job {job['job_id']} (queued)" in second_run  # the same job, not a second one
        report = wait_for(
            lambda: (r := httpx.get(url + "/api/reports/latest")).status_code == 200 and r.json(), 300, "report", proc
        )
        assert report["metrics"]["images"] == LIMIT + 5 and {"maps/pca.json", "maps/tsne.json"} <= set(report["files"])
        [done] = analyse_jobs(url)
        assert done["job_id"] == job["job_id"] and done["status"] == "succeeded" and done["attempts"] == 1
        retrain = [j for j in httpx.get(url + "/api/jobs?limit=100").json()["jobs"] if j["kind"] == "retrain"]
        assert [j["status"] for j in retrain] == ["succeeded"]  # the first classifier, queued the same way
        ctrl_c(proc)

    with demo(env, log) as (proc, url):  # built: nothing is queued any more
        third_run = log.read_text()[len(first_run) + len(second_run) :]
        before_serving = third_run.split("serving the search page")[0]
        assert "the first analysis" not in before_serving and "the label classifier" not in before_serving, third_run
        ctrl_c(proc)  # at once, its worker barely started: a quiet stop
    assert "Traceback" not in log.read_text()
