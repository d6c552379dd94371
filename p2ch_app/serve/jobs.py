"""Whole-CT analyses as jobs: queued, run one at a time on the device, kept on disk.

A CT takes seconds to minutes, far longer than an HTTP request should stay open, so /analyze only
queues the work and the client polls. Each job lives in its own folder under the results folder
(job.json, the detections JSON, the submission CSV, the report), so a restarted server still serves
finished jobs. A job that was queued or running when the server stopped is marked failed with a
reason, never left "running" for ever.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from p2ch_app.data.ct import load_ct
from p2ch_app.errors import UserError
from p2ch_app.files import write_text_atomic
from p2ch_app.inference.outputs import write_detections, write_submission
from p2ch_app.inference.pipeline import AnalysisSettings, Models, analyze
from p2ch_app.inference.summary import summarize
from p2ch_app.serve.batching import Overloaded

log = logging.getLogger("nodule_serve")
JOB_STATES = ("queued", "running", "done", "failed")
DETECTIONS, SUBMISSION, REPORT = "detections.json", "submission.csv", "report"
RESUBMIT = "the server stopped before this job finished; submit the CT again"
_JOB_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class JobSettings:
    results_dir: Path
    max_jobs: int = 8  # jobs waiting; past it, Overloaded
    keep_results: int = 100  # finished jobs kept on disk; the oldest go first


@dataclass(frozen=True)
class Upload:
    """A CT waiting in its private folder: what load_ct reads, and the series name to report it under."""

    folder: Path  # removed when the job ends
    ct_path: Path
    series_uid: str | None  # None: the CT's own (a DICOM series' UID)


class JobRunner:
    """The job queue and the one thread that works through it."""

    def __init__(self, settings: JobSettings, models: Models, device: torch.device, on_change=None):
        self.settings, self.models, self.device = settings, models, device
        self.on_change = on_change or (lambda counts: None)
        self._jobs: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=settings.max_jobs)
        self._stop = threading.Event()
        self._running: str | None = None
        self._thread = threading.Thread(target=self._work, name="nodule-serve-jobs", daemon=True)

    def start(self) -> None:
        """Recover the jobs on disk (an interrupted one becomes failed), trim old ones, start working."""
        self.settings.results_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.settings.results_dir.glob("*/job.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # not ours, or torn by a crash mid-write of a different file: ignored
            if job.get("state") in ("queued", "running"):
                job.update(state="failed", error=RESUBMIT)
                write_text_atomic(path, json.dumps(job, indent=2))
            self._jobs[job["id"]] = job
        self._prune()
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """No more jobs start; the running one gets grace_s to finish, else it is marked failed."""
        self._stop.set()
        self._thread.join(grace_s)
        while True:
            try:
                job_id, upload, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            self._finish(job_id, upload, state="failed", error=RESUBMIT)
        if self._thread.is_alive() and self._running is not None:
            self._update(self._running, state="failed", error=RESUBMIT)

    def submit(self, upload: Upload, settings: AnalysisSettings) -> dict:
        job_id = secrets.token_hex(8)
        job = {"id": job_id, "state": "queued", "stage": "queued", "fraction": 0.0, "submitted": time.time(),
               "options": asdict(settings), "error": None}
        if self._stop.is_set():
            raise Overloaded("the server is shutting down")
        with self._lock:
            try:
                self._queue.put_nowait((job_id, upload, settings))
            except queue.Full:
                raise Overloaded(f"{self.settings.max_jobs} jobs are already waiting") from None
            (self.settings.results_dir / job_id).mkdir()
            self._jobs[job_id] = job
            self._save(job)
            snapshot = dict(job)  # the worker may start it as soon as the lock is free
        self.on_change(self.counts())
        return snapshot

    def status(self, job_id: str) -> dict:
        """The job's record; when done, with the detections JSON and its files."""
        with self._lock:
            job = dict(self._jobs[self._known(job_id)])
        if job["state"] == "done":
            job["result"] = json.loads((self.folder(job_id) / DETECTIONS).read_text())
            job["files"] = sorted(self.files(job_id))
        return job

    def files(self, job_id: str) -> dict[str, Path]:
        """The files a finished job serves, by name: the names come from the folder, never from a client."""
        folder = self.folder(self._known(job_id))
        found = {p.name: p for p in (folder / DETECTIONS, folder / SUBMISSION) if p.is_file()}
        if (folder / REPORT).is_dir():
            found.update({p.name: p for p in (folder / REPORT).iterdir() if p.is_file()})
        return found

    def folder(self, job_id: str) -> Path:
        return self.settings.results_dir / job_id

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [job["state"] for job in self._jobs.values()]
        return {state: states.count(state) for state in JOB_STATES}

    def _known(self, job_id: str) -> str:
        if not _JOB_ID.match(job_id) or job_id not in self._jobs:
            raise KeyError(job_id)
        return job_id

    def _save(self, job: dict) -> None:
        write_text_atomic(self.folder(job["id"]) / "job.json", json.dumps(job, indent=2))

    def _update(self, job_id: str, **changes) -> None:
        with self._lock:
            job = self._jobs[job_id]
            if job["state"] in ("done", "failed") and changes.get("state") != "done":
                return  # marked failed at shutdown: the thread finishing late does not undo that
            job.update(changes)
            self._save(job)
        self.on_change(self.counts())

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job_id, upload, settings = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._running = job_id
            try:
                self._run(job_id, upload, settings)
                self._finish(job_id, upload, state="done", stage="done", fraction=1.0)
            except UserError as err:
                self._finish(job_id, upload, state="failed", error=str(err).replace(str(upload.folder), "upload"))
            except Exception:  # a bug, not the client's CT: logged whole under an id the client sees
                error_id = secrets.token_hex(4)
                log.exception("job %s failed, error id %s", job_id, error_id)
                self._finish(job_id, upload, state="failed", error=f"internal error (error id {error_id}); "
                                                                   "the server log has the details")
            finally:
                self._running = None
            self._prune()

    def _run(self, job_id: str, upload: Upload, settings: AnalysisSettings) -> None:
        """What nodule-analyze --ct CT --output detections.json --submission ... --report ... writes."""
        self._update(job_id, state="running", stage="reading the CT", fraction=0.05)
        ct = load_ct(upload.ct_path, upload.series_uid)
        self._update(job_id, stage="finding nodules", fraction=0.15)
        found = analyze(ct, self.models, settings, self.device)
        reported = [d for d in found if d.nodule_prob >= settings.threshold]
        summary = summarize(reported, self.models.malignancy is not None)
        self._update(job_id, stage="writing the report", fraction=0.85)
        folder = self.folder(job_id)
        write_detections(folder / DETECTIONS, [(ct.series_uid, d) for d in reported], self.models.paths,
                         {ct.series_uid: summary})
        write_submission(folder / SUBMISSION, [(ct.series_uid, d) for d in found])
        from p2ch_app.inference.report import write_report  # matplotlib: only once a job needs it

        write_report(folder / REPORT, ct, reported, summary, title=f"nodule-serve {ct.series_uid}")

    def _finish(self, job_id: str, upload: Upload, **changes) -> None:
        shutil.rmtree(upload.folder, ignore_errors=True)
        self._update(job_id, finished=time.time(), **changes)

    def _prune(self) -> None:
        """Keep the newest keep_results finished jobs."""
        with self._lock:
            ended = sorted((job for job in self._jobs.values() if job["state"] in ("done", "failed")),
                           key=lambda job: job["submitted"])
            for job in ended[:max(0, len(ended) - self.settings.keep_results)]:
                shutil.rmtree(self.folder(job["id"]), ignore_errors=True)
                del self._jobs[job["id"]]


def analysis_settings(fields: dict[str, bytes], batch_size: int) -> AnalysisSettings:
    """nodule-analyze's options from form fields: threshold (0..1) and the flags tta, split, dedupe,
    recentre, lung_only, keep_outside (true/false, 1/0, on/off)."""
    given = {name: value.decode("utf-8", "replace").strip() for name, value in fields.items() if name != "file"}
    flags = ("tta", "split", "dedupe", "recentre", "lung_only", "keep_outside")
    unknown = sorted(set(given) - {"threshold", *flags})
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}; /analyze takes file, threshold, {', '.join(flags)}")
    values: dict = {"batch_size": batch_size}
    if "threshold" in given:
        try:
            values["threshold"] = float(given["threshold"])
        except ValueError:
            values["threshold"] = -1.0
        if not 0 <= values["threshold"] <= 1:
            raise UserError(f"threshold {given['threshold']!r} is not a number from 0 to 1; give e.g. 0.5")
    for flag in flags:
        if flag in given:
            word = given[flag].lower()
            if word not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise UserError(f"{flag} {given[flag]!r} is not true or false; give true or false")
            values[flag] = word in ("true", "1", "on", "yes")
    return replace(AnalysisSettings(), **values)
