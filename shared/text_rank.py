"""The top-k images of a text query without scoring every row.

An image's text score is the highest of four terms (:func:`shared.text_search.score_rows`): its
classes' weight, its label's weight, its predicted label's weight times the prediction's
probability (unlabelled images only), and its caption's weight. The top k by the highest term are
among the union of the top k by each term, so only these candidates are scored, exactly:

- classes: the exact top k of the class term from the per-class lists
  (:meth:`shared.class_lists.ClassLists.top_rows`, Threshold Algorithm), hidden rows left out;
- labels: every labelled row (the label overlay's sparse view: O(labelled));
- predictions: the exact top k of the predicted term from lists of the predicted classes (one
  probability per row, so the same algorithm), labelled and hidden rows left out;
- captions: the k captions most similar to the query (their weight grows with the cosine).

Ties go to the lower row in each term and in the final order, so the result is the full scan's
(:func:`shared.text_search.text_scores`) top k exactly. With a filter, its rows are scored instead
(selecting them reads every row already).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.class_lists import class_score
from shared.index import ClusterIndex
from shared.text_search import QueryWeights, score_rows


@dataclass(frozen=True)
class TextRanking:
    """The best rows for a text query.

    Attributes:
        rows: int64 (<= k,) best first (ties: lower row first).
        scores: float32 (<= k,) their scores.
        scored: how many rows were scored exactly (candidates and, for the lists, the rows they met).
    """

    rows: np.ndarray
    scores: np.ndarray
    scored: int


def predicted_labels(index: ClusterIndex) -> np.ndarray:
    """int32 (P + 1,) each predicted class's code among the index's label names, and -1 last (for -1)."""
    return np.array([index.label_names.index(n) for n in index.predicted_names] + [-1], np.int32)


def rank_text(
    index: ClusterIndex,
    weights: QueryWeights,
    k: int,
    caption_sims: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> TextRanking:
    """The exact top-``k`` rows of a text query, scoring candidates only (see the module docstring).

    Args:
        index: the served index (labels overlay and predictions applied).
        weights: the query's weights (:func:`shared.text_search.query_weights`).
        k: rows wanted.
        caption_sims: float32 (m,) the query's cosine with each of ``index.captions.rows``' captions.
        allowed: int64 ascending rows a filter keeps (hidden rows already left out), or None for all.

    Returns:
        the best rows with a positive score, at most ``k``.
    """
    to_label = predicted_labels(index)
    hidden = np.asarray(index.hidden, np.int64)
    labelled_rows, _ = index.labelled()
    caption_rows = np.asarray(index.captions.rows, np.int64)
    if allowed is not None:
        candidates = np.asarray(allowed, np.int64)
        touched = len(candidates)
    else:
        parts = [labelled_rows]
        class_w = weights.classes
        class_rows, _, touched = index.text_lists().top_rows_counted(
            class_w, k, lambda rows: class_score(index.class_top[rows], index.class_prob[rows], class_w), hidden
        )
        parts.append(class_rows)
        if index.predicted_names and len(weights.labels):
            pred_w = weights.labels[to_label[:-1]]  # each predicted class's label weight
            pred_rows, _, read = index.prediction_lists().top_rows_counted(
                pred_w,
                k,
                lambda rows: pred_w[index.predicted[rows]] * index.predicted_prob[rows],
                np.union1d(hidden, labelled_rows),  # a labelled row's prediction does not count
            )
            parts.append(pred_rows)
            touched += read
        if caption_sims is not None and len(caption_rows):
            visible = ~np.isin(caption_rows, hidden)
            rows, sims = caption_rows[visible], caption_sims[visible]
            parts.append(rows[np.lexsort((rows, -sims))[:k]])
        candidates = np.unique(np.concatenate(parts))
        candidates = candidates[~np.isin(candidates, hidden)]
    scores = score_candidates(index, weights, candidates, to_label, caption_rows, caption_sims)
    order = np.lexsort((candidates, -scores))[:k]
    order = order[scores[order] > 0]
    return TextRanking(candidates[order], scores[order], int(touched + len(labelled_rows)))


def score_candidates(
    index: ClusterIndex,
    weights: QueryWeights,
    rows: np.ndarray,
    to_label: np.ndarray,
    caption_rows: np.ndarray,
    caption_sims: np.ndarray | None,
) -> np.ndarray:
    """float32 (m,) the exact text scores of ``rows`` (ascending), reading only their own columns."""
    sims = None
    if caption_sims is not None and len(caption_rows) and len(rows):
        pos = np.minimum(np.searchsorted(caption_rows, rows), len(caption_rows) - 1)
        sims = np.where(caption_rows[pos] == rows, caption_sims[pos], np.nan).astype(np.float32)
    predicted = prob = None
    if index.predicted_names:
        predicted, prob = to_label[index.predicted[rows]], index.predicted_prob[rows]
    return score_rows(
        weights, index.class_top[rows], index.class_prob[rows], index.label_codes(rows), sims, predicted, prob
    )
