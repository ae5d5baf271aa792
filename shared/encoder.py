"""The ONNX image encoder: EfficientNet-Lite0 giving a 1280-d embedding and 1000 ImageNet logits.

Only onnxruntime and numpy here; the model is exported by ``tools/export_models.py``. Each model
folder holds ``model.onnx`` and ``manifest.json`` (name, version, input, normalisation, outputs,
opset, sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.errors import NotReady
from shared.imaging import preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderManifest:
    """What an exported encoder is; written by the export tool, checked on load."""

    name: str
    version: str
    file: str
    sha256: str
    opset: int
    input_name: str
    input_layout: str
    default_size: int
    dynamic_size: bool
    mean: float
    std: float
    outputs: dict[str, int]
    raw: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> EncoderManifest:
        """Read ``manifest.json`` from a model folder.

        Raises:
            NotReady: if the folder or manifest is missing (run ``make models``).
        """
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise NotReady(f"no encoder manifest at {path}; run `make models` first", code="model_missing")
        raw = json.loads(path.read_text())
        return cls(
            name=raw["name"],
            version=raw["version"],
            file=raw["file"],
            sha256=raw["sha256"],
            opset=int(raw["opset"]),
            input_name=raw["input"]["name"],
            input_layout=raw["input"]["layout"],
            default_size=int(raw["input"]["size"]),
            dynamic_size=bool(raw["input"].get("dynamic_size", False)),
            mean=float(raw["normalisation"]["mean"]),
            std=float(raw["normalisation"]["std"]),
            outputs={k: int(v) for k, v in raw["outputs"].items()},
            raw=raw,
        )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pick_providers(preferred: list[str]) -> list[str]:
    """The preferred ONNX Runtime providers that this installation actually has, in order."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    return chosen or ["CPUExecutionProvider"]


@dataclass
class Embeddings:
    """Encoder output for a batch: ``vectors`` (n, 1280) float32, ``logits`` (n, 1000) float32."""

    vectors: np.ndarray
    logits: np.ndarray


class ImageEncoder:
    """Runs the exported encoder with ONNX Runtime. ONNX Runtime sessions are thread-safe; load once per worker.

    Args:
        folder: model folder with ``manifest.json`` and the ONNX file.
        size: input side in pixels (must equal the manifest's unless the model has dynamic size).
        providers: preferred execution providers; only available ones are used.
        intra_op_threads: ONNX Runtime thread count, 0 for its default.
        verify: check the ONNX file's sha256 against the manifest.
    """

    def __init__(
        self,
        folder: Path,
        *,
        size: int | None = None,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        verify: bool = True,
    ):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = EncoderManifest.load(self.folder)
        path = Path(folder) / self.manifest.file
        if not path.is_file():
            raise NotReady(f"encoder file {path} is missing; run `make models`", code="model_missing")
        if verify and file_sha256(path) != self.manifest.sha256:
            raise NotReady(
                f"{path} does not match its manifest's sha256; rebuild with `make models`", code="model_corrupt"
            )
        self.size = size or self.manifest.default_size
        if self.size != self.manifest.default_size and not self.manifest.dynamic_size:
            raise ValueError(f"this encoder takes {self.manifest.default_size} px input only")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = pick_providers(providers or ["CPUExecutionProvider"])
        self._session = ort.InferenceSession(str(path), options, providers=self.providers)
        log.info("loaded encoder %s at %d px on %s", self.manifest.version, self.size, self.providers)

    @property
    def version(self) -> str:
        """Identifies the embedding space: model version and input size."""
        return f"{self.manifest.version}@{self.size}px"

    @property
    def dim(self) -> int:
        return self.manifest.outputs["embedding"]

    def encode_array(self, batch: np.ndarray) -> Embeddings:
        """Run preprocessed input.

        Args:
            batch: float32 (n, 3, size, size), already normalised.
        """
        if batch.ndim != 4 or batch.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"expected (n, 3, {self.size}, {self.size}), got {batch.shape}")
        vectors, logits = self._session.run(["embedding", "logits"], {self.manifest.input_name: batch})
        return Embeddings(vectors=np.asarray(vectors, dtype=np.float32), logits=np.asarray(logits, dtype=np.float32))

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        """RGB images to normalised input, shape (n, 3, size, size)."""
        return preprocess(images, self.size, self.manifest.mean, self.manifest.std)

    def encode(self, images: list[Image.Image]) -> Embeddings:
        """Embed RGB images."""
        return self.encode_array(self.preprocess(images))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, c) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
