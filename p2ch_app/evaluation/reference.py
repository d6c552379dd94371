"""Our candidates beside a reference list of candidates of the same CT: the book's own pipeline run on
the real CT (../shared/data/reference) in the golden tests and `make gpu-check`. Both lists are CSVs with
x_mm, y_mm, z_mm, index, row, col, voxels and nodule_prob columns (nodule-analyze --output writes them)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree


def read_candidates(path: Path) -> dict[str, np.ndarray]:
    """A candidate CSV as arrays: xyz (patient mm), irc (voxel index, row, col), voxels, prob."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"xyz": np.array([[float(r[k]) for k in ("x_mm", "y_mm", "z_mm")] for r in rows]).reshape(-1, 3),
            "irc": np.array([[float(r[k]) for k in ("index", "row", "col")] for r in rows]).reshape(-1, 3),
            "voxels": np.array([int(r["voxels"]) for r in rows], int),
            "prob": np.array([float(r["nodule_prob"]) for r in rows], float)}


def match(ours: np.ndarray, theirs: np.ndarray, tolerance_mm: float = 0.01) -> np.ndarray:
    """For each of theirs, the index of our nearest candidate when it lies within tolerance_mm; -1 where none does."""
    if len(ours) == 0:
        return np.full(len(theirs), -1)
    distance, nearest = cKDTree(ours).query(theirs)
    return np.where(distance <= tolerance_mm, nearest, -1)


@dataclass(frozen=True)
class Comparison:
    """How a candidate list agrees with the reference; centres, voxels and probabilities over matched pairs."""

    reference: int  # candidates in the reference
    ours: int
    unmatched: int  # reference candidates with none of ours within the tolerance
    one_to_one: bool  # no candidate of ours matched twice
    voxels_equal: bool
    max_centre_mm: float
    max_prob_diff: float
    reference_detections: int  # reference candidates above the threshold
    our_detections: int
    lost_detections: int  # reference detections whose match is missing or not above the threshold
    extra_detections: int  # our detections that match no reference detection

    def exact(self, prob_tolerance: float = 1e-4) -> bool:
        """The same candidates one to one, with equal voxel counts and probabilities within prob_tolerance."""
        return (self.ours == self.reference and self.unmatched == 0 and self.one_to_one and self.voxels_equal
                and self.max_prob_diff <= prob_tolerance)


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], tolerance_mm: float = 0.01,
            threshold: float = 0.5) -> Comparison:
    """Each reference candidate paired with our nearest one within tolerance_mm (read_candidates' arrays)."""
    matched = match(ours["xyz"], reference["xyz"], tolerance_mm)
    found = matched >= 0
    pairs = matched[found]
    gaps = np.linalg.norm(ours["xyz"][pairs] - reference["xyz"][found], axis=1)
    detected = reference["prob"] > threshold
    hit = np.zeros(len(ours["prob"]), bool)
    hit[matched[detected & found]] = True
    ours_detected = ours["prob"] > threshold
    kept = found & detected
    kept[kept] = ours_detected[matched[kept]]
    return Comparison(
        reference=len(reference["xyz"]), ours=len(ours["xyz"]), unmatched=int((~found).sum()),
        one_to_one=len(np.unique(pairs)) == len(pairs),
        voxels_equal=bool(np.array_equal(ours["voxels"][pairs], reference["voxels"][found])),
        max_centre_mm=float(gaps.max(initial=0.0)),
        max_prob_diff=float(np.abs(ours["prob"][pairs] - reference["prob"][found]).max(initial=0.0)),
        reference_detections=int(detected.sum()), our_detections=int(ours_detected.sum()),
        lost_detections=int((detected & ~kept).sum()), extra_detections=int((ours_detected & ~hit).sum()))
