"""A real uvicorn server on 127.0.0.1 (what `clusterlens serve` and `make demo` run)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Collection, png
from tests.servers import running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(collection: Collection) -> Iterator[str]:
    with running_server({"CLUSTERLENS_DATA_DIR": str(collection.settings.data_dir)}) as url:
        yield url


def test_served_page_and_search(server: str, fashion_test) -> None:  # type: ignore[no-untyped-def]
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "clusterlens" in page.text
    health = httpx.get(server + "/api/health").json()
    assert health["status"] == "ok" and health["index"]["count"] == 1000
    images, _ = fashion_test
    resp = httpx.post(
        server + "/api/search", files={"image": ("q.png", png(images[1]), "image/png")}, data={"k": "7"}, timeout=30
    )
    assert resp.status_code == 200 and len(resp.json()["results"]) == 7
    first = resp.json()["results"][0]
    img = httpx.get(server + first["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"


def test_served_errors_are_json(server: str) -> None:
    resp = httpx.post(server + "/api/search", content=b"\x00" * 100, headers={"Content-Type": "image/png"})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    huge = httpx.post(server + "/api/search", content=b"0" * (21 * 1024 * 1024), headers={"Content-Type": "image/png"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"


def test_chunked_upload_without_length_is_cut_off(server: str) -> None:
    """A streamed body with no Content-Length is refused once it passes the limit, not buffered whole."""

    def body():  # type: ignore[no-untyped-def]
        for _ in range(30):
            yield b"0" * (1024 * 1024)

    resp = httpx.post(server + "/api/search", content=body(), headers={"Content-Type": "image/png"}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
