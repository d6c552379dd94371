"""Scoring detections against annotations: the LUNA16 FROC / CPM and the confusion table.

A scan's detections are centres in patient mm with a nodule probability (and optionally a
malignancy probability); its truth is the annotated nodules (centre, diameter, malignancy) and the
excluded findings (annotations_excluded.csv), which count neither way.

The FROC/CPM follow the challenge's evaluation script (noduleCADEvaluationLUNA16.py): a detection hits
a finding when its centre lies strictly within the finding's radius (a finding without a size, diameter
-1, gets 10 mm); only each scan's 100 most probable detections are scored; a nodule counts once, at the
highest probability among its hits, and the other hits are not false positives; a detection that hits
no nodule but an excluded finding is ignored; every other one is a false positive, counted per scan
over all scans; the curve runs through every threshold and is read at 1/8 ... 8 false positives per
scan by linear interpolation along it; scans are resampled with replacement for the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2ch_app.inference.summary import PatientSummary, size_category
from p2ch_app.metrics import distances, roc_auc, within_radius

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS_PER_SCAN = 100  # the challenge scores only each scan's most probable 100 detections


@dataclass
class ScanResult:
    """One scan's detections and truth, all in patient mm."""

    detections_xyz: np.ndarray  # (D, 3)
    nodule_prob: np.ndarray  # (D,)
    nodules_xyz: np.ndarray  # (N, 3)
    diameters_mm: np.ndarray  # (N,)
    malignant: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # (N,) 1, 0, or -1 unknown
    malignancy_prob: np.ndarray | None = None  # (D,)
    excluded_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (E, 3) count neither way
    excluded_diameters_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (E,) negative: no size given
    detection_diameters_mm: np.ndarray | None = None  # (D,) the pipeline's estimates
    summary: PatientSummary | None = None  # the per-patient answer for this scan


