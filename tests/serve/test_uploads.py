"""Uploads through /analyze: limits while streaming, zips checked before extraction, private folders."""

import os
import stat
import zipfile

import pytest
import torch

from p2ch_app.serve.client import Client, multipart
from tests.serve.conftest import running, settings_for
from tests.serve.test_jobs import leftover_uploads


def zipped(tmp_path, entries: dict, symlink: str | None = None):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("entries, symlink, message", [
    ({"../escape.dcm": b"x"}, None, "points outside the archive"),
    ({"/abs/slice.dcm": b"x"}, None, "points outside the archive"),
    ({"a.dcm": b"x"}, "link.dcm", "is a symbolic link"),
    ({f"{k}.dcm": b"x" for k in range(6)}, None, "entries, over the limit of 5"),
    ({"big.dcm": bytes(3 << 20)}, None, "over the limit of 2 MB"),
    ({"a.mhd": b"NDims = 3\nElementDataFile = gone.raw\n"}, None, "which the zip lacks"),
])
def test_unsafe_zips_are_refused_before_extraction(tmp_path, models, private_tmp, entries, symlink, message):
    from p2ch_app.serve.app import create_app

    app = create_app(settings_for(tmp_path / "results", max_upload_mb=2, max_zip_entries=5), models,
                     torch.device("cpu"))
    with running(app) as url:
        status, answer = Client(url).submit(zipped(tmp_path, entries, symlink))
    assert status in (400, 413) and message in answer["error"], answer
    assert leftover_uploads(private_tmp) == [] and list((tmp_path / "results").glob("*/job.json")) == []


def test_uploads_are_limited_while_streaming_and_checked(tmp_path, models, private_tmp):
    from p2ch_app.serve.app import create_app

    app = create_app(settings_for(tmp_path / "results", max_upload_mb=1), models, torch.device("cpu"))
    with running(app) as url:
        client = Client(url)
        body, content_type = multipart({}, {"file": ("big.nii", bytes(2 << 20))})
        # no Content-Length: the body is sent in chunks, so only counting while it streams can stop it
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        status, _, answer = client.request("POST", "/analyze", chunks, {"Content-Type": content_type,
                                                                        "Transfer-Encoding": "chunked"})
        assert status == 413 and b"over the limit of 1 MB" in answer
        client.close()
        body, content_type = multipart({}, {"file": ("scan.dcm", b"x")})
        status, answer = client.json("POST", "/analyze", body, {"Content-Type": content_type})
        assert status == 400 and "unsupported file 'scan.dcm'" in answer["error"]
        body, content_type = multipart({"threshold": "2"}, {"file": ("a.nii", b"x")})
        status, answer = client.json("POST", "/analyze", body, {"Content-Type": content_type})
        assert status == 400 and "threshold '2' is not a number from 0 to 1" in answer["error"]
        body, content_type = multipart({"colour": "red"}, {"file": ("a.nii", b"x")})
        assert "unknown field 'colour'" in client.json("POST", "/analyze", body, {"Content-Type": content_type})[1][
            "error"]
    assert leftover_uploads(private_tmp) == []


def test_private_folders_are_0700():
    from p2ch_app.serve.uploads import private_folder

    folder = private_folder()
    try:
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    finally:
        folder.rmdir()
