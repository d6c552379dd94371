import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_app.data.ct import (
    CROP_SIZE,
    Geometry,
    check_uid,
    context_slices,
    context_stacks,
    crop_starts,
    extract_crop,
    find_series,
    gather_crops,
    irc_to_xyz,
    load_ct,
    load_series,
    raw_int16_layout,
    slice_stack,
    xyz_to_irc,
)
from p2ch_app.errors import UserError
from tests.conftest import REAL_DICOM, requires_shared, write_image


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def test_round_trip_with_rotated_direction_and_anisotropic_spacing():
    rng = np.random.default_rng(1)
    geometry = Geometry(np.array([-170.5, 12.0, -310.25]), np.array([0.7, 0.7, 2.5]), random_rotation(rng))
    irc = rng.uniform(0, 300, size=(50, 3))
    assert np.allclose(xyz_to_irc(irc_to_xyz(irc, geometry), geometry), irc)
    xyz = rng.uniform(-200, 200, size=(50, 3))
    assert np.allclose(irc_to_xyz(xyz_to_irc(xyz, geometry), geometry), xyz)


def test_conversion_agrees_with_itk_for_a_rotated_image():
    rng = np.random.default_rng(2)
    image = sitk.Image(10, 20, 30, sitk.sitkInt16)
    image.SetOrigin((5.0, -3.0, 100.0))
    image.SetSpacing((0.6, 0.9, 1.7))
    image.SetDirection(random_rotation(rng).reshape(-1).tolist())
    geometry = Geometry.from_image(image)
    for col, row, index in [(0, 0, 0), (9, 19, 29), (3, 7, 11)]:
        expected = image.TransformIndexToPhysicalPoint((col, row, index))
        assert np.allclose(irc_to_xyz((index, row, col), geometry), expected)
        assert np.allclose(xyz_to_irc(expected, geometry), (index, row, col))


def test_flipped_x_axis_counts_voxels_towards_negative_x():
    geometry = Geometry(np.array([10.0, 0.0, 0.0]), np.ones(3), np.diag([-1.0, 1.0, 1.0]))
    assert np.allclose(irc_to_xyz((0, 0, 3), geometry), (7.0, 0.0, 0.0))
    assert np.allclose(xyz_to_irc((7.0, 0.0, 0.0), geometry), (0, 0, 3))
    assert np.allclose(xyz_to_irc((12.0, 0.0, 0.0), geometry), (0, 0, -2))


@pytest.mark.parametrize("name", ["ct.mhd", "ct.mha", "ct.nii", "ct.nii.gz"])
def test_load_file_formats_and_clip_hu(tmp_path, name):
    hu = np.zeros((4, 5, 6), np.int16)
    hu[0, 0, 0], hu[1, 1, 1], hu[2, 2, 2] = -3024, 3071, 123
    write_image(tmp_path / name, hu, spacing=(0.5, 0.75, 2.0), origin=(1.0, 2.0, 3.0))
    ct = load_ct(tmp_path / name)
    assert ct.hu.dtype == np.int16 and ct.hu.shape == (4, 5, 6)
    assert (ct.hu[0, 0, 0], ct.hu[1, 1, 1], ct.hu[2, 2, 2]) == (-1000, 1000, 123)
    assert np.allclose(ct.geometry.spacing, (0.5, 0.75, 2.0))
    assert np.allclose(ct.geometry.origin, (1.0, 2.0, 3.0))
    assert ct.series_uid == "ct"


