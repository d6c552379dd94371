"""CT volumes: loading from LUNA series UIDs or files, patient-mm <-> voxel geometry, crops.

Array axes are always (index, row, col) = (z, y, x) as SimpleITK returns them; patient
coordinates are always (x, y, z) millimetres in the scanner's (LPS) frame, as LUNA16 CSVs use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch_app.errors import UserError

HU_MIN, HU_MAX = -1000, 1000
CROP_SIZE = (32, 48, 48)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the voxel grid sits in the patient: ITK's origin, spacing and direction (all xyz)."""

    origin: np.ndarray  # (3,) mm, centre of voxel (0, 0, 0)
    spacing: np.ndarray  # (3,) mm between voxel centres along col, row, index
    direction: np.ndarray  # (3, 3); column k is the patient-space direction of array axis x/y/z

    @classmethod
    def from_image(cls, image: sitk.Image) -> Geometry:
        return cls(np.array(image.GetOrigin(), float), np.array(image.GetSpacing(), float),
                   np.array(image.GetDirection(), float).reshape(3, 3))

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(np.array(d["origin"], float), np.array(d["spacing"], float),
                   np.array(d["direction"], float).reshape(3, 3))

    def to_dict(self) -> dict:
        return {"origin": self.origin.tolist(), "spacing": self.spacing.tolist(),
                "direction": self.direction.reshape(-1).tolist()}

    @cached_property
    def inverse_direction(self) -> np.ndarray:
        return np.linalg.inv(self.direction)


def xyz_to_irc(xyz, geometry: Geometry) -> np.ndarray:
    """Patient mm (..., 3) -> continuous array indices (..., 3) as (index, row, col)."""
    offset = np.asarray(xyz, float) - geometry.origin
    cri = offset @ geometry.inverse_direction.T / geometry.spacing
    return cri[..., ::-1]


def irc_to_xyz(irc, geometry: Geometry) -> np.ndarray:
    """Array indices (..., 3) as (index, row, col) -> patient mm (..., 3) as (x, y, z)."""
    cri = np.asarray(irc, float)[..., ::-1]
    return geometry.origin + (cri * geometry.spacing) @ geometry.direction.T


@dataclass(eq=False)
class CtVolume:
    """A CT in HU, clipped to [HU_MIN, HU_MAX] and stored as int16 (index, row, col)."""

    hu: np.ndarray
    geometry: Geometry
    series_uid: str

    def contains(self, irc) -> np.ndarray:
        return inside(self.hu.shape, irc)


def inside(shape, irc) -> np.ndarray:
    """Whether continuous indices (..., 3) fall inside a volume of this shape (rounded to the nearest voxel)."""
    idx = np.rint(np.asarray(irc, float))
    return np.all((idx >= 0) & (idx < np.array(shape)), axis=-1)


def nearest_voxels(centers_xyz, geometry: Geometry, shape) -> np.ndarray:
    """The nearest voxel (index, row, col) of each centre that falls inside a volume of this shape."""
    irc = xyz_to_irc(centers_xyz, geometry).reshape(-1, 3)
    return np.rint(irc[inside(shape, irc)]).astype(np.int64)


def check_uid(uid: str) -> str:
    """Refuse anything but a DICOM-style UID, so a UID can never act as a path or a glob."""
    if not _UID_RE.fullmatch(uid or ""):
        raise UserError(f"'{uid}' is not a series UID: UIDs hold only digits and dots "
                        "(e.g. 1.3.6.1.4.1.14519.5.2.1.6279.6001.1001); pass a UID, or a file with --ct")
    return uid


def series_on_disk(data_root: Path) -> dict[str, Path]:
    """Every LUNA series present as subset*/<uid>.mhd under the data root, by UID."""
    found = {}
    for mhd in sorted(Path(data_root).glob("subset*/*.mhd")):
        if _UID_RE.fullmatch(mhd.stem):
            found[mhd.stem] = mhd
    return found


def find_series(data_root: Path, uid: str) -> Path:
    check_uid(uid)
    hits = sorted(Path(data_root).glob(f"subset*/{uid}.mhd"))
    if not hits:
        raise UserError(f"series {uid} is not on disk: no subset*/{uid}.mhd under {data_root}; "
                        "check the UID or --data-root")
    return hits[0]


def load_series(data_root: Path, uid: str) -> CtVolume:
    """Load a LUNA series by UID from <data_root>/subset*/<uid>.mhd."""
    return load_ct(find_series(data_root, uid), series_uid=uid)


