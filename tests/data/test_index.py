import shutil

import numpy as np
import pytest

from p2ch_app.data.index import (
    BENIGN,
    EXCLUDED_CSV,
    MALIGNANT,
    NOT_A_NODULE,
    UNKNOWN_MALIGNANCY,
    build_index,
    read_excluded,
)
from p2ch_app.errors import UserError
from tests.conftest import REAL_LUNA_CSVS, make_tiny_root, requires_shared


def test_merge_rules(tiny_root):
    index = build_index(tiny_root.root)
    assert index.series_uids == [s.uid for s in tiny_root.series]  # 1.2.840.99.777 is not on disk
    annotated = index.has_annotation
    assert annotated.sum() == 5  # series 0 and 2 have two nodules, series 1 has one
    assert (index.diameter_mm[annotated] > 0).all()
    # the class-1 candidate one voxel off a nodule merged into its annotation; the far one stayed
    extra = index.is_nodule & ~annotated
    assert extra.sum() == 1 and index.uids()[extra].tolist() == ["1.2.840.99.1"]
    assert index.diameter_mm[extra].tolist() == [0.0] and index.malignancy[extra].tolist() == [UNKNOWN_MALIGNANCY]
    assert (~index.is_nodule).sum() == 12 and (index.malignancy[~index.is_nodule] == NOT_A_NODULE).all()
    assert index.malignancy[annotated].tolist().count(MALIGNANT) == 3  # first nodule of each series
    assert index.malignancy[annotated].tolist().count(BENIGN) == 2
    assert not index.mined.any()


def test_records_and_order(tiny_root):
    index = build_index(tiny_root.root)
    assert index.uids()[0] == "1.2.840.99.1" and index.is_nodule[0] and index.has_annotation[0]
    assert index.malignancy[0] == MALIGNANT and index.line[0] == 2
    codes = index.series_code
    assert (np.diff(codes) >= 0).all()  # grouped by series, nodules first in each
    for code in range(len(index.series_uids)):
        flags = index.is_nodule[codes == code]
        assert (np.diff(flags.astype(int)) <= 0).all()


