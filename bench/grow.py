"""Growing large collections from real embeddings, for the benchmarks.

Two models, both fitted by k-means (hard EM) on real unit vectors and sampled L2-normalised:

- :func:`fit_mixture` / :func:`sample_mixture`: a Gaussian mixture with shrunk *full* covariances, for
  low dimensions (a (d, d) Cholesky factor per component: fine at 64 or 256, too big at 1280).
- :class:`LowRankMixture`: each component's covariance is its top ``rank`` principal directions plus a
  diagonal (its residual variance along each of the collection's principal axes), so a 1280-d mixture
  of 512 components is ~90 MB and draws are cheap. :func:`write_draws` streams draws into a ``.npy``
  on disk, chunk by chunk, so a collection larger than memory never exists in RAM.

:func:`nn_cosine` compares a grown collection's neighbourhoods with the real one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from shared.features import normalize

K = 10
CHUNK = 65536


def _kmeans_assign(real: np.ndarray, components: int, seed: int) -> np.ndarray:
    """int64 (n,) the spherical k-means component of each row of float32 (n, d) ``real``."""
    km = faiss.Kmeans(real.shape[1], components, niter=20, seed=seed, spherical=True)
    km.train(real)
    _, assign = km.index.search(real, 1)
    return assign[:, 0]


def _principal(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (descending, (min(m, d),)) and principal directions (rows, unit) of a
    centred float64 (m, d) array, from the eigenvectors of the smaller of its two Gram matrices (a
    LAPACK SVD of a 400 x 1280 block took 5 s here, this 0.2 s)."""
    m, d = centred.shape
    if m < d:
        w, u = np.linalg.eigh(centred @ centred.T)
        w, u = np.maximum(w[::-1], 0), u[:, ::-1]
        directions = (centred.T @ u).T
        directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
        return w, directions
    w, v = np.linalg.eigh(centred.T @ centred)
    return np.maximum(w[::-1], 0), v[:, ::-1].T


