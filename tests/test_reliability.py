"""The quick parts of `make bench-reliability`, against the real server on a small complete collection:

- Schemathesis from the app's own OpenAPI schema: no 5xx, every status, content type, header and body
  as the schema says, invalid input refused, 405 with Allow, the write key enforced;
- mixed search / image / label traffic at concurrency 32 for a few seconds: no errors;
- hostile paths and ids: 4xx, never a file;
- static checks: bandit finds nothing of high or medium severity, detect-secrets finds no secret in the
  repository, and no code on the query path can unpickle, run a shell or evaluate text.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.fuzz import run_fuzz
from bench.load import run_load
from bench.reliability import bandit_report, secret_scan
from tests.conftest import API_KEY, AUTH
from tests.full_collection import ENV
from tests.servers import ROOT, running_server

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


def test_mixed_traffic_at_concurrency_32_has_no_errors(server: str) -> None:
    queue = httpx.get(server + "/api/label-queue", params={"n": 50}).json()["items"]
    ids = [item["id"] for item in queue]
    images = [httpx.get(f"{server}/api/images/{i}").content for i in ids[:5]]
    out = run_load(server, API_KEY, seconds=5, concurrency=32, ids=ids, images=images)
    assert out["load_errors"] == 0, out["load_error_kinds"]
    assert out["load_requests"] >= 100 and set(out["load_mix"]) == {
        "search_id",
        "search_image",
        "image",
        "label_queue",
        "label",
    }


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/images/../../etc/passwd",
        "/api/images/" + "A" * 64,
        "/api/images/" + "0" * 64,
        "/api/reports/latest/..%2F..%2Fcatalog%2Findex.json",
        "/api/reports/latest/../../labels/CURRENT.json",
        "/api/reports/latest/classify/model.onnx",
        "/api/reports/v000001%00/metrics.json",
        "/api/reports/..%2F..%2Fetc/passwd",
        "/api/jobs/..%2F..%2Fcatalog",
        "/api/jobs/reindex-api-" + "x" * 200,
        "/static/../../function_app.py",
        "/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_paths_and_ids_never_reach_a_file(server: str, path: str) -> None:
    resp = httpx.get(server + path)
    assert resp.status_code in (400, 404, 405), (path, resp.status_code)
    assert set(resp.json()["error"]) == {"code", "message"}
    assert b"root:" not in resp.content and b"import" not in resp.content


def test_bandit_finds_nothing_high_or_medium() -> None:
    report = bandit_report()
    found = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
        if r["issue_severity"] in ("HIGH", "MEDIUM")
    ]
    assert not found, found
    assert report["metrics"]["_totals"]["loc"] > 5000  # it really read the code


def test_no_secrets_in_the_repository() -> None:
    scanned, findings = secret_scan()
    assert scanned > 100
    assert findings == {}


DANGEROUS_MODULES = {"pickle", "marshal", "shelve", "dill", "joblib", "cloudpickle"}
BUILTINS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_CALLS = {("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("subprocess", "getoutput")}


def test_nothing_a_client_sends_can_reach_a_pickle_a_shell_or_eval() -> None:
    """The app's code (query path, triggers, job side) never imports a pickle module, never starts a
    shell, never evaluates text, and reads every .npy/.npz with allow_pickle=False."""
    sources = [*sorted((ROOT / "shared").glob("*.py")), *sorted((ROOT / "functions").glob("*.py"))]
    sources += [ROOT / "function_app.py", ROOT / "tools" / "cli.py"]
    problems: list[str] = []
    for source in sources:
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            where = f"{source.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in DANGEROUS_MODULES for n in names):
                    problems.append(f"{where} imports {names}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if (isinstance(func, ast.Name) and name in BUILTINS) or (owner, name) in DANGEROUS_CALLS:
                    problems.append(f"{where} calls {owner or ''}{'.' if owner else ''}{name}")
                keywords = {k.arg: k.value for k in node.keywords}
                shell = keywords.get("shell")
                if isinstance(shell, ast.Constant) and shell.value is True:
                    problems.append(f"{where} runs a shell")
                if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "np":
                    pickle = keywords.get("allow_pickle")
                    if not (isinstance(pickle, ast.Constant) and pickle.value is False):
                        problems.append(f"{where} np.load without allow_pickle=False")
    assert len(sources) > 30
    assert not problems, problems