def test_with_mined_appends_non_nodule_rows_marked_as_mined(tiny_root):
    index = build_index(tiny_root.root)
    grown = index.with_mined(np.array([1, 0]), np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert len(grown) == len(index) + 2 and grown.series_uids == index.series_uids
    for name in ("series_code", "center_xyz", "is_nodule", "has_annotation", "diameter_mm", "malignancy", "line",
                 "mined"):
        assert np.array_equal(getattr(grown, name)[:len(index)], getattr(index, name)), name
    added = len(index) + 1
    assert grown.uids()[added] == index.series_uids[0] and grown.center_xyz[added].tolist() == [4.0, 5.0, 6.0]
    assert not grown.is_nodule[added] and not grown.has_annotation[added] and grown.mined[added]
    assert grown.malignancy[added] == NOT_A_NODULE and grown.mined.sum() == 2
    assert np.array_equal(grown.is_validation(2)[len(index):], index.validation_series(2)[[1, 0]])


def test_without_malignancy_file_malignancy_is_unknown(tiny_root):
    (tiny_root.root / "annotations_with_malignancy.csv").unlink()
    index = build_index(tiny_root.root)
    assert (index.malignancy[index.has_annotation] == UNKNOWN_MALIGNANCY).all()


def test_index_can_include_series_not_on_disk(tiny_root):
    assert "1.2.840.99.777" in build_index(tiny_root.root, require_on_disk=False).series_uids


def split(index, val_stride):
    """(training rows, validation rows) as an index each."""
    is_val = index.is_validation(val_stride)
    return index.select(~is_val), index.select(is_val)


def test_split_by_series_is_deterministic_and_disjoint(tmp_path):
    root = make_tiny_root(tmp_path, n_series=12, shape=(24, 48, 48))
    index = build_index(root.root)
    train, val = split(index, 5)
    assert val.series_uids == [index.series_uids[i] for i in (0, 5, 10)]
    assert set(train.series_uids).isdisjoint(val.series_uids)
    assert len(train) + len(val) == len(index)
    again_train, again_val = split(build_index(root.root), 5)
    assert again_val.series_uids == val.series_uids
    assert np.array_equal(again_train.center_xyz, train.center_xyz)
    assert split(build_index(root.root), 10)[1].series_uids == [index.series_uids[0], index.series_uids[10]]
    with pytest.raises(UserError, match="at least 2"):
        index.validation_series(1)


@requires_shared
def test_real_luna16_annotation_files(tmp_path):
    for name in ("annotations.csv", "annotations_with_malignancy.csv"):
        shutil.copy(REAL_LUNA_CSVS / name, tmp_path / name)
    (tmp_path / "candidates.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,class\n1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860,0,0,0,0\n")
    index = build_index(tmp_path, require_on_disk=False)
    annotated = index.has_annotation
    assert annotated.sum() == 1186
    assert (index.malignancy[annotated] >= 0).sum() == 1182
    assert (index.malignancy[annotated] == 1).sum() == 378
    assert len(index.series_uids) == 601


@pytest.mark.parametrize("name, content, message", [
    ("candidates.csv", "", "candidates.csv is empty"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n", "has a header but no rows"),
    ("candidates.csv", "seriesuid,coordX,coordZ,class\n1.2,1,2,0\n", "candidates.csv:1: header lacks column"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n1.2,1,2\n",
     "candidates.csv:3: row has 3 fields, expected 5"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n\n1.2,1,,3,0\n",
     "candidates.csv:4: field coordY is missing"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n1.2,1,2,abc,0\n",
     "candidates.csv:3: field coordZ 'abc' is not a number"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,nan,0\n",
     "candidates.csv:2: field coordZ 'nan' is not a finite number"),
    ("candidates.csv", "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,2\n",
     "candidates.csv:2: field class is not 0 or 1"),
    ("annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,-4\n",
     "annotations.csv:2: field diameter_mm is not a positive diameter"),
    ("annotations_with_malignancy.csv",
     "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool\n1.2,1,2,3,4,maybe\n",
     "annotations_with_malignancy.csv:2: field mal_bool 'maybe' is not True or False"),
])
def test_bad_csvs_name_file_and_line(tiny_root, name, content, message):
    (tiny_root.root / name).write_text(content)
    with pytest.raises(UserError, match=message):
        build_index(tiny_root.root)


def test_missing_csv_and_missing_root(tiny_root, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_index(tmp_path / "nowhere")
    (tiny_root.root / "annotations.csv").unlink()
    with pytest.raises(UserError, match="annotations.csv is missing"):
        build_index(tiny_root.root)


def test_no_series_on_disk(tiny_root):
    for s in tiny_root.series:
        s.mhd.unlink()
    with pytest.raises(UserError, match="none of the series"):
        build_index(tiny_root.root)


def test_csvs_saved_with_a_byte_order_mark_are_read(tiny_root):
    """Spreadsheets save 'CSV UTF-8' with a byte-order mark before the first column name."""
    expected = build_index(tiny_root.root)
    for name in ["candidates.csv", "annotations.csv", "annotations_with_malignancy.csv"]:
        path = tiny_root.root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    index = build_index(tiny_root.root)
    assert index.series_uids == expected.series_uids
    assert np.array_equal(index.center_xyz, expected.center_xyz)
    assert np.array_equal(index.malignancy, expected.malignancy)


def test_excluded_findings_are_optional_keep_their_sizes_and_name_bad_lines(tiny_root):
    root = tiny_root.root
    assert read_excluded(root).by_series == {}  # no file: nothing is excluded
    before = build_index(root)
    (root / EXCLUDED_CSV).write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.840.99.1,1,2,3,2.5\n"
                                     "1.2.840.99.2, 7,8,9,-1\n1.2.840.99.1,4.5,5,6,-1\n")
    excluded = read_excluded(root)
    xyz, diameters = excluded.for_series("1.2.840.99.1")
    assert xyz.tolist() == [[1, 2, 3], [4.5, 5, 6]] and diameters.tolist() == [2.5, -1.0]  # -1 kept: no size given
    assert excluded.for_series("1.2.840.99.2")[1].tolist() == [-1.0]
    xyz, diameters = excluded.for_series("1.2.840.99.3")
    assert xyz.shape == (0, 3) and diameters.shape == (0,)
    after = build_index(root)  # the training index does not change
    assert after.series_uids == before.series_uids and np.array_equal(after.center_xyz, before.center_xyz)
    (root / EXCLUDED_CSV).write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    assert read_excluded(root).by_series == {}  # a header alone excludes nothing
    (root / EXCLUDED_CSV).write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.840.99.1,1,2,3,2\n"
                                     "1.2.840.99.1,1,x,3,2\n")
    with pytest.raises(UserError, match="annotations_excluded.csv:3: field coordY 'x' is not a number"):
        read_excluded(root)
    (root / EXCLUDED_CSV).write_text("seriesuid,coordX,coordY,diameter_mm\n1.2.840.99.1,1,2,2\n")
    with pytest.raises(UserError, match="annotations_excluded.csv:1: header lacks column"):
        read_excluded(root)