def load_ct(path: Path, series_uid: str | None = None) -> CtVolume:
    """Load .mhd/.mha, .nii/.nii.gz or a DICOM series folder (slices ordered by position)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"CT not found: {path}; pass an existing .mhd/.mha/.nii/.nii.gz file or DICOM folder")
    if path.is_dir():
        image, uid = _read_dicom_folder(path)
    else:
        name = path.name.lower()
        if not name.endswith((".mhd", ".mha", ".nii", ".nii.gz")):
            raise UserError(f"unsupported CT file {path}: use .mhd/.mha, .nii/.nii.gz or a DICOM folder")
        if name.endswith(".mhd"):
            _check_mhd_data(path)
        image = _sitk_read(lambda: sitk.ReadImage(str(path)), path)
        uid = path.name.split(".nii")[0] if ".nii" in name else path.stem
    if image.GetDimension() != 3:
        raise UserError(f"{path} is a {image.GetDimension()}D image; a CT must be 3D")
    hu = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.int16, copy=False)  # int16 input: a single copy
    return CtVolume(hu, Geometry.from_image(image), series_uid or uid)


def _sitk_read(read, path: Path) -> sitk.Image:
    try:
        return read()
    except RuntimeError as err:
        detail = " ".join(str(err).split())[-160:]
        raise UserError(f"cannot read CT {path} ({detail}); check that the file is complete") from None


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, str]:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise UserError(f"no DICOM images in {folder}; pass a folder holding one series' .dcm files")
    if len(series_ids) > 1:
        raise UserError(f"{folder} holds {len(series_ids)} DICOM series; put each series in its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])  # sorted by position
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _sitk_read(reader.Execute, folder), series_ids[0]


def _check_mhd_data(mhd: Path) -> None:
    """Catch a missing or truncated .raw before SimpleITK does, with a message a user can act on."""
    header = {}
    for line in mhd.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    data_file = header.get("ElementDataFile")
    if data_file is None:
        raise UserError(f"{mhd} has no ElementDataFile line; it is not a MetaImage header")
    if data_file == "LOCAL" or data_file.startswith("LIST") or " " in data_file:
        return
    raw = mhd.parent / data_file
    if not raw.is_file():
        raise UserError(f"{mhd} names data file {raw.name}, which is missing; copy the .raw next to the .mhd")
    if header.get("CompressedData", "False").lower() == "true":
        return
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        nbytes = _MET_BYTES[header["ElementType"]] * int(header.get("ElementNumberOfChannels", 1))
    except (KeyError, ValueError):
        raise UserError(f"{mhd} has a bad DimSize or ElementType line; re-export the MetaImage") from None
    expected = int(np.prod(dims)) * nbytes + max(int(header.get("HeaderSize", 0)), 0)
    actual = raw.stat().st_size
    if actual < expected:
        raise UserError(f"{raw} is truncated ({actual} of {expected} bytes); copy or download it again")


def crop_starts(shape, centers_irc, size=CROP_SIZE) -> np.ndarray:
    """First voxel of each size-shaped crop centred on centers_irc (..., 3), shifted inside the volume."""
    size = np.asarray(size)
    starts = np.rint(np.asarray(centers_irc, float)).astype(np.int64) - size // 2
    return np.clip(starts, 0, np.maximum(np.asarray(shape) - size, 0))


def extract_crop(volume: np.ndarray, center_irc, size=CROP_SIZE, fill: int = HU_MIN):
    """A fixed-size crop around a point, copied out of the volume; returns (crop, start_irc).

    The crop is shifted to stay inside the volume; only a volume smaller than the crop is padded
    (with fill), so every crop has exactly `size`.
    """
    start = crop_starts(volume.shape, center_irc, size)
    crop = np.array(volume[tuple(slice(s, s + n) for s, n in zip(start, size))])  # a copy: owns its memory
    if crop.shape != tuple(size):
        crop = np.pad(crop, [(0, n - c) for n, c in zip(size, crop.shape)], constant_values=fill)
    return crop, start


def gather_crops(volume: np.ndarray, centers_irc, size=CROP_SIZE, fill: int = HU_MIN) -> np.ndarray:
    """(N, *size) crops, each exactly what extract_crop gives for its centre, taken at once from the
    volume's sliding-window view: whole blocks are copied, 4x faster than a voxel-by-voxel gather."""
    short = [max(0, n - s) for n, s in zip(size, volume.shape)]
    if any(short):  # only a volume smaller than the crop: padded after its end, as extract_crop does
        volume = np.pad(volume, [(0, k) for k in short], constant_values=fill)
    starts = crop_starts(volume.shape, np.asarray(centers_irc, float).reshape(-1, 3), size)
    return np.lib.stride_tricks.sliding_window_view(volume, size)[starts[:, 0], starts[:, 1], starts[:, 2]]


def slice_stack(volume: np.ndarray, index: int, context: int, rows: slice = slice(None),
                cols: slice = slice(None)) -> np.ndarray:
    """Slices index-context .. index+context (beyond the volume the edge slice repeats), cut to
    rows x cols: the segmentation input for one centre slice, read from a memory map without
    touching the rest of the volume."""
    return np.asarray(volume[context_slices(index, index + 1, context, volume.shape[0]), rows, cols])


def context_slices(start: int, stop: int, context: int, depth: int) -> np.ndarray:
    """Slice numbers start-context .. stop-1+context of a depth-slice volume, the edge slice
    standing in for those beyond it: the slices that centre slices start..stop-1 see."""
    return np.clip(np.arange(start - context, stop + context), 0, depth - 1)
