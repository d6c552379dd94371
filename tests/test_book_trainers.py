"""scripts/book_trainers.py: the book's own trainers laid out on our data, shimmed, and run for a few batches."""

import math

import pytest

from p2ch_app.errors import UserError
from tests.conftest import PROJECT, make_tiny_root, script_module

BOOK_CODE = PROJECT / "data-unversioned" / "dlwpt-code"
requires_book = pytest.mark.skipif(
    not (BOOK_CODE / "p2ch14" / "training.py").is_file(),
    reason=f"{BOOK_CODE} is absent (the book's code is never committed; docs/benchmarks.md, "
           "\"The book's trainers side by side\", says how to get it)")


@pytest.fixture(scope="module")
def book_trainers():
    with script_module("book_trainers") as module:
        yield module


def test_layout_links_the_books_paths_and_empties_its_cache_when_the_data_changes(book_trainers, tmp_path):
    first = make_tiny_root(tmp_path / "first", n_series=3).root  # subset0 and subset1
    work = tmp_path / "work"
    book_trainers.layout(first, work)
    assert (work / "data/part2/luna/annotations_with_malignancy.csv").resolve() == \
        (first / "annotations_with_malignancy.csv").resolve()
    assert sorted(p.name for p in work.glob("data-unversioned/part2/luna/subset*/*.mhd")) == \
        sorted(p.name for p in first.glob("subset*/*.mhd"))
    filled = work / "data-unversioned/cache/part2ch14_raw"
    filled.mkdir()
    book_trainers.layout(first, work)
    assert filled.is_dir()  # the same data: the book's cache is kept

    second = make_tiny_root(tmp_path / "second", n_series=1).root  # subset0 only
    book_trainers.layout(second, work)
    assert not filled.exists()  # its keys are series uids and centres: another root's entries would be served
    assert (work / "data/part2/luna/candidates.csv").resolve() == (second / "candidates.csv").resolve()
    assert [p.name for p in work.glob("data-unversioned/part2/luna/subset*")] == ["subset0"]


def test_layout_refuses_a_folder_without_the_csvs(book_trainers, tmp_path):
    root = make_tiny_root(tmp_path / "luna", n_series=1).root
    (root / "annotations_with_malignancy.csv").unlink()
    with pytest.raises(UserError, match="annotations_with_malignancy.csv"):
        book_trainers.layout(root, tmp_path / "work")


def test_without_the_books_code_it_says_where_it_goes_and_how_to_get_it(book_trainers, tmp_path):
    absent = tmp_path / "dlwpt-code"
    result = book_trainers.book_training_rate(absent, tmp_path / "luna", tmp_path / "work", "cls", 4, 0, 8, True)
    assert set(result) == {"skipped"}
    assert str(absent) in result["skipped"] and "git clone" in result["skipped"]


def test_the_books_classifier_always_augments(book_trainers):
    with pytest.raises(UserError, match="always augments"):
        book_trainers.book_cli("cls", 4, 0, augmented=False)
    assert book_trainers.book_cli("seg", 4, 0, augmented=False) == [
        "--batch-size", "4", "--num-workers", "0", "--epochs", "1", "bench"]


@requires_book
@pytest.mark.parametrize("trainer,cache", [("cls", "part2ch14_raw"), ("seg", "part2ch13_raw")])
def test_a_book_trainer_runs_two_batches_on_our_data(book_trainers, tmp_path, trainer, cache):
    root = make_tiny_root(tmp_path / "luna", n_series=3, shape=(36, 100, 100)).root  # p2ch13 crops 96x96
    work = tmp_path / "work"
    result = book_trainers.book_training_rate(BOOK_CODE, root, work, trainer, batch_size=4, workers=1, samples=8,
                                              augmented=True)
    assert result["samples"] == 8 and result["seconds"] > 0
    assert result["samples_per_s"] == pytest.approx(8 / result["seconds"])
    assert math.isfinite(result["loss"])
    assert result["steady_samples_per_s"] is None  # two batches: both are warm-up
    assert result["module"] == f"{'p2ch14' if trainer == 'cls' else 'p2ch13'}.training"
    commit = BOOK_CODE / "COMMIT"
    assert result["commit"] == (commit.read_text().strip() if commit.is_file() else None)
    assert any((work / "data-unversioned/cache" / cache).rglob("*.db"))  # prepcache filled the book's own cache
    assert list((work / "runs").rglob("events.out.tfevents.*"))  # logMetrics ran on the epoch's metrics
