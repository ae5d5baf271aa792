"""Labelling: strategies, diverse batches, the label log, the HTTP API, retraining and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from functions.http_api import create_app
from job.active_learning import diverse_order, entropy, least_confidence, margin, select_batch, typical_first
from job.datasets import FASHION_MNIST_CLASSES, fashion_mnist_items
from job.embeddings import embed_pending
from job.reindex import reindex
from job.worker import Worker
from shared.classifier import ClassifierView, current_classifier_version, history
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.jobs import JobStore
from shared.labels import LabelLog
from shared.queues import open_job_queues, open_queue
from shared.search import SearchService
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.conftest import AUTH, make_settings

POOL = 400
SEEDED = 40  # images that keep their Fashion-MNIST label at ingest; the rest come in unlabelled

# -- strategies on a probability matrix worked out by hand ------------------------------------

PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # sure
        [0.40, 0.35, 0.25],  # torn between 0 and 1, some doubt about 2
        [0.50, 0.50, 0.00],  # a coin flip between two classes
        [1 / 3, 1 / 3, 1 / 3],  # no idea
    ]
)


def test_least_confidence_margin_and_entropy_by_hand() -> None:
    np.testing.assert_allclose(least_confidence(PROBS), [0.10, 0.60, 0.50, 2 / 3])
    np.testing.assert_allclose(margin(PROBS), [1 - 0.85, 1 - 0.05, 1.0, 1.0])
    h0 = -(0.9 * np.log(0.9) + 2 * 0.05 * np.log(0.05))  # 0.3944
    h1 = -(0.4 * np.log(0.4) + 0.35 * np.log(0.35) + 0.25 * np.log(0.25))  # 1.0805
    np.testing.assert_allclose(entropy(PROBS), [h0, h1, np.log(2), np.log(3)])
    assert entropy(PROBS)[0] == pytest.approx(0.3944, abs=1e-4)
    # The strategies disagree where they should: the coin flip (row 2) is the least certain by
    # margin, but row 1's three-way doubt ranks above it by least confidence and by entropy.
    assert select_batch(PROBS, 1, "least_confidence").tolist() == [3]
    assert set(select_batch(PROBS, 2, "margin").tolist()) == {2, 3}
    assert select_batch(PROBS, 2, "least_confidence").tolist() == [3, 1]
    assert select_batch(PROBS, 2, "entropy").tolist() == [3, 1]
    picked = select_batch(PROBS, 4, "random", rng=np.random.default_rng(0))
    assert sorted(picked.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        select_batch(PROBS, 1, "most_fun")
    with pytest.raises(ValueError):
        margin(np.ones(3))


def test_a_diverse_batch_takes_from_both_near_identical_clusters() -> None:
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0.0, 0.0, 0.0]) + rng.normal(0, 1e-3, (10, 4))  # ten near-duplicates...
    b = np.array([0.0, 1.0, 0.0, 0.0]) + rng.normal(0, 1e-3, (10, 4))  # ...and ten more, elsewhere
    features = np.vstack([a, b]).astype(np.float32)
    scores = np.concatenate([np.linspace(0.99, 0.90, 10), np.linspace(0.89, 0.80, 10)])  # A all ahead
    top = diverse_order(scores, features, 2, pool_factor=1)
    assert set(top.tolist()) <= set(range(10))  # pure top-2: two look-alikes from A
    picked = diverse_order(scores, features, 2, pool_factor=10, n_clusters=2)
    assert {int(p) // 10 for p in picked} == {0, 1}  # one from each cluster
    assert picked[0] == 0 and picked[1] == 10  # each cluster's most uncertain, best cluster first
    four = diverse_order(scores, features, 4, pool_factor=5, n_clusters=2)
    assert sorted(int(p) // 10 for p in four) == [0, 0, 1, 1]


def test_class_balance_guard_caps_one_predicted_class() -> None:
    scores = np.linspace(1.0, 0.5, 10)
    groups = np.array([0] * 8 + [1] * 2)  # the eight most uncertain are all predicted class 0
    features = np.zeros((10, 1), np.float32)
    plain = diverse_order(scores, features, 4, pool_factor=1)
    assert (groups[plain] == 0).all()
    guarded = diverse_order(scores, features, 4, pool_factor=1, groups=groups, max_group_share=0.5)
    assert (groups[guarded] == 0).sum() == 2 and (groups[guarded] == 1).sum() == 2


def test_typical_first_takes_the_densest_image_of_each_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 10
    blobs = np.concatenate([c + rng.normal(0, 0.5, (50, 8)) for c in centres])
    outliers = rng.normal(0, 6, (6, 8))  # far from everything
    x = np.concatenate([blobs, outliers]).astype(np.float32)
    picked = typical_first(x, 3, seed=0)
    assert sorted(int(p) // 50 for p in picked) == [0, 1, 2]  # one from each blob, no outlier
    for p in picked:  # each the blob's most central member, or close to it
        blob = x[(p // 50) * 50 : (p // 50 + 1) * 50]
        assert np.linalg.norm(x[p] - blob.mean(axis=0)) < np.median(np.linalg.norm(blob - blob.mean(axis=0), axis=1))
    assert len(set(typical_first(x, len(x)).tolist())) == len(x)
    with pytest.raises(ValueError, match="n must be"):
        typical_first(x, 0)


def test_typical_first_on_real_images_is_denser_and_covers_more_classes(
    fashion_test: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = fashion_test[0][:2000].reshape(2000, -1).astype(np.float32), fashion_test[1][:2000]
    picked = typical_first(x, 20, seed=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    typicality = np.sort(sims, axis=1)[:, -21:-1].mean(axis=1)  # mean cosine to the 20 nearest others
    at_random = np.random.default_rng(0).choice(2000, 20, replace=False)
    assert typicality[picked].mean() > np.percentile(typicality, 50) > typicality[at_random].mean() - 0.05
    assert len(set(y[picked].tolist())) >= 9  # of the 10 classes, from 20 images and no label


# -- the label log --------------------------------------------------------------------------------

ID_A, ID_B = "a" * 64, "b" * 64


def test_label_log_survives_a_restart_and_the_latest_label_wins(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = LabelLog(storage)
    made = first.define(["cat", "dog"], user="ann")
    first.append([(ID_A, "cat"), (ID_B, "cat")], user="ann", label_set=made.version)
    first.append([(ID_A, "dog")], user="bob", label_set=made.version)

    again = LabelLog(LocalStorage(tmp_path))  # a new process: nothing cached
    assert again.refresh() == 2
    current = again.current(ingest={ID_A: "cat", "c" * 64: "dog"})
    assert current[ID_A].label == "dog" and current[ID_A].user == "bob"
    assert current[ID_B].label == "cat" and current["c" * 64].user == "ingest"
    assert [e.label for e in again.entries()] == ["cat", "cat", "dog"]  # the log keeps everything
    assert again.refresh() == 0  # batches already read are not read again
    assert again.label_set() is not None and again.label_set().classes == ["cat", "dog"]  # type: ignore[union-attr]
    grown = again.define(["cat", "dog", "bird"])
    assert grown.version == 2 and LabelLog(storage).label_set() == grown


# -- a small collection, mostly unlabelled, through the API -------------------------------------


@dataclasses.dataclass
class Pool:
    settings: Settings
    storage: LocalStorage
    encoder: ImageEncoder
    truth: dict[str, str]  # image id -> its Fashion-MNIST class (the oracle)
    seeded: set[str]

    def service(self) -> SearchService:
        return SearchService(self.settings, self.storage, encoder=self.encoder)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, encoder: ImageEncoder) -> Pool:
    settings = make_settings(tmp_path_factory.mktemp("label-pool"), retrain_after_labels=0)
    storage = LocalStorage(settings.data_dir)
    truth, seeded = {}, set()
    for i, item in enumerate(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=POOL, offset=5000)):
        result = ingest_bytes(storage, settings, dataclasses.replace(item, label=item.label if i < SEEDED else None))
        truth[result.id] = str(item.label)
        if i < SEEDED:
            seeded.add(result.id)
    embed_pending(storage, settings, encoder)
    reindex(storage, settings, encoder.version)
    return Pool(settings, storage, encoder, truth, seeded)


def _client(service: SearchService, settings: Settings) -> TestClient:
    queues = open_job_queues(settings)
    return TestClient(create_app(service=service, queues=queues), raise_server_exceptions=False, headers=AUTH)


def test_labelling_loop_through_the_api_and_the_retrain_job(pool: Pool) -> None:
    service = pool.service()
    client = _client(service, pool.settings)

    # Before any classifier: the index's typical images (one per cluster of a sample, most typical first,
    # written with the index), then every image round-robin over the index's clusters.
    index = service.index()
    typical = [str(index.ids[r]) for r in index.cold_start if str(index.ids[r]) not in pool.seeded]
    assert len(index.cold_start) == POOL // 4 == len(set(index.cold_start.tolist()))
    first = client.get("/api/label-queue", params={"n": 8})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["classifier"] is None and body["labelled"] == SEEDED
    items = body["items"]
    assert [i["id"] for i in items] == typical[:8] and not {i["id"] for i in items} & pool.seeded
    assert all(i["picked_by"] == "typical" and i["url"] == f"/api/images/{i['id']}" for i in items)
    more = client.get("/api/label-queue", params={"n": 200}).json()["items"]
    assert [i["picked_by"] for i in more] == ["typical"] * len(typical) + ["cluster_round_robin"] * (200 - len(typical))
    rest = [i["cluster"] for i in more[len(typical) :]][:8]  # after them, spread over the clusters
    assert len(set(rest)) >= min(6, int(index.manifest.nlist))
    assert len({i["id"] for i in more}) == 200

    # Label 60 more images (the oracle answers), in one batch with some bad items in it.
    unlabelled = [i for i in pool.truth if i not in pool.seeded]
    batch = [{"id": i, "label": pool.truth[i]} for i in unlabelled[:60]]
    bad = [
        {"id": "0" * 64, "label": "Bag"},  # no such image
        {"id": unlabelled[0], "label": "Spaceship"},  # not in the label set
        {"id": "../etc/passwd", "label": "Bag"},  # not an id
        "Bag",  # not an object
    ]
    posted = client.post("/api/labels", json={"labels": batch + bad, "user": "tester"})
    assert posted.status_code == 200, posted.text
    out = posted.json()
    assert out["accepted"] == 60 and out["rejected"] == 4
    codes = {e["index"]: e["error"]["code"] for e in out["errors"]}
    assert codes == {60: "image_not_found", 61: "unknown_label", 62: "invalid_id", 63: "invalid_item"}
    # The label set came from the labels given at ingest (the bad "Spaceship" did not join it).
    assert sorted(out["label_set"]["classes"]) == sorted(FASHION_MNIST_CLASSES)

    # Search sees the new labels at once, without a reindex.
    labelled_one = unlabelled[0]
    hit = client.post("/api/search", json={"id": labelled_one, "k": 1}).json()["results"][0]
    assert hit["id"] == labelled_one and hit["label"] == pool.truth[labelled_one]
    summary = client.get("/api/labels", params={"limit": 5}).json()
    assert summary["labelled"] == SEEDED + 60 and summary["log_entries"] == 60
    assert summary["recent"][0]["user"] == "tester" and len(summary["recent"]) == 5

    # Retrain as a job, the way the timer or POST /api/jobs does it.
    started = client.post("/api/jobs", json={"kind": "retrain"})
    assert started.status_code == 202, started.text
    job_id = started.json()["job"]["job_id"]
    s = pool.settings
    poison = open_queue(s, s.poison_queue_name)
    Worker(pool.storage, s, open_job_queues(s), poison, encoder=pool.encoder).run(until_idle=True, max_jobs=1)
    record = JobStore(pool.storage).get(job_id)
    assert record.status == "succeeded", record.error
    result = record.result
    assert result["classifier_version"] == "v000001" and result["labels_used"] == SEEDED + 60
    assert result["metrics"]["evaluated"] and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["predictions"] == POOL

    # Every image has a prediction; queue items are unlabelled, ordered by the classifier.
    view = ClassifierView(pool.storage, "v000001")
    assert len(view.ids) == POOL and set(view.classes) == set(FASHION_MNIST_CLASSES)
    correct = np.mean([view.prediction(i)["label"] == pool.truth[i] for i in unlabelled[60:]])  # type: ignore[index]
    assert correct > 0.5  # ten classes: chance is 0.1
    queue = client.get("/api/label-queue", params={"n": 10, "strategy": "margin"}).json()
    assert queue["classifier"]["version"] == "v000001"
    labelled_now = pool.seeded | set(unlabelled[:60])
    ids = [i["id"] for i in queue["items"]]
    assert len(ids) == 10 and not set(ids) & labelled_now
    assert all(i["picked_by"] == "margin" and i["prediction"]["label"] in FASHION_MNIST_CLASSES for i in queue["items"])
    margins = [i["uncertainty"] for i in queue["items"]]
    typical = np.median([1 - (view.prediction(i)["prob"] - view.prediction(i)["second_prob"]) for i in unlabelled])  # type: ignore[index]
    assert min(margins) > typical  # it asks about the doubtful ones

    # Predictions reach search: a filter on the predicted class, and in the results.
    found = client.post("/api/search", json={"id": ids[0], "k": 5, "filters": {"predicted": "Trouser"}}).json()
    assert found["results"] and all(r["predicted"]["label"] == "Trouser" for r in found["results"])
    bad_filter = client.post("/api/search", json={"id": ids[0], "filters": {"predicted": "Spaceship"}})
    assert bad_filter.status_code == 400 and bad_filter.json()["error"]["code"] == "unknown_label"

    # Metrics history and the classifier endpoint.
    info = client.get("/api/classifier").json()
    assert info["current"]["version"] == "v000001" and len(info["history"]) == 1
    assert info["history"][0]["labels_used"] == SEEDED + 60

    # Labels submitted after the retrain leave the queue at once.
    client.post("/api/labels", json={"labels": [{"id": ids[0], "label": pool.truth[ids[0]]}]})
    after = client.get("/api/label-queue", params={"n": 10, "strategy": "margin"}).json()
    assert ids[0] not in [i["id"] for i in after["items"]] and after["items"][0]["id"] == ids[1]
    assert after["classifier"]["labels_since"] == 1


@pytest.mark.parametrize(
    ("request_kwargs", "code"),
    [
        ({"json": {"labels": []}}, "invalid_body"),
        ({"json": {"labels": "Bag"}}, "invalid_body"),
        ({"json": [{"id": ID_A, "label": "Bag"}]}, "invalid_json"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "invalid_json"),
        ({"json": {"labels": [{"id": ID_A, "label": "Bag"}], "user": "x" * 65}}, "invalid_user"),
        ({"json": {"labels": [{"id": ID_A, "label": "Bag"}]}}, "invalid_labels"),  # every item bad
        ({"json": {"labels": [{"id": ID_A, "label": "Bag"}] * 501}}, "invalid_body"),
    ],
)
def test_bad_label_requests_are_4xx_json(pool: Pool, request_kwargs: dict, code: str) -> None:  # type: ignore[type-arg]
    client = _client(pool.service(), pool.settings)
    response = client.post("/api/labels", **request_kwargs)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"n": 0}, "invalid_n"),
        ({"n": 201}, "invalid_n"),
        ({"n": "many"}, None),
        ({"strategy": "vibes"}, "invalid_strategy"),
    ],
)
def test_bad_queue_requests_are_4xx_json(pool: Pool, params: dict, code: str | None) -> None:  # type: ignore[type-arg]
    response = _client(pool.service(), pool.settings).get("/api/label-queue", params=params)
    assert response.status_code == 400 and "error" in response.json()
    if code:
        assert response.json()["error"]["code"] == code


def test_retrain_with_one_class_is_skipped_not_failed(tmp_path: Path, encoder: ImageEncoder) -> None:
    from job.retrain import train_and_publish

    settings = make_settings(tmp_path)
    storage = LocalStorage(tmp_path)
    items = list(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=12))
    for item in items:
        ingest_bytes(storage, settings, dataclasses.replace(item, label="only"))
    embed_pending(storage, settings, encoder)
    result = train_and_publish(storage, settings, encoder.version)
    assert result.version is None and "two classes" in (result.reason or "")
    assert current_classifier_version(storage) is None and history(storage) == []


def test_enough_new_labels_queue_one_retrain(pool: Pool) -> None:
    before = _client(pool.service(), pool.settings).get("/api/label-queue", params={"n": 1}).json()
    since = before["classifier"]["labels_since"] if before["classifier"] else before["labelled"] - SEEDED
    settings = pool.settings.model_copy(update={"retrain_after_labels": since + 3})
    client = _client(SearchService(settings, pool.storage, encoder=pool.encoder), settings)
    ids = [i for i in pool.truth if i not in pool.seeded][100:104]
    two = client.post("/api/labels", json={"labels": [{"id": i, "label": pool.truth[i]} for i in ids[:2]]}).json()
    assert two["accepted"] == 2 and two["retrain_job"] is None  # one short of the threshold
    out = client.post("/api/labels", json={"labels": [{"id": ids[2], "label": pool.truth[ids[2]]}]}).json()
    job = out["retrain_job"]
    assert job and job.startswith("retrain-labels-")
    again = client.post("/api/labels", json={"labels": [{"id": ids[3], "label": pool.truth[ids[3]]}]}).json()
    assert again["retrain_job"] == job  # the same job: one retrain per threshold's worth of labels
    assert JobStore(pool.storage).get(job).kind == "retrain"


def test_cli_label_queue_label_and_retrain(pool: Pool) -> None:
    env = {**os.environ, "CLUSTERLENS_DATA_DIR": str(pool.settings.data_dir), "TQDM_DISABLE": "1"}
    env["CLUSTERLENS_RETRAIN_AFTER_LABELS"] = "0"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )

    shown = cli("label-queue", "--n", "3", "--json")
    assert shown.returncode == 0, shown.stderr
    ids = [i["id"] for i in json.loads(shown.stdout)["items"]]
    assert len(ids) == 3
    done = cli("label", ids[0], pool.truth[ids[0]], "--user", "cli-test")
    assert done.returncode == 0 and "labelled 1 of 1" in done.stdout, done.stderr
    refused = cli("label", ids[1], "Spaceship")
    assert refused.returncode == 1 and "unknown label 'Spaceship'" in refused.stderr
    current = LabelLog(pool.storage)
    current.refresh()
    assert current.current()[ids[0]].user == "cli-test"
    trained = cli("retrain", "--kind", "logistic")
    assert trained.returncode == 0, trained.stderr
    assert "trained on" in trained.stdout and "held-out accuracy" in trained.stdout
    version = current_classifier_version(pool.storage)
    assert version is not None and ClassifierView(pool.storage, version).manifest.kind == "logistic"
    table = cli("label-queue", "--n", "2")
    assert table.returncode == 0 and f"classifier {version}" in table.stdout


def test_the_label_overlay_is_a_sparse_pair_over_untouched_built_codes() -> None:
    """New labels are held as sorted (rows, codes) beside the built codes, never a copy of all n: every
    reader (label_of, labelled, label_codes, the filters, the whole column) sees the built codes with
    the overlay laid on top."""
    from job.index_build import IndexParams, build_index
    from shared.filters import SearchFilters

    n = 300
    ids = [f"{i:064x}" for i in range(n)]
    built = [("Bag" if i % 3 == 0 else "Coat") if i < 60 else None for i in range(n)]
    index = build_index(
        np.random.default_rng(2).normal(size=(n, 1280)).astype(np.float32),
        ids,
        built,
        encoder_version="test",
        params=IndexParams(kind="flat"),
    )
    codes_before = np.array(index.built_labels, copy=True)
    column_before = index.labels
    assert column_before is index.built_labels  # no overlay: the built column itself, not a copy
    index.overlay_labels({ids[0]: "Coat", ids[100]: "Bag", ids[250]: "Shirt", "f" * 64: "Bag"}, ["Dress"])
    np.testing.assert_array_equal(index.built_labels, codes_before)  # the built codes are left as they were
    rows, codes = index._overlay
    assert rows.tolist() == [0, 100, 250] and len(codes) == 3  # only the labelled rows, the unknown id dropped
    assert index.label_names == ["Bag", "Coat", "Dress", "Shirt"]
    assert [index.label_of(r) for r in (0, 3, 61, 100, 250)] == ["Coat", "Bag", None, "Bag", "Shirt"]
    labelled_rows, labelled_codes = index.labelled()
    assert labelled_rows.tolist() == [*range(60), 100, 250]
    np.testing.assert_array_equal(index.label_codes(labelled_rows), labelled_codes)
    column = index.labels
    assert column is not index.built_labels and (column[labelled_rows] == labelled_codes).all()
    assert (np.delete(column, labelled_rows) == -1).all() and index.labels is column  # kept until labels change
    selected = {
        name: index.select(f)
        for name, f in (
            ("bags", SearchFilters(label="Bag")),
            ("labelled", SearchFilters(labelled=True)),
            ("unlabelled", SearchFilters(labelled=False)),
        )
    }
    assert all(rows is not None for rows in selected.values())
    assert list(selected["bags"]) == [r for r in range(1, 60) if r % 3 == 0] + [100]  # type: ignore[arg-type]
    assert len(selected["labelled"]) == 62 and len(selected["unlabelled"]) == n - 62  # type: ignore[arg-type]
    index.overlay_labels({})  # a log emptied (another index version's labels): back to the built codes
    assert index.label_of(0) == "Bag" and len(index.labelled()[0]) == 60
