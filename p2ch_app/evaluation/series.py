"""Scoring many series: nodule-analyze --validation runs the pipeline over a data root's series and
scores every scan against its annotations, in a run folder of its own. Under torchrun each rank
analyses its share of the series (and writes their report pages); rank 0 gathers the results and
writes everything else, as one process would."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from p2ch_app.data.ct import CtVolume, load_series, raw_int16_layout, series_on_disk
from p2ch_app.data.index import LunaIndex, build_index, read_excluded
from p2ch_app.evaluation.results import save_evaluation
from p2ch_app.evaluation.scoring import ScanResult, evaluate
from p2ch_app.files import new_run_dir
from p2ch_app.inference.distributed import SINGLE, Ranks, gather_in_order, shard
from p2ch_app.inference.outputs import write_detections, write_submission
from p2ch_app.inference.pipeline import AnalysisSettings, Detection, Models, analyze
from p2ch_app.inference.report import write_report, write_report_index
from p2ch_app.inference.summary import PatientSummary, summarize


@dataclass(frozen=True)
class ValidationRun:
    """Which series --validation scores and where its results go."""

    data_root: Path
    val_stride: int = 10  # every Nth series (sorted by UID) validates, as in training
    include_train: bool = False  # score the training series too
    runs_dir: Path = Path("runs")
    comment: str = ""
    output: Path | None = None  # also write the reported rows here
    submission: Path | None = None  # every candidate of every series in the LUNA16 submission format
    report_dir: Path | None = None  # a visual report per series under this folder


def scan_result(detections: list[Detection], truth: LunaIndex, with_mal: bool,
                excluded: tuple[np.ndarray, np.ndarray] | None = None, threshold: float = 0.5) -> ScanResult:
    """A scan's detections beside its annotated nodules (those with a diameter) and its excluded findings
    (centres, diameters: ExcludedFindings.for_series), with the per-patient summary of the detections at or
    above threshold, for scoring."""
    nodules = truth.has_annotation
    excluded_xyz, excluded_diameters = excluded if excluded is not None else (np.zeros((0, 3)), np.zeros(0))
    return ScanResult(
        detections_xyz=np.array([d.center_xyz for d in detections], float).reshape(-1, 3),
        nodule_prob=np.array([d.nodule_prob for d in detections], float),
        nodules_xyz=truth.center_xyz[nodules], diameters_mm=truth.diameter_mm[nodules],
        malignant=truth.malignancy[nodules],
        malignancy_prob=np.array([np.nan if d.malignancy_prob is None else d.malignancy_prob for d in detections])
        if with_mal else None, excluded_xyz=excluded_xyz, excluded_diameters_mm=excluded_diameters,
        detection_diameters_mm=np.array([d.diameter_mm for d in detections], float),
        summary=summarize([d for d in detections if d.nodule_prob >= threshold], with_mal))


@dataclass(frozen=True)
class SeriesHooks:
    """What analyze_series tells its caller while it runs."""

    on_ct: Callable[[CtVolume, list[Detection], PatientSummary], None] | None = None  # each CT while loaded
    note: Callable[[str], None] | None = None  # hears analyze()'s notes (no lungs found, say)
    progress: bool = True


def analyze_series(data_root: Path, index: LunaIndex, uids, models: Models, settings: AnalysisSettings,
                   device: torch.device,
                   hooks: SeriesHooks = SeriesHooks()) -> list[tuple[str, list[Detection], ScanResult]]:
    """analyze() over many LUNA series of data_root (index: its build_index), each paired with its scoring
    against the annotations and annotations_excluded.csv (when there is one) and its per-patient summary;
    hooks.on_ct(ct, detections, summary) sees each CT while it is loaded (for reports)."""
    excluded = read_excluded(data_root)  # before the long work: a bad file fails now
    results = []
    for uid in tqdm(uids, desc="nodule-analyze", unit="CT", disable=not hooks.progress):
        ct = load_series(data_root, uid)
        detections = analyze(ct, models, settings, device, note=hooks.note)
        scan = scan_result(detections, index.for_series(uid), models.malignancy is not None,
                           excluded.for_series(uid), settings.threshold)
        if hooks.on_ct is not None:
            hooks.on_ct(ct, detections, scan.summary)
        results.append((uid, detections, scan))
    return results


def _series_reporter(report_dir: Path, threshold: float, entries: list) -> Callable:
    """An on_ct callback writing each series' visual report under report_dir and noting it in entries."""
    def report(ct: CtVolume, detections: list[Detection], summary: PatientSummary) -> None:
        shown = [d for d in detections if d.nodule_prob >= threshold]
        write_report(report_dir / ct.series_uid, ct, shown, summary, title=f"nodule-analyze {ct.series_uid}")
        entries.append((ct.series_uid, f"{ct.series_uid}/index.html", len(shown)))
    return report


