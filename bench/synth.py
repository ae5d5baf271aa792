"""An existing collection of any size, written straight into a storage folder: embedding shards grown from
real embeddings, with the catalogue columns filled (and, optionally, a catalogue record per image).

There is no million-image set here, and embedding one would take days on 2 cores, so the vectors are
**grown**: real Fashion-MNIST images are embedded with the product's encoder (64 px input, so it takes
seconds), and new 1280-d vectors are drawn from a model fitted to them: their top principal components
(:data:`COMPONENTS_DIM`) carry a Gaussian mixture (:func:`bench.grow.fit_mixture`: k-means, shrunk full
covariances), and the rest of each dimension's variance is added as independent noise; like the real
pooled activations they are clipped at 0. Not uniform random data: clusters and neighbourhoods follow the
real set's. The top classes, labels (about 10%), captions (about 0.1%) and ingest times are made up.

:func:`synthesize_collection` is what the ``full_reindex`` part of :mod:`bench.scale` builds on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.catalog import RECORDS_PREFIX, ImageRecord
from shared.storage import EMBEDDINGS, LocalStorage, Storage

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "cache" / "synth"
REAL_IMAGES = 4000  # real Fashion-MNIST training images the growth model is fitted to
REAL_SIZE = 64  # their encoder input size in pixels
COMPONENTS_DIM = 64  # principal components the mixture lives in
MIXTURE = 32  # its components
LABEL_SHARE, CAPTION_SHARE = 0.10, 0.001
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class GrowthModel:
    """Real embeddings' mean, top principal directions with a mixture over them, and residual spread."""

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (r, d) orthonormal rows
    mixture: list[tuple[float, np.ndarray, np.ndarray]]  # (weight, mean (r,), Cholesky factor (r, r))
    residual_std: np.ndarray  # (d,)
    source: str

    @classmethod
    def fit(cls, real: np.ndarray, source: str, seed: int = 0) -> GrowthModel:
        """Fit to real embeddings, float32 (n, d)."""
        from bench.grow import fit_mixture

        x = real.astype(np.float64)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        basis = vt[:COMPONENTS_DIM]
        coords = (x - mean) @ basis.T
        residual = (x - mean) - coords @ basis
        mixture = fit_mixture(coords.astype(np.float32), components=MIXTURE, seed=seed)
        return cls(mean, basis, mixture, residual.std(0), source)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """float32 (n, d) new embeddings."""
        weights = np.array([w for w, _, _ in self.mixture])
        which = rng.choice(len(self.mixture), size=n, p=weights / weights.sum())
        coords = np.empty((n, len(self.basis)))
        for c in np.unique(which):
            rows = np.flatnonzero(which == c)
            _, mean, chol = self.mixture[c]
            coords[rows] = mean + rng.standard_normal((len(rows), len(mean))) @ chol.T
        x = self.mean + coords @ self.basis + rng.standard_normal((n, len(self.mean))) * self.residual_std
        return np.maximum(x, 0).astype(np.float32)


