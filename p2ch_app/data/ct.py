"""CT volumes: loading from LUNA series UIDs or files, patient-mm <-> voxel geometry, crops.

Array axes are always (index, row, col) = (z, y, x) as SimpleITK returns them; patient
coordinates are always (x, y, z) millimetres in the scanner's (LPS) frame, as LUNA16 CSVs use.
"""

from __future__ import annotations

import functools
import math
import os
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2ch_app.errors import UserError, brief

HU_MIN, HU_MAX = -1000, 1000
CROP_SIZE = (32, 48, 48)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_CHARS = 64  # DICOM PS3.5 section 9.1

MAX_CT_VOXELS_ENV = "P2CH_MAX_CT_VOXELS"
# 2**31 voxels (4 GiB as int16) is twice a 1024x1024 matrix at 1,000 thin slices, far beyond any chest
# CT (LUNA16's largest is 512x512x764), yet a header claiming more is refused before ITK tries to
# allocate it. A user with a larger scan raises it through the environment variable.
DEFAULT_MAX_CT_VOXELS = 2**31

_ITK_PREFIX = re.compile(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?")
_REASON_CHARS = 200
_MAX_HEADER_BYTES = 1 << 20  # a MetaImage header is a few hundred bytes of text
_ZLIB_OR_GZIP = 32 + zlib.MAX_WBITS  # zlib accepts either header
_GZIP_MAGIC = b"\x1f\x8b"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_CHUNK_BYTES = 1 << 16  # compressed bytes per step: at most ~64 MiB inflated at once
_SAME_POSITION_MM = 1e-3  # DICOM positions are written to about 1e-4 mm
_SAME_ORIENTATION = 1e-3  # direction cosines
_DICOM_TAGS = {"0020|0032": "ImagePositionPatient", "0020|0037": "ImageOrientationPatient", "0028|0010": "Rows",
               "0028|0011": "Columns", "0028|0100": "BitsAllocated", "0028|0008": "NumberOfFrames"}
_STEP_TOLERANCE = 0.1  # of the slice step: rounding passes, a missing or repeated slice (100%) does not


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

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """from_image's inverse: image placed on this grid in the patient (origin, spacing, direction)."""
        image.SetOrigin([float(v) for v in self.origin])
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetDirection([float(v) for v in np.asarray(self.direction).reshape(-1)])
        return image

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


def check_uid(uid: str, what: str = "series") -> str:
    """Refuse anything but a DICOM-style UID, so a UID can never act as a path or a glob. what: the
    kind of UID expected (series, study), as the message names it."""
    uid = uid or ""
    if not _is_uid(uid):
        too_long = len(uid) > UID_MAX_CHARS
        shown = f"{uid[:24]!r}... ({len(uid):,} characters)" if too_long else repr(uid)
        rule = f"DICOM UIDs are at most {UID_MAX_CHARS} characters" if too_long else "UIDs hold only digits and dots"
        raise UserError(f"{shown} is not a {what} UID: {rule} (e.g. 1.3.6.1.4.1.14519.5.2.1.6279.6001.1001); "
                        f"pass a {what} UID")
    return uid


def _is_uid(text: str) -> bool:
    return len(text) <= UID_MAX_CHARS and _UID_RE.fullmatch(text) is not None


def series_on_disk(data_root: Path) -> dict[str, Path]:
    """Every LUNA series present as subset*/<uid>.mhd under the data root, by UID."""
    found = {}
    for mhd in sorted(Path(data_root).glob("subset*/*.mhd")):
        if _is_uid(mhd.stem):
            found[mhd.stem] = mhd
    return found


def find_series(data_root: Path, uid: str) -> Path:
    check_uid(uid)
    hits = sorted(Path(data_root).glob(f"subset*/{uid}.mhd"))
    if not hits:
        raise UserError(f"series {uid} is not on disk: no subset*/{uid}.mhd under {data_root}; "
                        "check the UID and the data root")
    return hits[0]


def load_series(data_root: Path, uid: str) -> CtVolume:
    """Load a LUNA series by UID from <data_root>/subset*/<uid>.mhd."""
    return load_ct(find_series(data_root, uid), series_uid=uid)


def max_ct_voxels() -> int:
    """The most voxels a CT header may claim before anything is allocated: the environment variable
    P2CH_MAX_CT_VOXELS (a whole number) when set, else DEFAULT_MAX_CT_VOXELS."""
    raw = os.environ.get(MAX_CT_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_CT_VOXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"{MAX_CT_VOXELS_ENV}={raw!r} is not a positive whole number of voxels; "
                        f"set it to e.g. {2 * DEFAULT_MAX_CT_VOXELS} or unset it")
    return limit


def load_ct(path: Path, series_uid: str | None = None) -> CtVolume:
    """Load .mhd/.mha, .nii/.nii.gz or a DICOM series folder (slices ordered by position).

    A damaged CT is refused, never read as if whole: every DICOM slice must read and the slices must
    be evenly spaced; a file's voxel data must be exactly as long as its header says; a voxel holds
    one value. The size a header claims is checked before anything is allocated: more voxels than
    the environment variable P2CH_MAX_CT_VOXELS (default DEFAULT_MAX_CT_VOXELS, 2**31) are refused.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"CT not found: {path}; pass an existing .mhd/.mha/.nii/.nii.gz file or DICOM folder")
    if path.is_dir():
        with _itk_warnings_off():  # what ITK warns of (no series, uneven slices) is refused here, in one line
            image, uid = _read_dicom_folder(path)
    else:
        name = path.name.lower()
        if not name.endswith((".mhd", ".mha", ".nii", ".nii.gz")):
            raise UserError(f"unsupported CT file {path}: use .mhd/.mha, .nii/.nii.gz or a DICOM folder")
        image = _read_file(path)
        uid = path.name.split(".nii")[0] if ".nii" in name else path.stem
    hu = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.int16, copy=False)  # int16 input: a single copy
    return CtVolume(hu, Geometry.from_image(image), series_uid or uid)


def _read_file(path: Path) -> sitk.Image:
    """Read a MetaImage or NIfTI file after its header has passed every check: ITK itself would
    allocate whatever a header claims and zero-fill data that ends early."""
    meta = path.name.lower().endswith((".mhd", ".mha"))
    header = _meta_header(path) if meta else None  # before ITK, whose MetaIO prints parse errors to stderr
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _sitk_read(reader.ReadImageInformation, path)
    if reader.GetDimension() != 3:
        raise UserError(f"{path} is a {reader.GetDimension()}D image; a CT must be 3D")
    _check_claim(path, reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
    if header:
        _check_meta_data(path, *header, math.prod(reader.GetSize()) * _component_bytes(reader.GetPixelID()))
    else:
        _check_nifti_data(path, reader)
    return _sitk_read(reader.Execute, path)


def _check_claim(source: Path, size, components: int, pixel_id: int) -> None:
    """One value per voxel, and no more voxels than the limit: checked from the header alone."""
    if components != 1:
        raise UserError(f"{source} holds {components} values per voxel (a colour or vector image); a CT holds "
                        "one, so export it as a single-channel (greyscale) image")
    voxels, limit = math.prod(size), max_ct_voxels()
    if voxels > limit:
        gib = voxels * _component_bytes(pixel_id) / 2**30
        raise UserError(f"{source} claims {'x'.join(map(str, size))} = {voxels:,} voxels ({gib:,.1f} GiB), over "
                        f"the limit of {limit:,}; if the scan really is that large, raise the limit with the "
                        f"environment variable {MAX_CT_VOXELS_ENV}")


def _component_bytes(pixel_id: int) -> int:
    return sitk.Image([1, 1], pixel_id).GetSizeOfPixelComponent()


def _sitk_read(read, path: Path):
    try:
        return read()
    except RuntimeError as err:
        raise UserError(f"cannot read CT {path}: {_itk_reason(err)}; check the file, or export or copy it "
                        "again") from None


def _itk_reason(err: RuntimeError) -> str:
    """The meaningful part of a SimpleITK exception, whole words only: its first line names only
    the C++ source line, and ITK prefixes the reason with the class and its address."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]
    return brief(RuntimeError(" ".join(_ITK_PREFIX.sub("", line) for line in lines)), _REASON_CHARS)


def _meta_header(path: Path) -> tuple[dict[str, str], int]:
    """The fields of a MetaImage header, up to its ElementDataFile line, and the byte offset where
    LOCAL voxel data start (right after that line)."""
    fields = {}
    with open(path, "rb") as f:
        while f.tell() < _MAX_HEADER_BYTES and (line := f.readline(_MAX_HEADER_BYTES)):
            key, sep, value = line.decode("latin-1").partition("=")
            if sep:
                fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, f.tell()
    raise UserError(f"{path} has no ElementDataFile line; it is not a MetaImage header")


@dataclass(frozen=True)
class RawLayout:
    """Where a MetaImage keeps its voxels as plain little-endian int16 in x-fastest order: the data
    file, the byte offset of the first voxel, and the (index, row, col) shape of a memory map over them."""

    file: Path
    offset: int
    shape: tuple[int, int, int]


def raw_int16_layout(path: Path) -> RawLayout | None:
    """The layout of a .mhd/.mha whose voxels can be memory-mapped where they lie, as LUNA16's can: 3D,
    ElementType MET_SHORT, one value per voxel, little-endian, uncompressed binary data in one file
    (a separate one, or LOCAL after the header; HeaderSize as ITK reads it). None for anything else.
    Only the header is read: whether a map holds what load_ct gives is for the caller to check."""
    try:
        fields, data_start = _meta_header(path)
        dims = tuple(int(v) for v in fields.get("DimSize", "").split())
        header_size = int(fields.get("HeaderSize", "0"))
    except (UserError, OSError, ValueError):
        return None
    name = fields["ElementDataFile"]
    big_endian = any(_meta_flag(fields, key, "False") for key in fields if key.endswith("ByteOrderMSB"))
    if (fields.get("NDims") != "3" or len(dims) != 3 or min(dims) < 1 or fields.get("ElementType") != "MET_SHORT"
            or fields.get("ElementNumberOfChannels", "1") != "1" or big_endian or name.startswith("LIST")
            or "%" in name or not _meta_flag(fields, "BinaryData", "True")
            or _meta_flag(fields, "CompressedData", "False")):
        return None
    data, offset = _meta_data_location(path, fields, data_start, header_size)
    try:
        size = data.stat().st_size
    except OSError:
        return None
    expected = math.prod(dims) * 2
    if header_size == -1:  # the voxels are the file's last bytes, after a header of any size
        offset = size - expected
    if offset < 0 or size < offset + expected:
        return None
    return RawLayout(data, offset, dims[::-1])


def _meta_flag(fields: dict[str, str], key: str, default: str) -> bool:
    return fields.get(key, default)[:1] in ("T", "t", "1")


def _meta_data_location(path: Path, fields: dict[str, str], data_start: int, header_size: int) -> tuple[Path, int]:
    """The file holding a MetaImage's voxels (its own for LOCAL) and the byte where they start in it, as
    ITK reads HeaderSize; HeaderSize -1 (the data are the file's last bytes) is left to the caller."""
    local = fields["ElementDataFile"].lower() == "local"
    data = path if local else path.parent / fields["ElementDataFile"]
    return data, header_size if header_size > 0 else data_start if local else 0


def _check_meta_data(path: Path, fields: dict[str, str], data_start: int, expected: int) -> None:
    """The voxel data of a MetaImage must be exactly `expected` bytes: shorter data would be
    zero-filled or refused by ITK, longer data means the header does not describe it."""
    name = fields["ElementDataFile"]
    if name.startswith("LIST") or "%" in name:
        raise UserError(f"{path} spreads its voxels over several files (ElementDataFile = {name}), which is not "
                        "supported; write the CT as a single .mha or .mhd + .raw")
    if not _meta_flag(fields, "BinaryData", "True"):
        raise UserError(f"{path} stores its voxels as text (BinaryData = False), which is not supported; "
                        "write the CT with binary data")
    try:
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise UserError(f"{path} has a bad HeaderSize line; re-export the MetaImage") from None
    data, start = _meta_data_location(path, fields, data_start, header_size)
    if not data.is_file():
        raise UserError(f"{path} names data file {data.name}, which is missing; copy the .raw next to the .mhd")
    if _meta_flag(fields, "CompressedData", "False"):
        with open(data, "rb") as f:
            f.seek(start)
            actual, complete = _inflated_size(f, expected)
        _check_length(data, actual, expected, complete, inflated=True)
        return
    actual = max(data.stat().st_size - start, 0)
    if header_size == -1:  # the data are the file's last bytes, after a header of any size
        actual = min(actual, expected)
    _check_length(data, actual, expected)


def _check_nifti_data(path: Path, reader: sitk.ImageFileReader) -> None:
    """A NIfTI file must be exactly its header, extensions and voxel data long: ITK reads a
    .nii.gz cut short as if the missing voxels were 0."""
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = math.prod(int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1))
        expected = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        raise UserError(f"{path} has an incomplete NIfTI header (dim, bitpix or vox_offset); export it again") from None
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:  # ITK reads an uncompressed file whatever its name
            _check_length(path, path.stat().st_size, expected)
            return
        f.seek(0)
        actual, complete = _inflated_size(f, expected)
    _check_length(path, actual, expected, complete, inflated=True)


