"""Text-to-image search: labelled Fashion-MNIST, and unlabelled real photos through class predictions."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from job.datasets import skimage_photo_items
from job.embeddings import embed_pending
from job.index_build import IndexParams, build_index, publish
from job.reindex import reindex
from shared.encoder import ImageEncoder
from shared.index import Captions, ClusterIndex
from shared.ingest import IngestItem, ingest_bytes
from shared.search import SearchService
from shared.storage import LocalStorage
from shared.text_encoder import TextEncoder
from shared.text_rank import predicted_labels, rank_text
from shared.text_search import query_weights, text_scores
from tests.conftest import AUTH, Collection, make_settings


@pytest.fixture(scope="module")
def client(collection: Collection) -> TestClient:
    return TestClient(create_app(service=collection.service), raise_server_exceptions=False, headers=AUTH)


@pytest.mark.parametrize(("text", "label"), [("ankle boot", "Ankle boot"), ("a bag", "Bag"), ("trousers", "Trouser")])
def test_labelled_collection_answers_text_queries(client: TestClient, text: str, label: str) -> None:
    resp = client.post("/api/search", json={"text": text, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    hits = sum(r["label"] == label for r in body["results"])
    assert len(body["results"]) == 10 and hits >= 8, [r["label"] for r in body["results"]]
    assert len(body["query_classes"]) == 5 and {"embed", "search", "total"} <= set(body["timing_ms"])


@pytest.fixture(scope="module")
def photo_service(tmp_path_factory: pytest.TempPathFactory, encoder: ImageEncoder) -> SearchService:
    """25 real photos ingested WITHOUT labels: only the image's own class predictions can match text."""
    settings = make_settings(tmp_path_factory.mktemp("photos"))
    storage = LocalStorage(settings.data_dir)
    spec = importlib.util.find_spec("foolbox")
    assert spec and spec.origin, "foolbox's sample photos are installed by `make test`"
    items = [IngestItem(data=i.data, source=i.source) for i in skimage_photo_items()]
    for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "imagenet_*.jpg"))):
        items.append(IngestItem(data=Path(path).read_bytes(), source=Path(path).name))
    for item in items:
        assert ingest_bytes(storage, settings, item).status == "added"
    embed_pending(storage, settings, encoder)
    reindex(storage, settings, encoder.version)
    return SearchService(settings, storage, encoder=encoder)


@pytest.mark.parametrize(
    ("text", "expected_sources"),
    [
        ("a cat", {"skimage/chelsea"}),
        ("a cup of coffee", {"skimage/coffee"}),
        ("a rocket", {"skimage/rocket"}),
        ("a dog", {"imagenet_00_243.jpg", "imagenet_16_251.jpg"}),  # bull mastiff, dalmatian
        ("a strawberry", {"imagenet_04_949.jpg"}),
    ],
)
def test_unlabelled_photos_match_through_class_predictions(
    photo_service: SearchService, text: str, expected_sources: set[str]
) -> None:
    from shared.catalog import Catalog

    results = photo_service.search_text(text, k=3)["results"]
    first = Catalog(photo_service.storage).get(results[0]["id"]).source
    assert first in expected_sources, [Catalog(photo_service.storage).get(r["id"]).source for r in results]


@pytest.mark.parametrize(
    "payload",
    [
        {"text": ""},
        {"text": "   "},
        {"text": "x" * 501},
        {"text": 123},
        {"text": "a bag", "id": "a" * 64},
        {"text": "a bag", "k": 0},
    ],
)
def test_bad_text_queries(client: TestClient, payload: dict) -> None:
    resp = client.post("/api/search", json=payload)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] in {"invalid_text", "missing_id", "invalid_k"}


