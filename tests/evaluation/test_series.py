"""Scoring series from a data root: its annotations_excluded.csv reaches the score."""

import numpy as np
import torch

from p2ch_app.data.index import ANNOTATIONS_CSV, EXCLUDED_CSV, build_index
from p2ch_app.evaluation.scoring import evaluate, froc
from p2ch_app.evaluation.series import analyze_series
from p2ch_app.inference.pipeline import AnalysisSettings, Models
from tests.inference.test_pipeline import CentreSliceThreshold, CentreVoxelClassifier


def test_a_finding_listed_as_excluded_stops_being_a_false_positive(tiny_root):
    root, uid = tiny_root.root, tiny_root.series[0].uid
    lines = (root / ANNOTATIONS_CSV).read_text().splitlines()
    unannotated = next(i for i, line in enumerate(lines) if line.startswith(uid + ",") and i > 1)
    (root / ANNOTATIONS_CSV).write_text("\n".join(lines[:unannotated] + lines[unannotated + 1:]) + "\n")
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > -400).float()  # the solid spheres
    settings, cpu = AnalysisSettings(keep_outside=True), torch.device("cpu")

    def score():
        (_, detections, scan), = analyze_series(root, build_index(root), [uid], models, settings, cpu)
        return detections, scan

    detections, scan = score()  # series 0's second sphere is no annotation now: a false positive
    assert len(detections) == 2 and len(scan.diameters_mm) == 1 and len(scan.excluded_diameters_mm) == 0
    assert froc([scan])[0].max() == 1
    stray = next(d for d in detections if np.linalg.norm(np.subtract(d.center_xyz, scan.nodules_xyz[0])) > 10)
    (root / EXCLUDED_CSV).write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                     f"{uid},{','.join(str(v + 0.5) for v in stray.center_xyz)},-1\n")
    _, scan = score()
    assert scan.excluded_xyz.tolist() == [[v + 0.5 for v in stray.center_xyz]]
    assert scan.excluded_diameters_mm.tolist() == [-1.0]
    assert froc([scan])[0].max() == 0  # now ignored: no false positive left, the nodule still found
    metrics = evaluate([scan], bootstrap=0)
    assert metrics["ignored_detections"] == 1 and metrics["excluded_findings"] == 1 and metrics["cpm"] == 1.0


def test_series_voxels_read_the_headers_and_give_way_to_equal_shares(tiny_root):
    from p2ch_app.evaluation.series import series_voxels

    root, uids = tiny_root.root, [s.uid for s in tiny_root.series]
    assert series_voxels(root, uids) == [36 * 56 * 56] * 3  # make_tiny_root's CTs
    mhd = tiny_root.series[0].mhd
    mhd.write_text(mhd.read_text().replace("ElementType = MET_SHORT", "ElementType = MET_FLOAT"))
    assert series_voxels(root, uids) is None  # not plain int16 on disk: every series weighs the same
    assert series_voxels(root, ["1.2.3"]) is None  # not on disk at all
