"""A PACS over DICOMweb: find a study's CT series (QIDO-RS), fetch one (WADO-RS) into a folder that is
then read and checked as any DICOM folder is, and store the SEG and SR back (STOW-RS).

dicomweb-client speaks the protocol (multipart bodies, DICOM JSON); here each failure becomes one line
that names the PACS, the UID and the fix. The objects are stored one request each, SEG first (the SR
references it): a failure part-way names what was stored, and since their UIDs are derived, not
random, a rerun stores the same objects again instead of duplicates.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from tqdm import tqdm

from p2ch_app.data.ct import check_uid, slice_depths
from p2ch_app.errors import UserError, brief
from p2ch_app.files import os_error

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

    from p2ch_app.inference.dicom_objects import DicomObjects

TIMEOUT_S = 60  # per request: a PACS that takes longer is treated as down
_CREDENTIAL_FIX = "check --dicomweb-user and --dicomweb-password-file, or --dicomweb-token-file"


@dataclass(frozen=True)
class Pacs:
    """Where the PACS is and how to sign in: a bearer token, or a user and password (each read from a
    file, so that no secret shows in the process list or the shell history)."""

    url: str
    token_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str
    description: str
    instances: int


def _secret(path: Path, option: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError as err:
        raise UserError(f"{option} {path}: {err.strerror}; give a readable file") from None
    if not text:
        raise UserError(f"{option} {path} is empty; put the secret on its first line")
    return text


def connect(pacs: Pacs) -> DICOMwebClient:
    """A client for the PACS, signed in as pacs says."""
    import requests
    from dicomweb_client import DICOMwebClient

    if pacs.user is not None and pacs.password_file is None:
        raise UserError("--dicomweb-user needs --dicomweb-password-file; give the file holding the password")
    if pacs.password_file is not None and pacs.user is None:
        raise UserError("--dicomweb-password-file needs --dicomweb-user; give the user name")
    if pacs.user is not None and pacs.token_file is not None:
        raise UserError("give either --dicomweb-token-file or --dicomweb-user, not both")
    if not pacs.url.startswith(("http://", "https://")):
        raise UserError(f"--dicomweb {pacs.url} is not an http(s) URL; give e.g. http://localhost:8042/dicom-web")
    session = requests.Session()
    if pacs.user is not None:
        session.auth = (pacs.user, _secret(pacs.password_file, "--dicomweb-password-file"))
    headers = {}
    if pacs.token_file is not None:
        headers["Authorization"] = f"Bearer {_secret(pacs.token_file, '--dicomweb-token-file')}"
    client = DICOMwebClient(pacs.url.rstrip("/"), session=session, headers=headers, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def _answers(client: DICOMwebClient, doing: str) -> Iterator[None]:
    """Turns what the PACS or the network says into one line about `doing`."""
    import requests

    try:
        yield
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else None
        if code in (401, 403):
            raise UserError(f"the PACS at {client.base_url} refused the credentials (HTTP {code}) {doing}; "
                            f"{_CREDENTIAL_FIX}") from None
        raise UserError(f"the PACS at {client.base_url} answered HTTP {code} {doing}: {brief(err)}; check the "
                        "UIDs and the PACS's log") from None
    except requests.RequestException as err:
        raise UserError(f"cannot reach the PACS at {client.base_url} {doing} ({brief(err, 80)}); check --dicomweb "
                        "and that the PACS is running") from None


def _tag(item: dict, tag: str, default=""):
    values = item.get(tag, {}).get("Value", [])
    return values[0] if values else default


def study_series(client: DICOMwebClient, study: str) -> list[SeriesInfo]:
    """Every series of the study, as the PACS lists them (QIDO-RS)."""
    with _answers(client, f"listing study {study}"):
        found = client.search_for_series(study_instance_uid=check_uid(study, "study"),
                                         fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"])
    return [SeriesInfo(str(_tag(s, "0020000E")), str(_tag(s, "00080060")), str(_tag(s, "0008103E")),
                       int(_tag(s, "00201209", 0))) for s in found]


def slice_spacing(client: DICOMwebClient, study: str, series: str) -> float:
    """The median distance between a series' slice positions (WADO-RS metadata), in mm; nan when unknown."""
    with _answers(client, f"reading series {series}'s metadata"):
        metadata = client.retrieve_series_metadata(study, series)
    try:
        positions = np.array([[float(v) for v in item["00200032"]["Value"]] for item in metadata])
        orientation = [float(v) for v in metadata[0]["00200037"]["Value"]]
    except (KeyError, IndexError, ValueError):
        return float("nan")
    depths = np.sort(slice_depths(positions, orientation))
    return float(np.median(np.diff(depths))) if len(depths) > 1 else float("nan")


