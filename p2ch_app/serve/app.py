"""The nodule-serve ASGI app: routes, errors as one-line JSON, the bearer token, metrics and the request log.

FastAPI (on Starlette) gives routing, the lifespan that starts and drains the batcher and the job
thread, and file responses; uploads are parsed by uploads.py as they stream, not by FastAPI's forms,
which store a whole file before the handler could check its size.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import shutil
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from p2ch_app.errors import UserError, brief
from p2ch_app.inference.pipeline import Models
from p2ch_app.serve.batching import BatchSettings, CropBatcher, Overloaded
from p2ch_app.serve.jobs import JobRunner, JobSettings, Upload, analysis_settings
from p2ch_app.serve.protocol import decode_crop, prediction
from p2ch_app.serve.telemetry import CONTENT_TYPE, Telemetry, log_request
from p2ch_app.serve.uploads import (
    TooLarge,
    UploadLimits,
    ct_suffix,
    private_folder,
    read_form,
    series_name,
    unpack_ct,
)

log = logging.getLogger("nodule_serve")
OPEN_ROUTES = ("/healthz", "/")  # the page holds no data; it asks for the token and sends it with each call
PREDICT_BODY_LIMIT = 4 << 20  # a 1x32x48x48 crop is 288 KiB


@dataclass(frozen=True)
class ServeSettings:
    jobs: JobSettings
    batching: BatchSettings = BatchSettings()
    max_upload_mb: float = 1024.0
    max_zip_entries: int = 2000
    token: str | None = None  # None: no authentication (loopback, or --no-auth)
    grace_s: float = 30.0  # how long a running job may take to finish at shutdown
    analysis_batch_size: int = 8  # candidate crops per classifier pass in /analyze jobs

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(int(self.max_upload_mb * 2**20), self.max_zip_entries)


class Service:
    """What the routes share: the models' batcher, the job runner, the metrics."""

    def __init__(self, settings: ServeSettings, models: Models, device: torch.device):
        self.settings, self.models = settings, models
        self.telemetry = Telemetry()
        classifiers = {"nodule_prob": models.classifier}
        if models.malignancy is not None:
            classifiers["malignancy_prob"] = models.malignancy
        self.batcher = CropBatcher(classifiers, device, settings.batching, self.telemetry.batch_size.observe)
        self.runner = JobRunner(settings.jobs, models, device, self.telemetry.set_jobs)
        self.telemetry.queue_depth.set_function(lambda: self.batcher.depth)
        self.ready = False

    async def start(self) -> None:
        self.batcher.start()
        self.runner.start()
        self.telemetry.set_jobs(self.runner.counts())
        self.ready = True

    async def drain(self) -> None:
        """New work is refused; queued crops are answered; the running job gets grace_s."""
        self.ready = False
        await self.batcher.close()
        await asyncio.to_thread(self.runner.stop, self.settings.grace_s)


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(settings: ServeSettings, models: Models, device: torch.device) -> FastAPI:
    service = Service(settings, models, device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.drain()

    app = FastAPI(title="nodule-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.middleware("http")(_guard(service))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    _routes(app, service)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in the same one-line JSON as ours."""
    fixes = {404: f"no route {request.url.path}; the routes are /, /predict, /analyze, /jobs/ID, /healthz, /readyz, "
                  "/metrics", 405: f"{request.method} is not allowed on {request.url.path}; check the method"}
    return error(exc.status_code, fixes.get(exc.status_code, f"{exc.detail}; check the request"))


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, f"invalid request ({brief(exc, 100)}); check the parameters")


def _authorized(service: Service, request: Request) -> bool:
    token = service.settings.token
    if token is None or request.url.path in OPEN_ROUTES:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def _guard(service: Service):
    """Around every request: the token, the refusals as JSON, a 500 with an error id, metrics, the log."""

    async def middleware(request: Request, call_next):
        start = time.perf_counter()
        if not _authorized(service, request):
            response = error(401, "missing or wrong bearer token; send the header 'Authorization: Bearer <token>' "
                                  "with the token of nodule-serve's --token-file", **{"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await call_next(request)
            except Overloaded as err:
                response = error(503, f"busy: {err}; retry in a moment", **{"Retry-After": "1"})
            except TooLarge as err:
                response = error(413, str(err))
            except UserError as err:
                response = error(400, str(err))
            except ClientDisconnect:
                response = error(400, "the client disconnected before the request was complete; send it again")
            except Exception:  # a bug: the client gets an id, the log the traceback
                error_id = secrets.token_hex(4)
                log.exception("error id %s on %s %s", error_id, request.method, request.url.path)
                response = error(500, f"internal error (error id {error_id}); the server log has the details")
        route = request.scope.get("route")
        seconds = time.perf_counter() - start
        service.telemetry.observe(route.path if route is not None else "unmatched", response.status_code, seconds)
        log_request(request.client.host if request.client else "-", request.method, request.url.path,
                    response.status_code, seconds)
        return response

    return middleware


def _routes(app: FastAPI, service: Service) -> None:
    page = resources.files("p2ch_app.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.ready:
            return error(503, "not ready: the models are loading or the server is stopping; retry in a moment")
        return {"status": "ready", "models": service.models.paths}

    @app.get("/metrics")
    async def metrics():
        return Response(service.telemetry.render(), media_type=CONTENT_TYPE)

    @app.post("/predict")
    async def predict(request: Request):
        form = await read_form(request, UploadLimits(PREDICT_BODY_LIMIT))
        meta = form.fields.get("meta", form.files.get("meta"))  # the book's client sends both as files
        blob = form.files.get("blob", form.fields.get("blob"))
        crop = decode_crop(meta, blob, service.models.classifier.config.crop_size)
        return prediction(await service.batcher.predict(crop))

    _job_routes(app, service)


def _job_routes(app: FastAPI, service: Service) -> None:
    @app.post("/analyze", status_code=202)
    async def submit(request: Request):
        limits = service.settings.upload_limits
        folder = private_folder()
        try:
            form = await read_form(request, limits, folder)
            upload = await asyncio.to_thread(_prepared_upload, form, folder, limits)
            job = service.runner.submit(upload, analysis_settings(form.fields, service.settings.analysis_batch_size))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        location = f"/jobs/{job['id']}"
        return JSONResponse({**job, "status_url": location}, status_code=202, headers={"Location": location})

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str):
        try:
            job = await asyncio.to_thread(service.runner.status, job_id)
        except KeyError:
            return error(404, f"no job {job_id!r} (finished jobs are kept for a while only); submit the CT again")
        if job["state"] == "done":
            job["links"] = {name: f"/jobs/{job_id}/files/{name}" for name in job["files"]}
        return job

    @app.get("/jobs/{job_id}/files/{name}")
    async def job_file(job_id: str, name: str):
        try:
            files = service.runner.files(job_id)
        except KeyError:
            return error(404, f"no job {job_id!r}; submit the CT again")
        if name not in files:
            return error(404, f"job {job_id} has no file {name!r}; GET /jobs/{job_id} lists its files")
        return FileResponse(files[name])


def _prepared_upload(form, folder, limits: UploadLimits) -> Upload:
    """The uploaded CT, unzipped when it came as a zip, ready for load_ct."""
    if set(form.saved) != {"file"}:
        raise UserError("send exactly one CT as the form's file field 'file' (.nii, .nii.gz, .mha, or a .zip of a "
                        "DICOM series or a .mhd with its .raw)")
    path, filename = form.saved["file"]
    suffix = ct_suffix(filename)
    if not suffix:
        raise UserError(f"unsupported file {filename!r}: send .nii, .nii.gz, .mha, or a .zip of a DICOM series or "
                        "a .mhd with its .raw")
    if suffix == ".zip":
        ct_path = unpack_ct(path, folder, limits)
        path.unlink()
        return Upload(folder, ct_path, None if ct_path.is_dir() else series_name(filename))
    return Upload(folder, path, series_name(filename))
