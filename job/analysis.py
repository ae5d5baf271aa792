"""Batch analysis: cluster the collection, draw it, classify it, and flag the odd images for review.

One job (``clusterlens analyse``, job kind ``analyse``) runs five steps on every embedded image and
publishes a numbered report in the reports container::

    reports/v000003/metrics.json      every figure, each step's status, reason and seconds
    reports/v000003/report.html       the same, readable, self-contained (images inlined)
    reports/v000003/maps/<m>.json     2-D maps as columns (x, y, id, cluster, label) for the web page
    reports/v000003/anomalies.json    the most isolated images, most isolated first
    reports/v000003/mislabels.json    labels their neighbours disagree with, most confident first
    reports/v000003/clusters.json     sizes and the images nearest each centroid
    reports/v000003/*.png             the figures
    reports/v000003/classify/         the best classifier in its served form (shared.classifier), for /api/classify
    reports/v000003/manifest.json     written last: the version is complete
    reports/CURRENT.json              the pointer, swapped after the manifest

The shards are read in bounded memory (:mod:`job.passes`): only the labelled images and a seeded
sample are held; k-means and the Isolation Forest are fitted on the sample, and every image's cluster
and anomaly score stream through them shard by shard (three reads of the shards in all).

Steps with nothing to work on are skipped with a reason (no labels: no classifiers, no
mislabels). scikit-learn, LightGBM, UMAP and matplotlib are imported inside the steps (job side).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from job.classifier import ONNX_KINDS, FeatureSpace, evaluate, export, fit_classifier, full_proba, holdout_split
from job.label_issues import find_issues, knn_neighbours, neighbours
from shared.errors import NotReady
from shared.features import normalize
from shared.manifests import ClassifierManifest
from shared.reports import CLASSIFY
from shared.settings import Settings
from shared.storage import Storage

if TYPE_CHECKING:
    from job.passes import Collected

log = logging.getLogger(__name__)

KNN_K = 10
KNN_ALPHA = 0.5  # Laplace smoothing of kNN vote shares, so a wrong unanimous vote has a finite log loss
MODELS = ("logistic", "lightgbm", "knn10")
Progress = Callable[[str, int, int], None]


@dataclass
class AnalysisData:
    """What every step works on, read from the shards in bounded memory (:mod:`job.passes`).

    Every row has its id and label; vectors are held only for the labelled rows and a seeded sample
    (``pass_sample`` rows, or more when a map draws more). What every row needs from a fitted model
    (its cluster, its anomaly score) streams through :meth:`feature_chunks`.

    Attributes:
        ids: (n,) image ids.
        labels: int64 (n,) code into ``classes``, -1 unlabelled.
        classes: the label set's classes that have labels.
        sample: int64 (s,) rows of the seeded sample, ascending (every row when n is small).
        sample_features: float32 (s, p) their power + L2 + PCA features (the classifiers' input).
        sample_unit: float32 (s, p) the same, L2-normalised (clustering, maps, anomalies: cosine geometry).
        labelled_features: float32 (m, p) the features of the rows in :attr:`labelled`, in that order.
        knn_space: float32 (m, q) unit vectors kNN votes in, of the same rows: the published index's
            space where the index holds every image, else the analysis features.
        space: the fitted feature space (saved with the classify model).
        passes: the shard reads (the peak rows held: ``passes.rows_held_max``).
    """

    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    sample: np.ndarray
    sample_features: np.ndarray
    sample_unit: np.ndarray
    labelled_features: np.ndarray
    knn_space: np.ndarray
    knn_source: str
    space: FeatureSpace
    encoder_version: str
    passes: Collected
    head_version: str | None = None

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    @property
    def feature_dim(self) -> int:
        return int(self.sample_features.shape[1])

    def feature_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every row's features, shard by shard: (first row, float32 (c, p))."""
        for start, x in self.passes.chunks():
            yield start, self.space.transform(x)


@dataclass
class Report:
    """A report being built: metrics, files to publish, each step's status."""

    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    nearest: dict[int, list[str]] = field(default_factory=dict)  # cluster -> image ids nearest its centroid

    def skip(self, step: str, reason: str) -> None:
        self.steps[step] = {"status": "skipped", "reason": reason, "seconds": 0.0}
        log.info("analysis step %s skipped: %s", step, reason)

    def json(self, name: str, value: Any) -> None:
        self.files[name] = json.dumps(value, separators=(",", ":")).encode()


def load_data(storage: Storage, settings: Settings, encoder_version: str) -> AnalysisData:
    """Every embedded image's id and current label (deleted ones left out), and the features of the
    labelled images and of a seeded sample, from one read of the shards.

    Raises:
        NotReady: no embeddings for this encoder (embed first).
    """
    from job.embeddings import EmbeddingStore
    from job.passes import collect
    from shared.catalog import Catalog
    from shared.labels import LabelLog

    log_ = LabelLog(storage)
    log_.refresh()
    from_log = {i: e.label for i, e in log_.current().items()}
    transform, head_version = None, None
    if settings.classifier_space == "head":
        from shared.head import load_head

        head = load_head(storage, settings)
        transform, head_version = (lambda x: head.apply(x).embedding), head.version
    catalog = Catalog(storage)
    seen = collect(
        EmbeddingStore(storage, encoder_version),
        skip=catalog.deleted_ids(),
        log_labels=from_log,
        vectors=transform,
        sample_size=_sample_size(settings),
        catalog=catalog,
    )
    if len(seen.ids) < 2:
        raise NotReady(
            f"need embedded images for encoder {encoder_version}: ingest and embed first", code="no_embeddings"
        )
    space = FeatureSpace(dim=settings.classifier_pca_dim if head_version is None else 0, sample=settings.pass_sample)
    space.fit(seen.sample_vectors)
    sample_features = space.transform(seen.sample_vectors)
    labelled_features = space.transform(seen.labelled_vectors)

    label_set = log_.label_set()
    present = set(seen.labels)
    order = list(label_set.classes) if label_set else []
    order += sorted(present - set(order))
    used = [c for c in order if c in present]
    code = {c: i for i, c in enumerate(used)}
    labels = np.full(len(seen.ids), -1, dtype=np.int64)
    labels[seen.labelled] = [code[lab] for lab in seen.labels]

    knn_space, source = _index_space(storage, settings, encoder_version, seen.ids, seen.labelled)
    if knn_space is None:
        knn_space, source = normalize(labelled_features), "analysis features (no published index for this encoder)"
    return AnalysisData(
        ids=seen.ids,
        labels=labels,
        classes=used,
        sample=seen.sample,
        sample_features=sample_features,
        sample_unit=normalize(sample_features),
        labelled_features=labelled_features,
        knn_space=knn_space,
        knn_source=source,
        space=space,
        encoder_version=encoder_version,
        passes=seen,
        head_version=head_version,
    )


def _sample_size(settings: Settings) -> int:
    """Rows the analysis samples: ``pass_sample``, or what the largest map or the silhouette draws."""
    draws = [settings.analysis_silhouette_sample]
    draws += [
        settings.analysis_pca_points if m == "pca" else settings.analysis_map_sample for m in settings.analysis_maps
    ]
    return max(settings.pass_sample, *draws)


def _index_space(
    storage: Storage, settings: Settings, encoder_version: str, ids: list[str], rows: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """The published index's vectors of the images at ``rows`` (int64 (m,) positions in ``ids``), when
    the index holds every image."""
    from shared.index import current_version, load_current

    if current_version(storage) is None:
        return None, ""
    index = load_current(storage, settings.data_dir / "cache" / "index", mount=settings.index_mount)
    if index.manifest.encoder_version != encoder_version:
        return None, ""
    found = index.rows_of(ids)
    if (found < 0).any():
        log.info(
            "index %s lacks %d embedded images: kNN uses analysis features",
            index.manifest.version,
            int((found < 0).sum()),
        )
        return None, ""
    return normalize(index.all_vectors()[found[rows]]), f"index {index.manifest.version} ({index.manifest.kind})"


# -- clustering --------------------------------------------------------------------------------


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> tuple[np.ndarray, np.ndarray, float]:
    """Spherical FAISS k-means on unit vectors.

    Args:
        x: float32 (n, d) unit vectors.
        k: clusters (at most n).

    Returns:
        centroids (k, d), assignment int64 (n,), inertia (sum of squared distances to the nearest centroid).
    """
    import faiss

    if x.ndim != 2 or not 1 <= k <= len(x):
        raise ValueError(f"need (n >= k, d) vectors for k={k}, got {x.shape}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    centroids = np.asarray(km.centroids, dtype=np.float32)
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(centroids)
    dist, assign = flat.search(x, 1)
    return centroids, assign[:, 0].astype(np.int64), float(dist.sum())


def sweep_candidates(k_min: int, k_max: int, n: int, steps: int = 8) -> list[int]:
    """Up to ``steps`` k values spread geometrically over [k_min, k_max], none above n - 1."""
    hi = max(2, min(k_max, n - 1))
    lo = max(2, min(k_min, hi))
    return sorted({int(round(v)) for v in np.geomspace(lo, hi, steps)})


def cluster_step(data: AnalysisData, settings: Settings, report: Report) -> np.ndarray:
    """k-means (k from settings or the best silhouette of a sweep), sizes, silhouette, agreement with labels.

    The sweep runs on the seeded sample (its silhouette on a sample of that); every image is then assigned
    to the chosen centroids shard by shard, for the sizes, the inertia and the images nearest each centroid.

    Returns:
        int64 (n,) cluster of every image.
    """
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    x = data.sample_unit
    rng = np.random.default_rng(0)
    sample = rng.choice(len(x), min(settings.analysis_silhouette_sample, len(x)), replace=False)
    sweep = []
    candidates = (
        [min(settings.analysis_k, len(x) - 1)]
        if settings.analysis_k
        else sweep_candidates(settings.analysis_k_min, settings.analysis_k_max, len(x))
    )
    best: tuple[float, int, np.ndarray, np.ndarray, float] | None = None
    for k in candidates:
        t0 = time.perf_counter()
        centroids, assign, inertia = kmeans(x, k)
        sil = float(silhouette_score(x[sample], assign[sample])) if len(np.unique(assign[sample])) > 1 else -1.0
        sweep.append(
            {
                "k": k,
                "silhouette": round(sil, 4),
                "inertia": round(inertia, 3),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        if best is None or sil > best[0]:
            best = (sil, k, centroids, assign, inertia)
    assert best is not None
    sil, k, centroids, _, _ = best
    assign, inertia, near = assign_all(data, centroids, settings.analysis_contact_per_cluster)
    sizes = np.bincount(assign, minlength=k)
    nearest = report.nearest
    for c in range(k):
        nearest[c] = [data.ids[int(i)] for i in near[c]]
    out: dict[str, Any] = {
        "k": k,
        "chosen_by": "setting" if settings.analysis_k else "silhouette sweep",
        "silhouette": round(sil, 4),
        "silhouette_sample": int(len(sample)),
        "inertia": round(inertia, 3),
        "sweep": sweep,
        "sizes": [int(s) for s in sizes],
        "size_stats": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
    }
    lab = data.labelled
    if len(lab) and len(data.classes) > 1:
        y, a = data.labels[lab], assign[lab]
        majority = sum(int(np.bincount(y[a == c]).max()) for c in np.unique(a))
        out["agreement"] = {
            "labelled": int(len(lab)),
            "adjusted_rand": round(float(adjusted_rand_score(y, a)), 4),
            "purity": round(majority / len(lab), 4),
        }
    else:
        out["agreement"] = None
    report.metrics["clustering"] = out
    report.json("clusters.json", {"k": k, "sizes": out["sizes"], "nearest": {str(c): v for c, v in nearest.items()}})
    report.files["centroids.npy"] = _npy(centroids)
    return assign


def assign_all(data: AnalysisData, centroids: np.ndarray, per: int) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Every image's nearest centroid, read shard by shard.

    Args:
        centroids: float32 (k, p) unit centroids.
        per: images to keep nearest each centroid.

    Returns:
        int64 (n,) cluster of every image, the inertia (sum of squared distances to the nearest
        centroid), and per cluster int64 rows of its ``per`` members nearest the centroid, nearest first.
    """
    import faiss

    k = len(centroids)
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(centroids)
    assign = np.zeros(len(data.ids), np.int64)
    inertia = 0.0
    best_rows = [np.zeros(0, np.int64) for _ in range(k)]
    best_sims = [np.zeros(0, np.float32) for _ in range(k)]
    for start, feats in data.feature_chunks():
        unit = normalize(feats)
        dist, nearest = flat.search(unit, 1)
        assign[start : start + len(unit)] = nearest[:, 0]
        inertia += float(dist.sum())
        for c in np.unique(nearest[:, 0]):
            members = np.flatnonzero(nearest[:, 0] == c)
            rows = np.concatenate([best_rows[c], start + members])
            sims = np.concatenate([best_sims[c], unit[members] @ centroids[c]])
            keep = np.lexsort((rows, -sims))[:per]  # most similar first, earlier row on a tie
            best_rows[c], best_sims[c] = rows[keep], sims[keep]
    return assign, inertia, best_rows


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


# -- maps ----------------------------------------------------------------------------------------


def project(method: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, d) -> float32 (n, 2): PCA, UMAP (n_neighbors 15, min_dist 0.1) or t-SNE (perplexity 30)."""
    if method == "pca":
        centred = (x - x.mean(axis=0)).astype(np.float64)
        _, vecs = np.linalg.eigh(centred.T @ centred)
        return (centred @ vecs[:, ::-1][:, :2]).astype(np.float32)
    if method == "umap":
        import umap

        neighbours = min(15, len(x) - 1)
        reducer = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
        return np.asarray(tsne.fit_transform(x), dtype=np.float32)
    raise ValueError(f"unknown map method {method!r}")


def maps_step(
    data: AnalysisData, clusters: np.ndarray | None, settings: Settings, report: Report, progress: Progress
) -> dict[str, Any]:
    """Every configured 2-D map of (a sample of) the seeded sample, as data columns for the page.

    Returns:
        method -> (rows, xy) for the figures: int64 rows of the images drawn, float32 (len(rows), 2).
    """
    rng = np.random.default_rng(0)
    n, s = len(data.ids), len(data.sample)
    drawn: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for i, method in enumerate(settings.analysis_maps):
        cap = settings.analysis_pca_points if method == "pca" else settings.analysis_map_sample
        picked = np.sort(rng.choice(s, cap, replace=False)) if s > cap else np.arange(s)
        rows = data.sample[picked]  # drawn from the seeded sample, which holds at least cap images
        if len(rows) < 5:
            out[method] = {"skipped": "fewer than 5 images"}
            continue
        progress(f"map {method}", i, len(settings.analysis_maps))
        t0 = time.perf_counter()
        xy = project(method, data.sample_unit[picked])
        seconds = time.perf_counter() - t0
        drawn[method] = (rows, xy)
        out[method] = {"points": int(len(rows)), "of": n, "seconds": round(seconds, 3)}
        report.json(
            f"maps/{method}.json",
            {
                "method": method,
                "seconds": round(seconds, 3),
                "x": [round(float(v), 4) for v in xy[:, 0]],
                "y": [round(float(v), 4) for v in xy[:, 1]],
                "id": [data.ids[int(r)] for r in rows],
                "cluster": [int(clusters[r]) for r in rows] if clusters is not None else None,
                "label": [data.classes[int(c)] if c >= 0 else None for c in data.labels[rows]],
            },
        )
    report.metrics["maps"] = out
    return drawn


# -- classifiers ---------------------------------------------------------------------------------


def knn_vote(neighbour_labels: np.ndarray, n_classes: int, alpha: float = KNN_ALPHA) -> np.ndarray:
    """Majority vote of neighbours' labels (int (m, k), -1 ignored) as smoothed shares (m, n_classes)."""
    counts = np.zeros((len(neighbour_labels), n_classes))
    for c in range(n_classes):
        counts[:, c] = (neighbour_labels == c).sum(axis=1)
    return (counts + alpha) / (counts.sum(axis=1, keepdims=True) + alpha * n_classes)


def classifier_step(
    data: AnalysisData, settings: Settings, report: Report, progress: Progress
) -> dict[str, Any] | None:
    """Logistic regression, LightGBM and 10-NN on the labelled images with a stratified 20% held out.

    Returns:
        what the figures need (confusion matrices, classes) or None when skipped.
    """
    from sklearn.metrics import confusion_matrix

    lab = data.labelled
    counts = np.bincount(data.labels[lab], minlength=len(data.classes)) if len(lab) else np.zeros(0, np.int64)
    keep = np.flatnonzero(counts >= 2)
    if len(keep) < 2:
        report.skip("classifiers", "no labels to learn from: need two classes with two labelled images each")
        return None
    remap = np.full(len(data.classes), -1)
    remap[keep] = np.arange(len(keep))
    at = np.flatnonzero(remap[data.labels[lab]] >= 0)  # positions in lab (and in labelled_features)
    rows = lab[at]
    y = remap[data.labels[rows]]
    classes = [data.classes[c] for c in keep]
    split = holdout_split(y, settings.classifier_holdout)
    if split is None:
        share = f"{settings.classifier_holdout:.0%}"
        report.skip("classifiers", f"too few labels to hold {share} out (each class needs one on each side)")
        return None
    tr, te = split
    c = len(classes)
    results: dict[str, Any] = {}
    figures: dict[str, Any] = {"classes": classes, "confusion": {}}
    for i, name in enumerate(MODELS):
        progress(f"classifier {name}", i, len(MODELS))
        t0 = time.perf_counter()
        if name == "knn10":
            _, nn = knn_neighbours(data.knn_space[at[tr]], data.knn_space[at[te]], KNN_K)
            proba = knn_vote(np.where(nn >= 0, y[tr][np.maximum(nn, 0)], -1), c)
        else:
            model = fit_classifier(name, data.labelled_features[at[tr]], y[tr], seed=0)
            proba = full_proba(model, data.labelled_features[at[te]], c)
        seconds = time.perf_counter() - t0
        results[name] = {**evaluate(proba, y[te], classes), "seconds": round(seconds, 3)}
        pred = proba.argmax(axis=1)
        figures["confusion"][name] = confusion_matrix(y[te], pred, labels=range(c))
    best = max(MODELS, key=lambda m: (results[m]["accuracy"], results[m]["macro_f1"]))
    report.metrics["classifiers"] = {
        "labelled": int(len(rows)),
        "train": int(len(tr)),
        "test": int(len(te)),
        "classes": classes,
        "chance": round(float(np.bincount(y[te]).max() / len(te)), 4),
        "knn_space": data.knn_source,
        "feature_dim": data.feature_dim,
        "models": results,
        "best": best,
    }
    figures["best"] = best
    figures["rows"], figures["at"], figures["y"] = rows, at, y
    return figures


def publish_classifier(data: AnalysisData, fitted: dict[str, Any], report: Report) -> ClassifierManifest:
    """Refit the best model on every label and add it to the report for ``POST /api/classify`` in the
    classifier's served form (:func:`job.classifier.export` under ``classify/``): ONNX for logistic
    regression and LightGBM (onnxruntime runs it, no scikit-learn in the API), no model for 10-NN
    (the API votes over the live index's labelled images)."""
    best, rows, y, classes = fitted["best"], fitted["rows"], fitted["y"], fitted["classes"]
    model = fit_classifier(best, data.labelled_features[fitted["at"]], y, seed=0) if best in ONNX_KINDS else None
    exported = export(
        best,
        model,
        data.space,
        classes,
        encoder_version=data.encoder_version,
        head_version=data.head_version,
        labelled=int(len(rows)),
        metrics=report.metrics["classifiers"]["models"][best],
        knn_k=KNN_K,
        knn_alpha=KNN_ALPHA,
    )
    for name, blob in exported.files.items():
        report.files[CLASSIFY + name] = blob
    report.metrics["classify"] = exported.manifest.to_json()
    return exported.manifest


# -- anomalies and mislabels ---------------------------------------------------------------------


def anomaly_step(
    data: AnalysisData, clusters: np.ndarray | None, settings: Settings, report: Report
) -> list[dict[str, Any]]:
    """Isolation Forest (200 trees) fitted on the seeded sample's features, then every image scored shard
    by shard; the ``analysis_anomaly_share`` most isolated flagged."""
    from sklearn.ensemble import IsolationForest

    n = len(data.ids)
    flagged = max(1, int(round(settings.analysis_anomaly_share * n)))
    forest = IsolationForest(n_estimators=200, random_state=0, n_jobs=1).fit(data.sample_features)
    score = np.zeros(n, np.float64)
    for start, feats in data.feature_chunks():
        score[start : start + len(feats)] = -forest.score_samples(feats)  # higher: more isolated
    order = np.argsort(-score, kind="stable")[:flagged]
    items = [
        {
            "id": data.ids[int(r)],
            "rank": i + 1,
            "score": round(float(score[r]), 5),
            "cluster": int(clusters[r]) if clusters is not None else None,
            "label": data.classes[int(data.labels[r])] if data.labels[r] >= 0 else None,
        }
        for i, r in enumerate(order)
    ]
    report.metrics["anomalies"] = {
        "trees": 200,
        "images": n,
        "fitted_on": int(len(data.sample)),
        "flagged": len(items),
        "share": round(len(items) / n, 4),
        "threshold": round(float(score[order[-1]]), 5),
        "score_median": round(float(np.median(score)), 5),
    }
    report.json("anomalies.json", {"items": items})
    return items


def mislabel_step(
    data: AnalysisData, settings: Settings, report: Report, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Likely mislabels among the labelled images, by ``settings.analysis_label_issues``
    (:mod:`job.label_issues`: cleanlab's confident learning over cross-validated probabilities, or the
    10 nearest labelled neighbours' vote), each with why: the label given and its probability, the
    class suggested and its probability, the neighbours' vote for it and the 5 nearest neighbours."""

    lab = data.labelled
    if len(lab) <= KNN_K or len(data.classes) < 2:
        report.skip("mislabels", f"needs more than {KNN_K} labelled images of two classes or more")
        return []
    method = settings.analysis_label_issues
    y = data.labels[lab]
    t0 = time.perf_counter()
    issues = find_issues(
        data.labelled_features,
        data.knn_space,
        y,
        len(data.classes),
        method,
        model=settings.analysis_label_issue_model,
        min_share=settings.analysis_mislabel_vote,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    _, nn = neighbours(data.knn_space, KNN_K)
    items = []
    for i in issues.order:
        votes = y[nn[i]]
        suggested = int(issues.suggested[i])
        items.append(
            {
                "id": data.ids[int(lab[i])],
                "label": data.classes[int(y[i])],
                "suggested": data.classes[suggested],
                "method": method,
                "given_probability": round(float(issues.given_probability[i]), 4),
                "suggested_probability": round(float(issues.suggested_probability[i]), 4),
                "vote": round(float((votes == suggested).mean()), 2),
                "neighbours": [data.ids[int(lab[j])] for j in nn[i][:5]],
                "neighbour_labels": [data.classes[int(c)] for c in votes[:5]],
            }
        )
    report.metrics["mislabels"] = {
        "method": method,
        "model": issues.model,
        "labelled": int(len(lab)),
        "flagged": len(items),
        "share": round(len(items) / len(lab), 4),
        "min_vote": settings.analysis_mislabel_vote if method == "knn_vote" else None,
        "knn_space": data.knn_source,
        "seconds": round(seconds, 2),
    }
    report.json("mislabels.json", {"items": items})
    return items