def choose_series(client: DICOMwebClient, study: str, series: str | None) -> SeriesInfo:
    """The CT series to analyse: the one asked for, else the study's only CT series. Several CT series
    and none asked for is refused with the list of them, so the user can pick one."""
    listed = study_series(client, study)
    if not listed:
        raise UserError(f"study {study} is not on the PACS at {client.base_url} (it lists no series of it); "
                        "check --study")
    if series is not None:
        chosen = [s for s in listed if s.uid == check_uid(series)]
        if not chosen:
            raise UserError(f"series {series} is not in study {study} on the PACS at {client.base_url}; check "
                            f"--series (the study's series: {', '.join(s.uid for s in listed)})")
        if chosen[0].modality != "CT":
            raise UserError(f"series {series} is {chosen[0].modality or 'of no modality'}, not CT; pass a CT series "
                            "with --series")
        return chosen[0]
    cts = sorted((s for s in listed if s.modality == "CT"), key=lambda s: s.uid)
    if not cts:
        raise UserError(f"study {study} holds no CT series (only {', '.join(sorted({s.modality for s in listed}))}); "
                        "pass a study with a CT")
    if len(cts) > 1:
        rows = "; ".join(f"{s.uid} '{s.description}' {s.instances} slices "
                         f"{slice_spacing(client, study, s.uid):.2f} mm apart" for s in cts)
        raise UserError(f"study {study} holds {len(cts)} CT series: {rows}; choose one with --series")
    return cts[0]


@contextlib.contextmanager
def fetched_series(client: DICOMwebClient, study: str, series: SeriesInfo) -> Iterator[Path]:
    """The series fetched over WADO-RS into a temporary folder (removed afterwards), one file per
    instance. Fewer instances than the PACS listed are refused; whether those make a whole, evenly
    spaced CT is for the DICOM folder reader to check, as for any folder."""
    with tempfile.TemporaryDirectory(prefix="p2ch-dicomweb-") as tmp:
        folder = Path(tmp)
        count = 0
        with _answers(client, f"fetching series {series.uid}"):
            instances = client.iter_series(study, series.uid)
            for ds in tqdm(instances, total=series.instances or None, desc="fetch", unit="instance"):
                path = folder / f"{count:06d}.dcm"
                try:
                    ds.save_as(path, enforce_file_format=True)
                except OSError as err:  # a full disk, say: named, in one line
                    raise os_error(err, path, f"fetching series {series.uid} into") from None
                count += 1
        if count < series.instances:
            raise UserError(f"the PACS at {client.base_url} gave {count} of the {series.instances} instances of "
                            f"series {series.uid}; check the PACS, then run again")
        yield folder


def _holds(client: DICOMwebClient, ds) -> bool:
    """Whether the PACS lists the instance (QIDO-RS): a PACS may answer a STOW-RS with success yet
    drop the object (Orthanc does when a filter refuses it)."""
    with _answers(client, f"checking that it holds {ds.SOPInstanceUID}"):
        found = client.search_for_instances(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                            search_filters={"SOPInstanceUID": ds.SOPInstanceUID})
    return len(found) == 1


def store(client: DICOMwebClient, objects: DicomObjects) -> list[str]:
    """STOW-RS of the SEG then the SR, one request each; returns what was stored. A failure names the
    objects already stored (a rerun stores them again under the same UIDs)."""
    stored: list[str] = []
    for name, ds in objects.named():
        what = f"{name} ({ds.Modality} {ds.SOPInstanceUID})"
        done = f"stored so far: {', '.join(stored)}" if stored else "nothing was stored"
        try:
            with _answers(client, f"storing {what}"):
                answer = client.store_instances([ds])
        except UserError as err:
            problem = str(err).rsplit("; ", 1)[0]
            raise UserError(f"{problem} ({done}); fix that and run again: the same objects are stored under the "
                            "same UIDs, with no duplicates") from None
        accepted = {item.ReferencedSOPInstanceUID for item in answer.get("ReferencedSOPSequence", [])}
        if answer.get("FailedSOPSequence") or ds.SOPInstanceUID not in accepted or not _holds(client, ds):
            raise UserError(f"the PACS at {client.base_url} refused {what} ({done}); see the PACS's log, then run "
                            "again: the same objects are stored under the same UIDs, with no duplicates")
        stored.append(what)
    return stored


def read_fetched(folder: Path, series: SeriesInfo, client: DICOMwebClient):
    """load_ct of a fetched series, its refusals (a missing slice, uneven spacing, several series)
    naming the series on the PACS instead of the temporary folder."""
    from p2ch_app.data.ct import load_ct

    try:
        return load_ct(folder, series_uid=series.uid)
    except UserError as err:
        where = f"series {series.uid} from {client.base_url}"
        text = str(err).replace(f"{folder}/", "").replace(str(folder), where)
        raise UserError(text).with_fix("store the complete series on the PACS, then run again") from None
