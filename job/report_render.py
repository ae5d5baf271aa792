"""The analysis report's figures (matplotlib, PIL contact sheets) and its self-contained HTML page.

Job side only: matplotlib is imported here and nowhere on the query path. Every figure goes into
the report as a PNG file, and the HTML inlines them (base64), so ``report.html`` opens offline,
mailed or downloaded on its own.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from shared.storage import Storage

if TYPE_CHECKING:
    from job.analysis import AnalysisData, Report

log = logging.getLogger(__name__)

THUMB = 56
MAP_TITLES = {"pca": "PCA", "umap": "UMAP (n_neighbors 15, min_dist 0.1)", "tsne": "t-SNE (perplexity 30)"}
MODEL_TITLES = {"logistic": "Logistic regression", "lightgbm": "LightGBM", "knn10": "10-NN vote (index space)"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


class Thumbnails:
    """Small thumbnails of stored images, read once each (a missing or unreadable image is grey)."""

    def __init__(self, storage: Storage, size: int = THUMB):
        from shared.catalog import Catalog

        self.storage, self.catalog, self.size = storage, Catalog(storage), size
        self._cache: dict[str, Image.Image] = {}

    def get(self, image_id: str) -> Image.Image:
        if image_id not in self._cache:
            try:
                data = self.catalog.image_bytes(self.catalog.get(image_id))
                with Image.open(io.BytesIO(data)) as img:
                    img.draft("RGB", (self.size * 2, self.size * 2))
                    thumb = img.convert("RGB")
                scale = self.size / max(thumb.width, thumb.height)  # small images are enlarged too
                thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))))
            except Exception:  # noqa: BLE001 - a report is drawn even if one image went missing
                log.warning("no thumbnail for %s", image_id)
                thumb = Image.new("RGB", (self.size, self.size), (200, 200, 200))
            tile = Image.new("RGB", (self.size, self.size), (255, 255, 255))
            tile.paste(thumb, ((self.size - thumb.width) // 2, (self.size - thumb.height) // 2))
            self._cache[image_id] = tile
        return self._cache[image_id]


def contact_sheet(thumbs: Thumbnails, rows: list[tuple[str, list[str]]], per_row: int) -> bytes:
    """One row of thumbnails per entry, captioned on the left: [(caption, [image ids])]."""
    s, pad, caption_w = thumbs.size, 4, 150
    width = caption_w + per_row * (s + pad) + pad
    sheet = Image.new("RGB", (width, max(1, len(rows)) * (s + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (caption, ids) in enumerate(rows):
        y = pad + r * (s + pad)
        draw.text((pad, y + s // 2 - 6), caption[:24], fill=(30, 30, 30))
        for c, image_id in enumerate(ids[:per_row]):
            sheet.paste(thumbs.get(image_id), (caption_w + pad + c * (s + pad), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _grid(thumbs: Thumbnails, items: list[dict[str, Any]], per_row: int = 8) -> bytes:
    """Ranked items, ``per_row`` to a row captioned with their rank range."""
    rows = []
    for i in range(0, len(items), per_row):
        chunk = items[i : i + per_row]
        rows.append((f"#{chunk[0]['rank']} to #{chunk[-1]['rank']}", [it["id"] for it in chunk]))
    return contact_sheet(thumbs, rows, per_row)


def render_figures(
    storage: Storage,
    data: AnalysisData,
    clusters: np.ndarray,
    drawn: dict[str, tuple[np.ndarray, np.ndarray]],
    fitted: dict[str, Any] | None,
    anomalies: list[dict[str, Any]],
    mislabels: list[dict[str, Any]],
    report: Report,
) -> None:
    """Add every figure to the report's files (PNG)."""
    plt = _pyplot()
    thumbs = Thumbnails(storage)
    clustering = report.metrics["clustering"]
    sizes = np.array(clustering["sizes"])

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    order = np.argsort(-sizes)
    left.bar(range(len(sizes)), sizes[order], color="#4472c4")
    left.set(title=f"Cluster sizes (k = {len(sizes)}), largest first", xlabel="cluster (by size)", ylabel="images")
    right.hist(sizes, bins=min(30, max(5, len(sizes) // 2)), color="#ed7d31")
    right.set(title="Histogram of cluster sizes", xlabel="images in cluster", ylabel="clusters")
    report.files["cluster_sizes.png"] = _png(fig)

    if len(clustering["sweep"]) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ks = [s["k"] for s in clustering["sweep"]]
        ax.plot(ks, [s["silhouette"] for s in clustering["sweep"]], "o-", color="#4472c4")
        ax.axvline(clustering["k"], color="#c00000", ls="--", lw=1)
        ax.set(title="Silhouette by k (sample)", xlabel="k", ylabel="silhouette", xscale="log")
        report.files["silhouette_sweep.png"] = _png(fig)

    nearest = report.nearest
    rows = [(f"cluster {c} ({sizes[c]})", nearest[c]) for c in order[:48]]
    report.files["contact_sheet.png"] = contact_sheet(thumbs, rows, per_row=max(len(v) for v in nearest.values()))

    cmap = plt.get_cmap("tab20")
    for method, (rows_drawn, xy) in drawn.items():
        labelled = data.labels[rows_drawn] >= 0
        panels = 2 if labelled.any() else 1
        fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.6), squeeze=False)
        size = max(1.0, min(12.0, 4000 / len(xy)))
        axes[0, 0].scatter(xy[:, 0], xy[:, 1], c=cmap(clusters[rows_drawn] % 20), s=size, linewidths=0)
        axes[0, 0].set_title(f"{MAP_TITLES[method]}: by cluster")
        if panels == 2:
            ax = axes[0, 1]
            ax.scatter(xy[~labelled, 0], xy[~labelled, 1], c="#dddddd", s=size, linewidths=0)
            codes = data.labels[rows_drawn][labelled]
            for c in np.unique(codes):
                pts = xy[labelled][codes == c]
                ax.scatter(
                    pts[:, 0],
                    pts[:, 1],
                    color=cmap(int(c) % 20),
                    s=size * 1.5,
                    linewidths=0,
                    label=data.classes[int(c)],
                )
            ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
            ax.set_title(f"{MAP_TITLES[method]}: by label (grey: unlabelled)")
        for ax in axes[0]:
            ax.set_xticks([])
            ax.set_yticks([])
        report.files[f"map_{method}.png"] = _png(fig)

    if fitted is not None:
        classes = fitted["classes"]
        n = len(fitted["confusion"])
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
        for ax, (name, cm) in zip(axes[0], fitted["confusion"].items(), strict=True):
            ax.imshow(cm, cmap="Blues")
            ax.set_title(
                f"{MODEL_TITLES[name]}\naccuracy {report.metrics['classifiers']['models'][name]['accuracy']:.3f}",
                fontsize=9,
            )
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set(xlabel="predicted", ylabel="true")
            for (i, j), v in np.ndenumerate(cm):
                if v:
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v > cm.max() / 2 else "black",
                    )
        report.files["confusion.png"] = _png(fig)

    if anomalies:
        report.files["anomalies.png"] = _grid(thumbs, anomalies[:48])
    if mislabels:
        rows = [(f"{m['label']} -> {m['suggested']}", [m["id"], *m["neighbours"][:5]]) for m in mislabels[:24]]
        report.files["mislabels.png"] = contact_sheet(thumbs, rows, per_row=6)


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ddd;padding:.2rem .55rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.muted{color:#777}.skip{color:#a60}
.kpi{display:inline-block;margin:0 1.6rem .6rem 0}.kpi b{font-size:1.3rem;display:block}
"""


def _img(report: Report, name: str, alt: str) -> str:
    if name not in report.files:
        return ""
    data = base64.b64encode(report.files[name]).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _skipped(report: Report, step: str) -> str:
    info = report.steps.get(step, {})
    if info.get("status") == "skipped":
        return f'<p class="skip">Skipped: {html.escape(info.get("reason", ""))}</p>'
    return ""


def render_html(report: Report, anomalies: list[dict[str, Any]], mislabels: list[dict[str, Any]]) -> bytes:
    """The whole report as one HTML page with its figures inlined."""
    m = report.metrics
    cl = m["clustering"]
    e = html.escape
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>clusterlens report {e(m['version'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>clusterlens analysis {e(m['version'])}</h1>",
        f"<p class=muted>{e(m['created_at'])} &middot; encoder {e(m['encoder_version'])}"
        f"{' &middot; head ' + e(str(m['head_version'])) if m.get('head_version') else ''}</p>",
        f"<div class=kpi><b>{m['images']:,}</b>images</div><div class=kpi><b>{m['labelled']:,}</b>labelled</div>",
        f"<div class=kpi><b>{cl['k']}</b>clusters</div><div class=kpi><b>{cl['silhouette']:.3f}</b>silhouette</div>",
    ]
    if "classifiers" in m:
        best = m["classifiers"]["best"]
        acc = m["classifiers"]["models"][best]["accuracy"]
        parts.append(f"<div class=kpi><b>{acc:.3f}</b>held-out accuracy ({e(MODEL_TITLES[best])})</div>")
    if "anomalies" in m:
        parts.append(f"<div class=kpi><b>{m['anomalies']['flagged']}</b>anomalies flagged</div>")

    parts.append("<h2>Clusters</h2>")
    parts.append(
        f"<p>FAISS spherical k-means on {m['feature_dim']}-d features, k = {cl['k']} ({e(cl['chosen_by'])}); "
        f"silhouette {cl['silhouette']:.3f} on a sample of {cl['silhouette_sample']:,} images.</p>"
    )
    if len(cl["sweep"]) > 1:
        parts.append(
            _table(
                ["k", "silhouette", "inertia", "seconds"],
                [[s["k"], s["silhouette"], s["inertia"], s["seconds"]] for s in cl["sweep"]],
            )
        )
        parts.append(_img(report, "silhouette_sweep.png", "silhouette for each k tried"))
    if cl.get("agreement"):
        a = cl["agreement"]
        parts.append(
            f"<p>Agreement with the {a['labelled']:,} labels: adjusted Rand {a['adjusted_rand']:.3f}, "
            f"purity {a['purity']:.3f}.</p>"
        )
    parts.append(_img(report, "cluster_sizes.png", "cluster sizes"))
    sizes = cl["sizes"]
    parts.append(
        _table(
            ["cluster", "images", "share"],
            [[c, s, f"{s / max(1, sum(sizes)):.1%}"] for c, s in sorted(enumerate(sizes), key=lambda p: -p[1])],
        )
    )
    parts.append("<h3>Images nearest each centroid</h3>")
    parts.append(_img(report, "contact_sheet.png", "contact sheet: the images nearest each cluster centre"))

    parts.append("<h2>Maps</h2>")
    maps = m.get("maps", {})
    parts.append(
        _table(
            ["map", "points", "of", "seconds"],
            [[k, v.get("points"), v.get("of"), v.get("seconds")] for k, v in maps.items()],
        )
    )
    for method in maps:
        parts.append(_img(report, f"map_{method}.png", f"{method} map"))

    parts.append("<h2>Classifiers</h2>")
    parts.append(_skipped(report, "classifiers"))
    if "classifiers" in m:
        c = m["classifiers"]
        parts.append(
            f"<p>{c['labelled']:,} labelled images, {len(c['classes'])} classes; trained on {c['train']:,}, "
            f"measured on a stratified held-out {c['test']:,} (chance: {c['chance']:.3f}). "
            f"10-NN votes in {e(c['knn_space'])}. Best: <b>{e(MODEL_TITLES[c['best']])}</b>, published for "
            f"<code>POST /api/classify</code>.</p>"
        )
        parts.append(
            _table(
                ["model", "accuracy", "macro-F1", "log loss", "seconds"],
                [
                    [MODEL_TITLES[k], v["accuracy"], v["macro_f1"], v["log_loss"], v["seconds"]]
                    for k, v in c["models"].items()
                ],
            )
        )
        parts.append(_img(report, "confusion.png", "confusion matrices"))
        best = c["models"][c["best"]]["per_class"]
        parts.append(f"<h3>Per class ({e(MODEL_TITLES[c['best']])})</h3>")
        parts.append(
            _table(
                ["class", "precision", "recall", "F1", "support"],
                [[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in best.items()],
            )
        )

    parts.append("<h2>Anomalies</h2>")
    if "anomalies" in m:
        a = m["anomalies"]
        parts.append(
            f"<p>Isolation Forest ({a['trees']} trees): the {a['flagged']} most isolated of {a['images']:,} images "
            f"({a['share']:.1%}), score &ge; {a['threshold']:.3f} (median {a['score_median']:.3f}). "
            "Most isolated first:</p>"
        )
        parts.append(_img(report, "anomalies.png", "the most isolated images"))
        parts.append(
            _table(
                ["rank", "id", "score", "cluster", "label"],
                [[a_["rank"], a_["id"][:12], a_["score"], a_["cluster"], a_["label"]] for a_ in anomalies[:25]],
            )
        )

    parts.append("<h2>Likely mislabels</h2>")
    parts.append(_skipped(report, "mislabels"))
    if "mislabels" in m:
        ml = m["mislabels"]
        if ml.get("method", "knn_vote") == "knn_vote":
            how = f"disagree with at least {ml['min_vote']:.0%} of their 10 nearest labelled neighbours"
        else:
            how = (
                f"are label issues by confident learning (cleanlab) over {ml['model']} probabilities from 5-fold "
                "cross-validation (each image predicted by a model that never saw it)"
            )
        parts.append(
            f"<p>{ml['flagged']} of {ml['labelled']:,} labels {how}. Each row: the image, then five of its "
            "nearest labelled neighbours.</p>"
        )
        parts.append(_img(report, "mislabels.png", "images whose label is likely wrong"))
        parts.append(
            _table(
                ["id", "label", "p(label)", "suggested", "p(suggested)", "neighbours' vote"],
                [
                    [
                        x["id"][:12],
                        x["label"],
                        x.get("given_probability", ""),
                        x["suggested"],
                        x.get("suggested_probability", ""),
                        x["vote"],
                    ]
                    for x in mislabels[:25]
                ],
            )
        )

    parts.append("<h2>Steps</h2>")
    parts.append(
        _table(
            ["step", "status", "seconds", "note"],
            [[k, v["status"], v["seconds"], v.get("reason")] for k, v in report.steps.items()],
        )
    )
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p).encode()
