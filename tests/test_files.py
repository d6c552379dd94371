import math
from pathlib import Path

import pytest

from p2ch_app.files import plain, write_atomic, write_csv_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(tmp: Path):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_csv_has_a_header_and_unix_line_ends(tmp_path):
    write_csv_atomic(tmp_path / "a.csv", ["uid", "x"], [["1.2", 3.5], ["1.3", -1]])
    assert (tmp_path / "a.csv").read_bytes() == b"uid,x\n1.2,3.5\n1.3,-1\n"


def test_plain_values_for_json_and_checkpoints():
    value = {"runs": Path("runs/x"), "aucs": (0.5, math.nan), "nested": {"n": 3, "s": "a"}}
    assert plain(value) == {"runs": "runs/x", "aucs": [0.5, None], "nested": {"n": 3, "s": "a"}}