def _inflated_size(f, limit: int) -> tuple[int, bool]:
    """(bytes that the zlib or gzip data from f's position inflate to, whether the stream ended
    properly), streamed in chunks so memory stays small; counting stops once past `limit`. Further
    gzip members are counted (pigz and bgzip write them); other bytes after the end are ignored,
    as the readers ignore them."""
    total, inflater = 0, zlib.decompressobj(_ZLIB_OR_GZIP)
    try:
        while total <= limit and (chunk := f.read(_CHUNK_BYTES)):
            while chunk:
                if inflater.eof:
                    if not chunk.startswith(_GZIP_MAGIC):
                        return total, True
                    inflater = zlib.decompressobj(_ZLIB_OR_GZIP)
                total += len(inflater.decompress(chunk))
                chunk = inflater.unused_data
    except zlib.error as err:
        raise UserError(f"{f.name} holds damaged compressed data ({err}); copy or download it again") from None
    return total, inflater.eof


def _check_length(data: Path, actual: int, expected: int, complete: bool = True, inflated: bool = False) -> None:
    unit = " once decompressed" if inflated else ""
    if actual > expected:
        held = f"more than {expected:,}" if inflated else f"{actual:,}"
        raise UserError(f"{data} holds {held} bytes{unit} where the header declares {expected:,}: the header's "
                        "size or voxel type does not match the data; fix the header or export the CT again")
    if actual < expected or not complete:
        raise UserError(f"{data} is truncated ({actual:,} of {expected:,} bytes{unit}); copy or download it again")


