"""Writing files so that a crash never leaves half of one under its final name, and the plain
values (JSON, weights_only checkpoints) that go into them."""

from __future__ import annotations

import csv
import io
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside path, which then replaces path in one rename.
    The temporary name keeps the suffix, so writers that pick a format by suffix still work."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    run_dir.mkdir(parents=True)
    return run_dir
