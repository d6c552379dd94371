"""Uploads: multipart forms read as they stream in, and CT archives unpacked only when safe.

Medical images must not leak and a client must not fill the disk, so an upload is counted while it
streams (the limit stops it mid-way, not after it was stored), goes to a private 0700 folder, and is
stored under names of our own: a client's file name only chooses among the known suffixes. A zip is
checked whole (entry names, links, entry count, unpacked size) before anything is extracted.
"""

from __future__ import annotations

import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from p2ch_app.errors import UserError

CT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".zip")  # what /analyze takes; a .mhd comes zipped with its .raw
FIELD_LIMIT = 64 * 1024  # a form field that is not a file (meta, options)
MAX_PARTS = 16


class TooLarge(UserError):
    """An upload over the limit: 413."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int  # the whole request body
    max_zip_entries: int = 2000  # a CT series is a few hundred slices


@dataclass
class Form:
    """A multipart form: its text fields, and its file parts (in memory, or saved in `folder`)."""

    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # without a folder
    saved: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> (stored file, client's file name)


class _FormReader:
    """python-multipart's callbacks, collecting one form part by part."""

    def __init__(self, folder: Path | None):
        self.form, self.folder = Form(), folder
        self._header_name, self._headers = b"", {}
        self._name, self._filename, self._buffer, self._file = "", None, bytearray(), None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        if len(self.form.fields) + len(self.form.files) + len(self.form.saved) >= MAX_PARTS:
            raise UserError(f"the form has more than {MAX_PARTS} parts; send only the documented fields")
        self._headers, self._buffer, self._file = {}, bytearray(), None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name = data[start:end].lower()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._headers[self._header_name] = self._headers.get(self._header_name, b"") + data[start:end]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = None if filename is None else filename.decode("utf-8", "replace")
        if self._filename is not None and self.folder is not None:
            path = self.folder / f"upload-{len(self.form.saved)}{ct_suffix(self._filename)}"
            self._file = open(path, "xb")
            self.form.saved[self._name] = (path, self._filename)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self._buffer += data[start:end]
        if self._filename is None and len(self._buffer) > FIELD_LIMIT:
            raise UserError(f"form field {self._name!r} is over {FIELD_LIMIT // 1024} KiB; send a short value")

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._filename is not None:
            self.form.files[self._name] = bytes(self._buffer)
        else:
            self.form.fields[self._name] = bytes(self._buffer)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def ct_suffix(filename: str) -> str:
    """The known CT suffix a client's file name ends with, else ""; the only part of the name we use."""
    lower = filename.lower()
    return next((suffix for suffix in CT_SUFFIXES if lower.endswith(suffix)), "")


def upload_limit_error(limit: int) -> TooLarge:
    return TooLarge(f"the upload is over the limit of {limit / 2**20:g} MB; send a smaller file or start "
                    "nodule-serve with a larger --max-upload-mb")


async def read_form(request, limits: UploadLimits, folder: Path | None = None) -> Form:
    """The request's multipart form, counted as it streams in: past limits.max_bytes it stops with
    TooLarge. File parts go to `folder` when given (else memory), under names of our own."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise UserError("expected a multipart/form-data body; send the fields as a multipart form")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise upload_limit_error(limits.max_bytes)
    reader = _FormReader(folder)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_bytes:
                raise upload_limit_error(limits.max_bytes)
            parser.write(chunk)
        parser.finalize()
    except ValueError as err:  # python-multipart's own refusals of a malformed body
        raise UserError(f"the multipart body is malformed ({err}); send a well-formed form") from None
    finally:
        reader.close()
    return reader.form


def private_folder(prefix: str = "nodule-serve-") -> Path:
    """A fresh folder only this user can enter (mkdtemp makes it 0700)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def series_name(filename: str) -> str:
    """A client's file name, less its suffix, as a printable series name (nodule-analyze --ct uses the stem)."""
    stem = Path(filename.replace("\\", "/")).name
    stem = stem[:-len(ct_suffix(stem))] if ct_suffix(stem) else stem
    return _SAFE_NAME.sub("_", stem)[:64] or "upload"


def _check_entries(archive: zipfile.ZipFile, limits: UploadLimits) -> list[zipfile.ZipInfo]:
    """The archive's files, after checking every entry: before extracting a single byte."""
    entries = archive.infolist()
    if len(entries) > limits.max_zip_entries:
        raise UserError(f"the zip holds {len(entries)} entries, over the limit of {limits.max_zip_entries}; zip "
                        "one series only, or start nodule-serve with a larger --max-zip-entries")
    for entry in entries:
        name = entry.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
            raise UserError(f"zip entry {entry.filename!r} points outside the archive; zip the files with "
                            "relative names")
        if stat.S_ISLNK(entry.external_attr >> 16):
            raise UserError(f"zip entry {entry.filename!r} is a symbolic link; zip the files themselves")
    files = [e for e in entries if not e.is_dir()]
    if sum(e.file_size for e in files) > limits.max_bytes:
        raise upload_limit_error(limits.max_bytes)
    return files


def unpack_ct(archive_path: Path, folder: Path, limits: UploadLimits) -> Path:
    """What load_ct reads from a zip: a folder of its DICOM files, or its .mhd beside its .raw. Every
    file is stored under a name of our own; the .mhd's data file line is rewritten to match."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            files = _check_entries(archive, limits)
            headers = [e for e in files if e.filename.lower().endswith(".mhd")]
            if len(headers) > 1:
                raise UserError(f"the zip holds {len(headers)} .mhd files; zip one CT only")
            if headers:
                return _unpack_meta(archive, headers[0], files, folder)
            series = folder / "series"
            series.mkdir()
            for k, entry in enumerate(files):
                (series / f"{k:05d}.dcm").write_bytes(archive.read(entry))
            return series
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise UserError(f"the upload is not a readable zip ({err}); zip the DICOM series or .mhd/.raw again") from None


def _unpack_meta(archive: zipfile.ZipFile, header: zipfile.ZipInfo, files: list, folder: Path) -> Path:
    text = archive.read(header).decode("latin-1")
    match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if match is None:
        raise UserError("the zip's .mhd has no ElementDataFile line; zip a MetaImage header with its data")
    data_name = match.group(1)
    if data_name.upper() == "LOCAL":
        (folder / "ct.mhd").write_text(text, "latin-1")
        return folder / "ct.mhd"
    wanted = Path(header.filename.replace("\\", "/")).parent / data_name
    data = [e for e in files if Path(e.filename.replace("\\", "/")) == wanted]
    if not data:
        raise UserError(f"the zip's .mhd names its voxel data {data_name!r}, which the zip lacks; zip the .raw "
                        "beside the .mhd")
    suffix = ".zraw" if data_name.lower().endswith(".zraw") else ".raw"
    (folder / f"ct{suffix}").write_bytes(archive.read(data[0]))
    (folder / "ct.mhd").write_text(text[:match.start(1)] + f"ct{suffix}" + text[match.end(1):], "latin-1")
    return folder / "ct.mhd"
