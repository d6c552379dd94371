import errno
import math
import os
import re
from pathlib import Path

import pytest

import p2ch_app.files
from p2ch_app.errors import UserError
from p2ch_app.files import check_writable, held_lock, new_run_dir, plain, write_atomic, write_csv_atomic


def test_a_failed_write_keeps_the_old_file_leaves_no_temporary_and_names_a_full_disk(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(tmp: Path):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=f"cannot write {target}: disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_concurrent_writers_get_their_own_temporary_files(tmp_path):
    names = []
    for _ in range(2):
        write_atomic(tmp_path / "a.npy", lambda tmp: (names.append(tmp.name), tmp.write_text("x")))
    assert names[0] != names[1] and str(os.getpid()) in names[0] and names[0].endswith(".tmp.npy")


def test_a_temporary_file_keeps_a_compressed_suffix_whole(tmp_path):
    """Writers that pick the format by suffix (ITK's .nii.gz) see the whole of it."""
    names = []
    write_atomic(tmp_path / "labels.nii.gz", lambda tmp: (names.append(tmp.name), tmp.write_text("x")))
    assert names[0].startswith(".labels.") and names[0].endswith(".tmp.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


def can_write_into_read_only_folders(tmp_path) -> bool:
    """True for root (or CAP_DAC_OVERRIDE), where chmod does not stop writes."""
    folder = tmp_path / "probe-ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "x").write_text("x")
        return True
    except PermissionError:
        return False
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("folder", [False, True])
def test_an_output_under_a_file_or_with_too_long_a_name_is_refused_before_any_work(tmp_path, folder):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=f"^--out {tmp_path}/afile/sub/o: {tmp_path}/afile is a file, not a folder; "):
        check_writable(tmp_path / "afile" / "sub" / "o", "--out", folder)
    with pytest.raises(UserError, match="^--out .*: name too long; choose a shorter name$"):
        check_writable(tmp_path / ("x" * 300), "--out", folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert check_writable(tmp_path / "new" / "o", "--out", folder) == tmp_path / "new" / "o"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == (["o"] if folder else [])  # no probe left


def test_a_read_only_folder_is_refused(tmp_path):
    if can_write_into_read_only_folders(tmp_path):
        pytest.skip("running as root: chmod does not stop writes (the monkeypatched test covers the message)")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(UserError, match="^--out .*ro/o.json: permission denied; choose a folder you can write"):
            check_writable(tmp_path / "ro" / "o.json", "--out")
    finally:
        (tmp_path / "ro").chmod(0o700)


def refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """os.open fails with `code` for every path under folder, as a read-only or full disk would."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(path).is_relative_to(folder) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(p2ch_app.files.os, "open", fake_open)


@pytest.mark.parametrize("code, message", [
    (errno.EACCES, "permission denied; choose a folder you can write to"),
    (errno.EROFS, "read-only file system; choose a folder on a writable disk"),
    (errno.ENOSPC, "disk full (no space left on device); free space or choose another disk"),
])
def test_a_folder_that_refuses_writes_is_named_with_its_fault(tmp_path, monkeypatch, code, message):
    refuse_writes_under(monkeypatch, tmp_path, code)
    with pytest.raises(UserError, match=re.escape(f"--output {tmp_path}/o.json: {message}")):
        check_writable(tmp_path / "o.json", "--output")
    assert not list(tmp_path.iterdir())


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(UserError, match=f"cannot create the run folder .*: {tmp_path}/runs is a file, not a folder"):
        new_run_dir(tmp_path / "runs", "cmd")


def test_csv_has_a_header_and_unix_line_ends(tmp_path):
    write_csv_atomic(tmp_path / "a.csv", ["uid", "x"], [["1.2", 3.5], ["1.3", -1]])
    assert (tmp_path / "a.csv").read_bytes() == b"uid,x\n1.2,3.5\n1.3,-1\n"


def test_plain_values_for_json_and_checkpoints():
    value = {"runs": Path("runs/x"), "aucs": (0.5, math.nan), "nested": {"n": 3, "s": "a"}}
    assert plain(value) == {"runs": "runs/x", "aucs": [0.5, None], "nested": {"n": 3, "s": "a"}}


def test_held_lock_makes_the_second_holder_wait_for_the_first(tmp_path):
    import threading
    import time

    events = []
    first_holds = threading.Event()

    def first():
        with held_lock(tmp_path / "work.lock"):
            first_holds.set()
            time.sleep(0.3)
            events.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    first_holds.wait()
    with held_lock(tmp_path / "work.lock"):  # blocks until the first lets go
        events.append("second in")
    thread.join()
    assert events == ["first done", "second in"]