def test_index_without_class_predictions_asks_for_a_reindex(tmp_path: Path, collection: Collection) -> None:
    storage = LocalStorage(tmp_path)
    vectors = np.random.default_rng(0).normal(size=(50, 1280)).astype(np.float32)
    publish(
        storage,
        build_index(
            vectors,
            [f"{i:064x}" for i in range(50)],
            [None] * 50,
            encoder_version=collection.encoder.version,
            params=IndexParams(kind="ivf_flat"),
        ),
    )
    client = TestClient(create_app(service=SearchService(make_settings(tmp_path), storage)), headers=AUTH)
    resp = client.post("/api/search", json={"text": "a bag"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "index_outdated"


def test_unrelated_images_are_not_padded_in(photo_service: SearchService) -> None:
    results = photo_service.search_text("a cup of coffee", k=20)["results"]
    assert 1 <= len(results) < 20 and all(r["score"] >= 0.001 for r in results)


def test_lexical_label_matching() -> None:
    from shared.text_search import lexical_match, words

    assert words("A pair of Trousers") == {"trouser"} and words("dress") == {"dress"}
    got = lexical_match("ankle boots", ["Ankle boot", "Trouser", "T-shirt/top", "boot"])
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert lexical_match("t-shirt", ["T-shirt/top"])[0] == pytest.approx(2 / 3)
    assert lexical_match("anything", []).shape == (0,)


def test_an_index_from_before_class_predictions_still_serves_images(tmp_path: Path, collection: Collection) -> None:
    """Format-1 versions had no class files: image search must keep working, text search asks for a reindex."""
    from shared.storage import INDEX

    storage = LocalStorage(tmp_path)
    vectors = np.random.default_rng(1).normal(size=(50, 1280)).astype(np.float32)
    version = publish(
        storage,
        build_index(
            vectors,
            [f"{i:064x}" for i in range(50)],
            [None] * 50,
            encoder_version=collection.encoder.version,
            params=IndexParams(kind="ivf_flat"),
        ),
    )
    for name in ("class_top.npy", "class_prob.npy"):
        storage.delete(INDEX, f"{version}/{name}")
    service = SearchService(make_settings(tmp_path), storage)
    assert service.search_id(f"{7:064x}", k=3)["results"][0]["id"] == f"{7:064x}"
    client = TestClient(create_app(service=service), headers=AUTH)
    resp = client.post("/api/search", json={"text": "a bag"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "index_outdated"


def test_captions_make_images_findable_by_text(
    tmp_path: Path, encoder: ImageEncoder, fashion_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """A caption (``photo.txt`` beside ``photo.png``) is searchable text even when the pixels say otherwise."""
    from shared.ingest import folder_items, scan_folder
    from tests.conftest import png

    x, _ = fashion_test
    folder = tmp_path / "imgs"
    folder.mkdir()
    captions = {"truck": "A red fire truck parked\toutside the station", "ramen": "a bowl of ramen noodles"}
    for i, (stem, text) in enumerate(captions.items()):
        (folder / f"{stem}.png").write_bytes(png(x[i]))
        (folder / f"{stem}.txt").write_text(text)
    for i in range(2, 40):
        (folder / f"plain{i}.png").write_bytes(png(x[i]))
    settings = make_settings(tmp_path / "data")
    storage = LocalStorage(settings.data_dir)
    for item in folder_items(scan_folder(folder)):
        assert ingest_bytes(storage, settings, item).status == "added"
    embed_pending(storage, settings, encoder)
    version = reindex(storage, settings, encoder.version).version
    assert storage.get_json("index", f"{version}/manifest.json")["captions"] == 2
    service = SearchService(settings, storage, encoder=encoder)

    for query, stem in (("fire engine", "truck"), ("noodle soup", "ramen")):
        top = service.search_text(query, 3)["results"][0]
        assert top["caption"] == " ".join(captions[stem].split()), (query, top)
    plain = service.search_text("fire engine", 40)["results"]
    assert all(r["caption"] is None for r in plain[1:])  # images without a caption report none
    by_image = service.search_id(service.search_text("noodle soup", 1)["results"][0]["id"], 1)["results"][0]
    assert by_image["caption"] == "a bowl of ramen noodles"


TEXTS = ("ankle boot", "a bag", "trousers", "a dress", "sneakers", "a cat", "a cup of coffee", "fire engine")


def full_scan_top(index: ClusterIndex, encoder: TextEncoder, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The old way: every row scored by ``text_scores``, hidden rows dropped, the best ``k`` (ties: lower row)."""
    query = encoder.encode([text])[0]
    predicted = prob = None
    if index.predicted_names:
        predicted, prob = predicted_labels(index)[index.predicted], index.predicted_prob
    scores, _ = text_scores(
        text,
        query,
        encoder.imagenet_classes(),
        index.label_names,
        encoder.encode(index.label_names) if index.label_names else np.zeros((0, 384), np.float32),
        index.class_top,
        index.class_prob,
        index.labels,
        0.05,
        index.captions.rows,
        index.caption_vectors @ query if len(index.captions.rows) else None,
        predicted,
        prob,
    )
    scores[index.hidden] = 0.0
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    order = order[scores[order] > 0]
    return order, scores[order]


def ranked_top(index: ClusterIndex, encoder: TextEncoder, text: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    query = encoder.encode([text])[0]
    label_vectors = encoder.encode(index.label_names) if index.label_names else np.zeros((0, 384), np.float32)
    weights = query_weights(text, query, encoder.imagenet_classes(), index.label_names, label_vectors, 0.05)
    sims = index.caption_vectors @ query if len(index.captions.rows) else None
    ranked = rank_text(index, weights, k, sims)
    return ranked.rows, ranked.scores, ranked.scored


def assert_same_top(index: ClusterIndex, encoder: TextEncoder, texts: tuple[str, ...], ks: tuple[int, ...]) -> None:
    for text in texts:
        for k in ks:
            rows, scores, _ = ranked_top(index, encoder, text, k)
            want_rows, want_scores = full_scan_top(index, encoder, text, k)
            np.testing.assert_array_equal(scores, want_scores, err_msg=f"{text!r} k={k}")
            np.testing.assert_array_equal(rows, want_rows, err_msg=f"{text!r} k={k}")


def test_ranking_from_lists_equals_the_full_scan_on_the_labelled_collection(collection: Collection) -> None:
    index = collection.service.index()
    assert index.class_lists is not None  # published with the version, not built at load
    assert_same_top(index, collection.service.models.text(), TEXTS, (1, 10, 50))


def test_ranking_from_lists_equals_the_full_scan_on_unlabelled_photos(photo_service: SearchService) -> None:
    assert_same_top(photo_service.index(), photo_service.models.text(), TEXTS, (1, 3, 20))


def test_ranking_from_lists_equals_the_full_scan_with_labels_predictions_captions_and_deletions(
    collection: Collection,
) -> None:
    """The collection's class predictions in an index built without labels, then a few labels laid over,
    a classifier's predictions, captions and deleted rows: every term of the score in play, and a
    peaked query scores a small share of the rows."""
    served = collection.service.index()
    n = served.count
    rng = np.random.default_rng(5)
    text_encoder = collection.service.models.text()
    caption_rows = np.sort(rng.choice(n, 30, replace=False)).astype(np.int64)
    caption_text = np.array([f"a photo of a {w}" for w in rng.choice(["bag", "boot", "dress", "truck"], 30)])
    ids = [f"{i:064x}" for i in range(n)]
    index = build_index(
        rng.normal(size=(n, 1280)).astype(np.float32),
        ids,
        [None] * n,
        encoder_version=collection.encoder.version,
        params=IndexParams(kind="ivf_flat"),
        class_top=np.asarray(served.class_top),
        class_prob=np.asarray(served.class_prob),
        captions=Captions(caption_rows, text_encoder.encode(list(caption_text)).astype(np.float16), caption_text),
    )
    names = sorted(set(served.label_names))
    labelled = rng.choice(n, 40, replace=False)
    index.overlay_labels({ids[r]: str(rng.choice(names)) for r in labelled}, names)
    predicted = rng.integers(-1, len(names), n).astype(np.int32)
    index.set_predictions(names, predicted, rng.uniform(0, 1, n).astype(np.float32))
    index.hidden = np.sort(rng.choice(n, 25, replace=False)).astype(np.int64)
    assert_same_top(index, text_encoder, TEXTS, (1, 10, 50))
    _, _, scored = ranked_top(index, text_encoder, "a cup of coffee", 10)
    assert scored < n / 2, scored


def test_a_version_without_class_lists_builds_them_at_load(tmp_path: Path, collection: Collection) -> None:
    """Versions published before the lists load (the lists built in memory) and answer as with them."""
    import shutil

    from shared.class_lists import LIST_FILES, ClassLists
    from shared.index import current_version
    from shared.storage import INDEX

    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    version = current_version(storage)
    for name in LIST_FILES:
        assert storage.exists(INDEX, f"{version}/{name}")
        storage.delete(INDEX, f"{version}/{name}")
    service = SearchService(make_settings(tmp_path / "data"), storage, encoder=collection.encoder)
    assert isinstance(service.index().class_lists, ClassLists)
    assert not isinstance(service.index().class_lists.rows, np.memmap)  # type: ignore[union-attr]
    for text in ("a bag", "a cat"):
        got, want = service.search_text(text, 20)["results"], collection.service.search_text(text, 20)["results"]
        assert [(r["id"], r["score"]) for r in got] == [(r["id"], r["score"]) for r in want]
