"""The detections as DICOM objects a PACS keeps beside the CT: a binary Segmentation (SEG) and a
Comprehensive 3D SR following TID 1500 (Measurement Report).

Both are built with highdicom from the source series' own headers, so they carry its patient, study
and frame of reference and reference its instances. Each segment holds exactly the voxels that
candidates.nii.gz gives the detection (viewer.label_volume, the one place they are decided). Their
UIDs are derived from the source series UID, the model files and the analysis settings, not drawn at
random: a rerun yields the same objects under the same UIDs, so storing them again replaces nothing
and duplicates nothing in a PACS.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

import p2ch_app
from p2ch_app.data.ct import CtVolume, dicom_series_files, xyz_to_irc
from p2ch_app.errors import UserError
from p2ch_app.files import write_atomic
from p2ch_app.inference.viewer import label_volume, point_label

if TYPE_CHECKING:
    from pydicom import Dataset

    from p2ch_app.inference.pipeline import AnalysisSettings, Detection
    from p2ch_app.inference.summary import PatientSummary

SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002  # high, so the viewers list them after the scanner's series
MANUFACTURER, MODEL_NAME = "p2ch_app", "nodule-analyze"
NO_UNITS = ("1", "UCUM", "no units")
MILLIMETRE = ("mm", "UCUM", "millimeter")
# NAMESPACE_OID seeds the UUIDs behind the derived UIDs ("2.25." + the UUID as an integer, DICOM PS3.5 B.2)
_UID_NAMESPACE = uuid.NAMESPACE_OID


@dataclass(frozen=True)
class DicomObjects:
    """The SEG (None when nothing was detected: a SEG holds at least one segment) and the SR."""

    seg: Dataset | None
    sr: Dataset

    def named(self) -> list[tuple[str, Dataset]]:
        return [(name, ds) for name, ds in ((SEG_FILE, self.seg), (SR_FILE, self.sr)) if ds is not None]


def derivation_key(series_uid: str, model_paths: dict, settings: AnalysisSettings) -> str:
    """What the objects follow from: the source series, the models' bytes (not their paths: the same
    model copied elsewhere gives the same objects) and the analysis settings that decide the findings
    (not batch_size, which only sets how many crops run at once)."""
    digest = hashlib.sha256(series_uid.encode())
    for role in sorted(model_paths):
        path = model_paths[role]
        digest.update(f"|{role}=".encode())
        if path is not None:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    decisive = {name: value for name, value in asdict(settings).items() if name != "batch_size"}
    digest.update(repr(sorted(decisive.items())).encode())
    return digest.hexdigest()


def derived_uid(key: str, role: str) -> str:
    """A UID that is a function of the derivation key and what it names (e.g. "seg-series")."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{key}/{role}').int}"


def read_source_headers(files: list[Path], ct: CtVolume) -> list[Dataset]:
    """The source series' headers (no pixel data), ordered as the CT's slices: slice k's header is the
    one whose position lies on slice k. Refuses headers that do not make up this CT, slice for slice."""
    import pydicom

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    slices = np.full(len(headers), -1)
    for k, ds in enumerate(headers):
        irc = xyz_to_irc([float(v) for v in ds.ImagePositionPatient], ct.geometry)
        if np.abs(irc[1:]).max() < 0.01 and abs(irc[0] - round(irc[0])) < 0.01:
            slices[k] = round(irc[0])
    if sorted(slices.tolist()) != list(range(ct.hu.shape[0])):
        raise UserError(f"the DICOM headers of {len(files)} files do not match CT {ct.series_uid} slice for slice; "
                        "pass the series folder the CT was read from")
    return [headers[k] for k in np.argsort(slices)]


@contextlib.contextmanager
def _names_as_written() -> Iterator[None]:
    """highdicom warns of a one-part patient name (e.g. an ID, as anonymisers write); it is the scan's
    own and copied as it is, so the user has nothing to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The string .* is unlikely to represent the intended person name")
        yield


def _algorithm():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=MODEL_NAME, family=codes.cid7162.ArtificialIntelligence,
                                              version=p2ch_app.__version__)


def build_seg(sources: list[Dataset], ct: CtVolume, detections: list[Detection], key: str) -> Dataset | None:
    """Binary SEG: segment k holds the voxels of rank k in the label map, labelled with rank and
    probability. None without detections."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not detections:
        return None
    # the label map itself, segment number = rank: segments cannot overlap in it, and highdicom reads it
    # frame by frame, where one boolean mask per detection would take depth x rows x columns bytes each
    labels = label_volume(ct, detections)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=rank, segment_label=f"nodule {point_label(rank, det)}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(), tracking_uid=derived_uid(key, f"finding-{rank}"),
        tracking_id=f"nodule {rank}") for rank, det in enumerate(detections, 1)]
    with _names_as_written():
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=derived_uid(key, "seg-series"),
            series_number=SEG_SERIES_NUMBER, sop_instance_uid=derived_uid(key, "seg-instance"), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME, software_versions=p2ch_app.__version__,
            device_serial_number="1", series_description="nodule-analyze nodules (SEG)",
            content_label="NODULES", content_description="Nodule candidates, one segment per reported detection")


