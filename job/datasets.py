"""Packaged datasets that work offline: Fashion-MNIST (Debian package) and scikit-image photos."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from shared.ingest import IngestItem

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Photos that ship inside scikit-image (no download): name -> label.
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut",
    "chelsea": "cat",
    "coffee": "coffee",
    "rocket": "rocket",
    "camera": "camera",
}


class DatasetMissing(FileNotFoundError):
    """A packaged dataset is not installed."""


def load_fashion_mnist(folder: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels from the Debian package's idx files.

    Returns:
        images uint8 (n, 28, 28), labels int64 (n,).

    Raises:
        DatasetMissing: if the files are not there (``apt-get install dataset-fashion-mnist``).
        ValueError: unknown split or a malformed file.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}")
    img_file, lbl_file = (Path(folder) / f for f in _FILES[split])
    if not img_file.is_file() or not lbl_file.is_file():
        raise DatasetMissing(
            f"Fashion-MNIST not found in {folder}: install it with "
            f"`sudo apt-get install -y {FASHION_MNIST_PACKAGE}` or set CLUSTERLENS_FASHION_MNIST_DIR"
        )
    with gzip.open(img_file, "rb") as fh:
        raw = fh.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{img_file} is not an idx image file")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), int(rows), int(cols))
    with gzip.open(lbl_file, "rb") as fh:
        raw = fh.read()
    if int(np.frombuffer(raw[:4], dtype=">u4")[0]) != 2049:
        raise ValueError(f"{lbl_file} is not an idx label file")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError("Fashion-MNIST images and labels differ in count")
    return images, labels


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 grey or RGB array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def fashion_mnist_items(
    folder: Path, split: str = "train", limit: int | None = None, offset: int = 0
) -> Iterator[IngestItem]:
    """Fashion-MNIST samples as PNG ingest items labelled with their class names."""
    images, labels = load_fashion_mnist(folder, split)
    end = len(images) if limit is None else min(len(images), offset + limit)
    for i in range(offset, end):
        yield IngestItem(
            data=png_bytes(images[i]),
            source=f"fashion-mnist/{split}/{i:05d}",
            label=FASHION_MNIST_CLASSES[int(labels[i])],
        )


def skimage_photo_items() -> Iterator[IngestItem]:
    """A few colour photos shipped inside scikit-image, as PNG ingest items."""
    from skimage import data as skdata

    for name, label in SKIMAGE_PHOTOS.items():
        yield IngestItem(data=png_bytes(np.asarray(getattr(skdata, name)())), source=f"skimage/{name}", label=label)