def validation_uids(run: ValidationRun, index: LunaIndex) -> list[str]:
    """The series run scores, sorted by UID: the validation ones, or every one with include_train."""
    chosen = np.ones(len(index.series_uids), bool) if run.include_train else index.validation_series(run.val_stride)
    return [uid for uid, keep in zip(index.series_uids, chosen) if keep]


def series_voxels(data_root: Path, uids: list[str]) -> list[int] | None:
    """Each series' voxels, as its header gives them, so that ranks get equal work (shard's costs);
    None, equal shares, unless every series is a plain int16 MetaImage (as LUNA16's are)."""
    on_disk = series_on_disk(data_root)
    layouts = [raw_int16_layout(on_disk[uid]) if uid in on_disk else None for uid in uids]
    return None if None in layouts else [math.prod(layout.shape) for layout in layouts]


def run_validation(run: ValidationRun, models: Models, settings: AnalysisSettings, device: torch.device,
                   ranks: Ranks = SINGLE, note: Callable[[str], None] | None = None) -> tuple[dict, Path] | None:
    """Every validation series (and the training ones with include_train), scored and saved in a run
    folder (metrics.json, froc.png, detections.csv, TensorBoard): (metrics, run folder). Excluded
    findings (annotations_excluded.csv) count neither way. With several ranks each analyses its share
    of the series; rank 0 gathers them in series order, writes the results and returns them, the
    other ranks return None. note(message) hears analyze()'s notes (no lungs found, say)."""
    index = build_index(run.data_root)
    uids = validation_uids(run, index)
    entries = []  # report pages, one per series this rank analysed
    reporter = None if run.report_dir is None else _series_reporter(run.report_dir, settings.threshold, entries)
    costs = series_voxels(run.data_root, uids)
    mine = analyze_series(run.data_root, index, shard(uids, ranks, costs), models, settings, device,
                          SeriesHooks(reporter, note, progress=ranks.is_main))
    results = gather_in_order(mine, ranks, costs)
    entries = gather_in_order(entries, ranks, costs) if reporter else []
    if not ranks.is_main:
        return None
    metrics = evaluate([scan for _, _, scan in results], settings.threshold)
    metrics.update(series=uids, patients={uid: scan.summary.record() for uid, _, scan in results},
                   models=models.paths, threshold=settings.threshold,
                   keep_outside=settings.keep_outside, tta=settings.tta, dedupe=settings.dedupe,
                   split=settings.split, lung_only=settings.lung_only, recentre=settings.recentre,
                   include_train=run.include_train, val_stride=run.val_stride)
    run_dir = new_run_dir(run.runs_dir, "nodule-analyze", run.comment)
    save_evaluation(run_dir, metrics)
    _write_outputs(run, run_dir, results, models.paths, settings.threshold)
    if run.report_dir is not None:
        write_report_index(run.report_dir, entries, title="nodule-analyze validation")
    return metrics, run_dir


def _write_outputs(run: ValidationRun, run_dir: Path, results: list, model_paths: dict, threshold: float) -> None:
    """detections.csv in the run folder, and --submission and --output where asked for."""
    summaries = {uid: scan.summary for uid, _, scan in results}
    rows = [(uid, d) for uid, detections, _ in results for d in detections]
    write_detections(run_dir / "detections.csv", rows, model_paths, summaries)
    if run.submission is not None:
        write_submission(run.submission, rows)
    if run.output is not None:
        write_detections(run.output, [(uid, d) for uid, d in rows if d.nodule_prob >= threshold], model_paths,
                         summaries)
