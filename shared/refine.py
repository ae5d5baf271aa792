"""Re-ranking codes: every row's vector, 8 bits a dimension, in the index's space (IVF-PQ) and in the raw space.

The lists hold 4-bit fast-scan PQ codes (``d / 4`` bytes a row at ``d / 2`` sub-quantisers): cheap to
scan, too coarse to rank by. A query's shortlist (``k * rerank`` rows) is re-ranked with these codes
instead: one byte a dimension (``refine.npy``, uint8 (n, d)), decoded as
``x = low + (code + 0.5) * step`` with ``low`` and ``step`` per dimension (``refine_codec.npy``,
float32 (2, d)), trained on the build's sample. The decoded inner product is
``codes @ (step * q) + (low + step / 2) @ q``, so re-ranking a shortlist is one small matrix product.

Memory-mapped when they fit the budget (``CLUSTERLENS_INDEX_REFINE_MEMORY_MB``: resident as queries touch
them, so in steady state all of them); otherwise each query reads its shortlist's rows from the file
(:class:`shared.rows.FileRows`: ``pread``, never mapped), so they stay in the page cache and out of the
serving process's memory.

**Raw codes.** PCA to 256 dimensions keeps most of the variance but not the neighbours: exact search in the
PCA space finds ~0.80 of the raw embeddings' true top 10 on the real 70k, so no index in that space can
reach 0.95 recall against the raw embeddings. What PCA does keep is a short list: the PCA space's top 50
holds 99.9% of the raw top 10. So an index built with PCA also stores every row's power- and L2-normalised
raw embedding (``input_dim`` bytes a row, ``raw.npy`` and ``raw_codec.npy``, the same quantiser), and a
query's last ``k * raw_rerank`` candidates are re-ranked by their raw cosine from these codes: the scores
it returns are raw-space cosine similarities. They are read like the re-ranking codes (mapped within the
budget left after those, else ``pread`` per query).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CODES_FILE = "refine.npy"
CODEC_FILE = "refine_codec.npy"
RAW_CODES_FILE = "raw.npy"
RAW_CODEC_FILE = "raw_codec.npy"
ENCODE_BLOCK = 4096  # rows encoded at once
SCORE_BLOCK = 16  # queries whose shortlists an in-memory batch scores at once


class RefineCodec:
    """8-bit scalar quantiser over the index's space (per-dimension range)."""

    def __init__(self, low: np.ndarray, step: np.ndarray):
        self.low = np.asarray(low, np.float32)
        self.step = np.asarray(step, np.float32)
        # what scoring needs of them, once (decoded = code * step + centre)
        self.centre = self.low + self.step / 2
        self._square = self.step * self.step
        self._cross = 2 * self.step * self.centre
        self._centre_sq = float(self.centre @ self.centre)

    @classmethod
    def train(cls, sample: np.ndarray) -> RefineCodec:
        """Ranges from a sample of vectors (float32 (m, d)) in the index's space."""
        lo = sample.min(axis=0).astype(np.float32)
        hi = sample.max(axis=0).astype(np.float32)
        return cls(lo, np.maximum(hi - lo, 1e-6) / 256)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> RefineCodec:
        return cls(arr[0], arr[1])

    def to_array(self) -> np.ndarray:
        return np.stack([self.low, self.step]).astype(np.float32)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """uint8 (m, d) codes of float32 (m, d) vectors (values outside the range are clipped)."""
        out = np.empty(x.shape, np.uint8)
        # in blocks that stay in cache, each step in place: 6x faster than whole-array temporaries (a 1M x
        # 1280 build spent 25 s here), the same codes
        for start in range(0, len(x), ENCODE_BLOCK):
            b = np.subtract(x[start : start + ENCODE_BLOCK], self.low, dtype=np.float32)
            b /= self.step
            np.floor(b, out=b)
            np.clip(b, 0, 255, out=b)
            out[start : start + len(b)] = b
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float32 (m, d) approximate vectors."""
        return (codes.astype(np.float32) + 0.5) * self.step + self.low

    def scores(self, codes: np.ndarray, xq: np.ndarray, *, unit: bool = False) -> np.ndarray:
        """float32 (m,) inner products of one query (d,) with the decoded rows of ``codes`` (m, d); ``unit``:
        cosines (each decoded row's norm divided out: rounding changes its length, not only its direction)."""
        c = codes.astype(np.float32)
        offset = float(self.centre @ xq)
        if not unit:
            return c @ (self.step * xq) + offset
        # |decoded|^2 = c^2 . step^2 + 2 c . (step * centre) + |centre|^2, without decoding: one product
        # gives the dots and the middle term, then c is squared in place (no second (m, d) temporary:
        # 4x faster for a 50 x 1280 shortlist than three separate products)
        both = c @ np.stack([self.step * xq, self._cross], axis=1)
        np.square(c, out=c)
        sq = c @ self._square + both[:, 1] + self._centre_sq
        return (both[:, 0] + offset) / np.sqrt(np.maximum(sq, 1e-24))

    def batch_scores(self, codes: np.ndarray, xq: np.ndarray, *, unit: bool = False) -> np.ndarray:
        """float32 (m, s) :meth:`scores` of m queries (m, d), each with its own s rows of ``codes`` (m, s, d):
        batched products instead of m calls."""
        c = codes.astype(np.float32)
        offset = xq @ self.centre
        w = np.stack([self.step * xq, np.broadcast_to(self._cross, xq.shape)], axis=2)  # (m, d, 2)
        both = c @ w  # (m, s, 2)
        if not unit:
            return both[:, :, 0] + offset[:, None]
        np.square(c, out=c)
        sq = c @ self._square + both[:, :, 1] + self._centre_sq
        return (both[:, :, 0] + offset[:, None]) / np.sqrt(np.maximum(sq, 1e-24))


def rerank_scores(
    codec: RefineCodec, codes: Any, rows: np.ndarray, xq: np.ndarray, *, unit: bool = False
) -> np.ndarray:
    """float32 (nq, s) decoded inner products (``unit``: cosines) of each query with its shortlist ``rows``
    (nq, s; -1 is none, scored -inf). ``codes`` is anything indexed by a row array: an array, a
    :class:`shared.rows.Column`, a :class:`shared.rows.FileRows`."""
    nq, s = rows.shape
    scores = np.full((nq, s), -np.inf, dtype=np.float32)
    valid = rows >= 0
    if nq == 1:  # one query (the serving path): no de-duplication, one sort
        at = np.flatnonzero(valid[0])
        if len(at):
            order = at[np.argsort(rows[0, at], kind="stable")]  # a file is read in order
            scores[0, order] = codec.scores(np.asarray(codes[rows[0, order]]), xq[0], unit=unit)
        return scores
    if not valid.any():
        return scores
    if isinstance(codes, np.ndarray):  # in memory or mapped: gathered per block of queries, no de-duplication
        for start in range(0, nq, SCORE_BLOCK):
            ok = valid[start : start + SCORE_BLOCK]
            got = codec.batch_scores(
                codes[np.where(ok, rows[start : start + SCORE_BLOCK], 0)], xq[start : start + SCORE_BLOCK], unit=unit
            )
            scores[start : start + SCORE_BLOCK] = np.where(ok, got, -np.inf)
        return scores
    wanted = np.unique(rows[valid])  # ascending: a file is read in order, each row once
    data = np.asarray(codes[wanted])
    for i in range(nq):
        ok = valid[i]
        if ok.any():
            scores[i, ok] = codec.scores(data[np.searchsorted(wanted, rows[i, ok])], xq[i], unit=unit)
    return scores
