"""Scoring for text-to-image search without a joint image-text model (an approximation of CLIP).

A query is compared with two kinds of text: the 1000 ImageNet class descriptions, which every
image relates to through its predicted class probabilities, and the collection's own label names.
Label similarity is hybrid: the dense (MiniLM) cosine, or a lexical match when the label's words
all appear in the query, whichever is higher (MiniLM embeds some bare labels, such as "Trouser",
poorly). A softmax with a low temperature turns all similarities into weights; an image scores
the weight its predicted classes carry, or its label's weight if that is higher. An image's own
caption competes as one more text: its weight is what it would get in that softmax, and the
image keeps the highest of the three. An unlabelled image with a prediction from the label
classifier scores its predicted label's weight times the prediction's probability.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from shared.class_lists import class_score
from shared.encoder import softmax

_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "for", "some", "pair", "photo", "picture", "image"}


def words(text: str) -> set[str]:
    """Lowercase content words with a plural ``s`` folded (``trousers`` -> ``trouser``)."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return out - _STOP


def lexical_match(query: str, labels: list[str]) -> np.ndarray:
    """Share of each label's content words that the query contains, in [0, 1]."""
    q = words(query)
    out = np.zeros(len(labels), dtype=np.float32)
    for i, label in enumerate(labels):
        lw = words(label)
        if lw:
            out[i] = len(lw & q) / len(lw)
    return out


@dataclass(frozen=True)
class QueryWeights:
    """What a text query gives each text: one softmax over class descriptions and label names.

    Attributes:
        classes: float32 (C,) each ImageNet class's weight.
        labels: float32 (L,) each label name's weight.
        log_z: log of the softmax's normaliser, for the weight of one more text (a caption).
        temperature: the softmax's temperature.
    """

    classes: np.ndarray
    labels: np.ndarray
    log_z: float
    temperature: float

    def caption(self, sims: np.ndarray) -> np.ndarray:
        """float64 weights of captions with cosines ``sims`` with the query, as one more text with logit
        ``sim / temperature`` in the same softmax: e^c / (e^c + sum(e^logits))."""
        return 1.0 / (1.0 + np.exp(self.log_z - np.asarray(sims, np.float64) / self.temperature))


def query_weights(
    query: str,
    query_vector: np.ndarray,
    class_vectors: np.ndarray,
    label_names: list[str],
    label_vectors: np.ndarray,
    temperature: float,
) -> QueryWeights:
    """The weights of a query's texts (see the module docstring).

    Args:
        query: the query text; query_vector: its (384,) unit embedding.
        class_vectors: (C, 384) class description embeddings.
        label_names, label_vectors: the L label names and their (L, 384) embeddings.
        temperature: softmax temperature over all similarities (low: sharp).

    Raises:
        ValueError: for mismatched shapes.
    """
    if query_vector.ndim != 1 or class_vectors.shape[1] != query_vector.shape[0]:
        raise ValueError("query_vector must be (d,) and class_vectors (C, d)")
    class_sims = class_vectors @ query_vector
    label_sims = label_vectors @ query_vector if len(label_names) else np.zeros(0, np.float32)
    if len(label_names):
        label_sims = np.maximum(label_sims, lexical_match(query, label_names))
    logits = np.concatenate([class_sims, label_sims]) / temperature
    weights = softmax(logits[None, :])[0]
    top = logits.max()
    log_z = float(top + np.log(np.exp(logits - top).sum()))
    return QueryWeights(weights[: len(class_sims)], weights[len(class_sims) :], log_z, temperature)


def score_rows(
    weights: QueryWeights,
    class_top: np.ndarray,
    class_prob: np.ndarray,
    labels: np.ndarray,
    caption_sims: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    predicted_prob: np.ndarray | None = None,
) -> np.ndarray:
    """Scores of m images from their own columns: the highest of their classes' weight, their label's
    weight, their predicted label's weight times its probability (unlabelled images only) and their
    caption's weight.

    Args:
        weights: the query's (:func:`query_weights`).
        class_top, class_prob: (m, t) the images' top classes and their probabilities.
        labels: (m,) label codes into the label names, -1 for none.
        caption_sims: (m,) the query's cosine with each image's caption, NaN where it has none.
        predicted, predicted_prob: (m,) predicted label codes into the label names (-1: none) and
            their probabilities.

    Returns:
        float32 (m,) scores in [0, 1].
    """
    label_w = weights.labels
    scores = class_score(class_top, class_prob, weights.classes)
    if predicted is not None and predicted_prob is not None and len(label_w):
        has = (predicted >= 0) & (labels < 0)
        if has.any():
            scores[has] = np.maximum(scores[has], label_w[predicted[has]] * predicted_prob[has])
    labelled = labels >= 0
    if labelled.any():
        scores[labelled] = np.maximum(scores[labelled], label_w[labels[labelled]])
    if caption_sims is not None:
        has_caption = ~np.isnan(caption_sims)
        if has_caption.any():
            scores[has_caption] = np.maximum(scores[has_caption], weights.caption(caption_sims[has_caption]))
    return scores.astype(np.float32)


def text_scores(
    query: str,
    query_vector: np.ndarray,
    class_vectors: np.ndarray,
    label_names: list[str],
    label_vectors: np.ndarray,
    class_top: np.ndarray,
    class_prob: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    caption_rows: np.ndarray | None = None,
    caption_sims: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    predicted_prob: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every indexed image for a text query: the full scan, O(n) (the search service scores only
    candidates, :mod:`shared.text_rank`; this is the reference it must agree with).

    Args:
        query, query_vector, class_vectors, label_names, label_vectors, temperature: as for
            :func:`query_weights`.
        class_top, class_prob: (n, t) each image's top classes and their probabilities.
        labels: (n,) each image's label code, -1 for none.
        caption_rows, caption_sims: (m,) rows that have a caption and the query's cosine with each.
        predicted, predicted_prob: (n,) each image's predicted label (code into ``label_names``, -1 for
            none) from the label classifier, and its probability: an unlabelled image scores its
            predicted label's weight times that probability.

    Returns:
        scores (n,) in [0, 1], and the class weights (C,).
    """
    weights = query_weights(query, query_vector, class_vectors, label_names, label_vectors, temperature)
    sims = None
    if caption_rows is not None and caption_sims is not None and len(caption_rows):
        sims = np.full(len(labels), np.nan, np.float32)
        sims[caption_rows] = caption_sims
    scores = score_rows(weights, class_top, class_prob, labels, sims, predicted, predicted_prob)
    return scores, weights.classes
