"""Detections for medical image viewers: a 3D Slicer point list, a label map of the candidates' voxels
and one of the lung mask that --lung-only uses.

All live in patient space, so they land on the CT they came from in any viewer: the points in LPS
millimetres (our x, y, z are ITK's physical points, which are LPS), the label maps on the CT's own grid
(origin, spacing, direction): one label value per reported detection, its rank; the lungs as 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from p2ch_app.data.ct import CtVolume
from p2ch_app.errors import UserError
from p2ch_app.files import write_atomic, write_text_atomic
from p2ch_app.inference.lungs import lungs_of

if TYPE_CHECKING:
    from p2ch_app.inference.pipeline import Detection

MARKUPS_FILE, LABEL_MAP_FILE, LUNG_MAP_FILE = "detections.mrk.json", "candidates.nii.gz", "lungs.nii.gz"
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
                  "markups-schema-v1.0.3.json#")


def point_label(rank: int, det: Detection) -> str:
    """What Slicer shows beside a point: its rank and nodule probability, e.g. "1 p=0.93"."""
    return f"{rank} p={det.nodule_prob:.2f}"


def markups(detections: list[Detection], name: str) -> dict:
    """A Slicer markups point list ("Fiducial") in LPS mm: one control point per detection, in rank order."""
    points = []
    for rank, det in enumerate(detections, 1):
        mal = "-" if det.malignancy_prob is None else f"{det.malignancy_prob:.3f}"
        points.append({"id": str(rank), "label": point_label(rank, det),
                       "description": f"nodule p {det.nodule_prob:.3f}, malignancy p {mal}, "
                                      f"diameter {det.diameter_mm:.1f} mm",
                       "associatedNodeID": "", "position": [float(v) for v in det.center_xyz], "selected": True,
                       "locked": True, "visibility": True, "positionStatus": "defined"})
    return {"@schema": MARKUPS_SCHEMA,
            "markups": [{"type": "Fiducial", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
                         "locked": True, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                         "lastUsedControlPointNumber": len(points), "controlPoints": points,
                         "display": {"visibility": True, "pointLabelsVisibility": True,
                                     "propertiesLabelVisibility": False}}]}


def label_volume(ct: CtVolume, detections: list[Detection]) -> np.ndarray:
    """The CT's grid with each detection's voxels set to its rank (1 = most probable) and 0 elsewhere.
    Candidates can share voxels (--split pieces lie inside their component): the better rank keeps them.
    A detection without voxels (made by hand, or under the analysis threshold) gets no label."""
    n = len(detections)
    dtype = np.uint8 if n <= np.iinfo(np.uint8).max else np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    labels = np.zeros(ct.hu.shape, dtype)
    flat = labels.reshape(-1)  # a view: the array is new and contiguous
    for rank in range(n, 0, -1):  # the best rank written last wins shared voxels
        index = detections[rank - 1].voxel_index
        if index is None or len(index) == 0:
            continue
        if index.min() < 0 or index.max() >= flat.size:
            raise UserError(f"detection {rank}'s voxels lie outside CT {ct.series_uid} of shape {ct.hu.shape}; "
                            "write the label map with the CT the detections came from")
        flat[index] = rank
    return labels


def write_on_grid(path: Path, ct: CtVolume, labels: np.ndarray) -> None:
    """A label volume as a compressed NIfTI with the CT's origin, spacing and direction, written atomically."""
    image = ct.geometry.apply_to(sitk.GetImageFromArray(labels))
    write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))


def write_label_map(path: Path, ct: CtVolume, detections: list[Detection]) -> None:
    """label_volume() on the CT's grid (write_on_grid)."""
    write_on_grid(path, ct, label_volume(ct, detections))


def write_viewer_files(out_dir: Path, ct: CtVolume, detections: list[Detection]) -> list[Path]:
    """detections.mrk.json, candidates.nii.gz and lungs.nii.gz (the lung mask as 1, all 0 where no lungs
    are found) in out_dir (which exists); returns their paths."""
    out_dir = Path(out_dir)
    points, label_map, lung_map = out_dir / MARKUPS_FILE, out_dir / LABEL_MAP_FILE, out_dir / LUNG_MAP_FILE
    write_text_atomic(points, json.dumps(markups(detections, f"nodules {ct.series_uid}"), indent=2))
    write_label_map(label_map, ct, detections)
    write_on_grid(lung_map, ct, lungs_of(ct.hu, ct.geometry.spacing).on_grid(ct.hu.shape).view(np.uint8))
    return [points, label_map, lung_map]