def _best_matches(scan: ScanResult, match_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule the most probable detection within match_fraction of its diameter (-1: none), and
    per detection whether it lies that near any nodule: the matching of the confusion table."""
    reach = match_fraction * np.asarray(scan.diameters_mm, float)[None, :]
    near = distances(scan.detections_xyz, scan.nodules_xyz) <= reach  # (D, N)
    if near.shape[0] == 0:
        return np.full(near.shape[1], -1), np.zeros(0, bool)
    scored = np.where(near, np.asarray(scan.nodule_prob, float)[:, None], -np.inf)
    return np.where(near.any(axis=0), scored.argmax(axis=0), -1), near.any(axis=1)


def _scored_marks(scan: ScanResult) -> np.ndarray:
    """Indices of the detections the challenge scores: all, or the MAX_MARKS_PER_SCAN most probable
    (those strictly above the next one's probability, so a tie at the cut drops out whole)."""
    probs = np.asarray(scan.nodule_prob, float)
    if len(probs) <= MAX_MARKS_PER_SCAN:
        return np.arange(len(probs))
    cut = np.sort(probs)[::-1][MAX_MARKS_PER_SCAN]
    return np.flatnonzero(probs > cut)


def _judged(scan: ScanResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scored detections' probabilities (D,), the nodules each hits (D, N), and whether each is ignored
    (it hits an excluded finding and no nodule: neither a hit nor a false positive)."""
    marks = _scored_marks(scan)
    xyz = np.asarray(scan.detections_xyz, float).reshape(-1, 3)[marks]
    on_nodule = within_radius(xyz, scan.nodules_xyz, scan.diameters_mm)
    ignored = within_radius(xyz, scan.excluded_xyz, scan.excluded_diameters_mm).any(axis=1) & ~on_nodule.any(axis=1)
    return np.asarray(scan.nodule_prob, float)[marks], on_nodule, ignored


def _froc_points(scan: ScanResult) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule of the scan its best hitting probability (-inf when missed), and every false-positive
    probability. Several detections on one nodule count once, with the highest probability, and the
    others are not false positives."""
    probs, hits, ignored = _judged(scan)
    return np.where(hits, probs[:, None], -np.inf).max(axis=0, initial=-np.inf), probs[~hits.any(axis=1) & ~ignored]


def ignored_detections(scans: list[ScanResult]) -> int:
    """How many scored detections hit an excluded finding and no nodule."""
    return int(sum(_judged(scan)[2].sum() for scan in scans))


def froc(scans: list[ScanResult]) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve from the threshold above every probability (0 FPs, sensitivity 0) down, one point
    per distinct probability (a detection counts at thresholds at or below its probability):
    (false positives per scan, sensitivity), FP rate ascending. Missed nodules count in the sensitivity's
    denominator only."""
    return _froc_curve([_froc_points(scan) for scan in scans])


def _froc_curve(points: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """froc from each scan's _froc_points: the bootstrap judges every scan once, not once per resample."""
    nodule_scores = np.concatenate([np.zeros(0), *(scores for scores, _ in points)])
    fp_probs = np.concatenate([np.zeros(0), *(fps for _, fps in points)])
    if len(nodule_scores) == 0:
        return np.zeros(1), np.zeros(1)
    thresholds = np.unique(np.concatenate([nodule_scores[np.isfinite(nodule_scores)], fp_probs]))[::-1]
    fp_sorted, hit_sorted = np.sort(fp_probs), np.sort(nodule_scores)
    fps = (len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")) / len(points)
    sens = (len(hit_sorted) - np.searchsorted(hit_sorted, thresholds, side="left")) / len(hit_sorted)
    return np.concatenate([[0.0], fps]), np.concatenate([[0.0], sens])


def sensitivities_at(fps: np.ndarray, sens: np.ndarray, rates=FROC_FP_RATES) -> np.ndarray:
    """Sensitivity at each FP rate, read off the curve as the LUNA16 evaluation does (numpy.interp over
    its points in threshold order): linear from the last point at or below the rate to the next point,
    so a step made by a false positive alone stays flat until the next nodule is found; beyond the
    curve's end the last value holds. fps must ascend (froc's order)."""
    fps, sens, rates = np.asarray(fps, float), np.asarray(sens, float), np.asarray(rates, float)
    last = np.searchsorted(fps, rates, side="right") - 1  # the curve starts at 0 FPs, so never -1
    after = np.minimum(last + 1, len(fps) - 1)
    span = fps[after] - fps[last]
    step = np.divide(rates - fps[last], span, out=np.zeros_like(rates), where=span > 0)
    return sens[last] + step * (sens[after] - sens[last])


def _interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The challenge's bootstrap interval: the sorted samples at floor(p * n) for p = (1 - confidence) / 2
    and 1 - p, along axis 0."""
    ordered = np.sort(samples, axis=0)
    tail = (1 - confidence) / 2
    n = len(ordered)
    return ordered[int(np.floor(tail * n))], ordered[int(np.floor((1 - tail) * n))]


def cpm(scans: list[ScanResult], bootstrap: int = 1000, seed: int = 0) -> dict:
    """LUNA16's competition performance metric: mean sensitivity at 1/8 ... 8 FPs per scan. The bootstrap
    resamples scans with replacement, as the challenge's does, and gives its 95% interval per FP rate
    (sensitivity_ci95) and, by the same rule, for the CPM (cpm_ci95)."""
    points = [_froc_points(scan) for scan in scans]
    fps, sens = _froc_curve(points)
    at = sensitivities_at(fps, sens)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap if len(scans) > 1 else 0):
        picks = [points[i] for i in rng.integers(0, len(scans), len(scans))]
        samples.append(sensitivities_at(*_froc_curve(picks)))
    if samples:
        (low, high), (rate_low, rate_high) = _interval(np.mean(samples, axis=1)), _interval(np.array(samples))
    else:
        low = high = float("nan")
        rate_low = rate_high = np.full(len(FROC_FP_RATES), np.nan)
    return {"cpm": float(at.mean()), "cpm_ci95": [float(low), float(high)],
            "sensitivity_at": {str(r): float(s) for r, s in zip(FROC_FP_RATES, at)},
            "sensitivity_ci95": {str(r): [float(lo), float(hi)] for r, lo, hi in zip(FROC_FP_RATES, rate_low,
                                                                                      rate_high)},
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
        malignant = _malignancy_of(scan)

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


def _found(scans: list[ScanResult], threshold: float, match_fraction: float):
    """(scan, nodule j, its detection i) for every true nodule found as in the confusion table: its best
    match within match_fraction of its diameter has nodule probability at or above threshold."""
    for scan in scans:
        best, _ = _best_matches(scan, match_fraction)
        nodule_prob = np.asarray(scan.nodule_prob, float)
        for j in np.flatnonzero(best >= 0):
            if nodule_prob[best[j]] >= threshold:
                yield scan, int(j), int(best[j])


def _malignancy_of(scan: ScanResult) -> np.ndarray:
    """Per nodule 1, 0 or -1 (unknown); 0 for every nodule when the scan gives none."""
    return np.resize(np.asarray(scan.malignant, np.int8), len(scan.diameters_mm))


def auc_interval(labels, scores, bootstrap: int = 1000, seed: int = 0) -> list[float]:
    """The bootstrap 95% interval of roc_auc, resampling the items with replacement (draws that miss a
    class are skipped); [nan, nan] when either class is absent."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    if labels.all() or not labels.any():
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    draws = (rng.integers(0, len(labels), len(labels)) for _ in range(bootstrap))
    samples = np.array([roc_auc(labels[d], scores[d]) for d in draws])
    low, high = _interval(samples[~np.isnan(samples)])
    return [float(low), float(high)]


def malignancy_aucs(scans: list[ScanResult], threshold: float = 0.5, match_fraction: float = 0.7) -> dict:
    """ROC AUC of the malignancy probability on the true nodules the pipeline found (predicted nodule,
    matched as in the confusion table, malignancy known), beside the AUC of their annotated diameter,
    each with its bootstrap 95% interval."""
    found = [(int(_malignancy_of(scan)[j]), float(scan.malignancy_prob[i]), float(scan.diameters_mm[j]))
             for scan, j, i in _found(scans, threshold, match_fraction)
             if scan.malignancy_prob is not None and _malignancy_of(scan)[j] >= 0]
    labels, probs, diameters = (np.array(column) for column in zip(*found)) if found else ([], [], [])
    return {"nodules": len(found), "malignant": int(np.sum(labels)),
            "auc": roc_auc(labels, probs), "auc_ci95": auc_interval(labels, probs),
            "diameter_auc": roc_auc(labels, diameters), "diameter_auc_ci95": auc_interval(labels, diameters)}


def diameter_agreement(scans: list[ScanResult], threshold: float = 0.5, match_fraction: float = 0.7) -> dict:
    """The estimated diameters of the found nodules against their annotated ones: the median absolute
    error, the bias (median of estimate - annotation) and the share in the same size band
    (summary.size_category)."""
    pairs = np.array([(scan.detection_diameters_mm[i], scan.diameters_mm[j])
                      for scan, j, i in _found(scans, threshold, match_fraction)
                      if scan.detection_diameters_mm is not None]).reshape(-1, 2)
    error = pairs[:, 0] - pairs[:, 1]
    same = [size_category(est) == size_category(ann) for est, ann in pairs]
    nan = float("nan")
    return {"nodules": len(pairs), "median_abs_error_mm": float(np.median(np.abs(error))) if len(pairs) else nan,
            "bias_mm": float(np.median(error)) if len(pairs) else nan,
            "band_agreement": float(np.mean(same)) if same else nan}


def patient_level(scans: list[ScanResult]) -> dict:
    """Per patient (scan): the malignancy score's AUC, a patient being malignant when any of its nodules
    is, and how often the size category matches the one of the largest annotated nodule."""
    summaries = [s.summary for s in scans if s.summary is not None]
    truth = [size_category(float(np.max(s.diameters_mm)) if len(s.diameters_mm) else None)
             for s in scans if s.summary is not None]
    result = {"patients": len(summaries),
              "category_agreement": float(np.mean([m.category == t for m, t in zip(summaries, truth)]))
              if summaries else float("nan")}
    scored = [(bool(np.any(np.asarray(s.malignant) == 1)), s.summary.malignancy_score) for s in scans
              if s.summary is not None and s.summary.malignancy_score is not None]
    if scored:
        labels, scores = (np.array(column) for column in zip(*scored))
        result.update(malignant_patients=int(labels.sum()), auc=roc_auc(labels, scores),
                      auc_ci95=auc_interval(labels, scores))
    return result


def evaluate(scans: list[ScanResult], threshold: float = 0.5, bootstrap: int = 1000) -> dict:
    """Everything --validation reports: FROC/CPM, the confusion table and the malignancy AUCs."""
    metrics = cpm(scans, bootstrap=bootstrap)
    metrics["scans"] = len(scans)
    metrics["nodules"] = int(sum(len(s.diameters_mm) for s in scans))
    metrics["excluded_findings"] = int(sum(len(s.excluded_diameters_mm) for s in scans))
    metrics["ignored_detections"] = ignored_detections(scans)
    metrics["confusion"] = confusion(scans, threshold)
    if any(s.malignancy_prob is not None for s in scans):
        metrics["malignancy"] = malignancy_aucs(scans, threshold)
    metrics["diameter"] = diameter_agreement(scans, threshold)
    metrics["patient"] = patient_level(scans)
    return metrics
