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
