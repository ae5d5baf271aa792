"""Search filters (label, cluster, predicted class, ingest time) through the HTTP API, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from job.embeddings import EmbeddingStore
from shared.features import power_normalize
from shared.index import pretransform
from tests.conftest import AUTH, Collection, png


@pytest.fixture(scope="module")
def client(collection: Collection) -> TestClient:
    return TestClient(create_app(service=collection.service), raise_server_exceptions=False, headers=AUTH)


def _search(client: TestClient, **body: object) -> dict:  # type: ignore[type-arg]
    resp = client.post("/api/search", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_label_filter_matches_exact_filtered_search(client: TestClient, collection: Collection) -> None:
    index = collection.service.index()
    emb = EmbeddingStore(collection.storage, collection.encoder.version).load()
    xt = pretransform(index.index, power_normalize(emb.vectors, index.manifest.power))
    rows_of = {image_id: index.row_of(image_id) for image_id in emb.ids}
    bag = np.array([rows_of[i] for i in emb.ids if index.label_of(rows_of[i]) == "Bag"])
    recalls = []
    for image_id in emb.ids[:40]:  # queries of every class; the filter keeps only bags
        body = _search(client, id=image_id, k=10, filters={"label": "Bag"})
        assert body["filters"] == {"label": "Bag"}
        assert len(body["results"]) == 10 and {r["label"] for r in body["results"]} == {"Bag"}
        q = xt[rows_of[image_id]]
        sims = xt[bag] @ q
        want = {str(index.ids[r]) for r in bag[np.argsort(-sims)[:10]]}
        recalls.append(len(want & {r["id"] for r in body["results"]}) / 10)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_cluster_class_and_time_filters(client: TestClient, collection: Collection) -> None:
    index = collection.service.index()
    some_id = str(index.ids[0])
    cluster = int(index.clusters[5])
    body = _search(client, id=some_id, k=100, filters={"cluster": cluster})
    assert {r["cluster"] for r in body["results"]} == {cluster}
    assert len(body["results"]) == min(100, int((index.clusters == cluster).sum()))
    assert [p["cluster"] for p in body["cluster_probe"]] == [cluster]

    top1 = int(np.bincount(index.class_top[:, 0]).argmax())  # the most common predicted ImageNet class
    with_top1 = int((index.class_top[:, 0] == top1).sum())
    assert with_top1 >= 20  # the most common of 1,000 predictions: the filter has plenty to return
    body = _search(client, id=some_id, k=20, filters={"imagenet_class": top1})
    assert len(body["results"]) == 20
    assert all(int(index.class_top[index.row_of(r["id"]), 0]) == top1 for r in body["results"])

    assert _search(client, id=some_id, k=5, filters={"ingested_after": "2999-01-01T00:00:00Z"})["results"] == []
    assert len(_search(client, id=some_id, k=5, filters={"ingested_before": "2999-01-01"})["results"]) == 5
    # Text with two filters. "footwear" alone finds ankle boots first; filtered, ten sneakers.
    unfiltered = {r["id"] for r in _search(client, text="footwear", k=10)["results"]}
    both = _search(client, text="footwear", k=10, filters={"label": "Sneaker", "ingested_before": "2999-01-01"})
    assert len(both["results"]) == 10 and {r["label"] for r in both["results"]} == {"Sneaker"}
    assert {r["id"] for r in both["results"]} != unfiltered
    too_early = {"label": "Sneaker", "ingested_before": "2000-01-01"}
    assert _search(client, text="footwear", k=10, filters=too_early)["results"] == []
    # No filler: a text that no image of the label matches (score under text_min_score) finds nothing.
    assert _search(client, text="ankle boot", k=10, filters={"label": "Bag"})["results"] == []


def test_filters_on_uploads(client: TestClient, fashion_test) -> None:  # type: ignore[no-untyped-def]
    x, _ = fashion_test
    data = png(x[0])
    resp = client.post(
        "/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "5", "label": "Sneaker"}
    )
    assert resp.status_code == 200, resp.text
    assert [r["label"] for r in resp.json()["results"]] == ["Sneaker"] * 5
    resp = client.post("/api/search?k=4&label=Coat", content=data, headers={"Content-Type": "image/png"})
    assert resp.status_code == 200 and [r["label"] for r in resp.json()["results"]] == ["Coat"] * 4


@pytest.mark.parametrize(
    ("filters", "code"),
    [
        ({"label": "Bags"}, "unknown_label"),
        ({"cluster": "x"}, "invalid_filter"),
        ({"cluster": 10_000}, "invalid_filter"),
        ({"imagenet_class": 1000}, "invalid_filter"),
        ({"colour": "red"}, "invalid_filter"),
        ({"ingested_after": "yesterday"}, "invalid_filter"),
        ({"cluster": True}, "invalid_filter"),
        ("label=Bag", "invalid_filter"),
    ],
)
def test_bad_filters_are_a_400(client: TestClient, collection: Collection, filters: object, code: str) -> None:
    some_id = str(collection.service.index().ids[0])
    resp = client.post("/api/search", json={"id": some_id, "filters": filters})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == code
