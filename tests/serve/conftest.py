"""nodule-serve's fixtures: models, a tiny CT in every upload format, and a real server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from tests.conftest import BOOK_MODELS, make_tiny_root

pytest.importorskip("fastapi", reason="nodule-serve needs the [serve] extra: pip install -e '.[serve]'")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict:
    """The book's checkpoints where ../shared has them (real detections), else untrained networks of the
    same architecture (the protocol and the jobs work the same)."""
    seg = next(BOOK_MODELS.glob("seg_*.state"), None) if BOOK_MODELS.is_dir() else None
    cls = next(BOOK_MODELS.glob("cls_*.state"), None) if BOOK_MODELS.is_dir() else None
    if seg is None or cls is None:
        from p2ch_app.checkpoints import model_entries, save_checkpoint
        from p2ch_app.models import NoduleClassifier, NoduleSegmenter

        folder = tmp_path_factory.mktemp("models")
        torch.manual_seed(0)
        seg, cls = folder / "seg.pt", folder / "cls.pt"
        save_checkpoint(seg, model_entries(NoduleSegmenter()))
        save_checkpoint(cls, model_entries(NoduleClassifier()))
    return {"seg": seg, "cls": cls, "mal": None}


@pytest.fixture(scope="session")
def models(model_files):
    from p2ch_app.inference.pipeline import load_models

    return load_models(model_files["seg"], model_files["cls"], model_files["mal"], torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_cts(tmp_path_factory) -> dict[str, Path]:
    """One tiny CT with two nodules as .mhd (+ .raw), .nii.gz, .mha and a zip of the .mhd and .raw."""
    folder = tmp_path_factory.mktemp("cts")
    series = make_tiny_root(folder / "root", n_series=1).series[0]
    image = sitk.ReadImage(str(series.mhd))
    found = {"mhd": series.mhd}
    for key, name in (("nii.gz", "tiny.nii.gz"), ("mha", "tiny.mha")):
        sitk.WriteImage(image, str(folder / name))
        found[key] = folder / name
    with zipfile.ZipFile(folder / "tiny.zip", "w") as archive:
        archive.write(series.mhd, f"scan/{series.mhd.name}")
        archive.write(series.mhd.with_suffix(".raw"), f"scan/{series.mhd.with_suffix('.raw').name}")
    found["zip"] = folder / "tiny.zip"
    return found


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app):
    """The app under a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def settings_for(results_dir: Path, **changes):
    from p2ch_app.serve.app import ServeSettings
    from p2ch_app.serve.jobs import JobSettings

    return replace(ServeSettings(jobs=JobSettings(results_dir)), **changes)


@pytest.fixture
def server(tmp_path, models):
    """A server with the default settings; yields (base URL, the app)."""
    from p2ch_app.serve.app import create_app

    app = create_app(settings_for(tmp_path / "results"), models, torch.device("cpu"))
    with running(app) as url:
        yield url, app


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The server's temporary files and private upload folders go here, where the test sees what is left
    (the machine's own temporary folder is shared with other processes)."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
