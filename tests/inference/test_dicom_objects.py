"""The SEG and SR: valid DICOM (dciodvfy), and read back with highdicom they hold exactly what the
other outputs report: each segment the detection's voxels in candidates.nii.gz, each SR point its
centre, each measurement its value."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_app.data.ct import dicom_series_files, load_ct
from p2ch_app.errors import UserError
from p2ch_app.inference.dicom_objects import SEG_FILE, SR_FILE, objects_for_series, write_objects
from p2ch_app.inference.pipeline import AnalysisSettings, Detection
from p2ch_app.inference.summary import noisy_or, summarize
from p2ch_app.inference.viewer import label_volume, write_viewer_files
from tests.conftest import BOOK_MODELS, REAL_DICOM, require_program, requires_shared, run, write_ct_dicom
from tests.inference.test_pipeline import hand_made_ct


def objects_of(folder, ct, detections, model_paths, settings):
    """objects_for_series with the summary nodule-analyze gives those detections (malignancy scored)."""
    return objects_for_series(folder, ct, detections, summarize(detections, True), model_paths, settings)

def assert_valid_dicom(path: Path) -> None:
    """dciodvfy (dicom3tools) finds no error in the object."""
    checked = subprocess.run([require_program("dciodvfy", "dicom3tools"), str(path)], capture_output=True, text=True)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def assert_objects_match(seg_path: Path | None, sr_path: Path, series_folder: Path, label_map: Path,
                         detections: list[dict]) -> None:
    """The SEG's segments equal the label map's ranks, the SR's groups the detections (dicts with x_mm,
    y_mm, z_mm, diameter_mm, nodule_prob, malignancy_prob), both on the source series' patient and study."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files, _ = dicom_series_files(series_folder)
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # in slice order, as the label map
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_map)))
    sr = hd.sr.srread(sr_path)
    objects = [sr] if seg_path is None else [sr, hd.seg.segread(seg_path)]
    for ds in objects:
        assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID) == (source[0].PatientID, source[0].PatientName,
                                                                       source[0].StudyInstanceUID)
    if seg_path is not None:
        seg = objects[1]
        assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
        assert seg.number_of_segments == len(detections)
        pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source],
                                                   segment_numbers=list(range(1, len(detections) + 1)),
                                                   assert_missing_frames_are_empty=True)
        for rank in range(1, len(detections) + 1):
            assert np.array_equal(pixels[..., rank - 1] > 0, labels == rank), f"segment {rank}"
            assert seg.get_segment_description(rank).segment_label.startswith(f"nodule {rank} p=")
        tracking = [seg.get_segment_description(rank).tracking_uid for rank in range(1, len(detections) + 1)]
    (summary,) = sr.content.get_image_measurement_groups()  # the per-patient summary
    patient = {m.name: m.value for m in summary.get_measurements()}
    assert patient.pop(codes.SCT.NumberOfLesions) == len(detections)
    if detections:
        assert patient.pop(codes.SCT.Diameter) == pytest.approx(max(d["diameter_mm"] for d in detections), abs=1e-6)
    if codes.DCM.ProbabilityOfCancer in patient:  # with a malignancy model: the noisy-OR of the five most probable
        top = sorted(detections, key=lambda d: -d["nodule_prob"])[:5]
        expected = noisy_or([d["malignancy_prob"] for d in top if d["malignancy_prob"] is not None])
        assert patient.pop(codes.DCM.ProbabilityOfCancer) == pytest.approx(expected, abs=1e-6)
    assert not patient
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(detections)
    if seg_path is not None:
        assert [group.tracking_uid for group in groups] == tracking  # each finding paired with its segment
    for group, det in zip(groups, detections):
        assert np.abs(group.roi[0].value - [det["x_mm"], det["y_mm"], det["z_mm"]]).max() <= 0.01
        values = {m.name: m.value for m in group.get_measurements()}
        assert values.pop(codes.SCT.Diameter) == pytest.approx(det["diameter_mm"], abs=1e-6)
        assert values.pop(codes.DCM.Probability) == pytest.approx(det["nodule_prob"], abs=1e-6)
        if det["malignancy_prob"] is not None:
            assert values.pop(codes.DCM.ProbabilityOfCancer) == pytest.approx(det["malignancy_prob"], abs=1e-6)
        assert not values
    evidence = {s.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence}
    assert evidence == {source[0].SeriesInstanceUID, *([objects[1].SeriesInstanceUID] if seg_path else [])}


def record(det: Detection) -> dict:
    return {"x_mm": det.center_xyz[0], "y_mm": det.center_xyz[1], "z_mm": det.center_xyz[2],
            "diameter_mm": det.diameter_mm, "nodule_prob": det.nodule_prob, "malignancy_prob": det.malignancy_prob}


