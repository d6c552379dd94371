"""Shared fixtures: tiny hand-made LUNA16 data roots whose contents every test knows exactly."""

from __future__ import annotations

import contextlib
import importlib.util
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import diskcache
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
REAL_DICOM = SHARED / "data" / "real-ct" / "cptac-C3N-00247-lung-3.0-B70f"
REAL_LUNA_CSVS = SHARED / "data" / "luna16"
BOOK_MODELS = SHARED / "models" / "book"

requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent (real CT, LUNA16 CSVs and book models live there)")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda (setup.cfg) skip with a reason where torch sees no CUDA GPU; make gpu-check runs them."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none here); make gpu-check runs these on one")
        for item in marked:
            item.add_marker(skip)


def write_image(path: Path, hu: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@dataclass
class TinySeries:
    uid: str
    mhd: Path
    spacing: tuple[float, float, float]  # xyz
    origin: tuple[float, float, float]
    nodules_irc: list[tuple[int, int, int]]
    radius_vox: int


@dataclass
class TinyRoot:
    root: Path
    series: list[TinySeries]


def make_tiny_root(root: Path, n_series: int = 3, shape=(36, 56, 56), seed: int = 0) -> TinyRoot:
    """n_series CTs of lung-like background with one or two solid spheres each, plus the three CSVs.

    Series i has uid 1.2.840.99.<i+1>, sits in subset<i % 2>, has nodules at known voxels, one class-1
    candidate 1 voxel off its first nodule (merges), one class-1 candidate far away (kept, no
    diameter) in series 0, and four class-0 candidates per series.
    """
    rng = np.random.default_rng(seed)
    made = []
    cand_rows, ann_rows, mal_rows = [], [], []
    for i in range(n_series):
        uid = f"1.2.840.99.{i + 1}"
        spacing = (0.8 + 0.1 * i, 0.8 + 0.1 * i, 1.5)
        origin = (-20.0 * (i + 1), -25.0, -100.0 - 7 * i)
        hu = rng.normal(-850, 15, shape).round().astype(np.int16)
        hu[:, :, :3] = -3024  # outside the reconstruction circle, as in real scans: must clip
        nodules = [(18, 20 + i, 28)] + ([(10, 40, 14)] if i % 2 == 0 else [])
        r = 3
        grid = np.indices(shape)
        for c in nodules:
            inside = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r
            hu[inside] = 40
        mhd = write_image(root / f"subset{i % 2}" / f"{uid}.mhd", hu, spacing, origin)
        made.append(TinySeries(uid, mhd, spacing, origin, nodules, r))
        to_xyz = lambda irc: tuple(o + s * v for o, s, v in zip(origin, spacing, irc[::-1]))
        for k, c in enumerate(nodules):
            x, y, z = to_xyz(c)
            diameter = 2 * r * spacing[0]
            ann_rows.append(f"{uid},{x},{y},{z},{diameter}")
            mal_rows.append(f'{uid},{x},{y},{z},{diameter},{"True" if k == 0 else "False"},"[4, 3]",'
                            f"{x - 2},{y - 2},{z - 2},{x + 2},{y + 2},{z + 2},2")
        x, y, z = to_xyz((nodules[0][0], nodules[0][1] + 1, nodules[0][2]))
        cand_rows.append(f"{uid},{x},{y},{z},1")
        if i == 0:
            x, y, z = to_xyz((5, 5, 50))
            cand_rows.append(f"{uid},{x},{y},{z},1")
        for _ in range(4):
            x, y, z = to_xyz(tuple(int(rng.integers(4, n - 4)) for n in shape))
            cand_rows.append(f"{uid},{x},{y},{z},0")
    cand_rows.append("1.2.840.99.777,1.0,2.0,3.0,0")  # a series that is not on disk
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(cand_rows) + "\n")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "\n".join(ann_rows) + "\n")
    (root / "annotations_with_malignancy.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool,mal_details,bboxLowX,bboxLowY,bboxLowZ,"
        "bboxHighX,bboxHighY,bboxHighZ,len_mal_details\n" + "\n".join(mal_rows) + "\n")
    return TinyRoot(root, made)


