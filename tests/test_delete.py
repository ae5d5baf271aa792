"""DELETE /api/images/{id}: gone from storage and answers at once, and never back after a reindex."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from job.datasets import png_bytes
from job.embeddings import embed_pending
from job.reindex import reindex
from shared.catalog import Catalog
from shared.ingest import IngestItem, ingest_bytes
from shared.search import SearchService
from shared.storage import LocalStorage
from tests.conftest import AUTH, Collection, make_settings


def test_delete_removes_an_image_for_good(tmp_path: Path, collection: Collection) -> None:
    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    settings = make_settings(tmp_path / "data", index_refresh_seconds=0)
    service = SearchService(settings, storage, encoder=collection.encoder)
    client = TestClient(create_app(service=service), raise_server_exceptions=False, headers=AUTH)
    index = service.index()
    victim = str(index.ids[3])
    data = storage.get("uploads", Catalog(storage).get(victim).blob)
    first = client.post("/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "3"}).json()
    assert first["results"][0]["id"] == victim

    resp = client.delete(f"/api/images/{victim}")
    assert resp.status_code == 200 and resp.json()["deleted"] == victim
    assert client.get(f"/api/images/{victim}").status_code == 404
    after = client.post("/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "10"}).json()
    assert victim not in {r["id"] for r in after["results"]} and len(after["results"]) == 10
    assert client.post("/api/search", json={"id": victim}).json()["error"]["code"] == "image_not_found"
    label = index.label_of(3)
    same_label = sum(index.label_of(row) == label for row in range(len(index.ids)))  # the victim included
    assert same_label > 50  # about 100 of each class among the 1,000
    text = client.post("/api/search", json={"text": "x", "k": 100, "filters": {"label": label}}).json()
    assert len(text["results"]) == min(100, same_label - 1)  # every other image of its label, not it
    assert {r["label"] for r in text["results"]} == {label}
    assert victim not in {r["id"] for r in text["results"]}

    # Another worker (a fresh service on the same storage) does not return it either.
    other = SearchService(settings, storage, encoder=collection.encoder)
    from_other = other.search_image(data, 10)["results"]
    assert len(from_other) == 10 and victim not in {r["id"] for r in from_other}

    # Reindex leaves it out although its embedding is still in the shards; embedding again changes nothing.
    built = reindex(storage, settings, collection.encoder.version)
    assert built.mode == "full" and built.count == 999
    assert embed_pending(storage, settings, collection.encoder).embedded == 0
    assert reindex(storage, settings, collection.encoder.version).mode == "unchanged"
    assert service.index().row_of(victim) is None

    assert client.delete(f"/api/images/{victim}").status_code == 404
    assert client.delete("/api/images/not-an-id").json()["error"]["code"] == "invalid_id"

    # Adding the same bytes again is taken as wanting it back.
    assert ingest_bytes(storage, settings, IngestItem(data=data, source="again")).status == "added"
    assert victim not in Catalog(storage).deleted_ids()
    back = reindex(storage, settings, collection.encoder.version)
    assert back.count == 1000 and service.search_id(victim, 1)["results"][0]["id"] == victim


def test_incremental_add_after_a_delete_retrains(tmp_path: Path, collection: Collection, fashion_test) -> None:  # type: ignore[no-untyped-def]
    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    settings = make_settings(tmp_path / "data")
    service = SearchService(settings, storage, encoder=collection.encoder)
    gone = str(service.index().ids[0])
    service.live.delete(gone)
    ingest_bytes(storage, settings, IngestItem(data=png_bytes(fashion_test[0][0]), source="new"))
    embed_pending(storage, settings, collection.encoder)
    result = reindex(storage, settings, collection.encoder.version)
    assert result.mode == "full" and result.count == 1000
    with pytest.raises(Exception, match="not in the index"):
        SearchService(settings, storage, encoder=collection.encoder).search_id(gone, 1)