def dicom_series_files(folder: Path) -> tuple[list[str], str]:
    """The slice files of the one DICOM series in folder, sorted by position, and its series ID; a
    folder holding no series, several, or a DICOM file that is not a readable slice is refused."""
    with _itk_warnings_off():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series_ids:
            _check_unlisted_dicom(folder, [])
            raise UserError(f"no DICOM images in {folder}; pass a folder holding one series' .dcm files")
        if len(series_ids) > 1:
            raise UserError(f"{folder} holds {len(series_ids)} DICOM series; put each series in its own folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])  # sorted by position
    _check_unlisted_dicom(folder, files)
    return list(files), series_ids[0]


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, str]:
    """One series, every slice of it read, its size checked before reading and its layout after."""
    files, series_id = dicom_series_files(folder)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    _sitk_read(first.ReadImageInformation, Path(files[0]))
    size = first.GetSize()
    _check_claim(folder, (*size[:2], math.prod(size[2:]) * len(files)), first.GetNumberOfComponents(),
                 first.GetPixelID())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # the slice positions, at no extra read
    image = _sitk_read(reader.Execute, folder)
    _check_pixel_data(reader, files)
    _check_slice_positions(folder, reader, files)
    return image, series_id


@contextmanager
def _itk_warnings_off():
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_unlisted_dicom(folder: Path, files) -> None:
    """GDCM leaves out a slice file it cannot parse (a truncated one, say), and ITK would then
    spread the other slices over the whole extent: any DICOM file left out is named instead."""
    listed = {Path(f).name for f in files}
    for path in sorted(folder.iterdir()):
        if path.name in listed or path.name.startswith(".") or not path.is_file():
            continue
        with open(path, "rb") as f:
            magic = f.read(132)[128:]
        if magic == b"DICM" or path.suffix.lower() in (".dcm", ".dicom", ".ima"):
            raise UserError(f"{path} is not a readable slice of the DICOM series in {folder} (truncated, damaged "
                            "or not an image); replace the file or move it out of the folder")


