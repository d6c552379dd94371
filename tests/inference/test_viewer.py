"""The viewer files read back: the 3D Slicer point list and the label maps, from detections of the real
pipeline (stand-in models) on a hand-made CT with an oblique, rotated grid."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_app.data.ct import CtVolume, load_ct
from p2ch_app.errors import UserError
from p2ch_app.inference.lungs import lungs_of
from p2ch_app.inference.pipeline import AnalysisSettings, Detection, Models, analyze
from p2ch_app.inference.viewer import LABEL_MAP_FILE, LUNG_MAP_FILE, MARKUPS_FILE, label_volume, write_viewer_files
from tests.conftest import write_image
from tests.inference.test_pipeline import CentreSliceThreshold, CentreVoxelClassifier

SPACING, ORIGIN = (0.8, 0.7, 2.0), (-31.7, 12.3, -140.9)
# 90 degrees about z after 10 degrees about x: the grid's axes are no patient axes
_TILT = np.radians(10)
DIRECTION = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(_TILT), -np.sin(_TILT)], [0, np.sin(_TILT), np.cos(_TILT)]])
# (centre irc, radius in voxels, HU): denser spheres get higher nodule probabilities. Their crops lie
# inside the CT, so the stand-in classifier's centre voxel is theirs.
SPHERES = [((18, 40, 28), 3, 600), ((24, 32, 26), 2, 300), ((30, 48, 30), 2.5, 150)]


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> CtVolume:
    z, y, x = np.indices((48, 80, 80))
    hu = np.full(z.shape, -1000, np.int16)
    hu[((y - 40) / 30) ** 2 + ((x - 40) / 35) ** 2 <= 1] = 40  # the body
    hu[((y - 40) / 15) ** 2 + ((x - 28) / 10) ** 2 <= 1] = -850  # a lung
    for (ci, cr, cc), radius, value in SPHERES:
        hu[(z - ci) ** 2 + (y - cr) ** 2 + (x - cc) ** 2 <= radius ** 2] = value
    path = write_image(tmp_path_factory.mktemp("ct") / "1.2.840.99.5.mhd", hu, SPACING, ORIGIN, DIRECTION.ravel())
    return load_ct(path)


@pytest.fixture(scope="module")
def detections(ct) -> list[Detection]:
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 100).float()
    found = analyze(ct, models, AnalysisSettings(threshold=0.5))
    assert len(found) == 3 and all(d.voxel_index is not None for d in found)
    return found


@pytest.fixture(scope="module")
def written(tmp_path_factory, ct, detections):
    out = tmp_path_factory.mktemp("report")
    return out, write_viewer_files(out, ct, detections)


def test_markups_point_list_round_trips_to_the_detections(written, detections):
    out, paths = written
    assert paths == [out / MARKUPS_FILE, out / LABEL_MAP_FILE, out / LUNG_MAP_FILE] and sorted(
        p.name for p in out.iterdir()) == sorted([MARKUPS_FILE, LABEL_MAP_FILE, LUNG_MAP_FILE])  # no temporaries left
    document = json.loads((out / MARKUPS_FILE).read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = document["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert markup["display"]["pointLabelsVisibility"] is True
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == [f"{rank} p={d.nodule_prob:.2f}" for rank, d in enumerate(detections, 1)]
    assert [p["label"] for p in points][:2] == ["1 p=1.00", "2 p=0.95"]  # sigmoid(6), sigmoid(3)
    for point, det in zip(points, detections):
        assert point["position"] == pytest.approx(det.center_xyz, abs=1e-3)
        assert point["positionStatus"] == "defined" and point["id"].isdigit()


def test_label_map_has_the_cts_geometry_and_the_candidates_voxels(written, ct, detections):
    out, _ = written
    image = sitk.ReadImage(str(out / LABEL_MAP_FILE))
    assert image.GetSize() == ct.hu.shape[::-1]
    # NIfTI stores the grid in float32: equal to that precision
    assert image.GetOrigin() == pytest.approx(tuple(ct.geometry.origin), abs=1e-4)
    assert image.GetSpacing() == pytest.approx(tuple(ct.geometry.spacing), abs=1e-6)
    assert image.GetDirection() == pytest.approx(tuple(ct.geometry.direction.ravel()), abs=1e-6)
    assert ct.geometry.direction.ravel() == pytest.approx(DIRECTION.ravel(), abs=1e-6)  # the CT kept its tilt
    labels = sitk.GetArrayFromImage(image)
    assert labels.dtype == np.uint8
    counts = np.bincount(labels.ravel(), minlength=len(detections) + 1)
    assert counts[1:].tolist() == [d.voxels for d in detections] and counts.sum() == labels.size
    for rank, det in enumerate(detections, 1):
        assert np.array_equal(np.flatnonzero(labels == rank), np.sort(det.voxel_index))
        # each point sits on its finding: ITK's own mm -> voxel mapping lands on the detection's label
        assert labels[image.TransformPhysicalPointToIndex(det.center_xyz)[::-1]] == rank


def test_shared_voxels_go_to_the_better_rank_and_foreign_voxels_are_refused(ct, detections):
    overlapping = [detections[1], Detection(*[getattr(detections[0], f) for f in (
        "center_xyz", "center_irc", "nodule_prob", "malignancy_prob", "diameter_mm", "voxels", "inside_body")],
        voxel_index=np.concatenate([detections[0].voxel_index, detections[1].voxel_index[:3]]))]
    labels = label_volume(ct, overlapping).ravel()
    assert (labels[detections[1].voxel_index] == 1).all() and (labels[detections[0].voxel_index] == 2).all()
    made_by_hand = Detection((0.0, 0.0, 0.0), (18.0, 40.0, 28.0), 0.9, None, 6.0, 10, True)
    assert not label_volume(ct, [made_by_hand]).any()
    stray = Detection((0.0, 0.0, 0.0), (18.0, 40.0, 28.0), 0.9, None, 6.0, 1, True, voxel_index=np.array([ct.hu.size]))
    with pytest.raises(UserError, match="outside CT 1.2.840.99.5"):
        label_volume(ct, [stray])


def test_many_detections_get_a_wider_label_type(ct, detections):
    many = [Detection(*[getattr(detections[0], f) for f in (
        "center_xyz", "center_irc", "nodule_prob", "malignancy_prob", "diameter_mm", "voxels", "inside_body")],
        voxel_index=np.array([k])) for k in range(300)]
    labels = label_volume(ct, many)
    assert labels.dtype == np.uint16 and labels.ravel()[:300].tolist() == list(range(1, 301))


def test_lung_map_is_the_lung_mask_on_the_cts_grid(written, ct):
    """Its lung is far too small to pass for one (test_lungs.py has real ones): the map is all 0, on the
    CT's grid; a mask that is found lands on it voxel for voxel."""
    out, _ = written
    image = sitk.ReadImage(str(out / LUNG_MAP_FILE))
    assert image.GetSize() == ct.hu.shape[::-1] and image.GetSpacing() == pytest.approx(tuple(ct.geometry.spacing))
    assert image.GetDirection() == pytest.approx(tuple(ct.geometry.direction.ravel()), abs=1e-6)
    lungs = lungs_of(ct.hu, ct.geometry.spacing)
    assert not lungs.found and np.array_equal(sitk.GetArrayFromImage(image), lungs.on_grid(ct.hu.shape))
