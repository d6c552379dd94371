"""Visual reports: per detection a PNG with axial, coronal and sagittal views, plus an HTML index.

A table of coordinates and probabilities cannot be checked by eye; a reader must see each finding in
the CT at its true physical scale. So every view is the same 60 mm field, centred on the detection, in
a lung window, with voxels drawn at their real size in mm (slices are often thicker than pixels).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from p2ch_app.data.ct import HU_MIN, CtVolume
from p2ch_app.errors import UserError
from p2ch_app.files import write_atomic, write_text_atomic
from p2ch_app.inference.viewer import LABEL_MAP_FILE, LUNG_MAP_FILE, MARKUPS_FILE, write_viewer_files

if TYPE_CHECKING:
    from p2ch_app.inference.pipeline import Detection
    from p2ch_app.inference.summary import PatientSummary

HALF_FIELD_MM = 30.0  # every view shows 60 mm x 60 mm around the detection
LUNG_LEVEL, LUNG_WIDTH = -600, 1500
MIN_CIRCLE_MM = 4.0  # a marker smaller than this vanishes at report size
CIRCLE_GAP_MM = 1.5  # the circle runs this far outside the estimated diameter: the margin stays visible
_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
          "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right;vertical-align:middle}")


def _window(plane: np.ndarray, center: np.ndarray, half: np.ndarray) -> np.ndarray:
    """The (2*half+1)-voxel box around center, padded with air where it leaves the plane."""
    out = np.full(tuple(2 * half + 1), HU_MIN, dtype=plane.dtype)
    src, dst = [], []
    for c, h, n in zip(center, half, plane.shape):
        lo, hi = max(c - h, 0), min(c + h + 1, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - (c - h), hi - (c - h)))
    out[tuple(dst)] = plane[tuple(src)]
    return out


def _views(ct: CtVolume, det: Detection) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]]:
    """(name, window, spacing mm, sub-voxel offset of the detection, superior up) per view."""
    irc = np.asarray(det.center_irc, float)
    idx = np.rint(irc).astype(int)
    spacing = np.asarray(ct.geometry.spacing, float)[::-1]  # (index, row, col)
    half = np.array([math.ceil(HALF_FIELD_MM / s) + 1 for s in spacing])
    superior_up = ct.geometry.direction[2, 2] >= 0  # slice index grows towards the head
    i, r, c = idx
    for name, plane, axes in (("Axial", ct.hu[i], [1, 2]), ("Coronal", ct.hu[:, r, :], [0, 2]),
                              ("Sagittal", ct.hu[:, :, c], [0, 1])):
        window = _window(np.asarray(plane), idx[axes], half[axes])
        yield name, window, spacing[axes], (irc - idx)[axes], name != "Axial" and superior_up


def _figure(ct: CtVolume, det: Detection, rank: int) -> Figure:
    fig = Figure(figsize=(9, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    mal = "-" if det.malignancy_prob is None else f"{det.malignancy_prob:.3f}"
    fig.suptitle(f"#{rank}   nodule p = {det.nodule_prob:.3f}   malignancy p = {mal}   "
                 f"diameter {det.diameter_mm:.1f} mm", fontsize=10)
    radius = max(det.diameter_mm, MIN_CIRCLE_MM) / 2 + CIRCLE_GAP_MM
    for ax, (name, img, (sv, sh), (fv, fh), superior_up) in zip(fig.subplots(1, 3), _views(ct, det)):
        hv, hh = img.shape[0] // 2, img.shape[1] // 2
        # mm from the detection: voxel j of the window is centred at (j - half - offset) * spacing
        extent = ((-hh - 0.5 - fh) * sh, (hh + 0.5 - fh) * sh, (hv + 0.5 - fv) * sv, (-hv - 0.5 - fv) * sv)
        ax.imshow(img, cmap="gray", vmin=LUNG_LEVEL - LUNG_WIDTH / 2, vmax=LUNG_LEVEL + LUNG_WIDTH / 2,
                  extent=extent, origin="upper", aspect="equal", interpolation="nearest")
        ax.add_patch(Circle((0.0, 0.0), radius, fill=False, edgecolor="red", linewidth=1.0))
        ax.set_xlim(-HALF_FIELD_MM, HALF_FIELD_MM)
        ax.set_ylim((-HALF_FIELD_MM, HALF_FIELD_MM) if superior_up else (HALF_FIELD_MM, -HALF_FIELD_MM))
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    return fig


def _save_png(fig: Figure, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()


def _save_html(path: Path, title: str, body: str) -> Path:
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n")
    write_text_atomic(path, page)
    return path


def _make_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create report folder {out_dir} ({err.strerror}); choose another folder") from None
    return out_dir


def write_report(out_dir: Path, ct: CtVolume, detections: list[Detection], summary: PatientSummary,
                 title: str = "") -> Path:
    """Write NNN.png per detection (rank order as given), the viewer files (viewer.py: a 3D Slicer point
    list, a label map of the detections' voxels and one of the lungs) and index.html, headed by the patient's
    summary, to out_dir; return the index."""
    for rank, det in enumerate(detections, 1):
        if not ct.contains(det.center_irc):
            raise UserError(f"detection {rank} at voxel {tuple(round(v, 1) for v in det.center_irc)} lies outside "
                            f"CT {ct.series_uid} of shape {ct.hu.shape}; report it with the CT it came from")
    out_dir = _make_dir(out_dir)
    rows = []
    for rank, det in enumerate(detections, 1):
        _save_png(_figure(ct, det, rank), out_dir / f"{rank:03d}.png")
        mal = "-" if det.malignancy_prob is None else f"{det.malignancy_prob:.3f}"
        xyz = ", ".join(f"{v:.1f}" for v in det.center_xyz)
        irc = ", ".join(f"{v:.1f}" for v in det.center_irc)
        rows.append(f"<tr><td>{rank}</td><td>{xyz}</td><td>{irc}</td><td>{det.nodule_prob:.3f}</td><td>{mal}</td>"
                    f'<td>{det.diameter_mm:.1f}</td><td><img src="{rank:03d}.png" width="600" '
                    f'alt="detection {rank}"></td></tr>\n')
    write_viewer_files(out_dir, ct, detections)
    body = f"<p>Series {html.escape(ct.series_uid)}: {html.escape(summary.headline())}.</p>\n"
    body += (f'<p>For a viewer, over the CT: <a href="{MARKUPS_FILE}">{MARKUPS_FILE}</a> (3D Slicer point list, '
             f'labelled rank and probability), <a href="{LABEL_MAP_FILE}">{LABEL_MAP_FILE}</a> (label map: each '
             f'detection\'s voxels hold its rank) and <a href="{LUNG_MAP_FILE}">{LUNG_MAP_FILE}</a> (label map: the '
             "lung mask of --lung-only, 1 in the lungs; all 0 where no lungs were found).</p>\n")
    if rows:
        body += ("<table><tr><th>rank</th><th>x, y, z (mm)</th><th>index, row, col</th><th>nodule p</th>"
                 "<th>malignancy p</th><th>diameter (mm)</th><th>views</th></tr>\n" + "".join(rows) + "</table>\n")
    return _save_html(out_dir / "index.html", title or f"Nodule report {ct.series_uid}", body)


def write_report_index(out_dir: Path, entries: list[tuple[str, str, int]], title: str) -> Path:
    """Top-level index.html linking each series' report: entries are (series_uid, relative link, detections)."""
    out_dir = _make_dir(out_dir)
    rows = "".join(f'<tr><td><a href="{html.escape(quote(link))}">{html.escape(uid)}</a></td><td>{n}</td></tr>\n'
                   for uid, link, n in entries)
    total = sum(n for _, _, n in entries)
    body = f"<p>{len(entries)} series, {total} detection(s).</p>\n"
    if entries:
        body += f"<table><tr><th>series UID</th><th>detections</th></tr>\n{rows}</table>\n"
    return _save_html(out_dir / "index.html", title, body)