def _check_slice_positions(folder: Path, reader: sitk.ImageSeriesReader, files) -> None:
    """Slices must share one orientation and follow each other at one even step along its normal:
    a missing slice would otherwise stretch the spacing, a repeated one shift every slice after it."""
    if len(files) < 2:
        return
    positions = np.array([_dicom_numbers(reader, k, files[k], "0020|0032", 3) for k in range(len(files))])
    orientations = np.array([_dicom_numbers(reader, k, files[k], "0020|0037", 6) for k in range(len(files))])
    names = [Path(f).name for f in files]
    turned = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > _SAME_ORIENTATION)
    if len(turned):
        raise UserError(f"DICOM slice {names[turned[0]]} in {folder} is oriented unlike {names[0]}; a CT series "
                        "has one orientation, so pass a folder holding only that series' slices")
    depth = slice_depths(positions, orientations[0])
    at = lambda k: f"{names[k]} ({depth[k]:.2f} mm)"
    order = np.argsort(depth, kind="stable")
    same = np.flatnonzero(np.diff(depth[order]) <= _SAME_POSITION_MM)
    if len(same):
        a, b = order[same[0]], order[same[0] + 1]
        raise UserError(f"DICOM series in {folder} repeats a slice position: {at(a)} and {at(b)}; "
                        "remove the duplicate slice")
    steps = np.diff(depth) * np.sign(depth[-1] - depth[0])  # in reading order: also catches a misplaced slice
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > _STEP_TOLERANCE * abs(step))
    if len(bad):
        k = bad[0]
        raise UserError(f"DICOM series in {folder} is unevenly spaced: {steps[k]:.2f} mm between {at(k)} and "
                        f"{at(k + 1)}, where the slices are {step:.2f} mm apart; a slice is missing or out of "
                        "place, so pass the complete series")


