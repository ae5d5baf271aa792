"""Batch analysis on 2,000 real Fashion-MNIST images: clusters, maps, classifiers, anomalies, mislabels,
the report and its API, and POST /api/classify on held-out test images.

Embedded at 64 px (the encoder takes any size) so the collection builds in seconds; the analysis runs
through the real job queue and worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from functions.http_api import create_app
from job.analysis import MODELS
from job.classifier import FeatureSpace, make_classifier, to_onnx
from job.datasets import FASHION_MNIST_CLASSES, fashion_mnist_items
from job.embeddings import EmbeddingStore, embed_pending
from job.reindex import reindex
from job.run_analysis import run_analysis
from job.worker import Worker
from shared.catalog import Catalog
from shared.classify import Classifier
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.jobs import JobStore
from shared.queues import open_job_queues, open_queue
from shared.search import SearchService
from shared.settings import Settings
from shared.storage import REPORTS, LocalStorage
from tests.conftest import AUTH, make_settings, png
from tests.test_layout import HEAVY, ROOT

SIZE = 2000
SMALL = dict(image_size=64, analysis_k_max=16, analysis_map_sample=400, analysis_silhouette_sample=1000)


@dataclass
class Analysed:
    settings: Settings
    storage: LocalStorage
    client: TestClient
    metrics: dict[str, Any]
    job: dict[str, Any]


def _collection(root: Path, n: int, labelled: bool, **overrides: Any) -> tuple[Settings, LocalStorage, ImageEncoder]:
    settings = make_settings(root, **{**SMALL, **overrides})
    storage = LocalStorage(settings.data_dir)
    for item in fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=n):
        ingest_bytes(storage, settings, item if labelled else dataclasses.replace(item, label=None))
    encoder = ImageEncoder(settings.encoder_dir, size=64, intra_op_threads=settings.ort_intra_op_threads)
    assert embed_pending(storage, settings, encoder).embedded == n
    reindex(storage, settings, encoder.version)
    return settings, storage, encoder


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Analysed]:
    """2,000 labelled images, analysed by a job started over HTTP and run by the worker."""
    settings, storage, encoder = _collection(tmp_path_factory.mktemp("analysis"), SIZE, labelled=True)
    service = SearchService(settings, storage, encoder=encoder)
    with TestClient(create_app(service, settings), headers=AUTH) as client:
        started = client.post("/api/jobs", json={"kind": "analyse"})
        assert started.status_code == 202, started.text
        poison = open_queue(settings, settings.poison_queue_name)
        Worker(storage, settings, open_job_queues(settings), poison, encoder=encoder).run(until_idle=True, max_jobs=1)
        record = JobStore(storage).get(started.json()["job"]["job_id"])
        assert record.status == "succeeded", record.error
        metrics = client.get("/api/reports/latest").json()["metrics"]
        yield Analysed(settings, storage, client, metrics, record.result)


def test_clusters_are_sane_and_agree_with_the_labels(analysed: Analysed) -> None:
    c = analysed.metrics["clustering"]
    assert -1 <= c["silhouette"] <= 1 and c["silhouette"] > 0
    assert c["chosen_by"] == "silhouette sweep" and c["k"] in [s["k"] for s in c["sweep"]]
    assert c["silhouette"] == max(s["silhouette"] for s in c["sweep"])
    assert sum(c["sizes"]) == SIZE and len(c["sizes"]) == c["k"] and min(c["sizes"]) > 0
    # Ten real classes: clusters and labels agree far beyond chance (ARI 0 for random clusters).
    assert c["agreement"]["adjusted_rand"] > 0.2 and c["agreement"]["purity"] > 1.5 / c["k"]
    nearest = json.loads(analysed.storage.get(REPORTS, f"{analysed.metrics['version']}/clusters.json"))["nearest"]
    assert len(nearest) == c["k"] and all(1 <= len(v) <= 8 for v in nearest.values())


def test_maps_hold_every_point_with_its_cluster_and_label(analysed: Analysed) -> None:
    maps = analysed.metrics["maps"]
    assert set(maps) == {"pca", "umap", "tsne"}
    assert maps["pca"]["points"] == SIZE and maps["umap"]["points"] == maps["tsne"]["points"] == 400
    for method in maps:
        resp = analysed.client.get(f"/api/reports/latest/maps/{method}.json")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        data = resp.json()
        n = maps[method]["points"]
        assert all(len(data[key]) == n for key in ("x", "y", "id", "cluster", "label"))
        assert len(set(data["id"])) == n and set(data["label"]) <= set(FASHION_MNIST_CLASSES)
        assert np.isfinite(data["x"]).all() and np.std(data["x"]) > 0 and maps[method]["seconds"] > 0
    # Images of one class sit together on the UMAP map: a point's nearest map neighbour mostly shares its label.
    umap_map = analysed.client.get("/api/reports/latest/maps/umap.json").json()
    xy = np.c_[umap_map["x"], umap_map["y"]]
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1) + np.eye(len(xy)) * 1e9
    labels = np.array(umap_map["label"])
    assert (labels[d.argmin(1)] == labels).mean() > 0.5


def test_classifiers_beat_chance_by_a_wide_margin(analysed: Analysed) -> None:
    c = analysed.metrics["classifiers"]
    assert c["labelled"] == SIZE and c["test"] == 400 and c["train"] == 1600 and c["chance"] < 0.15
    assert set(c["models"]) == set(MODELS) and c["best"] in MODELS
    for name, m in c["models"].items():
        assert m["accuracy"] > 0.65, name  # ten classes: chance is 0.1
        assert 0 < m["macro_f1"] <= 1 and 0 < m["log_loss"] < 2.3, name  # 2.3: uniform guessing
        assert set(m["per_class"]) == set(FASHION_MNIST_CLASSES)
        assert sum(v["support"] for v in m["per_class"].values()) == 400
    assert c["models"][c["best"]]["accuracy"] == max(m["accuracy"] for m in c["models"].values())
    assert c["knn_space"].startswith("index v")


def test_five_percent_flagged_as_anomalies_most_isolated_first(analysed: Analysed) -> None:
    a = analysed.metrics["anomalies"]
    assert a["trees"] == 200 and a["flagged"] == SIZE // 20 and a["threshold"] >= a["score_median"]
    page = analysed.client.get("/api/anomalies", params={"limit": 30}).json()
    assert page["total"] == SIZE // 20 and len(page["items"]) == 30
    scores = [it["score"] for it in page["items"]]
    assert scores == sorted(scores, reverse=True) and [it["rank"] for it in page["items"]] == list(range(1, 31))
    assert all(it["url"] == f"/api/images/{it['id']}" and it["current_label"] == it["label"] for it in page["items"])
    rest = analysed.client.get("/api/anomalies", params={"limit": 30, "offset": 90}).json()
    assert [it["rank"] for it in rest["items"]] == list(range(91, 101))


def test_mislabels_are_label_issues_with_their_reasons(analysed: Analysed) -> None:
    page = analysed.client.get("/api/mislabels", params={"limit": 500}).json()
    items = page["items"]
    summary = page["summary"]
    assert summary["method"] == "confident_learning" and summary["model"] == "logistic+knn"
    assert page["total"] == summary["flagged"] == len(items) > 0
    assert len(items) < 0.1 * SIZE  # Fashion-MNIST's own labels: a few percent are doubtful, not more
    # most suspect first: the given label's out-of-sample probability rises down the list
    given = [it["given_probability"] for it in items]
    assert given == sorted(given) and given[0] < 0.2
    for it in items:
        assert it["method"] == "confident_learning" and len(it["neighbours"]) == len(it["neighbour_labels"]) == 5
        assert 0 <= it["vote"] <= 1 and it["suggested_probability"] >= it["given_probability"]
    assert sum(it["label"] != it["suggested"] for it in items) >= 0.9 * len(items)
    assert all(it["resolved"] is False for it in items)
    # Relabel the first to what the model suggests: the review list marks it resolved.
    first = items[0]
    sent = analysed.client.post("/api/labels", json={"labels": [{"id": first["id"], "label": first["suggested"]}]})
    assert sent.status_code == 200, sent.text
    again = analysed.client.get("/api/mislabels", params={"limit": 1}).json()["items"][0]
    assert again["id"] == first["id"] and again["resolved"] is True and again["current_label"] == first["suggested"]


def test_label_queue_mixes_in_relabel_requests_for_likely_mislabels(analysed: Analysed) -> None:
    settings = analysed.settings.model_copy(update={"al_relabel_share": 0.3})
    encoder = ImageEncoder(settings.encoder_dir, size=64, intra_op_threads=settings.ort_intra_op_threads)
    client = TestClient(create_app(SearchService(settings, analysed.storage, encoder=encoder), settings), headers=AUTH)
    issues = client.get("/api/mislabels", params={"limit": 500}).json()["items"]
    still = [it for it in issues if not it["resolved"]]  # an earlier test may have relabelled the first
    queue = client.get("/api/label-queue", params={"n": 10}).json()["items"]
    relabel = [it for it in queue if it["picked_by"] == "relabel"]
    assert [it["id"] for it in relabel] == [it["id"] for it in still[:3]]  # 30% of 10, most suspect first
    assert all(
        it["label"] == s["label"] and it["suggested"] == s["suggested"]
        for it, s in zip(relabel, still[:3], strict=True)
    )
    assert len(queue) == 3  # every image here is labelled: nothing new to ask for
    # answered: the request leaves the queue, the next most suspect takes its place
    sent = client.post("/api/labels", json={"labels": [{"id": relabel[0]["id"], "label": relabel[0]["suggested"]}]})
    assert sent.status_code == 200, sent.text
    again = [it["id"] for it in client.get("/api/label-queue", params={"n": 10}).json()["items"][:3]]
    assert again == [it["id"] for it in still[1:4]]
    off = analysed.client.get("/api/label-queue", params={"n": 10}).json()["items"]  # the default share is 0
    assert all(it["picked_by"] != "relabel" for it in off)


def test_report_is_self_contained_and_served(analysed: Analysed) -> None:
    summary = analysed.client.get("/api/reports/latest").json()
    version = summary["version"]
    assert (
        analysed.job["report_version"] == version
        and analysed.job["best_model"] == summary["metrics"]["classifiers"]["best"]
    )
    assert {"report.html", "metrics.json", "confusion.png", "contact_sheet.png", "map_umap.png"} <= set(
        summary["files"]
    )
    assert not any(name.startswith("classify/") for name in summary["files"])
    page = analysed.client.get(summary["html"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "data:image/png;base64," in html and "Isolation Forest" in html and "adjusted Rand" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # opens offline
    for name in ("confusion.png", "contact_sheet.png", "cluster_sizes.png", "anomalies.png", "mislabels.png"):
        resp = analysed.client.get(f"/api/reports/{version}/{name}")
        assert resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(resp.content)).size[0] > 200
    steps = summary["metrics"]["steps"]
    assert all(s["status"] == "done" for s in steps.values()) and steps["total"]["seconds"] > 0


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/reports/latest/nope.json", 404, "no_report_file"),
        ("/api/reports/latest/classify/model.onnx", 404, "no_report_file"),
        ("/api/reports/latest/..%2F..%2Fetc%2Fpasswd", 404, "no_report_file"),
        ("/api/reports/v999999", 404, "no_report"),
        ("/api/reports/evil", 400, "invalid_version"),
        ("/api/anomalies?limit=0", 400, "invalid_limit"),
        ("/api/mislabels?offset=-1", 400, "invalid_offset"),
    ],
)
def test_bad_report_requests_are_clear_4xx(analysed: Analysed, path: str, status: int, code: str) -> None:
    resp = analysed.client.get(path)
    assert resp.status_code == status and resp.json()["error"]["code"] == code


def test_classify_names_the_class_of_clear_test_images(analysed: Analysed, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """Held-out test images: trousers and bags by name; boots and sneakers at least as footwear (at 64 px
    the three shoe classes are the collection's closest neighbours)."""
    images, labels = fashion_test
    footwear = {"Sandal", "Sneaker", "Ankle boot"}
    right = {"exact": [0, 0], "footwear": [0, 0]}
    for cls in ("Trouser", "Bag", "Ankle boot", "Sneaker"):
        group = "footwear" if cls in footwear else "exact"
        for i in np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(cls))[:12]:
            resp = analysed.client.post("/api/classify", files={"image": ("q.png", png(images[i]), "image/png")})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            probs = [c["prob"] for c in body["classes"]]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001 and len(probs) == 5
            assert len(body["neighbours"]) == 10 and all(n["label"] for n in body["neighbours"])
            top = body["classes"][0]["label"]
            right[group][0] += top == cls if group == "exact" else top in footwear
            right[group][1] += 1
    assert right["exact"][0] / right["exact"][1] >= 0.9, right
    assert right["footwear"][0] / right["footwear"][1] >= 0.9, right
    assert body["model"]["kind"] == analysed.metrics["classifiers"]["best"]
    assert body["model"]["report"] == analysed.metrics["version"]
    raw = analysed.client.post("/api/classify", content=png(images[0]), headers={"content-type": "image/png"})
    assert raw.status_code == 200
    for bad, ctype, code in (
        (b"not an image", "image/png", 415),
        (b"{}", "application/json", 415),
        (b"", "image/png", 400),
    ):
        resp = analysed.client.post("/api/classify", content=bad, headers={"content-type": ctype})
        assert resp.status_code == code and "error" in resp.json()


