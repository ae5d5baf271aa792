"""The ONNX text encoder (all-MiniLM-L6-v2): tokenizers + ONNX Runtime, no torch.

The exported graph does mean pooling and L2 normalisation itself, so ``encode`` returns unit
vectors whose dot products are cosine similarities.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import NotReady
from shared.manifests import TextEncoderManifest
from shared.sessions import Verify, open_session, session_options, verify_file

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)


class TextEncoder:
    """Embeds sentences to 384-d unit vectors. Load once per worker; thread-safe.

    Args:
        folder: model folder with ``manifest.json``, ``model.onnx`` and ``tokenizer.json``.
        providers: preferred ONNX Runtime providers (only available ones are used).

    Raises:
        NotReady: if the model has not been exported or does not match its manifest.
    """

    def __init__(
        self,
        folder: Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        verify: Verify = "size",
    ):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest = TextEncoderManifest.read(self.folder / "manifest.json")
        m = self.manifest
        path = verify_file(self.folder / m.file, m.sha256, size=m.bytes, verify=verify)
        self.max_tokens = self.manifest.tokenizer.max_tokens
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer.file))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        self._session = open_session(path, providers=providers, intra_op_threads=intra_op_threads)
        self.providers: list[str] = self._session.get_providers()

    @classmethod
    def from_settings(cls, settings: Settings, *, verify: Verify = "size") -> TextEncoder:
        """The text encoder the settings name, on their providers, its file checked by ``verify``.

        Raises:
            NotReady: the model has not been exported (``make models``) or does not match its manifest.
        """
        return cls(settings.text_encoder_dir, verify=verify, **session_options(settings))

    @property
    def version(self) -> str:
        return self.manifest.version

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed sentences.

        Returns:
            float32 (len(texts), 384), rows of unit length.
        """
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(texts[start : start + batch_size])
            feeds = {
                "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
            }
            out.append(self._session.run(["embedding"], feeds)[0])
        if not out:
            return np.zeros((0, self.manifest.outputs["embedding"]), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def imagenet_classes(self) -> np.ndarray:
        """The 1000 ImageNet class descriptions embedded at export time, float32 (1000, 384)."""
        texts = self.manifest.imagenet_classes
        if texts is None:
            raise NotReady(f"{self.folder} has no ImageNet class texts; run `make models`", code="model_missing")
        return np.load(self.folder / texts.file, allow_pickle=False)
