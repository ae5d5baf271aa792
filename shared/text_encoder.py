"""The ONNX text encoder (all-MiniLM-L6-v2): tokenizers + ONNX Runtime, no torch.

The exported graph does mean pooling and L2 normalisation itself, so ``encode`` returns unit
vectors whose dot products are cosine similarities.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared.encoder import file_sha256, pick_providers
from shared.errors import NotReady

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
        self, folder: Path, *, providers: list[str] | None = None, intra_op_threads: int = 0, verify: bool = True
    ):
        import json

        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise NotReady(f"no text encoder at {self.folder}; run `make models`", code="model_missing")
        self.manifest = json.loads(path.read_text())
        onnx_path = self.folder / self.manifest["file"]
        if verify and (not onnx_path.is_file() or file_sha256(onnx_path) != self.manifest["sha256"]):
            raise NotReady(
                f"{onnx_path} is missing or does not match its manifest; run `make models`", code="model_corrupt"
            )
        self.max_tokens = int(self.manifest["tokenizer"]["max_tokens"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest["tokenizer"]["file"]))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = pick_providers(providers or ["CPUExecutionProvider"])
        self._session = ort.InferenceSession(str(onnx_path), options, providers=self.providers)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

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
            return np.zeros((0, int(self.manifest["outputs"]["embedding"])), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def imagenet_classes(self) -> np.ndarray:
        """The 1000 ImageNet class descriptions embedded at export time, float32 (1000, 384)."""
        return np.load(self.folder / self.manifest["imagenet_classes"]["file"], allow_pickle=False)
