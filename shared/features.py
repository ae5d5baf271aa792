"""The one feature transform: signed power normalisation, L2, then an optional centred projection (PCA).

The index, the label classifier and the analysis report all map raw backbone embeddings this way;
:class:`FeatureTransform` is the fitted form that is saved with a model and applied at query time
(numpy only). Fitting the projection is job-side (:class:`job.active_learning.FeatureSpace`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a float32 (n, d) array (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    # einsum, not np.linalg.norm: 4x faster on (256k, 1280) float32, the same norms to 4e-7
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norms, 1e-12)


def power_normalize(x: np.ndarray, power: float) -> np.ndarray:
    """Signed power normalisation ``sign(x) * |x| ** power`` (1.0: unchanged), then L2 per row.

    Damps the few large activations that dominate pooled CNN features; 0.5 raised Fashion-MNIST
    precision@10 by ~0.6 points over plain cosine on two disjoint query sets.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if power != 1.0:
        x = np.sign(x) * np.abs(x) ** np.float32(power)
    return normalize(x)


def power_normalize_into(out: np.ndarray, x: np.ndarray, power: float) -> np.ndarray:
    """:func:`power_normalize` of ``x`` written into ``out`` (float32, C-contiguous, its shape; may be ``x``
    itself), which it returns: a build reuses one buffer chunk after chunk, or transforms a copy it owns in
    place, instead of faulting in fresh memory each time."""
    if out is not x:
        np.copyto(out, x)
    if power != 1.0:
        np.copysign(np.abs(out) ** np.float32(power), out, out=out)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norms, 1e-12)[:, None]
    return out


@dataclass(frozen=True)
class FeatureTransform:
    """Embeddings (n, d) -> features (n, p): power + L2, minus ``mean`` (d,), times ``components`` (d, p).

    Attributes:
        mean: float32 (d,) mean of the power-normalised embeddings it was fitted on.
        components: float32 (d, p) projection (PCA axes, or the identity).
        power: the power normalisation exponent (1: none).
    """

    mean: np.ndarray
    components: np.ndarray
    power: float = 0.5

    @property
    def input_dim(self) -> int:
        return int(len(self.mean))

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, d) raw embeddings -> float32 (n, p) features.

        Raises:
            ValueError: on a wrong shape.
        """
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected (n, {self.input_dim}) embeddings, got {x.shape}")
        return np.ascontiguousarray((power_normalize(x, self.power) - self.mean) @ self.components, dtype=np.float32)

    def to_bytes(self) -> bytes:
        """The transform as an ``.npz`` file (arrays only, read back without pickle)."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, power=np.float32(self.power))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, power: float | None = None) -> FeatureTransform:
        """Read :meth:`to_bytes` output (``power`` for files written before it was stored)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            stored = float(f["power"]) if "power" in f.files else None
            return cls(
                f["mean"].astype(np.float32),
                f["components"].astype(np.float32),
                power if stored is None and power is not None else (stored if stored is not None else 1.0),
            )