def write_dicom_series(folder: Path, series_uid: str, z_positions, names) -> None:
    """One 8x8 slice per z position; the pixel value of each slice is its z, so order is checkable."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, name in zip(z_positions, names):
        image = sitk.GetImageFromArray(np.full((1, 8, 8), int(z), np.int16))
        image.SetSpacing((0.5, 0.5, 2.0))
        for tag, value in [("0008|0060", "CT"), ("0020|000d", "1.2.3"), ("0020|000e", series_uid),
                           ("0020|0032", f"0\\0\\{z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(int(z))), ("0008|0018", f"{series_uid}.{int(z) + 100}")]:
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(image)


def test_dicom_folder_is_sorted_by_position_not_file_name(tmp_path):
    zs = [30, 10, 20, 0, 40]
    write_dicom_series(tmp_path / "dcm", "1.2.3.4", zs, ["a.dcm", "b.dcm", "c.dcm", "d.dcm", "e.dcm"])
    ct = load_ct(tmp_path / "dcm")
    assert ct.hu.shape == (5, 8, 8)
    assert ct.hu[:, 0, 0].tolist() == [0, 10, 20, 30, 40]
    assert np.allclose(irc_to_xyz((4, 0, 0), ct.geometry)[2], 40.0)


def test_dicom_folder_errors(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no DICOM images"):
        load_ct(tmp_path / "empty")
    write_dicom_series(tmp_path / "two", "1.2.3.4", [0, 2], ["a.dcm", "b.dcm"])
    write_dicom_series(tmp_path / "two", "1.2.3.5", [0, 2], ["c.dcm", "d.dcm"])
    with pytest.raises(UserError, match="holds 2 DICOM series"):
        load_ct(tmp_path / "two")
    assert capfd.readouterr().err == ""  # ITK's own warnings would print beside the one-line message


@requires_shared
def test_real_dicom_series_geometry():
    ct = load_ct(REAL_DICOM)
    assert ct.hu.shape == (99, 512, 512)
    assert np.allclose(ct.geometry.spacing, (0.564453125, 0.564453125, 3.0))
    assert irc_to_xyz((0, 0, 0), ct.geometry)[2] == pytest.approx(-288.0)
    assert irc_to_xyz((98, 0, 0), ct.geometry)[2] == pytest.approx(6.0)
    assert ct.hu.min() == -1000 and ct.hu.max() == 1000
    # Slice k holds the file whose ImagePositionPatient z is the k-th smallest.
    by_z = {}
    for path in REAL_DICOM.glob("*.dcm"):
        image = sitk.ReadImage(str(path))
        by_z[image.GetOrigin()[2]] = path
    for k, z in enumerate(sorted(by_z)[:3] + sorted(by_z)[-2:]):
        k = k if k < 3 else 99 - 5 + k
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(by_z[z])))[0]
        assert np.array_equal(np.clip(raw, -1000, 1000), ct.hu[k])


def test_mhd_with_missing_or_truncated_raw(tmp_path):
    mhd = write_image(tmp_path / "x.mhd", np.zeros((4, 4, 4), np.int16))
    raw = tmp_path / "x.raw"
    raw.write_bytes(raw.read_bytes()[:50])
    with pytest.raises(UserError, match=r"truncated \(50 of 128 bytes\)"):
        load_ct(mhd)
    raw.unlink()
    with pytest.raises(UserError, match="x.raw, which is missing"):
        load_ct(mhd)


def test_unsupported_and_missing_paths(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"png")
    with pytest.raises(UserError, match="unsupported CT file"):
        load_ct(tmp_path / "scan.png")
    with pytest.raises(UserError, match="CT not found"):
        load_ct(tmp_path / "nope.mhd")


@pytest.mark.parametrize("uid", ["../subset0/x", "1.2.*", "1.2;rm", "", "1..2", "1.2 ", "a.b"])
def test_check_uid_refuses_anything_but_digits_and_dots(uid):
    with pytest.raises(UserError, match="is not a series UID") as err:
        check_uid(uid)
    assert "--" not in str(err.value)  # the data layer names no option: commands differ in theirs


def test_check_uid_refuses_uids_longer_than_dicom_allows():
    assert check_uid("1." + "2" * 62) == "1." + "2" * 62
    with pytest.raises(UserError, match=r"\(6,600 characters\) is not a series UID: DICOM UIDs are at most 64") as err:
        check_uid("1.2" * 2200)
    assert len(str(err.value)) < 200


def test_find_and_load_series_by_uid(tiny_root):
    series = tiny_root.series[1]
    assert find_series(tiny_root.root, series.uid) == series.mhd
    ct = load_series(tiny_root.root, series.uid)
    assert ct.series_uid == series.uid and ct.hu[:, :, :3].min() == -1000
    with pytest.raises(UserError, match="is not on disk") as err:
        find_series(tiny_root.root, "1.2.3")
    assert "--" not in str(err.value)


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _edit_header(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    assert old.encode() in data
    path.write_bytes(data.replace(old.encode(), new.encode(), 1))


def _set_nifti_dims(path: Path, dims) -> None:
    """Rewrite dim[1..3] of a NIfTI-1 header (int16 at byte 42), gzipped or not."""
    zipped = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if zipped else path.read_bytes())
    data[42:48] = np.array(dims, "<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(data)) if zipped else bytes(data))


def write_compressed(path: Path, hu: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(path), useCompression=True)
    return path


HU = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)


@pytest.mark.parametrize("name", ["ct.mhd", "ct.mha"])
def test_compressed_metaimages_load(tmp_path, name):
    ct = load_ct(write_compressed(tmp_path / name, HU))
    assert np.array_equal(ct.hu, HU)


def test_uncompressed_nifti_named_nii_gz_loads(tmp_path):
    """ITK reads it as it is, so its length is checked uncompressed."""
    write_image(tmp_path / "ct.nii", HU).rename(tmp_path / "ct.nii.gz")
    assert np.array_equal(load_ct(tmp_path / "ct.nii.gz").hu, HU)


def test_multi_member_gzip_nifti_loads(tmp_path):
    """pigz and bgzip write several gzip members; every member counts towards the length."""
    path = write_image(tmp_path / "ct.nii.gz", HU)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert np.array_equal(load_ct(path).hu, HU)


def test_mhd_whose_data_sit_at_the_end_of_a_longer_file(tmp_path):
    """HeaderSize = -1: the voxels are the file's last bytes, whatever precedes them."""
    mhd = write_image(tmp_path / "x.mhd", HU)
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"skip me" + raw.read_bytes())
    _edit_header(mhd, "ElementDataFile", "HeaderSize = -1\nElementDataFile")
    assert np.array_equal(load_ct(mhd).hu, HU)
    raw.write_bytes(raw.read_bytes()[:200])
    with pytest.raises(UserError, match=r"x.raw is truncated \(200 of 240 bytes\)"):
        load_ct(mhd)


