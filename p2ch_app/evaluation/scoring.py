"""Scoring detections against annotations: the LUNA16 FROC / CPM and the confusion table.

A scan's detections are centres in patient mm with a nodule probability (and optionally a
malignancy probability); its truth is the annotated nodules (centre, diameter, malignancy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2ch_app.metrics import roc_auc

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class ScanResult:
    """One scan's detections and truth, all in patient mm."""

    detections_xyz: np.ndarray  # (D, 3)
    nodule_prob: np.ndarray  # (D,)
    nodules_xyz: np.ndarray  # (N, 3)
    diameters_mm: np.ndarray  # (N,)
    malignant: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # (N,) 1, 0, or -1 unknown
    malignancy_prob: np.ndarray | None = None  # (D,)


def _distances(scan: ScanResult) -> np.ndarray:
    det = np.asarray(scan.detections_xyz, float).reshape(-1, 3)
    nod = np.asarray(scan.nodules_xyz, float).reshape(-1, 3)
    return np.linalg.norm(det[:, None, :] - nod[None, :, :], axis=2)  # (D, N)


def _best_matches(scan: ScanResult, match_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule the most probable detection within match_fraction of its diameter (-1: none), and
    per detection whether it lies that near any nodule: the matching of the confusion table."""
    near = _distances(scan) <= match_fraction * np.asarray(scan.diameters_mm, float)[None, :]  # (D, N)
    if near.shape[0] == 0:
        return np.full(near.shape[1], -1), np.zeros(0, bool)
    scored = np.where(near, np.asarray(scan.nodule_prob, float)[:, None], -np.inf)
    return np.where(near.any(axis=0), scored.argmax(axis=0), -1), near.any(axis=1)


def _froc_points(scans: list[ScanResult]) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule its best hitting probability (-inf when missed), and every false-positive probability.

    A detection hits a nodule when its centre lies within the nodule's radius (the LUNA16 rule);
    several detections on one nodule count once, with the highest probability.
    """
    nodule_scores, fp_probs = [np.zeros(0)], [np.zeros(0)]
    for scan in scans:
        hits = _distances(scan) <= np.asarray(scan.diameters_mm, float)[None, :] / 2  # (D, N)
        probs = np.asarray(scan.nodule_prob, float)
        nodule_scores.append(np.where(hits, probs[:, None], -np.inf).max(axis=0, initial=-np.inf))
        fp_probs.append(probs[~hits.any(axis=1)])
    return np.concatenate(nodule_scores), np.concatenate(fp_probs)


def froc(scans: list[ScanResult]) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve from the threshold above every probability (0 FPs, sensitivity 0) down:
    (false positives per scan, sensitivity), FP rate ascending."""
    nodule_scores, fp_probs = _froc_points(scans)
    if len(nodule_scores) == 0:
        return np.zeros(1), np.zeros(1)
    thresholds = np.unique(np.concatenate([nodule_scores[np.isfinite(nodule_scores)], fp_probs]))[::-1]
    fp_sorted, hit_sorted = np.sort(fp_probs), np.sort(nodule_scores)
    fps = (len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")) / len(scans)
    sens = (len(hit_sorted) - np.searchsorted(hit_sorted, thresholds, side="left")) / len(hit_sorted)
    return np.concatenate([[0.0], fps]), np.concatenate([[0.0], sens])


def sensitivities_at(fps: np.ndarray, sens: np.ndarray, rates=FROC_FP_RATES) -> np.ndarray:
    """Sensitivity at each FP rate, interpolated linearly along the curve as the LUNA16 evaluation
    does; where one FP rate has several sensitivities the best counts, and beyond the curve's end
    the last value holds."""
    rates_seen = np.unique(fps)
    best = np.array([sens[fps == r].max() for r in rates_seen])
    return np.interp(np.asarray(rates, float), rates_seen, best)


def cpm(scans: list[ScanResult], bootstrap: int = 1000, seed: int = 0) -> dict:
    """LUNA16's competition performance metric: mean sensitivity at 1/8 ... 8 FPs per scan, with a
    bootstrap 95% interval over scans."""
    fps, sens = froc(scans)
    at = sensitivities_at(fps, sens)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap if len(scans) > 1 else 0):
        picks = [scans[i] for i in rng.integers(0, len(scans), len(scans))]
        samples.append(sensitivities_at(*froc(picks)).mean())
    low, high = (np.percentile(samples, [2.5, 97.5]) if samples else (float("nan"), float("nan")))
    return {"cpm": float(at.mean()), "cpm_ci95": [float(low), float(high)],
            "sensitivity_at": {str(r): float(s) for r, s in zip(FROC_FP_RATES, at)},
            "froc_fps": fps.tolist(), "froc_sensitivity": sens.tolist()}


ROWS = ("Non-nodule", "Benign", "Malignant")


def confusion(scans: list[ScanResult], threshold: float = 0.5, mal_threshold: float = 0.5,
              match_fraction: float = 0.7) -> dict[str, dict[str, int]]:
    """The table LUNA practitioners know: what became of each true nodule and of each other detection.

    A true nodule is found when a detection lies within match_fraction of its diameter; it is then
    "Filtered out" when that detection's nodule probability is under threshold, else predicted as a
    nodule (benign or malignant by malignancy probability when there is one). Detections near no
    nodule are the Non-nodule row. Nodules of unknown malignancy count as Benign.
    """
    with_mal = any(s.malignancy_prob is not None for s in scans)
    predicted = ["Pred. benign", "Pred. malignant"] if with_mal else ["Pred. nodule"]
    columns = ["Complete miss", "Filtered out"] + predicted
    table = {row: {c: 0 for c in columns} for row in ROWS}
    for scan in scans:
        best, near_nodule = _best_matches(scan, match_fraction)
        probs = np.asarray(scan.nodule_prob, float)
        mal = scan.malignancy_prob
        malignant = np.resize(np.asarray(scan.malignant, np.int8), len(best))

        def predicted(i: int) -> str:
            if probs[i] < threshold:
                return "Filtered out"
            if mal is None:
                return "Pred. nodule" if not with_mal else "Pred. benign"
            return "Pred. malignant" if mal[i] >= mal_threshold else "Pred. benign"

        for j, i in enumerate(best):
            row = "Malignant" if malignant[j] == 1 else "Benign"
            table[row]["Complete miss" if i < 0 else predicted(int(i))] += 1
        for i in np.flatnonzero(~near_nodule):
            table["Non-nodule"][predicted(int(i))] += 1
    return table


def malignancy_aucs(scans: list[ScanResult], threshold: float = 0.5, match_fraction: float = 0.7) -> dict:
    """ROC AUC of the malignancy probability on the true nodules the pipeline found (predicted nodule,
    matched as in the confusion table, malignancy known), beside the AUC of their annotated diameter."""
    labels, probs, diameters = [], [], []
    for scan in scans:
        if scan.malignancy_prob is None:
            continue
        best, _ = _best_matches(scan, match_fraction)
        nodule_prob = np.asarray(scan.nodule_prob, float)
        malignant = np.resize(np.asarray(scan.malignant, np.int8), len(best))
        for j in np.flatnonzero((malignant >= 0) & (best >= 0)):
            if nodule_prob[best[j]] >= threshold:
                labels.append(int(malignant[j]))
                probs.append(float(scan.malignancy_prob[best[j]]))
                diameters.append(float(scan.diameters_mm[j]))
    labels = np.array(labels, np.int64)
    return {"nodules": len(labels), "malignant": int(labels.sum()),
            "auc": roc_auc(labels, np.array(probs)), "diameter_auc": roc_auc(labels, np.array(diameters))}


def evaluate(scans: list[ScanResult], threshold: float = 0.5, bootstrap: int = 1000) -> dict:
    """Everything --validation reports: FROC/CPM, the confusion table and the malignancy AUCs."""
    metrics = cpm(scans, bootstrap=bootstrap)
    metrics["scans"] = len(scans)
    metrics["nodules"] = int(sum(len(s.diameters_mm) for s in scans))
    metrics["confusion"] = confusion(scans, threshold)
    if any(s.malignancy_prob is not None for s in scans):
        metrics["malignancy"] = malignancy_aucs(scans, threshold)
    return metrics