@pytest.fixture
def tiny_root(tmp_path) -> TinyRoot:
    return make_tiny_root(tmp_path / "luna")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes, to prove a failed command changed nothing.

    sqlite files (diskcache) change on mere opening, so their records are compared instead.
    """
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and ".db" not in p.name}
    for db in folder.rglob("cache.db"):
        with diskcache.Cache(str(db.parent)) as store:
            for key in store:
                files[f"{db.relative_to(folder)}:{key}"] = pickle.dumps(store[key])
    return files


def small_geometry():
    """The demo anatomy on a coarser grid, so tests run in seconds."""
    from p2ch_app.data.synth import SynthGeometry

    return SynthGeometry(96, (3.2, 3.6), (3.0, 3.5))


@pytest.fixture(scope="session")
def prepared_synth(tmp_path_factory):
    """Six small synthetic series (seed 0) with their luna-prep cache. With val_stride 3 both the
    training and the validation series hold malignant and benign nodules and non-nodules."""
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.index import build_index
    from p2ch_app.data.synth import SynthRun, write_dataset

    root = tmp_path_factory.mktemp("prepared") / "luna"
    write_dataset(root, series=6, subsets=2, seed=0, geometry=small_geometry(), run=SynthRun(progress=False))
    LunaCache(root / "cache", root).build(build_index(root), workers=1, progress=False)
    return root


TINY = ["--epochs", "2", "--epoch-samples", "32", "--batch-size", "16", "--workers", "0", "--val-stride", "3"]


@contextlib.contextmanager
def script_module(name: str):
    """scripts/<name>.py imported as the module <name>, with scripts/ importable as it is when the
    script runs (its sibling scripts); both undone on leaving."""
    scripts = str(PROJECT / "scripts")
    spec = importlib.util.spec_from_file_location(name, PROJECT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up while it is defined
    sys.path.insert(0, scripts)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(scripts)
        del sys.modules[name]


def run(command, args):
    """A click command in this process, every argument as a string."""
    return CliRunner().invoke(command, [str(a) for a in args])


def assert_one_line_error(result, message):
    """A command refused: exit code 2, no traceback, and one error line that contains message."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def only_run_dir(runs: Path, command: str) -> Path:
    dirs = list((runs / command).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def tensorboard_tags(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


def write_ct_dicom(folder: Path, hu: np.ndarray, geometry, series_uid: str = "1.2.826.0.1.3680043.8.498.1001",
                   study_uid: str = "1.2.826.0.1.3680043.8.498.1000", modality: str = "CT") -> list[Path]:
    """A CT (index, row, col) HU array as one DICOM file per slice, with the tags a CT scanner writes
    (CT Image Storage, patient, study, series, frame of reference, equipment, geometry, rescale), so
    DICOM objects derived from it can be validated. The geometry's direction must be axis-aligned
    in-plane rows and columns (any direction matrix whose first two columns are the row and column)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(geometry.direction, float)
    frame_uid = f"{series_uid}.9"
    paths = []
    for k in range(hu.shape[0]):
        position = np.asarray(geometry.origin) + k * geometry.spacing[2] * direction[:, 2]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = modality, "Synthetic", "Phantom 1"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P2CH-0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, k + 1
        ds.SeriesDescription, ds.BodyPartExamined, ds.KVP = "Chest 1.0 B70f", "CHEST", 120
        ds.PositionReferenceIndicator, ds.PatientPosition = "", "FFS"
        ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "20240101", "120000", 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:g}", f"{geometry.spacing[0]:g}"]
        ds.SliceThickness = f"{geometry.spacing[2]:g}"
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = np.ascontiguousarray(hu[k], "<i2").tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def require_program(name: str, package: str) -> str:
    """The path of a program a test needs: skipped with the reason where it is missing, but failed
    under CI=true, where .ci/run installs it."""
    import os
    import shutil

    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found