@pytest.mark.parametrize("name, data, done", [
    ("ct.nii.gz", "ct.nii.gz", "once decompressed"),  # ITK reads the missing half as 0 HU
    ("ct.nii", "ct.nii", ""),
    ("ct.mha", "ct.mha", ""),
    ("ct.mhd", "ct.raw", ""),
    ("zipped.mhd", "zipped.zraw", "once decompressed"),
    ("zipped.mha", "zipped.mha", "once decompressed"),
])
def test_data_shorter_than_the_header_says_is_refused(tmp_path, name, data, done):
    path = (write_compressed if name.startswith("zipped") else write_image)(tmp_path / name, HU)
    _cut(tmp_path / data, 0.8)
    with pytest.raises(UserError, match=rf"{data} is truncated \(.*bytes( {done})?\); copy or download it again"):
        load_ct(path)


@pytest.mark.parametrize("name, data, edit", [
    ("ct.mhd", "ct.raw", ("MET_SHORT", "MET_UCHAR")),  # int16 data under a uint8 header: cached as 0-255 "HU"
    ("ct.mha", "ct.mha", ("DimSize = 6 5 4", "DimSize = 6 5 3")),
    ("zipped.mhd", "zipped.zraw", ("DimSize = 6 5 4", "DimSize = 6 5 3")),
    ("ct.nii", "ct.nii", None),
])
def test_data_longer_than_the_header_says_is_refused(tmp_path, name, data, edit):
    path = (write_compressed if name.startswith("zipped") else write_image)(tmp_path / name, HU)
    if edit:
        _edit_header(path, *edit)
    else:
        path.write_bytes(path.read_bytes() + bytes(16))
    with pytest.raises(UserError, match=rf"{data} holds .* bytes.* where the header declares .*fix the header"):
        load_ct(path)


@pytest.mark.parametrize("name", ["ct.mhd", "ct.mha", "zipped.mhd", "ct.nii", "ct.nii.gz"])
def test_a_huge_claimed_size_is_refused_from_the_header(tmp_path, name):
    path = (write_compressed if name.startswith("zipped") else write_image)(tmp_path / name, HU)
    if ".nii" in name:
        _set_nifti_dims(path, (30000, 30000, 30000))
    else:
        _edit_header(path, "DimSize = 6 5 4", "DimSize = 30000 30000 30000")
    message = r"claims 30000x30000x30000 = 27,000,000,000,000 voxels \(50,291.4 GiB\), over the limit of 2,147,483,648"
    with pytest.raises(UserError, match=message + ".*environment variable P2CH_MAX_CT_VOXELS"):
        load_ct(path)