def slice_depths(positions, orientation) -> np.ndarray:
    """Each slice's distance (mm) along the normal of its ImageOrientationPatient (6 direction cosines),
    from its ImagePositionPatient (N, 3): what orders a series' slices and measures their spacing."""
    orientation = np.asarray(orientation, float)
    return np.asarray(positions, float) @ np.cross(orientation[:3], orientation[3:])


def _check_pixel_data(reader: sitk.ImageSeriesReader, files) -> None:
    """Each slice's pixel data must be as long as its Rows x Columns x BitsAllocated say: GDCM
    would read a shorter element into a larger image and leave the rest to chance."""
    for k, file in enumerate(files):
        rows, columns, bits = (_dicom_numbers(reader, k, file, tag, 1)[0] for tag in ("0028|0010", "0028|0011",
                                                                                      "0028|0100"))
        frames = _dicom_numbers(reader, k, file, "0028|0008", 1)[0] if reader.HasMetaDataKey(k, "0028|0008") else 1
        expected = int(rows * columns * frames) * int(bits) // 8  # one sample per pixel: _check_claim saw to it
        held = _pixel_data_bytes(Path(file), expected + expected % 2)
        if held is not None and held != expected + expected % 2:
            raise UserError(f"DICOM slice {file} holds {held:,} bytes of pixel data where its header (Rows x Columns "
                            f"x BitsAllocated) declares {expected:,}; replace the file or export the series again")