def fit_mixture(
    real: np.ndarray, components: int = 512, shrink: float = 0.05, seed: int = 0
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """A Gaussian mixture fitted to real unit vectors by hard EM.

    k-means splits ``real`` into ``components``; each becomes (weight, mean, Cholesky factor of its
    covariance shrunk towards a scaled identity by ``shrink``, so small components stay full rank).

    Args:
        real: float32 (n, d) unit vectors in the index's space.

    Returns:
        [(weight, mean (d,), lower-triangular factor (d, d))] for each non-empty component.
    """
    n, d = real.shape
    assign = _kmeans_assign(real, components, seed)
    out = []
    for c in range(components):
        members = real[assign == c].astype(np.float64)
        if len(members) < 2:
            continue
        cov = np.cov(members, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        out.append((len(members) / n, members.mean(0), np.linalg.cholesky(cov)))
    return out


def sample_mixture(mixture: list[tuple[float, np.ndarray, np.ndarray]], n: int, seed: int) -> np.ndarray:
    """float32 (n, d) L2-normalised draws from :func:`fit_mixture`'s mixture, in random order."""
    rng = np.random.default_rng(seed)
    weights = np.array([w for w, _, _ in mixture])
    counts = rng.multinomial(n, weights / weights.sum())
    d = len(mixture[0][1])
    out = np.empty((n, d), dtype=np.float32)
    pos = 0
    for (_, mean, chol), m in zip(mixture, counts, strict=True):
        for start in range(0, m, CHUNK):
            z = rng.standard_normal((min(CHUNK, m - start), d))
            out[pos : pos + len(z)] = mean + z @ chol.T
            pos += len(z)
    out = out[rng.permutation(n)]
    return normalize(out)


@dataclass(frozen=True)
class LowRankMixture:
    """A Gaussian mixture whose covariances are low rank plus a diagonal in the collection's principal axes.

    Each component has its own top ``r`` principal directions; what they leave (the residual) is drawn
    as independent noise along the *whole collection's* principal axes, with the component's own
    residual variance along each axis. Isotropic residual noise would spread variance evenly over all
    1280 dimensions, where real embeddings have almost none outside their top few hundred axes, and make
    the grown collection much harder for a PCA to 256 than the real one.

    Attributes:
        weights: float64 (c,) component weights, summing to 1.
        means: float32 (c, d) component means.
        factors: float32 (c, r, d) each component's top ``r`` principal directions, each scaled by its
            standard deviation (a draw adds ``z @ factors[c]``, z standard normal (r,)).
        axes: float32 (d, d) the collection's principal axes (rows, unit length).
        noise: float32 (c, d) standard deviation of each component's residual along each axis.
    """

    weights: np.ndarray
    means: np.ndarray
    factors: np.ndarray
    axes: np.ndarray
    noise: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @classmethod
    def fit(cls, real: np.ndarray, components: int = 512, rank: int = 32, seed: int = 0) -> LowRankMixture:
        """Fit to real unit vectors by hard EM (spherical k-means), then per component its principal directions.

        A component's covariance is approximated by its top ``rank`` directions (fewer where it has fewer
        members) and, for the rest, its residual's variance along each of the collection's principal
        axes, so each component keeps its total variance and its residual stays where real data has some.

        Args:
            real: float32 (n, d) unit vectors.

        Raises:
            ValueError: if ``real`` is not a 2-d array with more rows than ``components``.
        """
        if real.ndim != 2 or len(real) <= components:
            raise ValueError(f"need (n, d) vectors with n > {components} components, got {real.shape}")
        n, d = real.shape
        x = np.ascontiguousarray(real, dtype=np.float32)
        centred = x - x.mean(0)
        _, axes = np.linalg.eigh((centred.T @ centred).astype(np.float64))
        axes = axes[:, ::-1].T  # rows, largest variance first
        del centred
        assign = _kmeans_assign(x, components, seed)
        weights, means, factors, noise = [], [], [], []
        for c in range(components):
            members = real[assign == c].astype(np.float64)
            if len(members) < 2:
                continue
            mean = members.mean(0)
            var, directions = _principal(members - mean)
            var = var / (len(members) - 1)  # variance along each principal direction
            r = min(rank, int((var > 0).sum()))
            factor = np.zeros((rank, d))
            factor[:r] = np.sqrt(var[:r])[:, None] * directions[:r]
            residual = members - mean
            residual -= (residual @ directions[:r].T) @ directions[:r]
            weights.append(len(members) / n)
            means.append(mean)
            factors.append(factor)
            noise.append(np.sqrt(((residual @ axes.T) ** 2).sum(0) / (len(members) - 1)))
        w = np.array(weights)
        return cls(
            w / w.sum(),
            np.array(means, np.float32),
            np.array(factors, np.float32),
            np.ascontiguousarray(axes, dtype=np.float32),
            np.array(noise, np.float32),
        )

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """float32 (n, d) L2-normalised draws, components in random order."""
        which = rng.choice(len(self.weights), size=n, p=self.weights)
        rank = self.factors.shape[1]
        out = rng.standard_normal((n, self.dim), dtype=np.float32)
        out *= self.noise[which]
        out = out @ self.axes
        out += self.means[which]
        for c in np.unique(which):
            rows = np.flatnonzero(which == c)
            out[rows] += rng.standard_normal((len(rows), rank), dtype=np.float32) @ self.factors[c]
        return normalize(out)


def write_draws(mixture: LowRankMixture, path: Path, n: int, seed: int, *, desc: str = "grow") -> np.ndarray:
    """Stream ``n`` draws of ``mixture`` into the ``.npy`` at ``path``, :data:`CHUNK` rows at a time.

    Returns:
        float32 (n, d) the file, memory-mapped read-only (pages come from the page cache, not the heap).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, mixture.dim))
    rng = np.random.default_rng(seed)
    with tqdm(total=n, desc=desc, unit="vec", unit_scale=True) as bar:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            out[start:stop] = mixture.draw(stop - start, rng)
            bar.update(stop - start)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def nn_cosine(queries: np.ndarray, base: np.ndarray, leave_one_out: bool) -> dict[str, float]:
    """Mean cosine similarity of each query's 1st and 10th nearest neighbour: how tight the
    neighbourhoods are, to compare a grown collection with the real one."""
    skip = 1 if leave_one_out else 0
    sims, _ = faiss.knn(queries, base, K + skip, metric=faiss.METRIC_INNER_PRODUCT)
    return {"nn1": round(float(sims[:, skip].mean()), 4), "nn10": round(float(sims[:, K - 1 + skip].mean()), 4)}


def pca_ceiling(queries: np.ndarray, base: np.ndarray, dim: int = 256) -> float:
    """Recall@10 of exact search after a PCA to ``dim`` (fitted on ``base``) and L2, against exact search in
    the full space: the most any index behind that PCA can reach, to compare a grown collection with the
    real one. Both float32 unit vectors, (nq, d) and (n, d)."""
    _, truth = faiss.knn(queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    pca = faiss.PCAMatrix(base.shape[1], dim)
    pca.train(base)
    _, got = faiss.knn(normalize(pca.apply(queries)), normalize(pca.apply(base)), K, metric=faiss.METRIC_INNER_PRODUCT)
    hits = sum(len(set(g.tolist()) & set(t.tolist())) for g, t in zip(got, truth, strict=True))
    return round(hits / truth.size, 4)
