import signal
import subprocess
import sys
import time

import diskcache
import numpy as np
import pytest
import SimpleITK as sitk

from p2ch_app.data.cache import ClippedVolume, LunaCache, SeriesRecord, grow_nodule_mask
from p2ch_app.data.ct import extract_crop, load_series, slice_stack, xyz_to_irc
from p2ch_app.data.index import build_index
from p2ch_app.errors import UserError
from tests.conftest import PROJECT, make_tiny_root, snapshot


def sphere(shape, center, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def test_grown_mask_is_the_nodule_and_cuts_an_attached_vessel():
    hu = np.full((30, 40, 40), -850, np.int16)
    ball = sphere(hu.shape, (15, 20, 20), 4)
    hu[ball] = 30
    hu[15, 20, 24:] = 30  # a vessel leaving the nodule along the column axis
    mask = grow_nodule_mask(hu, [(15.3, 19.8, 20.1)])
    assert mask[ball].all()
    assert not mask[15, 20, 30:].any()  # the vessel is cut where the box ends
    assert not mask[~ball].any() or mask[~ball].sum() <= 6


@pytest.mark.parametrize("margin", [0, 1, 2, 3])
def test_mask_slice_with_margin_is_the_3d_grown_label(margin):
    from scipy import ndimage

    from p2ch_app.data.ct import Geometry

    label = np.zeros((9, 12, 12), bool)
    label[4, 5:7, 5:7] = True  # a nodule one slice thick
    label[0, 0, 11] = True  # a corner voxel: growth stops at the volume's faces
    label[8, 3:9, 2] = True
    label |= np.random.default_rng(margin).random(label.shape) > 0.97  # scattered voxels, at the edges too
    record = SeriesRecord("1.2", label.shape, Geometry(np.zeros(3), np.ones(3), np.eye(3)),
                          np.flatnonzero(label), np.unique(np.nonzero(label)[0]), "")
    grown = ndimage.binary_dilation(label, ndimage.generate_binary_structure(3, 1), iterations=margin) if margin \
        else label
    for k in range(label.shape[0]):
        assert np.array_equal(record.mask_slice(k, margin), grown[k]), k
    assert record.label_slices(margin).tolist() == np.flatnonzero(grown.any(axis=(1, 2))).tolist()


def test_build_then_read(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    done = cache.build(index, progress=False)
    assert done["built"] == 3 and done["skipped"] == 0 and done["series"] == 3 and done["bytes"] > 0
    for series in tiny_root.series:
        ct = load_series(tiny_root.root, series.uid)
        volume = cache.volume(series.uid)
        assert np.array_equal(volume, ct.hu)
        record = cache.record(series.uid)
        raw = series.mhd.with_suffix(".raw")
        assert record.source.path == raw.relative_to(tiny_root.root).as_posix() and record.source.offset == 0
        assert record.source.file(cache.root) == raw.resolve()  # named under the root it was built from
        assert (record.source.device, record.source.inode) == (raw.stat().st_dev, raw.stat().st_ino)
        assert record.shape == ct.hu.shape
        assert np.allclose(record.geometry.spacing, ct.geometry.spacing)
        mask = record.mask()
        expected = np.zeros(ct.hu.shape, bool)
        for c in series.nodules_irc:
            expected |= sphere(ct.hu.shape, c, series.radius_vox)
        assert np.array_equal(mask, expected)
        assert record.nodule_slices.tolist() == sorted({i for c in series.nodules_irc
                                                       for i in range(c[0] - 3, c[0] + 4)})
        center = index.for_series(series.uid).center_xyz[0]
        crop, start = cache.crop(series.uid, center)
        assert np.array_equal((crop, start)[0], extract_crop(ct.hu, xyz_to_irc(center, ct.geometry))[0])
    assert not list((tmp_path / "cache" / "volumes").iterdir())  # the .raw files are read where they lie


def test_second_build_skips_and_changed_annotations_rebuild_one_series(tiny_root, tmp_path):
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    cache.build(build_index(tiny_root.root), progress=False)
    again = LunaCache(tmp_path / "cache", tiny_root.root).build(build_index(tiny_root.root), progress=False)
    assert again["built"] == 0 and again["skipped"] == 3
    ann = tiny_root.root / "annotations.csv"
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join(lines[:-1]) + "\n")  # drop the last series' last nodule
    index = build_index(tiny_root.root)
    redone = LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)
    assert redone["built"] == 1 and redone["skipped"] == 2
    raw = tiny_root.series[0].mhd.with_suffix(".raw")
    data = bytearray(raw.read_bytes())
    data[:2] = (123).to_bytes(2, "little", signed=True)
    raw.write_bytes(bytes(data))  # a rewritten CT is cached again, with its new values
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert cache.build(index, progress=False)["built"] == 1
    assert cache.volume(tiny_root.series[0].uid)[0, 0, 0] == 123