def test_onnx_export_matches_the_fitted_models(analysed: Analysed) -> None:
    """The models /api/classify runs (ONNX, no scikit-learn) give the fitted models' probabilities."""
    settings = analysed.settings
    emb = EmbeddingStore(analysed.storage, ImageEncoder(settings.encoder_dir, size=64).version).load()
    feats = FeatureSpace(dim=128).fit(emb.vectors).transform(emb.vectors)
    y = np.arange(len(feats)) % 3  # any three classes will do for parity
    import onnxruntime as ort

    for kind in ("logistic", "lightgbm"):
        model = make_classifier(kind, n_labels=300).fit(feats[:300], y[:300])
        session = ort.InferenceSession(to_onnx(kind, model, feats.shape[1]), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"x": feats[300:400]})[0]
        np.testing.assert_allclose(got, model.predict_proba(feats[300:400]), atol=1e-4)
    # and the published model, read back as /api/classify reads it, reproduces its own feature space
    published = Classifier(analysed.storage, settings).model()
    assert published.manifest.version == analysed.metrics["version"] and published.kind in MODELS
    np.testing.assert_allclose(published.features(emb.vectors[:50]), feats[:50], atol=1e-4)
    if published.kind == "knn10":  # the 10-NN vote has no model: it votes over the live index
        assert published.session is None and published.manifest.model_file is None
        return
    probs = published.predict_proba(emb.vectors[:50])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4) and probs.shape == (50, 10)
    catalog = Catalog(analysed.storage)
    truth = [catalog.get(image_id).label for image_id in emb.ids[:50]]
    predicted = [published.classes[i] for i in probs.argmax(axis=1)]
    assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) >= 0.7  # its own labelled images


