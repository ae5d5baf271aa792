"""Access control, CORS and security headers, through the real HTTP app.

The write endpoints are found from the app's own OpenAPI schema (operations that declare the write
key), so an endpoint added later without the guard fails here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from functions.http_api import create_app
from job.datasets import fashion_mnist_items
from shared.catalog import Catalog
from shared.ingest import ingest_bytes
from shared.search import SearchService
from shared.storage import LocalStorage
from shared.web import page_csp
from tests.conftest import API_KEY, AUTH, make_settings
from tools.cli import demo_key

READ_KEY = "test-read-key-77aa01bc"
# Operations that change nothing although they are POSTs (a query sent as a body).
READ_POSTS = {("post", "/api/search"), ("post", "/api/classify")}
EXPECTED_WRITES = {
    ("post", "/api/images"),
    ("delete", "/api/images/{image_id}"),
    ("post", "/api/jobs"),
    ("post", "/api/labels"),
    ("put", "/api/label-set"),
    ("post", "/api/index/rollback"),
    ("post", "/api/duplicates/{group}/resolve"),
    ("post", "/api/duplicates/{group}/unresolve"),
}
SAMPLE_ID = "0" * 64


def client_for(tmp_path: Path, headers: dict[str, str] | None = None, **overrides: Any) -> TestClient:
    settings = make_settings(tmp_path, **overrides)
    return TestClient(create_app(SearchService(settings), settings), headers=headers, raise_server_exceptions=False)


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    schema = client.get("/api/openapi.json").json()
    return [(m, path, op) for path, ops in schema["paths"].items() for m, op in ops.items()]


def write_operations(client: TestClient) -> set[tuple[str, str]]:
    return {(m, p) for m, p, op in operations(client) if {"writeKey": []} in op.get("security", [])}


def call(client: TestClient, method: str, path: str, **kwargs: Any) -> Any:
    return client.request(method.upper(), path.replace("{image_id}", SAMPLE_ID), **kwargs)


def test_every_changing_endpoint_declares_the_write_key(tmp_path: Path) -> None:
    client = client_for(tmp_path)
    writes = write_operations(client)
    assert writes == EXPECTED_WRITES
    changing = {(m, p) for m, p, _ in operations(client) if m != "get"} - READ_POSTS
    assert changing == writes, changing ^ writes


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"X-API-Key": "not-the-key-0000000000"}, 401, "invalid_api_key"),
        ({"X-API-Key": API_KEY[:-1]}, 401, "invalid_api_key"),
        ({"X-API-Key": READ_KEY}, 403, "forbidden"),
        ({"Authorization": f"Bearer {API_KEY}"}, 401, "missing_api_key"),  # only the one header counts
    ],
)
def test_each_write_endpoint_refuses_without_the_write_key(
    tmp_path: Path, headers: dict[str, str], status: int, code: str
) -> None:
    client = client_for(tmp_path, read_key=READ_KEY)
    for method, path in sorted(EXPECTED_WRITES):
        resp = call(client, method, path, headers=headers, json={"kind": "reindex"})
        assert resp.status_code == status, (method, path, resp.text)
        assert resp.json() == {"error": {"code": code, "message": resp.json()["error"]["message"]}}


def test_write_endpoints_are_closed_when_no_key_is_configured(tmp_path: Path) -> None:
    """The default: no write key, so nothing may write, whatever the request carries."""
    client = client_for(tmp_path, api_key=None)
    for method, path in sorted(EXPECTED_WRITES):
        for headers in ({}, AUTH, {"X-MS-CLIENT-PRINCIPAL": principal(["clusterlens.write"])}):
            resp = call(client, method, path, headers=headers)
            assert resp.status_code in (401, 403), (method, path, resp.text)
        resp = call(client, method, path)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "writes_closed"
        assert "CLUSTERLENS_API_KEY" in resp.json()["error"]["message"]


def test_refused_writes_change_nothing_and_the_key_opens_them(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, image_size=64)
    storage = LocalStorage(settings.data_dir)
    items = list(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=2))
    kept = ingest_bytes(storage, settings, items[0]).id
    client = TestClient(create_app(SearchService(settings, storage), settings), raise_server_exceptions=False)
    upload = {"files": {"image": ("a.png", items[1].data, "image/png")}}
    assert client.post("/api/images", **upload).status_code == 401
    assert client.delete(f"/api/images/{kept}").status_code == 401
    assert client.put("/api/label-set", json={"classes": ["a", "b"]}).status_code == 401
    assert client.post("/api/labels", json={"labels": [{"id": kept, "label": "a"}]}).status_code == 401
    assert client.post("/api/jobs", json={"kind": "reindex"}).status_code == 401
    assert sorted(Catalog(storage).ids()) == [kept]
    assert client.get("/api/label-set").json()["label_set"] is None
    assert client.get("/api/jobs").json()["jobs"] == []
    # the same requests with the key go through
    assert client.post("/api/images", headers=AUTH, **upload).status_code == 201
    assert client.put("/api/label-set", headers=AUTH, json={"classes": ["a", "b"]}).status_code == 200
    assert client.delete(f"/api/images/{kept}", headers=AUTH).status_code == 200
    assert kept not in Catalog(storage).ids()


def test_reads_are_open_by_default_and_closed_by_a_read_key(tmp_path: Path) -> None:
    read_paths = [p for m, p, _ in operations(client_for(tmp_path)) if m == "get" and "{" not in p]
    assert {"/api/jobs", "/api/labels", "/api/index", "/api/label-set"} <= set(read_paths)
    open_client = client_for(tmp_path)
    for path in read_paths:
        assert open_client.get(path).status_code not in (401, 403), path
    closed = client_for(tmp_path, read_key=READ_KEY)
    for path in read_paths:
        if path == "/api/health":  # liveness probes need no key
            assert closed.get(path).status_code == 200
            continue
        resp = closed.get(path)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "missing_api_key", path
        assert closed.get(path, headers={"X-API-Key": READ_KEY}).status_code not in (401, 403), path
        assert closed.get(path, headers=AUTH).status_code not in (401, 403), path  # write includes read
    # <img> requests carry the page's cookie: good for reading, ignored for writing, stale ones ignored
    closed.cookies.set("clusterlens-key", READ_KEY)
    assert closed.get("/api/jobs").status_code == 200
    closed.cookies.set("clusterlens-key", API_KEY)
    assert closed.post("/api/jobs", json={"kind": "reindex"}).status_code == 401
    open_client.cookies.set("clusterlens-key", "stale-key-0123456789")
    assert open_client.get("/api/jobs").status_code == 200


def principal(roles: list[str]) -> str:
    claims = [{"typ": "roles", "val": r} for r in roles] + [{"typ": "name", "val": "ada@example.com"}]
    return base64.b64encode(json.dumps({"auth_typ": "aad", "claims": claims}).encode()).decode()


def test_platform_sign_in_grants_by_app_role_only_when_trusted(tmp_path: Path) -> None:
    trusted = client_for(tmp_path, api_key=None, read_key=READ_KEY, auth_platform=True)
    writer = {"X-MS-CLIENT-PRINCIPAL": principal(["clusterlens.write"])}
    reader = {"X-MS-CLIENT-PRINCIPAL": principal(["clusterlens.read"])}
    assert trusted.put("/api/label-set", headers=writer, json={"classes": ["a", "b"]}).status_code == 200
    resp = trusted.put("/api/label-set", headers=reader, json={"classes": ["a", "b"]})
    assert resp.status_code == 403 and "clusterlens.write" in resp.json()["error"]["message"]
    assert trusted.get("/api/label-set", headers=reader).status_code == 200
    assert trusted.get("/api/label-set").status_code == 401  # nobody signed in
    for forged in ("not base64!", base64.b64encode(b"[1, 2]").decode(), base64.b64encode(b"\xff").decode()):
        assert trusted.get("/api/label-set", headers={"X-MS-CLIENT-PRINCIPAL": forged}).status_code == 401
    # not trusted (no platform sign-in in front): the header is anyone's to forge, so it counts for nothing
    untrusted = client_for(tmp_path)
    assert untrusted.put("/api/label-set", headers=writer, json={"classes": ["a", "b"]}).status_code == 401


def test_cors_is_off_unless_configured(tmp_path: Path) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    off = client_for(tmp_path)
    assert "access-control-allow-origin" not in off.get("/api/jobs", headers=origin).headers
    resp = off.options("/api/labels", headers=preflight)
    assert resp.status_code >= 400 and "access-control-allow-origin" not in resp.headers
    on = client_for(tmp_path, cors_origins=["https://app.example"])
    allowed = {**preflight, "Origin": "https://app.example"}
    resp = on.options("/api/labels", headers=allowed)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in resp.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in on.get("/api/jobs", headers=origin).headers
    assert on.options("/api/labels", headers=preflight).status_code == 400
    with pytest.raises(ValidationError):
        make_settings(tmp_path, cors_origins=["https://app.example/path"])


def test_security_headers_and_a_strict_page_policy(tmp_path: Path) -> None:
    client = client_for(tmp_path)
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert csp == page_csp(page.text)
    script = re.search(r"<script>(.*?)</script>", page.text, flags=re.S)
    assert script is not None and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"\son[a-z]+=", page.text)  # no inline handlers (the policy would block them)
    assert not re.search(r"\sstyle=", page.text)
    for resp in (page, client.get("/api/jobs"), client.get("/api/images/" + SAMPLE_ID), client.post("/api/jobs")):
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert "content-security-policy" in resp.headers
        assert "strict-transport-security" not in resp.headers  # plain HTTP here
    behind_https = client.get("/api/jobs", headers={"X-Forwarded-Proto": "https"})
    assert behind_https.headers["strict-transport-security"].startswith("max-age=")


def test_keys_must_be_strong_and_distinct(tmp_path: Path) -> None:
    for bad in ("short", "x" * 300, "has a newline\n0123456789"):
        with pytest.raises(ValidationError):
            make_settings(tmp_path, api_key=bad)
    with pytest.raises(ValidationError):
        make_settings(tmp_path, read_key=API_KEY)
    assert make_settings(tmp_path, api_key="").api_key is None  # an empty variable means none
    assert API_KEY not in repr(make_settings(tmp_path))  # never printed with the settings


def test_the_demo_key_is_random_private_and_stable(tmp_path: Path) -> None:
    key = demo_key(tmp_path)
    assert len(key) >= 32 and demo_key(tmp_path) == key and demo_key(tmp_path / "other") != key
    assert stat.S_IMODE(os.stat(tmp_path / "demo-api-key").st_mode) == 0o600