def test_parallel_build_matches_serial(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    serial, parallel = LunaCache(tmp_path / "a", tiny_root.root), LunaCache(tmp_path / "b", tiny_root.root)
    serial.build(index, progress=False)
    assert parallel.build(index, workers=2, progress=False)["built"] == 3
    for uid in index.series_uids:
        assert np.array_equal(serial.volume(uid), parallel.volume(uid))
        assert np.array_equal(serial.record(uid).mask_voxels, parallel.record(uid).mask_voxels)


def test_annotation_outside_its_ct_is_refused_and_the_cache_is_kept(tiny_root, tmp_path):
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    cache.build(build_index(tiny_root.root), progress=False)
    before = snapshot(tmp_path / "cache")
    ann = tiny_root.root / "annotations.csv"
    ann.write_text(ann.read_text() + "1.2.840.99.2,900.0,0.0,0.0,5.0\n")
    outside = r"annotations.csv:7: nodule at \[900.0, 0.0, 0.0\] mm lies outside CT 1.2.840.99.2"
    with pytest.raises(UserError, match=outside):
        LunaCache(tmp_path / "cache", tiny_root.root).build(build_index(tiny_root.root), progress=False)
    assert snapshot(tmp_path / "cache") == before


def test_reading_an_uncached_series_says_to_run_prep(tmp_path):
    with pytest.raises(UserError, match=f"run luna-prep --data-root {tmp_path} first"):
        LunaCache(tmp_path / "cache", tmp_path).volume("1.2.3")


SLOW_PREP = """
import sys, time
import p2ch_app.data.cache as cache
from p2ch_app.data.index import build_index
build = cache._build_series
def slow(job):
    record = build(job)
    time.sleep(0.3)
    return record
cache._build_series = slow
cache.LunaCache(sys.argv[2], sys.argv[1]).build(build_index(sys.argv[1]), progress=False)
"""


def test_killed_run_leaves_no_corrupt_entry_and_resume_builds_only_the_rest(tmp_path):
    tiny = make_tiny_root(tmp_path / "luna", n_series=6, shape=(24, 48, 48))
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREP, str(tiny.root), str(cache_dir)], cwd=PROJECT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (cache_dir / "meta").is_dir() and len(diskcache.Cache(str(cache_dir / "meta"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = LunaCache(cache_dir, tiny.root)
    survivors = cache.cached_uids()
    assert 2 <= len(survivors) < 6
    for uid in survivors:  # whatever looks cached is whole
        assert np.array_equal(cache.volume(uid), load_series(tiny.root, uid).hu)
    done = LunaCache(cache_dir, tiny.root).build(build_index(tiny.root), progress=False)
    assert done["built"] == 6 - len(survivors) and done["series"] == 6
    assert not list((cache_dir / "volumes").glob("*.tmp.npy"))


def test_a_truncated_or_replaced_volume_is_not_current_and_is_rebuilt(tiny_root, tmp_path):
    from p2ch_app.data.cache import require_cached

    index = build_index(tiny_root.root)
    LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False, copy_volumes=True)
    first, second = (LunaCache(tmp_path / "cache", tiny_root.root).volume_path(s.uid) for s in tiny_root.series[:2])
    first.write_bytes(first.read_bytes()[:-100])  # cut off, as by a full disk or a copy that stopped
    np.save(second, np.zeros((2, 2, 2), np.int16))  # a whole .npy, of the wrong shape
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert cache.cached_uids() == [tiny_root.series[2].uid]
    with pytest.raises(UserError, match=f"the cached volume {first} does not match its record .*run luna-prep again"):
        cache.volume(tiny_root.series[0].uid)
    with pytest.raises(UserError, match="2 series .* are not in the cache .*or damaged"):
        require_cached(tmp_path / "cache", index, tiny_root.root)
    done = LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False, copy_volumes=True)
    assert done["built"] == 2 and done["series"] == 3
    rebuilt = LunaCache(tmp_path / "cache", tiny_root.root)
    for series in tiny_root.series:
        assert np.array_equal(rebuilt.volume(series.uid), load_series(tiny_root.root, series.uid).hu)


@pytest.mark.parametrize("damage", ["junk", "torn"])
def test_a_damaged_cache_database_says_how_to_rebuild(tiny_root, tmp_path, damage):
    LunaCache(tmp_path / "cache", tiny_root.root).build(build_index(tiny_root.root), progress=False)
    db = tmp_path / "cache" / "meta" / "cache.db"
    data = db.read_bytes()
    db.write_bytes(bytes(range(256)) * 20 if damage == "junk" else data[:200] + bytes(len(data) - 200))
    rebuild = f"the cache database {tmp_path / 'cache' / 'meta'} is damaged .*; delete .*meta .*run luna-prep again"
    with pytest.raises(UserError, match=rebuild):
        LunaCache(tmp_path / "cache", tiny_root.root).build(build_index(tiny_root.root), progress=False)
    with pytest.raises(UserError, match=rebuild):
        LunaCache(tmp_path / "cache", tiny_root.root).volume(tiny_root.series[0].uid)


def test_a_full_disk_during_prep_is_one_line_and_leaves_no_temporary_file(tiny_root, tmp_path, monkeypatch):
    import errno

    from p2ch_app.cli import prep
    from tests.conftest import run

    real_save = np.save

    def save_half(path, array):
        real_save(path, array[: len(array) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    for series in tiny_root.series:  # compressed, so luna-prep writes copies of them (a .raw is read in place)
        sitk.WriteImage(sitk.ReadImage(str(series.mhd)), str(series.mhd), useCompression=True)
    args = ["--data-root", tiny_root.root, "--cache-dir", tmp_path / "cache", "--workers", 1]
    assert run(prep, [*args, "--series", tiny_root.series[0].uid]).exit_code == 0
    before = snapshot(tmp_path / "cache")
    monkeypatch.setattr(np, "save", save_half)
    result = run(prep, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    volume = LunaCache(tmp_path / "cache", tiny_root.root).volume_path(tiny_root.series[1].uid)
    assert result.stderr.splitlines()[-1] == (f"luna-prep: error: cannot write {volume}: disk full (no space left on "
                                              "device); free space or choose another disk")
    first = LunaCache(tmp_path / "cache", tiny_root.root).volume_path(tiny_root.series[0].uid)
    assert sorted(p.name for p in (tmp_path / "cache" / "volumes").iterdir()) == [first.name]
    assert snapshot(tmp_path / "cache") == before


PREP = [sys.executable, "-m", "p2ch_app.cli", "luna-prep", "--workers", "2"]


def test_concurrent_preps_wait_for_each_other_and_keep_each_others_temporary_files(tmp_path):
    import fcntl

    tiny = make_tiny_root(tmp_path / "luna", n_series=4, shape=(24, 48, 48))
    cache_dir = tmp_path / "cache"
    (cache_dir / "volumes").mkdir(parents=True)
    theirs = cache_dir / "volumes" / ".1.2.840.99.1.99999-0000.tmp.npy"  # a live run's half-written volume
    theirs.write_bytes(b"half")
    with open(cache_dir / "luna-prep.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another luna-prep is building this cache
        procs = [subprocess.Popen([*PREP, "--data-root", str(tiny.root), "--cache-dir", str(cache_dir)], cwd=PROJECT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(proc.poll() is None and waiting(proc) for proc in procs):
            time.sleep(0.05)
        assert all(waiting(proc) for proc in procs)
        assert list((cache_dir / "volumes").iterdir()) == [theirs]  # neither removed it nor built anything
        theirs.unlink()  # the other run finishes
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert proc.first_line == f"luna-prep: waiting for another luna-prep to finish building {cache_dir}\n"
    cache = LunaCache(cache_dir, tiny.root)
    assert cache.cached_uids() == sorted(s.uid for s in tiny.series)
    for series in tiny.series:
        assert np.array_equal(cache.volume(series.uid), load_series(tiny.root, series.uid).hu)
    assert not list((cache_dir / "volumes").glob("*.tmp.npy"))


def waiting(proc) -> bool:
    """Whether luna-prep has said that it waits for the lock (its first line on stderr)."""
    if not hasattr(proc, "first_line"):
        proc.first_line = proc.stderr.readline()
    return "waiting" in proc.first_line


def test_a_clipped_volume_reads_any_index_as_clipped_int16_of_its_own():
    data = np.arange(-2400, 2400, 10).reshape(4, 8, 15)
    expected = np.clip(data, -1000, 1000).astype(np.int16)
    for voxels in (data.astype(np.int16), data.astype(">i2")):  # native, and a byte order to convert
        volume = ClippedVolume(voxels)
        assert volume.shape == (4, 8, 15) and volume.ndim == 3 and len(volume) == 4 and volume.dtype == np.int16
        for key in [(0, 0, 0), (-1, 3), (slice(1, 3), slice(None), slice(2, 9)), (np.array([0, 0, 2, 3]), slice(1, 5)),
                    (Ellipsis, 4)]:
            part = volume[key]
            assert np.array_equal(part, expected[key]) and part.dtype == np.int16 and part.dtype.isnative, key
            if np.ndim(part):
                assert part.flags.owndata and part.flags.writeable and not np.shares_memory(part, voxels)
        assert np.array_equal(np.asarray(volume), expected) and np.asarray(volume, np.float32).dtype == np.float32
        assert (volume == expected).all()
        with pytest.raises(ValueError, match="makes a copy"):
            np.asarray(volume, copy=False)


def assert_same_reads(mapped: LunaCache, copied: LunaCache, uid: str, centers_xyz) -> None:
    """Every way the trainers and mining read a CT gives the same int16 voxels from both caches."""
    whole = np.asarray(mapped.volume(uid))
    assert whole.dtype == np.int16 and np.array_equal(whole, np.asarray(copied.volume(uid)))
    for xyz in centers_xyz:
        for size in ((32, 48, 48), (6, 10, 10)):
            (a, start_a), (b, start_b) = mapped.crop(uid, xyz, size), copied.crop(uid, xyz, size)
            assert a.dtype == b.dtype == np.int16 and np.array_equal(a, b) and np.array_equal(start_a, start_b)
    for k in (0, len(whole) // 2, len(whole) - 1):
        for rows, cols in ((slice(None), slice(None)), (slice(5, 37), slice(3, 35))):
            stack = slice_stack(mapped.volume(uid), k, 3, rows, cols)
            assert stack.dtype == np.int16 and np.array_equal(stack, slice_stack(copied.volume(uid), k, 3, rows, cols))
            assert np.array_equal(stack, slice_stack(whole, k, 3, rows, cols))


def test_mapped_raw_files_read_bit_for_bit_as_the_copied_volumes(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    mapped, copied = LunaCache(tmp_path / "mapped", tiny_root.root), LunaCache(tmp_path / "copied", tiny_root.root)
    mapped.build(index, progress=False)
    copied.build(index, progress=False, copy_volumes=True)
    assert not list((tmp_path / "mapped" / "volumes").iterdir())
    assert len(list((tmp_path / "copied" / "volumes").glob("*.npy"))) == 3
    raw_bytes = sum(s.mhd.with_suffix(".raw").stat().st_size for s in tiny_root.series)
    assert mapped.size_bytes() < copied.size_bytes() - 0.9 * raw_bytes
    for series in tiny_root.series:
        assert np.fromfile(series.mhd.with_suffix(".raw"), "<i2").min() == -3024  # on disk out of range
        assert mapped.record(series.uid).source is not None and copied.record(series.uid).source is None
        assert np.asarray(mapped.volume(series.uid))[:, :, :3].max() == -1000  # clipped as read
        assert_same_reads(mapped, copied, series.uid, index.for_series(series.uid).center_xyz)


def test_synthetic_series_read_bit_for_bit_as_their_copies(prepared_synth, tmp_path):
    index = build_index(prepared_synth)
    mapped = LunaCache(prepared_synth / "cache", prepared_synth)  # the fixture's own luna-prep build
    copied = LunaCache(tmp_path / "copied", prepared_synth)
    copied.build(index, progress=False, copy_volumes=True)
    for uid in index.series_uids:
        assert mapped.record(uid).source is not None and not mapped.volume_path(uid).exists()
        assert_same_reads(mapped, copied, uid, index.for_series(uid).center_xyz[:12])


LAYOUT_UID = "1.2.840.99.5"
LAYOUTS = {"raw": True, "local": True, "header_size": True, "header_at_end": True, "big_endian": False,
           "compressed": False, "float": False}


def write_layout(folder, hu: np.ndarray, geometry, layout: str):
    """One CT as a .mhd in the given layout: the voxels of hu, geometry's origin, spacing and direction."""
    mhd = folder / f"{LAYOUT_UID}.mhd"
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(hu.astype(np.float32) if layout == "float" else hu)
    image.SetOrigin(geometry.origin.tolist())
    image.SetSpacing(geometry.spacing.tolist())
    image.SetDirection(geometry.direction.reshape(-1).tolist())
    sitk.WriteImage(image, str(mhd), useCompression=layout == "compressed")
    header, raw = mhd.read_text(), mhd.with_suffix(".raw")
    if layout == "local":  # the voxels right after the header, in the .mhd itself
        mhd.write_bytes(header.replace(f"= {raw.name}", "= LOCAL").encode() + raw.read_bytes())
        raw.unlink()
    elif layout in ("header_size", "header_at_end"):  # bytes before the voxels that ITK skips
        raw.write_bytes(bytes(range(64 if layout == "header_size" else 100)) + raw.read_bytes())
        size = "64" if layout == "header_size" else "-1"
        mhd.write_text(header.replace("ElementDataFile", f"HeaderSize = {size}\nElementDataFile"))
    elif layout == "big_endian":
        raw.write_bytes(hu.astype(">i2").tobytes())
        mhd.write_text(header.replace("BinaryDataByteOrderMSB = False", "BinaryDataByteOrderMSB = True"))
    return mhd


@pytest.mark.parametrize("layout, mapped", LAYOUTS.items())
def test_each_layout_reads_as_load_ct_and_only_plain_little_endian_int16_is_read_in_place(tmp_path, layout, mapped):
    from p2ch_app.data.ct import Geometry, irc_to_xyz

    rng = np.random.default_rng(3)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    geometry = Geometry(np.array([-120.0, 30.5, -310.0]), np.array([0.7, 0.8, 2.5]), q * np.sign(np.diag(r)))
    hu = rng.integers(-3024, 3072, (12, 20, 26)).astype(np.int16)  # every axis its own length
    root = tmp_path / "luna"
    write_layout(root / "subset0", hu, geometry, layout)
    centers = irc_to_xyz(np.array([(0, 0, 0), (6, 10, 13), (11, 19, 25), (3, 15, 2)]), geometry)
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "".join(
        f"{LAYOUT_UID},{x},{y},{z},0\n" for x, y, z in centers))
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                          f"{LAYOUT_UID},{centers[1, 0]},{centers[1, 1]},{centers[1, 2]},3.0\n")
    cache = LunaCache(tmp_path / "cache", root)
    cache.build(build_index(root), progress=False)
    ct = load_series(root, LAYOUT_UID)
    assert np.array_equal(ct.hu, np.clip(hu, -1000, 1000))
    record = cache.record(LAYOUT_UID)
    assert (record.source is not None) == mapped and cache.volume_path(LAYOUT_UID).exists() != mapped
    assert np.allclose(record.geometry.direction, geometry.direction)
    assert np.array_equal(cache.volume(LAYOUT_UID), ct.hu)
    for xyz in centers:
        crop, start = cache.crop(LAYOUT_UID, xyz, (4, 6, 6))
        expected, expected_start = extract_crop(ct.hu, xyz_to_irc(xyz, ct.geometry), (4, 6, 6))
        assert np.array_equal(crop, expected) and np.array_equal(start, expected_start)


def test_a_layout_that_does_not_read_as_load_ct_is_copied_instead(tiny_root, tmp_path, monkeypatch):
    from dataclasses import replace

    from p2ch_app.data import cache as cache_module

    header_layout = cache_module.raw_int16_layout
    others = {s.mhd: tiny_root.series[(k + 1) % 3].mhd.with_suffix(".raw") for k, s in enumerate(tiny_root.series)}
    # a header that would map another CT's voxels (same shape, other values): luna-prep compares and copies
    monkeypatch.setattr(cache_module, "raw_int16_layout", lambda mhd: replace(header_layout(mhd), file=others[mhd]))
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    cache.build(build_index(tiny_root.root), progress=False)
    for series in tiny_root.series:
        assert cache.record(series.uid).source is None and cache.volume_path(series.uid).exists()
        assert np.array_equal(cache.volume(series.uid), load_series(tiny_root.root, series.uid).hu)


def test_a_data_file_outside_the_data_root_is_copied_not_read_in_place(tiny_root, tmp_path):
    series = tiny_root.series[0]
    raw = series.mhd.with_suffix(".raw")
    elsewhere = raw.rename(tmp_path / "elsewhere.raw")  # the header names a file beside the data root
    series.mhd.write_text(series.mhd.read_text().replace(f"= {raw.name}", "= ../../elsewhere.raw"))
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    cache.build(build_index(tiny_root.root), progress=False)
    assert cache.record(series.uid).source is None and cache.volume_path(series.uid).exists()
    assert np.array_equal(cache.volume(series.uid), load_series(tiny_root.root, series.uid).hu)
    elsewhere.unlink()  # the copy does not depend on it
    assert np.array_equal(LunaCache(tmp_path / "cache", tiny_root.root).volume(series.uid), cache.volume(series.uid))
    assert all(cache.record(s.uid).source is not None for s in tiny_root.series[1:])


def prepared_raw(tiny_root, tmp_path, k: int):
    """(index, series k, its .raw) once the tiny root is cached in tmp_path/cache."""
    index = build_index(tiny_root.root)
    LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)
    return index, tiny_root.series[k], tiny_root.series[k].mhd.with_suffix(".raw")


def test_a_raw_file_changed_after_prep_is_refused_by_readers_and_rebuilt_by_prep(tiny_root, tmp_path):
    from p2ch_app.data.cache import require_cached

    index, series, raw = prepared_raw(tiny_root, tmp_path, 0)
    data = bytearray(raw.read_bytes())
    data[:2] = (123).to_bytes(2, "little", signed=True)
    raw.write_bytes(bytes(data))  # same size, new contents and time
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert cache.cached_uids() == [s.uid for s in tiny_root.series[1:]]
    changed = (f"{raw.resolve()}, the CT file of series {series.uid}, was changed or removed after luna-prep read "
               "it; run luna-prep again to update the cache")
    with pytest.raises(UserError) as refused:
        cache.volume(series.uid)
    assert str(refused.value) == changed
    with pytest.raises(UserError) as refused:
        cache.crop(series.uid, index.for_series(series.uid).center_xyz[0])
    assert str(refused.value) == changed
    with pytest.raises(UserError, match="1 series .* are not in the cache .*run luna-prep"):
        require_cached(tmp_path / "cache", index, tiny_root.root)
    done = LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)
    assert done["built"] == 1 and done["skipped"] == 2 and done["series"] == 3
    rebuilt = LunaCache(tmp_path / "cache", tiny_root.root)
    assert rebuilt.volume(series.uid)[0, 0, 0] == 123
    assert np.array_equal(rebuilt.volume(series.uid), load_series(tiny_root.root, series.uid).hu)


def test_a_raw_file_removed_after_prep_is_refused_by_readers_and_named_by_prep(tiny_root, tmp_path):
    index, series, raw = prepared_raw(tiny_root, tmp_path, 1)
    data = raw.read_bytes()
    raw.unlink()
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert series.uid not in cache.cached_uids() and len(cache.cached_uids()) == 2
    with pytest.raises(UserError) as refused:
        cache.volume(series.uid)
    assert str(refused.value) == (f"{raw.resolve()}, the CT file of series {series.uid}, was changed or removed "
                                  "after luna-prep read it; run luna-prep again to update the cache")
    with pytest.raises(UserError, match=f"names data file {raw.name}, which is missing; copy the .raw"):
        LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)
    raw.write_bytes(data)  # back, with a new time: read again, then trusted
    assert LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)["built"] == 1
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert np.array_equal(cache.volume(series.uid), load_series(tiny_root.root, series.uid).hu)


def test_an_old_format_or_copied_cache_is_rebuilt_in_place_and_its_copies_deleted(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False, copy_volumes=True)
    volumes = tmp_path / "cache" / "volumes"
    with diskcache.Cache(str(tmp_path / "cache" / "meta")) as store:
        for root, uid in list(store):  # the records as FORMAT_VERSION 1 wrote them: keyed by uid, copies <uid>.npy
            old = store.pop((root, uid))
            old["version"] = 1
            del old["source"]
            store[uid] = old
    for copy in volumes.glob("*.npy"):
        copy.rename(volumes / f"{copy.name.split('-')[0]}.npy")
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    assert cache.cached_uids() == [] and len(list(volumes.glob("*.npy"))) == 3
    with pytest.raises(UserError, match=f"not in the cache .*; run luna-prep --data-root {tiny_root.root} first"):
        cache.volume(tiny_root.series[0].uid)
    assert LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False, copy_volumes=True)["built"] == 3
    with diskcache.Cache(str(tmp_path / "cache" / "meta")) as store:
        assert sorted(store) == [(cache.root, s.uid) for s in tiny_root.series]  # the old records are gone
    assert sorted(p.name for p in volumes.iterdir()) == [cache.volume_path(s.uid).name for s in tiny_root.series]
    done = LunaCache(tmp_path / "cache", tiny_root.root).build(index, progress=False)  # read in place from now on
    assert done["built"] == 3 and done["series"] == 3 and not list(volumes.iterdir())
    cache = LunaCache(tmp_path / "cache", tiny_root.root)
    for series in tiny_root.series:
        assert cache.record(series.uid).source is not None
        assert np.array_equal(cache.volume(series.uid), load_series(tiny_root.root, series.uid).hu)
