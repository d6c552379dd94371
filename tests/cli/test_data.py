"""luna-prep and the trainers on data roots that were copied, moved or share a cache folder: a cache
record serves only the data root it was built from, so a command never reads another root's files."""

import shutil

import numpy as np
import SimpleITK as sitk

from p2ch_app.cli import COMMANDS, prep
from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import load_series
from tests.conftest import TINY, assert_one_line_error, make_tiny_root, run


def prepped(root, *args) -> str:
    """luna-prep of root (and args): its summary line."""
    result = run(prep, ["--data-root", root, "--workers", 1, *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def train(root, runs, *args):
    return run(COMMANDS["luna-train-cls"], ["--data-root", root, *TINY, "--epochs", 1, "--runs-dir", runs, *args])


def refused_for_another_root(result, built_for, root) -> None:
    assert_one_line_error(result, f"was built for the data root {built_for.resolve()}, not {root} ")
    assert f"run luna-prep --data-root {root} to cache this root's own files" in result.stderr


def assert_reads_its_own_files(cache_dir, root, uids) -> None:
    cache = LunaCache(cache_dir, root)
    assert cache.cached_uids() == sorted(uids)
    for uid in uids:
        assert np.array_equal(cache.volume(uid), load_series(root, uid).hu)


def assert_one_prep_then_trains(built_for, root, runs) -> None:
    """root, holding the 3-series cache built for another root: training refuses until one luna-prep
    has built root's own records, from root's own files."""
    refused_for_another_root(train(root, runs), built_for, root)
    assert "built 3, already current 0; 3 series" in prepped(root)
    assert "built 0, already current 3; 3 series" in prepped(root)
    result = train(root, runs)
    assert result.exit_code == 0, result.output
    assert_reads_its_own_files(root / "cache", root, ["1.2.840.99.1", "1.2.840.99.2", "1.2.840.99.3"])


def test_a_copied_root_is_rebuilt_from_its_own_files_and_its_cut_file_is_refused(tmp_path):
    original = make_tiny_root(tmp_path / "a" / "luna").root
    prepped(original)
    copy = tmp_path / "b" / "luna"
    shutil.copytree(original, copy)  # the cache included, times kept
    cut = copy / "subset0" / "1.2.840.99.3.raw"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    refused_for_another_root(train(copy, tmp_path / "runs"), original, copy)
    result = run(prep, ["--data-root", copy, "--workers", 1])
    assert_one_line_error(result, f"{cut} is truncated")
    assert str(original) not in result.stderr
    assert_reads_its_own_files(copy / "cache", copy, ["1.2.840.99.1", "1.2.840.99.2"])  # built before the cut one
    refused_for_another_root(train(copy, tmp_path / "runs"), original, copy)  # still no record of its own
    assert_one_line_error(run(prep, ["--data-root", copy, "--workers", 1]), f"{cut} is truncated")
    assert_reads_its_own_files(original / "cache", original, ["1.2.840.99.1", "1.2.840.99.2", "1.2.840.99.3"])


def test_a_copy_whose_original_is_deleted_trains(tmp_path):
    original = make_tiny_root(tmp_path / "a" / "luna").root
    prepped(original)
    copy = tmp_path / "b" / "luna"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    assert_one_prep_then_trains(original, copy, tmp_path / "runs")


def test_a_moved_root_needs_one_prep_that_reads_only_the_new_place(tmp_path):
    old = make_tiny_root(tmp_path / "old").root
    prepped(old)
    new = tmp_path / "new"
    old.rename(new)  # with its cache; nothing is left at the old place to read
    assert_one_prep_then_trains(old, new, tmp_path / "runs")


def test_a_cache_dir_shared_by_two_roots_keeps_each_roots_own_series(tmp_path):
    a = make_tiny_root(tmp_path / "a", n_series=3, seed=0)
    b = make_tiny_root(tmp_path / "b", n_series=2, seed=1)  # the same UIDs 1.2.840.99.1-2, other voxels
    for tiny in (a, b):  # series 1 compressed in both: each root needs a copy of its own in the one folder
        mhd = tiny.series[0].mhd
        sitk.WriteImage(sitk.ReadImage(str(mhd)), str(mhd), True)
        mhd.with_suffix(".raw").unlink()
    uid = a.series[0].uid
    assert not np.array_equal(load_series(a.root, uid).hu, load_series(b.root, uid).hu)
    shared = ["--cache-dir", tmp_path / "cache"]
    assert_one_line_error(train(b.root, tmp_path / "runs", *shared), f"run luna-prep --data-root {b.root} first")
    assert not (tmp_path / "cache").exists()  # refused, and nothing made
    assert "built 3, already current 0; 3 series" in prepped(a.root, *shared)
    assert "built 2, already current 0; 2 series" in prepped(b.root, *shared)
    assert "built 0, already current 3; 3 series" in prepped(a.root, *shared)  # b did not overwrite a's records
    assert "built 0, already current 2; 2 series" in prepped(b.root, *shared)
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npy"))) == 2
    assert_reads_its_own_files(tmp_path / "cache", a.root, [s.uid for s in a.series])
    assert_reads_its_own_files(tmp_path / "cache", b.root, [s.uid for s in b.series])
    result = train(b.root, tmp_path / "runs", *shared, "--val-stride", 2)
    assert result.exit_code == 0, result.output