def test_query_path_stays_light(analysed: Analysed, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """Classify, review lists and reports in a fresh interpreter: no scikit-learn, UMAP or matplotlib."""
    images, _ = fashion_test
    query = analysed.settings.data_dir / "query.png"
    query.write_bytes(png(images[1]))
    code = """
import sys, json
from fastapi.testclient import TestClient
from functions.http_api import create_app
client = TestClient(create_app())
data = open(sys.argv[1], "rb").read()
for resp in (
    client.post("/api/classify", files={"image": ("q.png", data, "image/png")}),
    client.get("/api/anomalies"),
    client.get("/api/mislabels"),
    client.get("/api/reports/latest"),
):
    assert resp.status_code == 200, resp.text
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""
    env = {
        "CLUSTERLENS_DATA_DIR": str(analysed.settings.data_dir),
        "CLUSTERLENS_IMAGE_SIZE": "64",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, str(query)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in loaded and not loaded & set(HEAVY)


def test_without_labels_classifiers_skip_with_a_reason(tmp_path: Path) -> None:
    """Steps with nothing to work on skip cleanly; a second run publishes the next version."""
    settings, storage, encoder = _collection(tmp_path, 300, labelled=False, analysis_maps=["pca"])
    first = run_analysis(storage, settings, encoder.version)
    steps = first["steps"]
    assert steps["classifiers"]["status"] == "skipped" and "no labels" in steps["classifiers"]["reason"]
    assert steps["mislabels"]["status"] == "skipped" and steps["classify_model"]["status"] == "skipped"
    assert "classifiers" not in first and first["clustering"]["agreement"] is None
    assert first["anomalies"]["flagged"] == 15 and first["maps"]["pca"]["points"] == 300
    service = SearchService(settings, storage, encoder=encoder)
    client = TestClient(create_app(service, settings), headers=AUTH)
    resp = client.post(
        "/api/classify", content=png(np.zeros((28, 28), np.uint8)), headers={"content-type": "image/png"}
    )
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_classifier"
    assert "no labels" in resp.json()["error"]["message"]
    mislabels = client.get("/api/mislabels").json()
    assert mislabels["total"] == 0 and "labelled" in mislabels["skipped"]
    assert "Skipped: no labels" in client.get("/api/reports/latest/report.html").text

    second = run_analysis(storage, settings.model_copy(update={"analysis_k": 6}), encoder.version)
    assert (first["version"], second["version"]) == ("v000001", "v000002")
    assert second["clustering"]["k"] == 6 and second["clustering"]["chosen_by"] == "setting"
    assert client.get("/api/reports/latest").json()["version"] == "v000002"
    assert client.get("/api/reports/v000001").json()["metrics"]["clustering"]["k"] == first["clustering"]["k"]


def test_no_report_yet_and_nothing_embedded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **SMALL)
    storage = LocalStorage(settings.data_dir)
    client = TestClient(create_app(SearchService(settings, storage), settings), headers=AUTH)
    for path in ("/api/reports/latest", "/api/anomalies", "/api/mislabels"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_report", path
        assert "analyse" in resp.json()["error"]["message"]
    from shared.errors import NotReady

    with pytest.raises(NotReady, match="embed first"):
        run_analysis(storage, settings, "some-encoder")
