"""nodule-serve: the models over HTTP."""

from __future__ import annotations

from pathlib import Path

import click

from p2ch_app.cli.options import app_command, device_option, model_options, runs_dir_option


@app_command("nodule-serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token-file or --no-auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@model_options
@device_option
@runs_dir_option
@click.option("--max-batch", type=click.IntRange(1), default=16, show_default=True,
              help="/predict crops per classifier pass (1: one request at a time, as the book's server).")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long the first crop of a batch waits for others.")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="/predict crops waiting; past it the answer is 503 with Retry-After.")
@click.option("--max-jobs", type=click.IntRange(1), default=8, show_default=True,
              help="/analyze jobs waiting; past it the answer is 503.")
@click.option("--results-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/nodule-serve"),
              show_default=True, help="Where finished jobs are kept (a restart keeps them).")
@click.option("--keep-results", type=click.IntRange(1), default=100, show_default=True,
              help="Finished jobs kept; the oldest are removed.")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=1024.0, show_default=True,
              help="Largest /analyze upload (also the most a zip may unpack to).")
@click.option("--max-zip-entries", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--grace-s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="At SIGTERM or Ctrl-C, how long a running job may take to finish before it is marked failed.")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File holding a bearer token that every route but /healthz requires.")
@click.option("--no-auth", is_flag=True, help="Allow a non-loopback --host without a token (trusted networks only).")
def serve(**opts):
    """Serve the models over HTTP: the book's chapter-15 POST /predict (batched), whole CTs as POST /analyze
    jobs, a page at GET / to upload a CT, GET /healthz, /readyz and /metrics.

    The models are found as nodule-analyze finds them. SIGTERM or Ctrl-C drains: work in flight
    finishes, a running job within --grace-s; a second Ctrl-C exits at once.
    """
    from p2ch_app.checkpoints import model_paths
    from p2ch_app.inference.pipeline import load_models
    from p2ch_app.inference.runtime import select_device
    from p2ch_app.serve.app import ServeSettings, create_app
    from p2ch_app.serve.batching import BatchSettings
    from p2ch_app.serve.jobs import JobSettings
    from p2ch_app.serve.server import access_token
    from p2ch_app.serve.server import serve as run_server

    token = access_token(opts["host"], opts["token_file"], opts["no_auth"])
    device = select_device(opts["device"])
    paths = model_paths(opts["runs_dir"], opts["seg_model"], opts["cls_model"], opts["mal_model"])
    models = load_models(paths["seg"], paths["cls"], paths["mal"], device)
    settings = ServeSettings(
        jobs=JobSettings(opts["results_dir"], opts["max_jobs"], opts["keep_results"]),
        batching=BatchSettings(opts["max_batch"], opts["max_wait_ms"], opts["max_queue"]),
        max_upload_mb=opts["max_upload_mb"], max_zip_entries=opts["max_zip_entries"], token=token,
        grace_s=opts["grace_s"])
    run_server(create_app(settings, models, device), opts["host"], opts["port"], opts["grace_s"])
