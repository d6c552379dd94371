import signal
import subprocess
import sys
import time

import diskcache
import numpy as np
import pytest

from p2ch_app.data.cache import LunaCache, SeriesRecord, grow_nodule_mask
from p2ch_app.data.ct import extract_crop, load_series, xyz_to_irc
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


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_mask_slice_with_margin_is_the_3d_grown_label(margin):
    from scipy import ndimage

    from p2ch_app.data.ct import Geometry

    label = np.zeros((9, 12, 12), bool)
    label[4, 5:7, 5:7] = True  # a nodule one slice thick
    label[0, 0, 11] = True  # a corner voxel: growth stops at the volume's faces
    label[8, 3:9, 2] = True
    record = SeriesRecord("1.2", label.shape, Geometry(np.zeros(3), np.ones(3), np.eye(3)),
                          np.flatnonzero(label), np.unique(np.nonzero(label)[0]), "")
    grown = ndimage.binary_dilation(label, ndimage.generate_binary_structure(3, 1), iterations=margin) if margin \
        else label
    for k in range(label.shape[0]):
        assert np.array_equal(record.mask_slice(k, margin), grown[k]), k
    assert record.label_slices(margin).tolist() == np.flatnonzero(grown.any(axis=(1, 2))).tolist()


def test_build_then_read(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    cache = LunaCache(tmp_path / "cache")
    done = cache.build(tiny_root.root, index, progress=False)
    assert done["built"] == 3 and done["skipped"] == 0 and done["series"] == 3 and done["bytes"] > 0
    for series in tiny_root.series:
        ct = load_series(tiny_root.root, series.uid)
        volume = cache.volume(series.uid)
        assert isinstance(volume, np.memmap) and np.array_equal(volume, ct.hu)
        record = cache.record(series.uid)
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


def test_second_build_skips_and_changed_annotations_rebuild_one_series(tiny_root, tmp_path):
    cache = LunaCache(tmp_path / "cache")
    cache.build(tiny_root.root, build_index(tiny_root.root), progress=False)
    again = LunaCache(tmp_path / "cache").build(tiny_root.root, build_index(tiny_root.root), progress=False)
    assert again["built"] == 0 and again["skipped"] == 3
    ann = tiny_root.root / "annotations.csv"
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join(lines[:-1]) + "\n")  # drop the last series' last nodule
    index = build_index(tiny_root.root)
    redone = LunaCache(tmp_path / "cache").build(tiny_root.root, index, progress=False)
    assert redone["built"] == 1 and redone["skipped"] == 2
    raw = tiny_root.series[0].mhd.with_suffix(".raw")
    data = bytearray(raw.read_bytes())
    data[:2] = (123).to_bytes(2, "little", signed=True)
    raw.write_bytes(bytes(data))  # a rewritten CT is cached again, with its new values
    cache = LunaCache(tmp_path / "cache")
    assert cache.build(tiny_root.root, index, progress=False)["built"] == 1
    assert cache.volume(tiny_root.series[0].uid)[0, 0, 0] == 123


def test_parallel_build_matches_serial(tiny_root, tmp_path):
    index = build_index(tiny_root.root)
    serial, parallel = LunaCache(tmp_path / "a"), LunaCache(tmp_path / "b")
    serial.build(tiny_root.root, index, progress=False)
    assert parallel.build(tiny_root.root, index, workers=2, progress=False)["built"] == 3
    for uid in index.series_uids:
        assert np.array_equal(serial.volume(uid), parallel.volume(uid))
        assert np.array_equal(serial.record(uid).mask_voxels, parallel.record(uid).mask_voxels)


def test_annotation_outside_its_ct_is_refused_and_the_cache_is_kept(tiny_root, tmp_path):
    cache = LunaCache(tmp_path / "cache")
    cache.build(tiny_root.root, build_index(tiny_root.root), progress=False)
    before = snapshot(tmp_path / "cache")
    ann = tiny_root.root / "annotations.csv"
    ann.write_text(ann.read_text() + "1.2.840.99.2,900.0,0.0,0.0,5.0\n")
    outside = r"annotations.csv:7: nodule at \[900.0, 0.0, 0.0\] mm lies outside CT 1.2.840.99.2"
    with pytest.raises(UserError, match=outside):
        LunaCache(tmp_path / "cache").build(tiny_root.root, build_index(tiny_root.root), progress=False)
    assert snapshot(tmp_path / "cache") == before


