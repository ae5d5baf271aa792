"""Schemathesis against the real server's own OpenAPI schema (the quick run; `make bench-reliability`
runs the long one): no 5xx, every status, content type, header and body as the schema says, invalid
input refused, unsupported methods answered with 405 and Allow, the write key enforced.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.fuzz import run_fuzz
from tests.conftest import API_KEY, AUTH
from tests.full_collection import ENV
from tests.servers import running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(full_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    shutil.copytree(full_collection, data_dir)  # the fuzzer relabels, deletes and rolls back
    with running_server({"CLUSTERLENS_DATA_DIR": str(data_dir), **ENV}) as url:
        yield url


def test_generated_requests_get_no_5xx_and_match_the_schema(server: str) -> None:
    out = run_fuzz(server, API_KEY, examples=5, seed=1)
    assert out["fuzz_requests"] >= 300, out
    paths = httpx.get(server + "/api/openapi.json").json()["paths"]
    assert out["fuzz_operations"] == sum(len(ops) for ops in paths.values())  # every operation
    assert out["fuzz_5xx"] == 0, out
    assert out["fuzz_failures"] == [] and out["fuzz_errors"] == 0, out["fuzz_output_tail"]
    assert out["fuzz_exit_code"] == 0
    statuses = {int(s) for s in out["fuzz_statuses"]}
    assert {200, 400, 401, 404, 405} <= statuses  # it reached the handlers, the guards and the router


@pytest.mark.parametrize(
    "body",
    [{"kind": {}}, {"kind": []}, {"kind": "reindex", "params": []}, {"kind": "reindex", "extra": 1}, []],
)
def test_job_bodies_of_the_wrong_shape_are_400_not_500(server: str, body: object) -> None:
    """Found by the fuzzer: a JSON object as the job kind used to be a 500 (unhashable dict)."""
    resp = httpx.post(server + "/api/jobs", json=body, headers=AUTH)
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"code", "message"}
