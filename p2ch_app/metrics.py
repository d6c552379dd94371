"""Metrics shared by every trainer and the evaluation: one definition of precision, recall, AUC."""

from __future__ import annotations

import numpy as np

UNSIZED_DIAMETER_MM = 10.0  # LUNA16's diameter for a finding whose diameter is negative (-1: not given)


def scores_from_counts(tp: float, fp: float, fn: float, tn: float | None = None) -> dict[str, float]:
    """Precision, recall, F1 (and negative-class accuracy when tn is known) from confusion counts.

    Used for candidates (one count per sample) and for segmentation (one count per pixel). An
    undefined ratio (0/0) is reported as 0, so a model that predicts nothing scores 0, not NaN.
    """
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    out = {"precision": float(precision), "recall": float(recall), "f1": f_beta(precision, recall, 1.0),
           "f2": f_beta(precision, recall, 2.0)}
    if tn is not None:
        out["accuracy_neg"] = float(tn / (tn + fp)) if tn + fp else 0.0
        out["accuracy_pos"] = out["recall"]
        out["accuracy"] = float((tp + tn) / (tp + tn + fp + fn)) if tp + tn + fp + fn else 0.0
    return out


def f_beta(precision: float, recall: float, beta: float) -> float:
    """Weighted harmonic mean: recall counts beta times as much as precision (F2 for segmentation,
    where a missed nodule is lost for good and a false alarm is filtered later)."""
    b2 = beta * beta
    denominator = b2 * precision + recall
    return float((1 + b2) * precision * recall / denominator) if denominator else 0.0


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative
    (ties count half). NaN when either class is absent."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average the ranks of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first[counts > 1], counts[counts > 1]):
        ranks[order[start:start + count]] = start + (count + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(labels, probs, threshold: float = 0.5, loss: float | None = None) -> dict[str, float]:
    """Every per-sample metric the trainers log: counts-based scores, ROC AUC and the mean loss."""
    labels = np.asarray(labels, bool)
    predicted = np.asarray(probs, float) >= threshold
    tp = float(np.sum(predicted & labels))
    fp = float(np.sum(predicted & ~labels))
    fn = float(np.sum(~predicted & labels))
    tn = float(np.sum(~predicted & ~labels))
    out = scores_from_counts(tp, fp, fn, tn)
    out["auc"] = roc_auc(labels, probs)
    if loss is not None:
        out["loss"] = float(loss)
    return out


def distances(points_xyz, centers_xyz) -> np.ndarray:
    """(P, C): the distance in mm from each point to each centre."""
    points = np.asarray(points_xyz, float).reshape(-1, 3)
    centers = np.asarray(centers_xyz, float).reshape(-1, 3)
    return np.linalg.norm(points[:, None, :] - centers[None, :, :], axis=2)


def hit_radii(diameters_mm) -> np.ndarray:
    """(C,): the radius within which a point hits each finding, by the LUNA16 rule (a negative diameter,
    "no size given", counts as UNSIZED_DIAMETER_MM)."""
    diameters = np.asarray(diameters_mm, float)
    return np.where(diameters < 0, UNSIZED_DIAMETER_MM, diameters) / 2


def within_radius(points_xyz, centers_xyz, diameters_mm) -> np.ndarray:
    """(P, C): point p lies strictly within finding c's radius (hit_radii), the LUNA16 rule that both the
    scoring and the classifier's mined hits follow."""
    return distances(points_xyz, centers_xyz) < hit_radii(diameters_mm)[None, :]