def test_reading_an_uncached_series_says_to_run_prep(tmp_path):
    with pytest.raises(UserError, match="run luna-prep first"):
        LunaCache(tmp_path / "cache").volume("1.2.3")


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
cache.LunaCache(sys.argv[2]).build(sys.argv[1], build_index(sys.argv[1]), progress=False)
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
    cache = LunaCache(cache_dir)
    survivors = cache.cached_uids()
    assert 2 <= len(survivors) < 6
    for uid in survivors:  # whatever looks cached is whole
        assert np.array_equal(cache.volume(uid), load_series(tiny.root, uid).hu)
    done = LunaCache(cache_dir).build(tiny.root, build_index(tiny.root), progress=False)
    assert done["built"] == 6 - len(survivors) and done["series"] == 6
    assert not list((cache_dir / "volumes").glob("*.tmp.npy"))


def test_a_truncated_or_replaced_volume_is_not_current_and_is_rebuilt(tiny_root, tmp_path):
    from p2ch_app.data.cache import require_cached

    index = build_index(tiny_root.root)
    LunaCache(tmp_path / "cache").build(tiny_root.root, index, progress=False)
    first, second = (LunaCache(tmp_path / "cache").volume_path(s.uid) for s in tiny_root.series[:2])
    first.write_bytes(first.read_bytes()[:-100])  # cut off, as by a full disk or a copy that stopped
    np.save(second, np.zeros((2, 2, 2), np.int16))  # a whole .npy, of the wrong shape
    cache = LunaCache(tmp_path / "cache")
    assert cache.cached_uids() == [tiny_root.series[2].uid]
    with pytest.raises(UserError, match=f"the cached volume {first} does not match its record .*run luna-prep again"):
        cache.volume(tiny_root.series[0].uid)
    with pytest.raises(UserError, match="2 series .* are not in the cache .*or damaged"):
        require_cached(tmp_path / "cache", index, tiny_root.root)
    done = LunaCache(tmp_path / "cache").build(tiny_root.root, index, progress=False)
    assert done["built"] == 2 and done["series"] == 3
    rebuilt = LunaCache(tmp_path / "cache")
    for series in tiny_root.series:
        assert np.array_equal(rebuilt.volume(series.uid), load_series(tiny_root.root, series.uid).hu)


@pytest.mark.parametrize("damage", ["junk", "torn"])
def test_a_damaged_cache_database_says_how_to_rebuild(tiny_root, tmp_path, damage):
    LunaCache(tmp_path / "cache").build(tiny_root.root, build_index(tiny_root.root), progress=False)
    db = tmp_path / "cache" / "meta" / "cache.db"
    data = db.read_bytes()
    db.write_bytes(bytes(range(256)) * 20 if damage == "junk" else data[:200] + bytes(len(data) - 200))
    rebuild = f"the cache database {tmp_path / 'cache' / 'meta'} is damaged .*; delete .*meta .*run luna-prep again"
    with pytest.raises(UserError, match=rebuild):
        LunaCache(tmp_path / "cache").build(tiny_root.root, build_index(tiny_root.root), progress=False)
    with pytest.raises(UserError, match=rebuild):
        LunaCache(tmp_path / "cache").volume(tiny_root.series[0].uid)


def test_a_full_disk_during_prep_is_one_line_and_leaves_no_temporary_file(tiny_root, tmp_path, monkeypatch):
    import errno

    from p2ch_app.cli import prep
    from tests.conftest import run

    real_save = np.save

    def save_half(path, array):
        real_save(path, array[: len(array) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    args = ["--data-root", tiny_root.root, "--cache-dir", tmp_path / "cache", "--workers", 1]
    assert run(prep, [*args, "--series", tiny_root.series[0].uid]).exit_code == 0
    before = snapshot(tmp_path / "cache")
    monkeypatch.setattr(np, "save", save_half)
    result = run(prep, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    volume = LunaCache(tmp_path / "cache").volume_path(tiny_root.series[1].uid)
    assert result.stderr.splitlines()[-1] == (f"luna-prep: error: cannot write {volume}: disk full (no space left on "
                                              "device); free space or choose another disk")
    assert sorted(p.name for p in (tmp_path / "cache" / "volumes").iterdir()) == [f"{tiny_root.series[0].uid}.npy"]
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
    cache = LunaCache(cache_dir)
    assert cache.cached_uids() == sorted(s.uid for s in tiny.series)
    for series in tiny.series:
        assert np.array_equal(cache.volume(series.uid), load_series(tiny.root, series.uid).hu)
    assert not list((cache_dir / "volumes").glob("*.tmp.npy"))


def waiting(proc) -> bool:
    """Whether luna-prep has said that it waits for the lock (its first line on stderr)."""
    if not hasattr(proc, "first_line"):
        proc.first_line = proc.stderr.readline()
    return "waiting" in proc.first_line
