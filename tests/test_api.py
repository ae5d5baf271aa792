"""End to end through the real HTTP app on a real 1,000-image Fashion-MNIST collection."""

from __future__ import annotations

import asyncio
import json

import azure.functions as func
import numpy as np
import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from tests.conftest import AUTH, FASHION_MNIST_CLASSES, Collection, png

N_QUERIES = 500


@pytest.fixture(scope="module")
def client(collection: Collection) -> TestClient:
    return TestClient(create_app(service=collection.service), raise_server_exceptions=False, headers=AUTH)


def test_held_out_images_find_their_class(client: TestClient, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """Mean precision@10 by class label over held-out test images, uploaded as files."""
    images, labels = fashion_test
    precisions = []
    for i in range(N_QUERIES):
        resp = client.post("/api/search", files={"image": ("q.png", png(images[i]), "image/png")}, data={"k": "10"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["results"]) == 10
        truth = FASHION_MNIST_CLASSES[int(labels[i])]
        precisions.append(np.mean([r["label"] == truth for r in body["results"]]))
    mean_p10 = float(np.mean(precisions))
    print(f"\nmean precision@10 over {N_QUERIES} held-out Fashion-MNIST test images: {mean_p10:.3f}")
    assert mean_p10 >= 0.75


def test_search_response_shape(client: TestClient, fashion_test) -> None:  # type: ignore[no-untyped-def]
    images, _ = fashion_test
    body = client.post("/api/search", files={"image": ("q.png", png(images[0]), "image/png")}).json()
    assert len(body["results"]) == 10  # default k
    first = body["results"][0]
    assert set(first) >= {"id", "score", "cluster", "label"}
    assert first["label"] in FASHION_MNIST_CLASSES
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0001
    probed = {p["cluster"] for p in body["cluster_probe"]}
    assert probed and all(r["cluster"] in probed for r in body["results"])  # only probed clusters searched
    assert {"decode", "embed", "search", "total"} <= set(body["timing_ms"])


def test_search_by_id_returns_that_image_first(client: TestClient, collection: Collection) -> None:
    index = collection.service.index()
    for row in (0, 17, 500, 999):
        image_id = str(index.ids[row])
        resp = client.post("/api/search", json={"id": image_id, "k": 5})
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert results[0]["id"] == image_id
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[0]["label"] == index.label_of(row)


def test_image_bytes_served(client: TestClient, collection: Collection) -> None:
    image_id = str(collection.service.index().ids[3])
    resp = client.get(f"/api/images/{image_id}")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    import hashlib

    assert hashlib.sha256(resp.content).hexdigest() == image_id


def test_health_reports_versions_and_counts(client: TestClient, collection: Collection) -> None:
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["encoder"]["version"] == collection.encoder.version
    assert body["index"]["count"] == 1000
    assert body["index"]["encoder_version"] == collection.encoder.version
    assert body["index"]["version"].startswith("v")


def test_page_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<input" in page.text and "/api/search" in page.text
    schema = client.get("/api/openapi.json").json()
    assert "/api/search" in schema["paths"] and "/api/health" in schema["paths"]
    content = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)


TRUNCATED_PNG = png(np.full((64, 64), 128, np.uint8) + np.arange(64, dtype=np.uint8)[None, :])[:60]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({}, 400, "empty_request"),
        ({"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty_request"),
        ({"files": {"image": ("x.png", b"this is not an image at all", "image/png")}}, 415, "unsupported_media_type"),
        ({"files": {"image": ("x.png", TRUNCATED_PNG, "image/png")}}, 400, "invalid_image"),
        ({"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty_image"),
        ({"files": {"other": ("x.png", b"abc", "image/png")}}, 400, "missing_image"),
        ({"json": {"id": "f" * 64}}, 404, "image_not_found"),
        ({"json": {"id": "../../etc/passwd"}}, 400, "invalid_id"),
        ({"json": {"id": 12}}, 400, "invalid_id"),
        ({"json": {"k": 3}}, 400, "missing_id"),
        ({"json": ["a"]}, 400, "missing_id"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, None),
    ],
)
def test_bad_input_is_a_4xx_json_error(client: TestClient, kwargs: dict, status: int, code: str | None) -> None:  # type: ignore[type-arg]
    resp = client.post("/api/search", **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if code:
        assert err["code"] == code
    assert "Traceback" not in resp.text


@pytest.mark.parametrize("k", [0, -1, 101, 10**9, "abc", 2.5, True])
def test_bad_k_is_rejected(client: TestClient, collection: Collection, fashion_test, k: object) -> None:  # type: ignore[no-untyped-def]
    image_id = str(collection.service.index().ids[0])
    resp = client.post("/api/search", json={"id": image_id, "k": k})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_k"
    resp = client.post(
        "/api/search", files={"image": ("q.png", png(fashion_test[0][0]), "image/png")}, data={"k": str(k)}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_k"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/images/" + "0" * 64, 404, "image_not_found"),
        ("/api/images/not-an-id", 400, "invalid_id"),
        ("/api/nowhere", 404, "not_found"),
    ],
)
def test_bad_paths(client: TestClient, path: str, status: int, code: str) -> None:
    resp = client.get(path)
    assert resp.status_code == status and resp.json()["error"]["code"] == code