def _pixel_data_bytes(path: Path, expected: int) -> int | None:
    """The length of a DICOM file's native Pixel Data element, or None when it is compressed
    (undefined length) or not found. Pixel data come last, so a well-formed file is checked from
    its last bytes alone; only a file that does not end as expected is searched."""
    with open(path, "rb") as f:
        f.seek(max(path.stat().st_size - expected - 12, 0))
        tail = f.read(12)
        if tail[4:] == _PIXEL_DATA_TAG + expected.to_bytes(4, "little") or (
                tail[:4] == _PIXEL_DATA_TAG and tail[8:] == expected.to_bytes(4, "little")):
            return expected  # implicit VR (tag, length) or explicit VR (tag, OB/OW, 0, length)
        f.seek(0)
        data = f.read()
    at = data.find(_PIXEL_DATA_TAG, 132)
    if at < 0:
        return None
    explicit = data[at + 4:at + 6] in (b"OB", b"OW")
    length = int.from_bytes(data[at + 8:at + 12] if explicit else data[at + 4:at + 8], "little")
    return None if length == 0xFFFFFFFF else length


def _dicom_numbers(reader: sitk.ImageSeriesReader, k: int, file: str, tag: str, count: int) -> list[float]:
    """A DICOM number (or `count` of them, e.g. ImagePositionPatient) of slice k. One that is missing or
    unreadable is refused: the check that needs it cannot be made."""
    try:
        values = [float(v) for v in reader.GetMetaData(k, tag).split("\\")] if reader.HasMetaDataKey(k, tag) else []
    except ValueError:
        values = []
    if len(values) != count:
        raise UserError(f"DICOM slice {file} lacks a readable {_DICOM_TAGS[tag]} ({tag.replace('|', ',')}), so its "
                        "place in the series or its size is unknown; export the series again with it")
    return values


def crop_starts(shape, centers_irc, size=CROP_SIZE) -> np.ndarray:
    """First voxel of each size-shaped crop centred on centers_irc (..., 3), shifted inside the volume."""
    size = np.asarray(size)
    starts = np.rint(np.asarray(centers_irc, float)).astype(np.int64) - size // 2
    return np.minimum(np.maximum(starts, 0), np.maximum(np.asarray(shape) - size, 0))  # np.clip's overhead is 5x


def extract_crop(volume: np.ndarray, center_irc, size=CROP_SIZE, fill: int = HU_MIN, zoom: float = 1.0):
    """A fixed-size crop around a point, copied out of the volume; returns (crop, start_irc).

    The crop is shifted to stay inside the volume; only a volume smaller than the crop is padded
    (with fill), so every crop has exactly `size`. With zoom != 1 its rows and columns sample the CT
    `zoom` times finer than its pixels (zoomed_crops); start_irc is then that of the pixels read.
    """
    if zoom != 1:
        block, start = extract_crop(volume, center_irc, zoom_source_size(size, zoom), fill)
        return zoomed_crops(block[None], size, zoom)[0], start
    start = crop_starts(volume.shape, center_irc, size)
    crop = volume[tuple(slice(s, s + n) for s, n in zip(start, size))]
    if crop.base is not None:  # a view of an array (a cached volume's reads are copies already): own the memory
        crop = crop.copy()
    if crop.shape != tuple(size):
        crop = np.pad(crop, [(0, n - c) for n, c in zip(size, crop.shape)], constant_values=fill)
    return crop, start


