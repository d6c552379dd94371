"""nodule-analyze against a real PACS: Orthanc with its DICOMweb plugin, started here on a free loopback
port with its storage in a temporary folder. Fetch, analyse, store the SEG and SR, read them back; and
every fault (PACS down, wrong credentials, missing UIDs, a non-CT or incomplete series, a store failing
part-way) is one line, exit 2, with nothing half-stored."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from p2ch_app.cli import analyze
from tests.conftest import BOOK_MODELS, assert_one_line_error, require_program, requires_shared, run, write_ct_dicom
from tests.inference.test_dicom_objects import assert_objects_match, assert_valid_dicom
from tests.inference.test_pipeline import hand_made_ct

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.2000", "1.2.826.0.1.3680043.8.498.2001"
pytestmark = requires_shared  # the book's models: nodule-analyze finds its models before it asks the PACS
REJECT_SR = "function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= 'SR'\nend\n"


def _plugin() -> Path:
    found = [p for d in PLUGIN_DIRS for p in sorted(d.glob("libOrthancDicomWeb.so*"))]
    if not found:
        reason = "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on its own folder and port; restartable with other users or Lua scripts,
    keeping its storage."""

    def __init__(self, folder: Path):
        self.binary, self.plugin = require_program("Orthanc", "orthanc"), _plugin()
        self.folder, self.port, self.process, self.auth = folder, _free_port(), None, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def start(self, users: dict | None = None, lua: str | None = None) -> Orthanc:
        config = {"Name": "p2ch-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "storage"), "HttpPort": self.port, "DicomServerEnabled": False,
                  "DicomPort": _free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
                  "RegisteredUsers": users or {}, "Plugins": [str(self.plugin)], "SaveJobs": False,
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": []}
        if lua is not None:
            (self.folder / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(self.folder / "filter.lua")]
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.auth = next(iter(users.items())) if users else None
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.binary, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        for _ in range(200):
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            assert self.process.poll() is None, (self.folder / "orthanc.log").read_text()[-2000:]
            time.sleep(0.1)
        raise AssertionError("Orthanc did not start in 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def upload(self, folder: Path) -> None:
        for path in sorted(folder.glob("*.dcm")):
            requests.post(f"http://127.0.0.1:{self.port}/instances", data=path.read_bytes(), auth=self.auth,
                          timeout=30).raise_for_status()

    def instances(self, modality: str) -> list:
        """(series UID, SOP instance UID) of every stored instance of this modality."""
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(self.url)
        if self.auth:
            client._session.auth = self.auth
        found = client.search_for_instances(search_filters={"Modality": modality})
        return sorted((i["0020000E"]["Value"][0], i["00080018"]["Value"][0]) for i in found)


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


def series_folder(tmp_path: Path, name: str, series_uid: str = SERIES, modality: str = "CT", drop=None) -> Path:
    ct = hand_made_ct()
    paths = write_ct_dicom(tmp_path / name, ct.hu, ct.geometry, series_uid=series_uid, study_uid=STUDY,
                           modality=modality)
    if drop is not None:
        paths[drop].unlink()
    return tmp_path / name


def book_models() -> list:
    return ["--seg-model", next(BOOK_MODELS.glob("seg_*.state")), "--cls-model", next(BOOK_MODELS.glob("cls_*.state"))]


def pacs_args(server: Orthanc, tmp_path: Path, *extra) -> list:
    return ["--dicomweb", server.url, "--study", STUDY, *book_models(), "--runs-dir", tmp_path / "runs",
            "--threshold", 0, "--keep-outside", *extra]


def test_fetch_analyse_store_and_read_back(orthanc, tmp_path):
    from dicomweb_client import DICOMwebClient

    source = series_folder(tmp_path, "ct")
    orthanc.upload(source)
    orthanc.upload(series_folder(tmp_path, "mr", series_uid=f"{SERIES}.3", modality="MR"))  # not a candidate
    report = tmp_path / "report"
    result = run(analyze, pacs_args(orthanc, tmp_path, "--store", "--report", report, "--output", tmp_path / "o.json"))
    assert result.exit_code == 0, result.output
    assert "stored seg.dcm (SEG " in result.stdout and "stored sr.dcm (SR " in result.stdout
    detections = json.loads((tmp_path / "o.json").read_text())["detections"]
    assert len(detections) == 3
    client, stored = DICOMwebClient(orthanc.url), tmp_path / "stored"
    stored.mkdir()
    for modality in ("SEG", "SR"):
        ((series, instance),) = orthanc.instances(modality)
        client.retrieve_instance(STUDY, series, instance).save_as(stored / f"{modality}.dcm")
        assert_valid_dicom(stored / f"{modality}.dcm")
    assert_objects_match(stored / "SEG.dcm", stored / "SR.dcm", source, report / "candidates.nii.gz", detections)
    before = orthanc.instances("SEG") + orthanc.instances("SR")
    assert run(analyze, pacs_args(orthanc, tmp_path, "--store")).exit_code == 0  # a rerun: the same UIDs again
    assert orthanc.instances("SEG") + orthanc.instances("SR") == before


def test_a_store_failing_part_way_names_what_was_stored_and_a_rerun_completes_it(orthanc, tmp_path):
    orthanc.upload(series_folder(tmp_path, "ct"))
    orthanc.stop()
    orthanc.start(lua=REJECT_SR)  # this PACS refuses SR objects
    result = run(analyze, pacs_args(orthanc, tmp_path, "--store"))
    assert_one_line_error(result, "sr.dcm (SR ")
    assert "stored so far: seg.dcm (SEG " in result.stderr and "run again" in result.stderr
    seg = orthanc.instances("SEG")
    assert len(seg) == 1 and orthanc.instances("SR") == []
    orthanc.stop()
    orthanc.start()
    assert run(analyze, pacs_args(orthanc, tmp_path, "--store")).exit_code == 0
    assert orthanc.instances("SEG") == seg and len(orthanc.instances("SR")) == 1


def test_several_ct_series_are_listed_for_the_user_to_choose(orthanc, tmp_path):
    orthanc.upload(series_folder(tmp_path, "a"))
    orthanc.upload(series_folder(tmp_path, "b", series_uid=f"{SERIES}.2"))
    result = run(analyze, ["--dicomweb", orthanc.url, "--study", STUDY, *book_models()])
    listed = f"{SERIES} 'Chest 1.0 B70f' 36 slices 2.00 mm apart; {SERIES}.2 'Chest 1.0 B70f' 36 slices 2.00 mm apart"
    assert_one_line_error(result, f"study {STUDY} holds 2 CT series: {listed}; choose one with --series")


FAULTS = {  # --series given, and what the error line says
    "missing study": (None, "study 1.2.3.4.5 is not on the PACS"),
    "missing series": ("1.2.3.4.6", "series 1.2.3.4.6 is not in study"),
    "not CT": (f"{SERIES}.3", f"series {SERIES}.3 is MR, not CT; pass a CT series"),
    "missing instance": (f"{SERIES}.4", f"series {SERIES}.4 from http://127.0.0.1:"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_are_one_line_and_store_nothing(orthanc, tmp_path, fault):
    orthanc.upload(series_folder(tmp_path, "ct"))
    orthanc.upload(series_folder(tmp_path, "mr", series_uid=f"{SERIES}.3", modality="MR"))
    orthanc.upload(series_folder(tmp_path, "gap", series_uid=f"{SERIES}.4", drop=20))
    series, message = FAULTS[fault]
    study = "1.2.3.4.5" if series is None else STUDY
    result = run(analyze, ["--dicomweb", orthanc.url, "--study", study, *(["--series", series] if series else []),
                           *book_models(), "--store", "--report", tmp_path / "report"])
    assert_one_line_error(result, message)
    assert fault != "missing instance" or "is unevenly spaced" in result.stderr
    assert orthanc.instances("SEG") == orthanc.instances("SR") == [] and not any((tmp_path / "report").iterdir())


def test_a_pacs_that_is_down(orthanc, tmp_path):
    orthanc.stop()
    result = run(analyze, ["--dicomweb", orthanc.url, "--study", STUDY, *book_models()])
    assert_one_line_error(result, f"cannot reach the PACS at {orthanc.url} listing study {STUDY}")


def test_credentials(orthanc, tmp_path):
    orthanc.stop()
    orthanc.start(users={"alice": "right"})
    (tmp_path / "wrong").write_text("wrong\n")
    (tmp_path / "right").write_text("right\n")
    (tmp_path / "token").write_text("not-a-token\n")
    base = ["--dicomweb", orthanc.url, "--study", STUDY, "--series", "1.2.3.4.6", *book_models()]
    refused = "refused the credentials (HTTP 401) listing study"
    assert_one_line_error(run(analyze, base), refused)
    assert_one_line_error(run(analyze, [*base, "--dicomweb-user", "alice", "--dicomweb-password-file",
                                        tmp_path / "wrong"]), refused)
    assert_one_line_error(run(analyze, [*base, "--dicomweb-token-file", tmp_path / "token"]), refused)
    assert_one_line_error(run(analyze, [*base, "--dicomweb-user", "alice"]), "needs --dicomweb-password-file")
    assert_one_line_error(run(analyze, [*base[:1], "localhost:8042", *base[2:]]), "is not an http(s) URL")
    assert_one_line_error(run(analyze, [*base[:3], "1.2/../3", *base[4:], "--dicomweb-user", "alice",
                                        "--dicomweb-password-file", tmp_path / "right"]),
                          "'1.2/../3' is not a study UID")
    assert_one_line_error(run(analyze, [*base, "--dicomweb-token-file", tmp_path / "none"]),
                          f"--dicomweb-token-file {tmp_path / 'none'}: No such file or directory")
    # signed in, the PACS answers: the study is not there
    assert_one_line_error(run(analyze, [*base, "--dicomweb-user", "alice", "--dicomweb-password-file",
                                        tmp_path / "right"]), f"study {STUDY} is not on the PACS")