def real_sample(count: int = REAL_IMAGES) -> tuple[np.ndarray, str]:
    """Embeddings of the first ``count`` Fashion-MNIST training images (cached), and what they are."""
    from PIL import Image

    from job.datasets import load_fashion_mnist
    from shared.encoder import ImageEncoder
    from shared.settings import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    encoder = ImageEncoder.from_settings(settings, size=REAL_SIZE)
    what = f"{count} Fashion-MNIST training images embedded by {encoder.version}"
    path = CACHE / f"real-{encoder.version.replace('/', '_')}-{count}.npy"
    if path.is_file():
        return np.load(path), what
    pixels, _ = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    images = [Image.fromarray(p).convert("RGB") for p in pixels[:count]]
    vectors = np.concatenate([encoder.encode(images[i : i + 256]).vectors for i in range(0, count, 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, what


def synthesize_collection(
    storage: Storage,
    n: int,
    encoder_version: str,
    *,
    seed: int = 0,
    shard_rows: int = 4096,
    records: bool = False,
    model: GrowthModel | None = None,
) -> dict[str, Any]:
    """Write ``n`` grown embeddings of ``encoder_version`` as shards of ``shard_rows`` rows into ``storage``.

    Ids are 64-hex sha256 strings (of the seed and row number). Each shard carries the catalogue columns
    (label, caption, ingest time) as :meth:`job.embeddings.EmbeddingStore.write_shard` writes them.

    Args:
        records: also write each image's catalogue record (``embeddings/records/<id>.json``; straight
            into the folder when ``storage`` is local, else one put each).
        model: what to grow from (default: fitted to :func:`real_sample`).

    Returns:
        what was written: counts, seconds, bytes, and how the vectors were grown.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from job.embeddings import TOP_CLASSES, EmbeddingStore

    t0 = time.perf_counter()
    if model is None:
        real, what = real_sample()
        model = GrowthModel.fit(real, what, seed=seed)
    store = EmbeddingStore(storage, encoder_version)
    rng = np.random.default_rng(seed)
    start_time = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    shards, size = 0, 0
    for first in range(0, n, shard_rows):
        m = min(shard_rows, n - first)
        ids = [hashlib.sha256(f"{seed}:{first + i}".encode()).hexdigest() for i in range(m)]
        vectors = model.draw(m, rng)
        top = rng.integers(0, 1000, (m, TOP_CLASSES)).astype(np.int16)
        prob = np.sort(rng.dirichlet(np.ones(TOP_CLASSES + 1), m)[:, :TOP_CLASSES], axis=1)[:, ::-1]
        labels = [LABELS[rng.integers(len(LABELS))] if rng.random() < LABEL_SHARE else None for _ in range(m)]
        captions = [f"a grown image, number {first + i}" if rng.random() < CAPTION_SHARE else None for i in range(m)]
        ingested = start_time + (first + np.arange(m)) * 7
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
                "top_class": pa.FixedSizeListArray.from_arrays(pa.array(top.ravel()), TOP_CLASSES),
                "top_prob": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(prob, np.float32).ravel()), TOP_CLASSES
                ),
                "label": pa.array(labels, pa.string()),
                "caption": pa.array(captions, pa.string()),
                "ingested": pa.array(ingested, pa.int64()),
            },
            metadata={"encoder_version": encoder_version},
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        storage.put(EMBEDDINGS, store.shard_name(m), data)
        shards, size = shards + 1, size + len(data)
        if records:
            _write_records(storage, ids, labels, captions, ingested)
    return {
        "images": n,
        "shards": shards,
        "shard_rows": shard_rows,
        "bytes": size,
        "records": records,
        "seconds": round(time.perf_counter() - t0, 1),
        "vectors": "grown (synthesised), not embedded: a Gaussian mixture over the top "
        f"{COMPONENTS_DIM} principal components plus per-dimension residual noise, clipped at 0, "
        f"fitted to {model.source}",
    }


def _write_records(
    storage: Storage, ids: list[str], labels: list[str | None], captions: list[str | None], ingested: np.ndarray
) -> None:
    for image_id, label, caption, when in zip(ids, labels, captions, ingested, strict=True):
        record = ImageRecord(
            id=image_id,
            blob=f"{image_id}.png",
            label=label,
            source="synth",
            format="PNG",
            width=28,
            height=28,
            bytes=0,
            ingested_at=datetime.fromtimestamp(int(when), UTC).isoformat(timespec="seconds"),
            caption=caption,
        )
        name = f"{RECORDS_PREFIX}{image_id}.json"
        if isinstance(storage, LocalStorage):  # straight into the folder: no request counted, and fast
            path = storage._path(EMBEDDINGS, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record.to_json(), indent=1, sort_keys=True))
        else:
            storage.put_json(EMBEDDINGS, name, record.to_json())