def hand_detections(ct) -> list[Detection]:
    """Three detections of the hand-made CT's nodule: a sphere, a piece partly inside it and one wholly
    inside it (the better rank keeps the shared voxels, as with --split pieces: the last one's segment is empty)."""
    z, y, x = np.indices(ct.hu.shape)
    sphere = np.flatnonzero(((z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 4).ravel())
    piece = np.concatenate([sphere[:3], [10 * 80 * 80 + 40 * 80 + 28]])
    return [Detection((-12.0, 0.0, -64.0), (18.0, 40.0, 28.0), 0.93, 0.61, 3.4, len(sphere), True, sphere),
            Detection((-12.5, 0.25, -80.0), (10.0, 40.25, 27.5), 0.71, None, 1.2, len(piece), True, piece),
            Detection((-12.0, 0.0, -64.0), (18.0, 40.0, 28.0), 0.52, 0.2, 1.0, 2, True, sphere[:2])]


@pytest.fixture
def hand_series(tmp_path):
    ct = hand_made_ct()
    write_ct_dicom(tmp_path / "dcm", ct.hu, ct.geometry)
    return tmp_path / "dcm", load_ct(tmp_path / "dcm")


def test_seg_and_sr_are_valid_and_hold_the_detections(hand_series, tmp_path):
    folder, ct = hand_series
    detections = hand_detections(ct)
    out = tmp_path / "out"
    out.mkdir()
    write_viewer_files(out, ct, detections)
    objects = objects_of(folder, ct, detections, {"seg": None}, AnalysisSettings())
    assert write_objects(out, objects) == [out / SEG_FILE, out / SR_FILE]
    for name in (SEG_FILE, SR_FILE):
        assert_valid_dicom(out / name)
    labels = label_volume(ct, detections)
    assert (labels == 2).sum() == 1 and (labels == 3).sum() == 0  # shared voxels went to rank 1
    assert_objects_match(out / SEG_FILE, out / SR_FILE, folder, out / "candidates.nii.gz",
                         [record(d) for d in detections])


def test_uids_follow_the_series_models_and_settings(hand_series, tmp_path):
    folder, ct = hand_series
    detections = hand_detections(ct)
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    uids = lambda objects: [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for _, ds in objects.named()]
    first = uids(objects_of(folder, ct, detections, {"seg": model}, AnalysisSettings()))
    assert uids(objects_of(folder, ct, detections, {"seg": model}, AnalysisSettings())) == first
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(model, moved)
    assert uids(objects_of(folder, ct, detections, {"seg": moved}, AnalysisSettings(batch_size=2))) == first
    other = [uids(objects_of(folder, ct, detections, {"seg": model}, AnalysisSettings(threshold=0.6)))]
    model.write_bytes(b"other weights")
    other.append(uids(objects_of(folder, ct, detections, {"seg": model}, AnalysisSettings())))
    assert all(set(first).isdisjoint(o) for o in other) and len(set(sum(other, []))) == 4
    assert len({u for pair in first for u in pair}) == 4


def test_no_detections_give_an_sr_alone(hand_series, tmp_path):
    folder, ct = hand_series
    objects = objects_of(folder, ct, [], {}, AnalysisSettings())
    paths = write_objects(tmp_path, objects)
    assert paths == [tmp_path / SR_FILE]
    assert_valid_dicom(tmp_path / SR_FILE)
    write_viewer_files(tmp_path, ct, [])
    assert_objects_match(None, tmp_path / SR_FILE, folder, tmp_path / "candidates.nii.gz", [])


def test_headers_of_another_series_are_refused(hand_series, tmp_path):
    folder, ct = hand_series
    shifted = hand_made_ct()
    shifted.geometry.origin[2] += 1.0
    write_ct_dicom(tmp_path / "other", shifted.hu, shifted.geometry)
    with pytest.raises(UserError, match="do not match CT"):
        objects_of(tmp_path / "other", ct, [], {}, AnalysisSettings())


def book_models() -> list:
    return ["--seg-model", next(BOOK_MODELS.glob("seg_*.state")), "--cls-model", next(BOOK_MODELS.glob("cls_*.state"))]


def analyse_folder(folder: Path, tmp_path: Path, *extra) -> list[dict]:
    """nodule-analyze --ct folder --report with the book's models (the classifier also standing in as a
    malignancy model); the SEG and SR it writes are checked against its label map and detections."""
    from p2ch_app.cli import analyze

    report, output = tmp_path / "report", tmp_path / "out.json"
    result = run(analyze, ["--ct", folder, *book_models(), "--mal-model", next(BOOK_MODELS.glob("cls_*.state")),
                           "--runs-dir", tmp_path, "--report", report, "--output", output, *extra])
    assert result.exit_code == 0, result.output
    detections = json.loads(output.read_text())["detections"]
    seg = report / SEG_FILE if detections else None
    for path in (seg, report / SR_FILE):
        if path is not None:
            assert_valid_dicom(path)
    assert_objects_match(seg, report / SR_FILE, folder, report / "candidates.nii.gz", detections)
    return detections


@requires_shared
def test_a_synthetic_dicom_series_analysed_with_the_book_models(prepared_synth, tmp_path):
    mhd = sorted(prepared_synth.glob("subset*/*.mhd"))[0]
    ct = load_ct(mhd)
    write_ct_dicom(tmp_path / "dcm", ct.hu, ct.geometry)
    detections = analyse_folder(tmp_path / "dcm", tmp_path, "--threshold", 0.001)
    assert detections and all(d["malignancy_prob"] is not None for d in detections)


@requires_shared
def test_the_real_ct_analysed_with_the_book_models(tmp_path):
    """The 32 slices of the real CT around its two surest candidates (slice 31), as deep as a classifier
    crop (a shallower CT gets crops padded off-centre): a scanner's own headers."""
    files, _ = dicom_series_files(REAL_DICOM)
    (tmp_path / "dcm").mkdir()
    for f in files[15:47]:
        shutil.copy(f, tmp_path / "dcm")
    assert len(analyse_folder(tmp_path / "dcm", tmp_path, "--keep-outside", "--threshold", 0.9)) >= 2