def _measurement(name, value: float, unit):
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=value, unit=hd.sr.CodedConcept(*unit), algorithm_id=None)


def _finding_group(sources: list[Dataset], det: Detection, rank: int, key: str):
    """TID 1411 for one detection: its centre as a SCOORD3D point, diameter and probabilities. Its
    tracking UID is that of the detection's segment in the SEG, which pairs the two for a viewer."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    first = sources[0]
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=np.array([det.center_xyz], float),
        frame_of_reference_uid=first.FrameOfReferenceUID,
        source_series=hd.sr.SourceSeriesForSegmentation(first.SeriesInstanceUID))
    measurements = [_measurement(codes.SCT.Diameter, det.diameter_mm, MILLIMETRE),
                    _measurement(codes.DCM.Probability, det.nodule_prob, NO_UNITS)]
    if det.malignancy_prob is not None:
        measurements.append(_measurement(codes.DCM.ProbabilityOfCancer, det.malignancy_prob, NO_UNITS))
    tracking = hd.sr.TrackingIdentifier(uid=derived_uid(key, f"finding-{rank}"),
                                        identifier=f"nodule {point_label(rank, det)}")
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_volume_surface=surface, finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)], measurements=measurements,
        algorithm_id=hd.sr.AlgorithmIdentification(MODEL_NAME, p2ch_app.__version__))


def _summary_group(summary: PatientSummary, key: str):
    """TID 1501 for the patient as a whole, the per-patient summary: the number of nodules reported, the
    largest one's diameter and, with a malignancy model, the patient's malignancy score. The size
    category is the largest diameter's Lung-RADS band (summary.size_category)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements = [_measurement(codes.SCT.NumberOfLesions, summary.detections, NO_UNITS)]
    if summary.largest_diameter_mm is not None:
        measurements.append(_measurement(codes.SCT.Diameter, summary.largest_diameter_mm, MILLIMETRE))
    if summary.malignancy_score is not None:
        measurements.append(_measurement(codes.DCM.ProbabilityOfCancer, summary.malignancy_score, NO_UNITS))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(key, "summary"), identifier="patient summary"),
        finding_type=codes.SCT.Nodule, measurements=measurements,
        algorithm_id=hd.sr.AlgorithmIdentification(MODEL_NAME, p2ch_app.__version__))


def build_sr(sources: list[Dataset], seg: Dataset | None, detections: list[Detection], summary: PatientSummary,
             key: str) -> Dataset:
    """Comprehensive 3D SR, TID 1500: a group for the patient (_summary_group), then one per detection in
    rank order; its evidence is the source series and the SEG."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    groups = [_summary_group(summary, key), *(_finding_group(sources, det, rank, key)
                                                 for rank, det in enumerate(detections, 1))]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(key, "device"), name=MODEL_NAME, manufacturer_name=MANUFACTURER,
            model_name=p2ch_app.__version__))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("24627-2", "LN", "CT Chest"), imaging_measurements=groups)
    with _names_as_written():
        return hd.sr.Comprehensive3DSR(
            evidence=[*sources, *([seg] if seg is not None else [])], content=report[0],
            series_instance_uid=derived_uid(key, "sr-series"), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=derived_uid(key, "sr-instance"), instance_number=1, manufacturer=MANUFACTURER,
            is_complete=True, series_description="nodule-analyze nodules (SR)")


def build_objects(sources: list[Dataset], ct: CtVolume, detections: list[Detection], summary: PatientSummary,
                  key: str) -> DicomObjects:
    seg = build_seg(sources, ct, detections, key)
    return DicomObjects(seg, build_sr(sources, seg, detections, summary, key))


def objects_for_series(folder: Path, ct: CtVolume, detections: list[Detection], summary: PatientSummary,
                       model_paths: dict, settings: AnalysisSettings) -> DicomObjects:
    """The SEG and SR of detections found in CT ct (and their per-patient summary), read from the DICOM
    series in folder."""
    files, _ = dicom_series_files(folder)
    sources = read_source_headers([Path(f) for f in files], ct)
    key = derivation_key(sources[0].SeriesInstanceUID, model_paths, settings)
    return build_objects(sources, ct, detections, summary, key)


def write_objects(out_dir: Path, objects: DicomObjects) -> list[Path]:
    """seg.dcm (when there is one) and sr.dcm in out_dir, each written atomically; returns their paths."""
    paths = []
    for name, ds in objects.named():
        write_atomic(Path(out_dir) / name, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
        paths.append(Path(out_dir) / name)
    return paths
