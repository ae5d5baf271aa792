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

import numpy as np

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
    """Score every indexed image for a text query.

    Args:
        query: the query text; query_vector: its (384,) unit embedding.
        class_vectors: (C, 384) class description embeddings.
        label_names, label_vectors: the L label names and their (L, 384) embeddings.
        class_top, class_prob: (n, t) each image's top classes and their probabilities.
        labels: (n,) each image's label code, -1 for none.
        temperature: softmax temperature over all similarities (low: sharp).
        caption_rows, caption_sims: (m,) rows that have a caption and the query's cosine with each.
        predicted, predicted_prob: (n,) each image's predicted label (code into ``label_names``, -1 for
            none) from the label classifier, and its probability: an unlabelled image scores its
            predicted label's weight times that probability.

    Returns:
        scores (n,) in [0, 1], and the class weights (C,).
    """
    if query_vector.ndim != 1 or class_vectors.shape[1] != query_vector.shape[0]:
        raise ValueError("query_vector must be (d,) and class_vectors (C, d)")
    class_sims = class_vectors @ query_vector
    label_sims = label_vectors @ query_vector if len(label_names) else np.zeros(0, np.float32)
    if len(label_names):
        label_sims = np.maximum(label_sims, lexical_match(query, label_names))
    logits = np.concatenate([class_sims, label_sims]) / temperature
    weights = softmax(logits[None, :])[0]
    class_w, label_w = weights[: len(class_sims)], weights[len(class_sims) :]
    scores = (class_prob * class_w[class_top]).sum(axis=1) if class_top.shape[1] else np.zeros(len(labels))
    if predicted is not None and predicted_prob is not None and len(label_names):
        has = (predicted >= 0) & (labels < 0)
        if has.any():
            scores[has] = np.maximum(scores[has], label_w[predicted[has]] * predicted_prob[has])
    labelled = labels >= 0
    if labelled.any():
        scores[labelled] = np.maximum(scores[labelled], label_w[labels[labelled]])
    if caption_rows is not None and caption_sims is not None and len(caption_rows):
        # Weight of one more text with logit c in the same softmax: e^c / (e^c + sum(e^logits)).
        top = logits.max()
        log_z = top + np.log(np.exp(logits - top).sum())
        caption_w = 1.0 / (1.0 + np.exp(log_z - caption_sims.astype(np.float64) / temperature))
        scores[caption_rows] = np.maximum(scores[caption_rows], caption_w)
    return scores.astype(np.float32), class_w