def test_the_voxel_limit_comes_from_the_environment(tmp_path, monkeypatch):
    path = write_image(tmp_path / "ct.mha", HU)
    monkeypatch.setenv("P2CH_MAX_CT_VOXELS", "119")
    with pytest.raises(UserError, match="claims 6x5x4 = 120 voxels .*over the limit of 119"):
        load_ct(path)
    write_dicom_series(tmp_path / "dcm", "1.2.3.4", [0, 2, 4], ["a.dcm", "b.dcm", "c.dcm"])
    monkeypatch.setenv("P2CH_MAX_CT_VOXELS", "191")
    with pytest.raises(UserError, match="dcm claims 8x8x3 = 192 voxels"):
        load_ct(tmp_path / "dcm")
    monkeypatch.setenv("P2CH_MAX_CT_VOXELS", "192")
    assert load_ct(tmp_path / "dcm").hu.shape == (3, 8, 8)
    monkeypatch.setenv("P2CH_MAX_CT_VOXELS", "lots")
    with pytest.raises(UserError, match="P2CH_MAX_CT_VOXELS='lots' is not a positive whole number"):
        load_ct(path)


@pytest.mark.parametrize("name", ["rgb.mha", "rgb.nii.gz"])
def test_colour_images_are_refused(tmp_path, name):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(tmp_path / name))
    with pytest.raises(UserError, match="holds 3 values per voxel"):
        load_ct(tmp_path / name)


@pytest.mark.parametrize("edit, message", [
    (("ElementDataFile = ct.raw", "ElementDataFile = LIST\nct.raw"), "spreads its voxels over several files"),
    (("ElementDataFile = ct.raw", "ElementDataFile = ct%03d.raw 1 4 1"), "spreads its voxels over several files"),
    (("BinaryData = True", "BinaryData = False"), "stores its voxels as text"),
    (("ElementDataFile = ct.raw", "Comment = no data file"), "has no ElementDataFile line"),
])
def test_metaimage_layouts_whose_length_cannot_be_checked_are_refused(tmp_path, edit, message):
    mhd = write_image(tmp_path / "ct.mhd", HU)
    _edit_header(mhd, *edit)
    with pytest.raises(UserError, match=message):
        load_ct(mhd)


def test_library_errors_are_shortened_at_a_word(tmp_path):
    folder = tmp_path / ("long-folder-name-" * 12)
    folder.mkdir()
    (folder / "ct.nii").write_bytes(bytes(400))
    with pytest.raises(UserError) as err:
        load_ct(folder / "ct.nii")
    message = str(err.value)
    assert "\n" not in message and "Exception thrown" not in message
    reason = message.split(": ", 1)[1]
    assert reason.startswith("Unable to determine ImageIO reader") and " ...;" in reason


def _dicom(tmp_path, zs=(0, 2, 4, 6, 8)) -> Path:
    names = [f"{c}.dcm" for c in "abcdefgh"[:len(zs)]]
    write_dicom_series(tmp_path / "dcm", "1.2.3.4", zs, names)
    return tmp_path / "dcm"


def _patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_dicom_folder_with_a_truncated_slice_names_it(tmp_path):
    folder = _dicom(tmp_path)
    _cut(folder / "c.dcm", 0.95)  # GDCM leaves it out; ITK spread the other four over the extent
    with pytest.raises(UserError, match=r"c.dcm is not a readable slice of the DICOM series"):
        load_ct(folder)
    for name in ["a.dcm", "b.dcm", "d.dcm", "e.dcm"]:
        (folder / name).unlink()
    with pytest.raises(UserError, match=r"c.dcm is not a readable slice"):  # not "no DICOM images"
        load_ct(folder)


def test_dicom_folder_with_a_missing_slice_reports_the_gap(tmp_path, capfd):
    folder = _dicom(tmp_path, (0, 3, 6, 12, 15))
    with pytest.raises(UserError, match=r"unevenly spaced: 6.00 mm between c.dcm \(6.00 mm\) and d.dcm \(12.00 mm\), "
                                        r"where the slices are 3.00 mm apart"):
        load_ct(folder)
    assert capfd.readouterr().err == ""


