"""The benchmarks' real collection: all 70,000 Fashion-MNIST images through the product's own pipeline.

Ingest (train and test splits, labelled), embed with the fp32 encoder at the configured input size,
into a local-storage data dir under ``bench/cache/fmnist70k``. It is built once (about 12 minutes on
2 CPU cores, nearly all of it embedding) and reused by ``make bench-search`` and ``make bench-http``;
ingest and embed skip what is already there, so an interrupted build resumes.

Images are content-addressed, so a byte-identical pair would be stored once; Fashion-MNIST has
none, and the collection holds all 70,000.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from job.datasets import fashion_mnist_items
from job.embeddings import EmbeddingSet, EmbeddingStore, embed_pending
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.settings import Settings
from shared.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "bench" / "cache" / "fmnist70k"
STAMP = "ingested.done"

log = logging.getLogger(__name__)


def settings(data_dir: Path = DATA_DIR, **overrides: Any) -> Settings:
    """Settings for the benchmark collection (no .env file: the defaults, as a fresh install has them)."""
    return Settings(_env_file=None, data_dir=data_dir, **overrides)  # type: ignore[call-arg]


def ensure_collection(data_dir: Path = DATA_DIR) -> tuple[Settings, LocalStorage, ImageEncoder]:
    """Ingest and embed the 70,000 Fashion-MNIST images into ``data_dir`` (skipped when done)."""
    s = settings(data_dir)
    storage = LocalStorage(s.data_dir)
    encoder = ImageEncoder.from_settings(s)
    if not (data_dir / STAMP).is_file():
        for split, n in (("train", 60_000), ("test", 10_000)):
            items = fashion_mnist_items(s.fashion_mnist_dir, split)
            for item in tqdm(items, total=n, desc=f"ingest fashion-mnist {split}", unit="img"):
                ingest_bytes(storage, s, item)
        (data_dir / STAMP).write_text("ok\n")
    stats = embed_pending(storage, s, encoder)
    if stats.embedded:
        log.info("embedded %d images at %.1f img/s", stats.embedded, stats.images_per_second)
    return s, storage, encoder


def real_embeddings(data_dir: Path = DATA_DIR) -> tuple[Settings, LocalStorage, ImageEncoder, EmbeddingSet]:
    """The collection (built if needed) and all its stored embeddings."""
    s, storage, encoder = ensure_collection(data_dir)
    return s, storage, encoder, EmbeddingStore(storage, encoder.version).load()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    *_, emb = real_embeddings()
    print(f"{len(emb.ids)} embeddings of dimension {emb.vectors.shape[1]} in {DATA_DIR}")
