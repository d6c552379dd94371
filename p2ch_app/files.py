"""Writing files so that a crash never leaves half of one under its final name, checking before long
work that its outputs can be written at all, and the plain values (JSON, weights_only checkpoints)
that go into them. Every failure to write is one line that names the fault (a full disk as such)."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Callable

from p2ch_app.errors import UserError, brief

PROBE_BYTES = 4096  # a full disk may still create an empty file, but not one holding a block
_FAULTS = {  # errno -> (the problem, the fix) of a path that cannot be written (or read)
    errno.ENOSPC: ("disk full (no space left on device)", "free space or choose another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another disk"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.ENAMETOOLONG: ("name too long", "choose a shorter name"),
    errno.EISDIR: ("is a folder", "give a file name"),
}


def os_error(err: OSError, path: Path | None = None, what: str = "") -> UserError:
    """One line for an OSError on `path`: "<what> <path>: <fault>; <fix>". A parent that is a file is
    named, since the error itself only says "not a directory" about the whole path."""
    path = Path(err.filename) if path is None and err.filename else path
    head = " ".join(str(part) for part in (what, path) if part)
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return UserError(f"{head}: {blocker} is a file, not a folder; choose another path")
    problem, fix = _FAULTS.get(err.errno, (err.strerror or brief(err), "check the path or choose another"))
    return UserError(f"{head}: {problem}; {fix}" if head else f"{problem}; {fix}")


def _temp_path(path: Path) -> Path:
    """A temporary name beside path, unique to this process and call, so concurrent writers never share
    one. It keeps the suffix, a compressed one with the suffix before it (.nii.gz), so writers that pick
    a format by suffix still work."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix
    stem = path.name[:len(path.name) - len(suffix)]
    return path.with_name(f".{stem[:64]}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def check_writable(path: Path, what: str, folder: bool = False) -> Path:
    """Create the folder an output goes into and write a probe file there, so an output that cannot be
    written (read-only, under a file, a full disk, a name too long) fails now, in one line naming `what`
    (the option), instead of after the long work whose results it would lose. With folder=True, path is
    the output folder itself."""
    path = Path(path)
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not folder:
            _check_file_name(path)
        probe = _temp_path(where / ".probe" if folder else path)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as err:
        raise os_error(err, path, what) from None
    return path


def _check_file_name(path: Path) -> None:
    """The final name is only created at the end, by a rename; refuse now what the rename would refuse."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(path.name)) > limit:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside path, which then replaces path in one rename. On any
    failure (or Ctrl-C) the temporary file is removed and path is as it was; an OSError becomes one
    line naming path and the fault."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, path, "cannot write") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def held_lock(path: Path):
    """An exclusive lock on the file at path (created if missing) for the duration, so that processes
    sharing a folder do one piece of work once: the second waits, then finds it done. Where the
    platform has no flock (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv_atomic(path: Path, header: list[str], rows) -> None:
    """A CSV with a header line and "\\n" line ends (as LUNA16's own files), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def plain(value):
    """Nested dicts, lists and tuples with Paths as strings and NaN (an undefined AUC) as None: what
    strict JSON and weights_only checkpoints can hold."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def new_run_dir(runs_dir: Path, command: str, comment: str = "") -> Path:
    """runs/<command>/<timestamp>[-comment], never an existing folder."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
    base = Path(runs_dir) / command / (f"{stamp}-{comment}" if comment else stamp)
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise os_error(err, run_dir, "cannot create the run folder") from None
    return run_dir