def test_dicom_folder_with_a_repeated_slice_position(tmp_path):
    folder = _dicom(tmp_path)
    (folder / "f.dcm").write_bytes((folder / "c.dcm").read_bytes())
    with pytest.raises(UserError, match=r"repeats a slice position: c.dcm \(4.00 mm\) and f.dcm \(4.00 mm\)"):
        load_ct(folder)


def test_dicom_slice_turned_unlike_the_others(tmp_path):
    folder = _dicom(tmp_path)
    _patch(folder / "c.dcm", b"1\\0\\0\\0\\1\\0", b"0\\1\\0\\1\\0\\0")
    with pytest.raises(UserError, match="slice c.dcm in .* is oriented unlike a.dcm"):
        load_ct(folder)


def test_dicom_slice_without_a_position(tmp_path):
    folder = _dicom(tmp_path)
    _patch(folder / "c.dcm", b"\x20\x00\x32\x00", b"\x20\x00\x31\x00")  # (0020,0032) becomes an unknown tag
    with pytest.raises(UserError, match=r"slice .*c.dcm lacks a readable ImagePositionPatient \(0020,0032\)"):
        load_ct(folder)


def test_dicom_pixel_data_shorter_than_rows_and_columns_say(tmp_path):
    folder = _dicom(tmp_path, (0, 2, 4))
    for name in ["a.dcm", "b.dcm", "c.dcm"]:  # Rows 8 -> 16 over 8x8 pixels: GDCM fills the rest by chance
        _patch(folder / name, b"\x28\x00\x10\x00\x02\x00\x00\x00\x08\x00", b"\x28\x00\x10\x00\x02\x00\x00\x00\x10\x00")
    with pytest.raises(UserError, match="a.dcm holds 128 bytes of pixel data where its header .* declares 256"):
        load_ct(folder)


def test_crop_is_centred_inside_and_shifted_at_edges():
    volume = np.arange(40 * 60 * 70, dtype=np.int32).reshape(40, 60, 70)
    crop, start = extract_crop(volume, (20, 30, 35))
    assert crop.shape == CROP_SIZE and start.tolist() == [4, 6, 11]
    assert crop[16, 24, 24] == volume[20, 30, 35]
    crop, start = extract_crop(volume, (1.4, 58.6, 0.2))
    assert crop.shape == CROP_SIZE and start.tolist() == [0, 12, 0]
    assert np.array_equal(crop, volume[0:32, 12:60, 0:48])
    crop[:] = -1  # a crop owns its memory: writing to it leaves the volume as it was
    assert volume[0, 12, 0] == 12 * 70


def test_crop_of_a_volume_smaller_than_the_crop_is_padded_with_air():
    volume = np.zeros((10, 60, 60), np.int16)
    crop, start = extract_crop(volume, (5, 30, 30))
    assert crop.shape == CROP_SIZE and start[0] == 0
    assert (crop[:10] == 0).all() and (crop[10:] == -1000).all()


def test_crop_starts_is_vectorised():
    starts = crop_starts((40, 60, 70), np.array([[20, 30, 35], [0, 0, 0], [39, 59, 69]]))
    assert starts.tolist() == [[4, 6, 11], [0, 0, 0], [8, 12, 22]]


@pytest.mark.parametrize("zoom", [1, 2, 1.5])
@pytest.mark.parametrize("shape", [(40, 60, 70), (12, 60, 40), (40, 20, 18)])  # smaller than a crop: 2nd, 3rd
def test_gather_crops_equals_extract_crop_everywhere(shape, zoom):
    rng = np.random.default_rng(0)
    hu = rng.integers(-999, 1000, shape).astype(np.int16)
    centers = np.array([[20, 30, 35], [0.4, 0, 0], [39, 59, 69], [10.6, 50.2, 3.9]])
    crops = gather_crops(hu, centers, zoom=zoom)
    assert crops.shape == (4, *CROP_SIZE)
    for crop, center in zip(crops, centers):
        assert np.array_equal(crop, extract_crop(hu, center, zoom=zoom)[0])


