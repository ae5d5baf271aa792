"""The ONNX image encoder: EfficientNet-Lite0 giving a 1280-d embedding and 1000 ImageNet logits.

Only onnxruntime and numpy here; the model is exported by ``tools/export_models.py``. Each model
folder holds ``model.onnx`` and ``manifest.json`` (name, version, input, normalisation, outputs,
opset, sha256).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from shared.imaging import preprocess
from shared.manifests import EncoderManifest
from shared.sessions import Verify, open_session, session_options, verify_file

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)


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
        verify: check the ONNX file against the manifest by its byte size (``"size"``, a stat: the query
            side's cold start), its sha256 (``"sha256"``: the export and the jobs) or not (``"none"``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        size: int | None = None,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        verify: Verify = "size",
    ):
        self.folder = Path(folder)
        self.manifest = EncoderManifest.read(self.folder / "manifest.json")
        m = self.manifest
        path = verify_file(self.folder / m.file, m.sha256, size=m.bytes, verify=verify)
        self.size = size or self.manifest.input.size
        if self.size != self.manifest.input.size and not self.manifest.input.dynamic_size:
            raise ValueError(f"this encoder takes {self.manifest.input.size} px input only")
        self._session = open_session(path, providers=providers, intra_op_threads=intra_op_threads)
        self.providers: list[str] = self._session.get_providers()
        log.info("loaded encoder %s at %d px on %s", self.manifest.version, self.size, self.providers)

    @classmethod
    def from_settings(cls, settings: Settings, *, size: int | None = None, verify: Verify = "size") -> ImageEncoder:
        """The encoder the settings name, at their image size (or ``size``), on their providers, its file
        checked by ``verify``.

        Raises:
            NotReady: the model has not been exported (``make models``) or does not match its manifest.
        """
        return cls(settings.encoder_dir, size=size or settings.image_size, verify=verify, **session_options(settings))

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
        vectors, logits = self._session.run(["embedding", "logits"], {self.manifest.input.name: batch})
        return Embeddings(vectors=np.asarray(vectors, dtype=np.float32), logits=np.asarray(logits, dtype=np.float32))

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        """RGB images to normalised input, shape (n, 3, size, size)."""
        return preprocess(images, self.size, self.manifest.normalisation.mean, self.manifest.normalisation.std)

    def encode(self, images: list[Image.Image]) -> Embeddings:
        """Embed RGB images."""
        return self.encode_array(self.preprocess(images))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, c) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