def gather_crops(volume: np.ndarray, centers_irc, size=CROP_SIZE, fill: int = HU_MIN, zoom: float = 1.0) -> np.ndarray:
    """(N, *size) crops, each exactly what extract_crop gives for its centre, taken at once from the
    volume's sliding-window view: whole blocks are copied, 4x faster than a voxel-by-voxel gather."""
    if zoom != 1:
        return zoomed_crops(gather_crops(volume, centers_irc, zoom_source_size(size, zoom), fill), size, zoom)
    short = [max(0, n - s) for n, s in zip(size, volume.shape)]
    if any(short):  # only a volume smaller than the crop: padded after its end, as extract_crop does
        volume = np.pad(volume, [(0, k) for k in short], constant_values=fill)
    starts = crop_starts(volume.shape, np.asarray(centers_irc, float).reshape(-1, 3), size)
    return np.lib.stride_tricks.sliding_window_view(volume, size)[starts[:, 0], starts[:, 1], starts[:, 2]]


def zoom_source_size(size, zoom: float) -> tuple[int, int, int]:
    """The native block a zoomed crop of `size` is interpolated from: all slices, and in-plane the
    2 * ceil(half / zoom) + 1 pixels centred on the crop's centre pixel."""
    return (int(size[0]), *(2 * math.ceil((n // 2) / zoom) + 1 for n in size[1:]))


def zoomed_crops(blocks: np.ndarray, size, zoom: float) -> np.ndarray:
    """(N, *size) float32 crops, linearly interpolated in-plane from (N, *zoom_source_size) blocks:
    crop pixel j lies (j - n // 2) / zoom pixels from the block's centre pixel, as a native crop's pixel
    j lies j - n // 2 from it. Slices are not resampled."""
    rows = _interpolation_matrix(int(size[1]), blocks.shape[2], zoom)
    cols = _interpolation_matrix(int(size[2]), blocks.shape[3], zoom)
    return rows @ blocks.astype(np.float32) @ cols.T


@functools.lru_cache(maxsize=8)
def _interpolation_matrix(n: int, m: int, zoom: float) -> np.ndarray:
    """(n, m) weights of linear interpolation from m native pixels to n pixels zoom times finer."""
    position = (np.arange(n) - n // 2) / zoom + m // 2
    low = np.floor(position).astype(np.int64)
    frac = (position - low).astype(np.float32)
    weights = np.zeros((n, m), np.float32)
    weights[np.arange(n), low] = 1 - frac
    upper = frac > 0
    weights[np.arange(n)[upper], low[upper] + 1] += frac[upper]
    return weights


def slice_stack(volume: np.ndarray, index: int, context: int, rows: slice = slice(None),
                cols: slice = slice(None)) -> np.ndarray:
    """Slices index-context .. index+context (beyond the volume the edge slice repeats), cut to
    rows x cols: the segmentation input for one centre slice, read from a memory map without
    touching the rest of the volume."""
    return np.asarray(volume[context_slices(index, index + 1, context, volume.shape[0]), rows, cols])


def context_stacks(volume: np.ndarray, start: int, stop: int, context: int) -> np.ndarray:
    """The stacks of centre slices start..stop-1, each with its context slices (the edge slice repeated
    beyond the volume), as a (stop-start, H, W, 2C+1) window view over one copy of the slices they need."""
    chunk = volume[context_slices(start, stop, context, volume.shape[0])]
    return np.lib.stride_tricks.sliding_window_view(chunk, 2 * context + 1, axis=0)


def context_slices(start: int, stop: int, context: int, depth: int) -> np.ndarray:
    """Slice numbers start-context .. stop-1+context of a depth-slice volume, the edge slice
    standing in for those beyond it: the slices that centre slices start..stop-1 see."""
    return np.clip(np.arange(start - context, stop + context), 0, depth - 1)