def test_a_zoomed_crop_interpolates_in_plane_around_the_same_centre_pixel():
    rng = np.random.default_rng(1)
    hu = rng.integers(-999, 1000, (40, 60, 70)).astype(np.int16)
    crop, start = extract_crop(hu, (20.2, 30.4, 34.6), zoom=2)
    native = hu.astype(np.float32)
    assert crop.shape == CROP_SIZE and crop.dtype == np.float32 and start.tolist() == [4, 18, 23]
    assert np.array_equal(crop[:, 24::2, 24::2], native[4:36, 30:42, 35:47])  # every second pixel: the CT's own
    assert np.array_equal(crop[:, 0::2, 0::2], native[4:36, 18:42, 23:47])
    between = (native[4:36, 30:42, 35:47] + native[4:36, 31:43, 35:47]) / 2
    assert np.allclose(crop[:, 25::2, 24::2], between[:, :11 + 1])  # halfway between rows: their mean
    wide = rng.integers(-999, 1000, (40, 120, 120)).astype(np.int16)
    coarse = extract_crop(wide, (20, 60, 60), zoom=0.5)[0]  # coarser than the CT: every second pixel
    assert np.array_equal(coarse[:, 24, :], wide[4:36, 60, 12:108:2].astype(np.float32))


def test_context_slices_repeat_the_edge_slices():
    assert context_slices(0, 2, 2, 5).tolist() == [0, 0, 0, 1, 2, 3]
    assert context_slices(4, 5, 2, 5).tolist() == [2, 3, 4, 4, 4]
    volume = np.arange(5)[:, None, None] * np.ones((1, 2, 2), np.int16)
    assert slice_stack(volume, 0, 1)[:, 0, 0].tolist() == [0, 0, 1]


def test_context_stacks_are_the_slice_stacks_of_each_centre_slice():
    volume = np.random.default_rng(0).integers(-1000, 1000, (6, 3, 4)).astype(np.int16)
    stacks = context_stacks(volume, 1, 6, 2)
    assert stacks.shape == (5, 3, 4, 5)
    for k in range(5):
        assert np.array_equal(stacks[k].transpose(2, 0, 1), slice_stack(volume, k + 1, 2))


PLAIN_HEADER = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
                "CompressedData": "False", "DimSize": "6 5 4", "ElementType": "MET_SHORT", "ElementDataFile": "ct.raw"}


@pytest.mark.parametrize("edit, offset", [
    ({}, 0),
    ({"ElementDataFile": "LOCAL"}, "after the header"),
    ({"HeaderSize": "16"}, 16),
    ({"HeaderSize": "-1"}, 100),  # the voxels are the file's last bytes
    ({"ElementByteOrderMSB": "False"}, 0),
    ({"ElementNumberOfChannels": "1"}, 0),
    ({"ElementType": "MET_USHORT"}, None),
    ({"ElementType": "MET_FLOAT"}, None),
    ({"ElementNumberOfChannels": "2"}, None),
    ({"BinaryDataByteOrderMSB": "True"}, None),
    ({"ElementByteOrderMSB": "True"}, None),
    ({"CompressedData": "True"}, None),
    ({"BinaryData": "False"}, None),
    ({"NDims": "2", "DimSize": "6 20"}, None),
    ({"DimSize": "6 5 5"}, None),  # more voxels than the file holds
    ({"ElementDataFile": "LIST"}, None),
    ({"ElementDataFile": "ct_%03d.raw 1 4 1"}, None),
    ({"ElementDataFile": "missing.raw"}, None),
])
def test_raw_int16_layout_is_found_only_for_plain_little_endian_int16(tmp_path, edit, offset):
    fields = {**PLAIN_HEADER, **edit}
    name = fields.pop("ElementDataFile")
    header = "".join(f"{k} = {v}\n" for k, v in fields.items()) + f"ElementDataFile = {name}\n"
    voxels = np.arange(120, dtype="<i2").tobytes()
    mhd = tmp_path / "ct.mhd"
    if name == "LOCAL":
        mhd.write_bytes(header.encode() + voxels)
    else:
        mhd.write_text(header)
        (tmp_path / "ct.raw").write_bytes(bytes(offset if offset in (16, 100) else 0) + voxels)
    layout = raw_int16_layout(mhd)
    if offset is None:
        assert layout is None
        return
    local = offset == "after the header"
    assert layout.file == (mhd if local else tmp_path / "ct.raw") and layout.shape == (4, 5, 6)
    assert layout.offset == (len(header) if local else offset)
    mapped = np.memmap(layout.file, "<i2", "r", layout.offset, layout.shape)
    assert np.array_equal(mapped, np.arange(120).reshape(4, 5, 6))
    assert np.array_equal(load_ct(mhd).hu, mapped)  # what ITK reads from the same header
