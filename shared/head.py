"""The trained projection head: backbone embedding (1280) -> 64-d task-tuned embedding + class probabilities.

The head is the design of the original pipeline, 1280 -> BN -> Dropout(0.5) -> 512 -> ReLU -> BN ->
Dropout -> 64 (the embedding) -> class logits, trained on stored backbone embeddings of labelled
images by ``job/train_head.py`` (torch, job side) and exported to ONNX. This module runs the
export with onnxruntime only: the graph takes raw backbone embeddings, applies the same power
normalisation as the index, and returns the L2-normalised 64-d embedding and softmax probabilities.

Heads are versioned in the models container and published by a pointer swap::

    models/heads/v000002/head.onnx
    models/heads/v000002/manifest.json   classes, encoder version, dims, metrics, sha256
    models/heads/CURRENT.json

An index built in the head's space keeps its own copy of the head (see :mod:`shared.index`), so
queries always go through the head the index was built with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import NotReady
from shared.manifests import HeadManifest
from shared.sessions import open_session, session_options, verify_file
from shared.storage import MODELS, Storage
from shared.versions import read_pointer

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

HEADS = "heads/"
HEAD_FILE = "head.onnx"
_BATCH = 8192


@dataclass
class HeadOutput:
    """``embedding`` float32 (n, dim) L2-normalised; ``probs`` float32 (n, classes), rows sum to 1."""

    embedding: np.ndarray
    probs: np.ndarray


class ProjectionHead:
    """An exported head run by ONNX Runtime.

    Args:
        path: the ONNX file.
        manifest: its manifest (``sha256``, ``input_dim``, ``dim``, ``classes``, ``encoder_version``, ``version``).
        providers: preferred execution providers; only available ones are used.
        verify: check the file's sha256 against the manifest.

    Raises:
        NotReady: if the file is missing or does not match its manifest.
    """

    def __init__(
        self,
        path: Path,
        manifest: HeadManifest | dict[str, Any],
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.manifest = manifest if isinstance(manifest, HeadManifest) else HeadManifest.parse(manifest, str(path))
        verify_file(self.path, self.manifest.sha256 if verify else None, fix="train the head again")
        self._session = open_session(self.path, providers=providers, intra_op_threads=intra_op_threads)
        self.providers: list[str] = self._session.get_providers()

    @property
    def version(self) -> str:
        """Identifies the head's embedding space: its publish version and file hash."""
        return f"head-{self.manifest.version or 'unpublished'}-{self.manifest.sha256[:8]}"

    @property
    def input_dim(self) -> int:
        return self.manifest.input_dim

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def encoder_version(self) -> str:
        """The backbone embedding space the head was trained on."""
        return self.manifest.encoder_version

    def apply(self, vectors: np.ndarray) -> HeadOutput:
        """Project backbone embeddings.

        Args:
            vectors: float32 (n, input_dim) raw backbone embeddings.

        Returns:
            the (n, dim) embedding and (n, classes) probabilities.

        Raises:
            ValueError: on a wrong shape.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(f"expected (n, {self.input_dim}) backbone embeddings, got {vectors.shape}")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        emb, probs = [], []
        for i in range(0, max(len(x), 1), _BATCH):
            e, p = self._session.run(["embedding", "probs"], {"features": x[i : i + _BATCH]})
            emb.append(np.asarray(e, dtype=np.float32))
            probs.append(np.asarray(p, dtype=np.float32))
        return HeadOutput(np.concatenate(emb), np.concatenate(probs))


def current_head_version(storage: Storage) -> str | None:
    """The published head version, or None if no head has been trained."""
    return read_pointer(storage, MODELS, HEADS)


def load_head(storage: Storage, settings: Settings, version: str | None = None) -> ProjectionHead:
    """Load a published head (the current one by default), on the settings' providers; a remote file is
    cached under ``settings.data_dir``.

    Raises:
        NotReady: if no head has been trained, or the version is incomplete.
    """
    version = version or current_head_version(storage)
    if version is None:
        raise NotReady("no projection head has been trained: run `clusterlens train-head` first", code="head_missing")
    prefix = f"{HEADS}{version}/"
    if not storage.exists(MODELS, prefix + "manifest.json"):
        raise NotReady(f"projection head {version} is incomplete", code="head_missing")
    manifest = HeadManifest.parse(storage.get_json(MODELS, prefix + "manifest.json"), f"head {version}")
    path = storage.local_path(MODELS, prefix + HEAD_FILE) or storage.download_file(
        MODELS, prefix + HEAD_FILE, settings.data_dir / "cache" / "heads" / version / HEAD_FILE
    )
    return ProjectionHead(path, manifest, **session_options(settings))
