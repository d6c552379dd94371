"""Scoring detections against annotations: the LUNA16 FROC / CPM and the confusion table.

A scan's detections are centres in patient mm with a nodule probability (and optionally a
malignancy probability); its truth is the annotated nodules (centre, diameter, malignancy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    columns = ["Complete miss", "Filtered out"] + (["Pred. benign", "Pred. malignant"] if with_mal else ["Pred. nodule"])
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


def format_confusion(table: dict[str, dict[str, int]]) -> str:
    columns = list(next(iter(table.values())))
    width = max(len(c) for c in columns) + 2
    lines = ["".ljust(12) + "".join(c.rjust(width) for c in columns)]
    for row, counts in table.items():
        cells = ["-" if row == "Non-nodule" and c == "Complete miss" else str(counts[c]) for c in columns]
        lines.append(row.ljust(12) + "".join(v.rjust(width) for v in cells))
    return "\n".join(lines)


def malignancy_aucs(scans: list[ScanResult], threshold: float = 0.5, match_fraction: float = 0.7) -> dict:
    """ROC AUC of the malignancy probability on the true nodules the pipeline found (predicted nodule,
    matched as in the confusion table, malignancy known), beside the AUC of their annotated diameter."""
    from p2ch_app.metrics import roc_auc

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


def plot_froc(metrics: dict):
    """The FROC curve with the seven CPM operating points, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    fps, sens = np.array(metrics["froc_fps"]), np.array(metrics["froc_sensitivity"])
    shown = fps > 0
    ax.step(fps[shown], sens[shown], where="post", label="FROC")
    rates = [float(r) for r in metrics["sensitivity_at"]]
    ax.plot(rates, list(metrics["sensitivity_at"].values()), "o", label="CPM points")
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rates, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    low, high = metrics["cpm_ci95"]
    ax.set_title(f"CPM {metrics['cpm']:.3f} (95% CI {low:.3f}-{high:.3f}), {metrics['scans']} scans, "
                 f"{metrics['nodules']} nodules", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_evaluation(run_dir: Path, metrics: dict) -> None:
    """metrics.json, froc.png and the same figures in TensorBoard, all in run_dir."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    from p2ch_app.files import plain, write_atomic, write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "metrics.json", json.dumps(plain(metrics), indent=2))
    figure = plot_froc(metrics)
    write_atomic(run_dir / "froc.png", figure.savefig)
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_scalar("eval/cpm", metrics["cpm"], 0)
        for rate, sens in metrics["sensitivity_at"].items():
            writer.add_scalar(f"eval/sensitivity_at_{rate}_fp", sens, 0)
        for name, value in metrics.get("malignancy", {}).items():
            writer.add_scalar(f"eval/malignancy_{name}", value, 0)
        writer.add_figure("eval/froc", figure, 0)
        writer.add_text("eval/confusion", "    " + format_confusion(metrics["confusion"]).replace("\n", "\n    "), 0)


def format_summary(metrics: dict) -> str:
    """The lines --validation prints: confusion table, CPM with its interval, malignancy AUCs."""
    low, high = metrics["cpm_ci95"]
    at = "  ".join(f"{rate}: {sens:.3f}" for rate, sens in metrics["sensitivity_at"].items())
    lines = [format_confusion(metrics["confusion"]), "",
             f"CPM {metrics['cpm']:.3f} (bootstrap 95% CI {low:.3f}-{high:.3f}) over {metrics['scans']} scans, "
             f"{metrics['nodules']} nodules", f"sensitivity at FPs/scan  {at}"]
    mal = metrics.get("malignancy")
    if mal:
        lines.append(f"malignancy AUC {mal['auc']:.3f} on {mal['nodules']} detected nodules ({mal['malignant']} "
                     f"malignant); diameter-only baseline AUC {mal['diameter_auc']:.3f}")
    return "\n".join(lines)
