"""Evaluation results where people read them: the console summary, metrics.json, the FROC plot
and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from p2ch_app.files import plain, write_atomic, write_text_atomic


def format_confusion(table: dict[str, dict[str, int]]) -> str:
    columns = list(next(iter(table.values())))
    width = max(len(c) for c in columns) + 2
    lines = ["".ljust(12) + "".join(c.rjust(width) for c in columns)]
    for row, counts in table.items():
        cells = ["-" if row == "Non-nodule" and c == "Complete miss" else str(counts[c]) for c in columns]
        lines.append(row.ljust(12) + "".join(v.rjust(width) for v in cells))
    return "\n".join(lines)


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
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "metrics.json", json.dumps(plain(metrics), indent=2))
    figure = plot_froc(metrics)
    write_atomic(run_dir / "froc.png", figure.savefig)
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_scalar("eval/cpm", metrics["cpm"], 0)
        for rate, sens in metrics["sensitivity_at"].items():
            writer.add_scalar(f"eval/sensitivity_at_{rate}_fp", sens, 0)
        for group in ("malignancy", "diameter", "patient"):
            for name, value in metrics.get(group, {}).items():
                if isinstance(value, (int, float)):  # not the intervals
                    writer.add_scalar(f"eval/{group}_{name}", value, 0)
        writer.add_figure("eval/froc", figure, 0)
        writer.add_text("eval/confusion", "    " + format_confusion(metrics["confusion"]).replace("\n", "\n    "), 0)


def format_summary(metrics: dict) -> str:
    """The lines --validation prints: confusion table, CPM with its interval, malignancy AUCs."""
    low, high = metrics["cpm_ci95"]
    at = "  ".join(f"{rate}: {sens:.3f}" for rate, sens in metrics["sensitivity_at"].items())
    lines = [format_confusion(metrics["confusion"]), "",
             f"CPM {metrics['cpm']:.3f} (bootstrap 95% CI {low:.3f}-{high:.3f}) over {metrics['scans']} scans, "
             f"{metrics['nodules']} nodules", f"sensitivity at FPs/scan  {at}"]
    if metrics.get("excluded_findings"):
        lines.append(f"{metrics['excluded_findings']} excluded findings (annotations_excluded.csv): "
                     f"{metrics['ignored_detections']} detection(s) on them ignored, neither hit nor false positive")
    mal = metrics.get("malignancy")
    if mal:
        lines.append(f"malignancy AUC {_with_interval(mal, 'auc')} on {mal['nodules']} detected nodules "
                     f"({mal['malignant']} malignant); diameter-only baseline AUC "
                     f"{_with_interval(mal, 'diameter_auc')}")
    size = metrics.get("diameter")
    if size and size["nodules"]:
        lines.append(f"diameter of the {size['nodules']} detected nodules against the annotations: median absolute "
                     f"error {size['median_abs_error_mm']:.2f} mm, bias {size['bias_mm']:+.2f} mm, same size band "
                     f"{size['band_agreement']:.0%}")
    patient = metrics.get("patient")
    if patient and patient["patients"]:
        line = f"per patient ({patient['patients']}): size category as annotated {patient['category_agreement']:.0%}"
        if "auc" in patient and patient["malignant_patients"] in (0, patient["patients"]):
            line += f"; no malignancy score AUC: {patient['malignant_patients']} of them malignant"
        elif "auc" in patient:
            line += (f"; malignancy score AUC {_with_interval(patient, 'auc')} "
                     f"({patient['malignant_patients']} malignant)")
        lines.append(line)
    return "\n".join(lines)


def _with_interval(figures: dict, name: str) -> str:
    low, high = figures[f"{name}_ci95"]
    return f"{figures[name]:.3f} (95% CI {low:.3f}-{high:.3f})"
