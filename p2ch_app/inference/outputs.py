"""Detections as text: the console table, the --output files (CSV or JSON) and the LUNA16 submission file."""

from __future__ import annotations

import json
from pathlib import Path

from p2ch_app.files import write_csv_atomic, write_text_atomic
from p2ch_app.inference.pipeline import Detection
from p2ch_app.inference.summary import PatientSummary


def detection_table(rows: list[Detection], summary: PatientSummary) -> str:
    """Ranked detections as aligned columns under the patient's summary, for the console."""
    head = f"{'rank':>4} {'x mm':>8} {'y mm':>8} {'z mm':>8} {'index':>6} {'row':>6} {'col':>6} " \
           f"{'nodule':>7} {'malig.':>7} {'diam mm':>8}"
    lines = [summary.headline(), head]
    for rank, d in enumerate(rows, 1):
        mal = "-" if d.malignancy_prob is None else f"{d.malignancy_prob:.3f}"
        lines.append(f"{rank:>4} {d.center_xyz[0]:>8.1f} {d.center_xyz[1]:>8.1f} {d.center_xyz[2]:>8.1f} "
                     f"{d.center_irc[0]:>6.1f} {d.center_irc[1]:>6.1f} {d.center_irc[2]:>6.1f} "
                     f"{d.nodule_prob:>7.3f} {mal:>7} {d.diameter_mm:>8.1f}")
    return "\n".join(lines)


def detection_records(rows: list[tuple[str, Detection]], model_paths: dict | None = None) -> list[dict]:
    """(series UID, detection) rows as flat records, ranked within their series, with the models used
    (when model_paths is given). The one place a detection becomes a record: every file writes these."""
    ranks, seen = [], {}
    for uid, _ in rows:
        seen[uid] = seen.get(uid, 0) + 1
        ranks.append(seen[uid])
    models = {} if model_paths is None else {"seg_model": model_paths["seg"], "cls_model": model_paths["cls"],
                                             "mal_model": model_paths["mal"]}
    return [{"rank": rank, "series_uid": uid, "x_mm": d.center_xyz[0], "y_mm": d.center_xyz[1],
             "z_mm": d.center_xyz[2], "index": d.center_irc[0], "row": d.center_irc[1], "col": d.center_irc[2],
             "nodule_prob": d.nodule_prob, "malignancy_prob": d.malignancy_prob, "diameter_mm": d.diameter_mm,
             "voxels": d.voxels, "inside_body": d.inside_body, **models}
            for rank, (uid, d) in zip(ranks, rows)]


# The LUNA16 submission columns (noduleCADEvaluationLUNA16.py reads them by name) and the record fields they hold
SUBMISSION_COLUMNS = {"seriesuid": "series_uid", "coordX": "x_mm", "coordY": "y_mm", "coordZ": "z_mm",
                      "probability": "nodule_prob"}


def write_submission(path: Path, rows: list[tuple[str, Detection]]) -> None:
    """The rows to a LUNA16 submission CSV, through a temporary file: seriesuid, the centre in patient mm
    and the nodule probability, one line per candidate. Give every candidate, not only those above a
    threshold: the challenge's FROC sweeps the threshold itself."""
    records = detection_records(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(path, list(SUBMISSION_COLUMNS), [[r[field] for field in SUBMISSION_COLUMNS.values()]
                                                      for r in records])


def write_detections(path: Path, rows: list[tuple[str, Detection]], model_paths: dict,
                     summaries: dict[str, PatientSummary]) -> None:
    """The rows to FILE.csv or FILE.json, through a temporary file. summaries: each series analysed and
    its per-patient summary; the JSON records them (series_uid: the one UID, or the list of them)."""
    records = detection_records(rows, model_paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        uids = list(summaries)
        document = {"series_uid": uids[0] if len(uids) == 1 else uids, "models": model_paths,
                    "patients": {uid: summary.record() for uid, summary in summaries.items()},
                    "detections": records}
        write_text_atomic(path, json.dumps(document, indent=2))
    else:
        write_csv_atomic(path, list(records[0]) if records else ["rank", "series_uid"],
                         [list(r.values()) for r in records])