def test_wrong_method_is_json(client: TestClient) -> None:
    resp = client.get("/api/search")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_no_index_yet_is_a_clear_503(tmp_path, encoder) -> None:  # type: ignore[no-untyped-def]
    from shared.search import SearchService
    from tests.conftest import make_settings

    service = SearchService(make_settings(tmp_path), encoder=encoder)
    client = TestClient(create_app(service=service), raise_server_exceptions=False, headers=AUTH)
    resp = client.post("/api/search", json={"id": "a" * 64})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "index_missing"
    assert "reindex" in resp.json()["error"]["message"]
    assert client.get("/api/health").json()["status"] == "degraded"


def test_azure_functions_wrapper_routes_to_the_api(collection: Collection, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """function_app.app (AsgiFunctionApp) handles a real func.HttpRequest end to end."""
    monkeypatch.setenv("CLUSTERLENS_DATA_DIR", str(collection.settings.data_dir))
    from shared.settings import get_settings

    get_settings.cache_clear()
    import function_app

    functions = {f.get_function_name(): f for f in function_app.app.get_functions()}
    assert sorted(functions) == ["http_app_func", "ingest_blob", "reindex_timer", "retrain_timer"]
    # What the host indexes: the blob trigger fed by Event Grid, timers on schedules from app settings.
    blob = json.loads(functions["ingest_blob"].get_function_json())["bindings"][0]
    assert (blob["type"], blob["path"], blob["source"]) == ("blobTrigger", "uploads/{name}", "EventGrid")
    schedules = {
        name: json.loads(functions[name].get_function_json())["bindings"][0]["schedule"]
        for name in ("reindex_timer", "retrain_timer")
    }
    assert schedules == {"reindex_timer": "%REINDEX_SCHEDULE%", "retrain_timer": "%RETRAIN_SCHEDULE%"}
    handler = functions["http_app_func"].get_user_function()
    image_id = str(collection.service.index().ids[5])
    req = func.HttpRequest(
        method="POST",
        url="http://localhost:7071/api/search",
        headers={"Content-Type": "application/json"},
        body=json.dumps({"id": image_id, "k": 3}).encode(),
    )
    resp = asyncio.run(handler(req, _context()))
    assert resp.status_code == 200
    assert json.loads(resp.get_body())["results"][0]["id"] == image_id
    req = func.HttpRequest(method="GET", url="http://localhost:7071/api/images/zzz", headers={}, body=b"")
    resp = asyncio.run(handler(req, _context()))
    assert resp.status_code == 400 and json.loads(resp.get_body())["error"]["code"] == "invalid_id"
    get_settings.cache_clear()


def _context() -> func.Context:
    class Ctx(func.Context):
        invocation_id = "test"
        function_name = "http_app_func"
        function_directory = "."
        trace_context = None  # type: ignore[assignment]
        retry_context = None  # type: ignore[assignment]
        thread_local_storage = None  # type: ignore[assignment]

    return Ctx()


def test_queries_run_faiss_on_the_configured_threads(collection: Collection, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """CLUSTERLENS_SEARCH_THREADS holds in whichever server thread answers (OpenMP counts per thread)."""
    import threading

    import faiss

    from shared.search import SearchService
    from tests.conftest import make_settings

    settings = make_settings(collection.settings.data_dir, search_threads=1)
    service = SearchService(settings, collection.storage, encoder=collection.encoder)
    seen: dict[str, int] = {}

    def worker() -> None:  # a fresh thread, like a server's pool thread
        faiss.omp_set_num_threads(2)
        service.search_image(png(fashion_test[0][0]), 5)
        seen["image"] = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(2)
        service.search_id(str(service.index().ids[0]), 5)
        seen["id"] = faiss.omp_get_max_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"image": 1, "id": 1}
