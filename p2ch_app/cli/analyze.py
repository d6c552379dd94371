"""nodule-analyze: one LUNA series, one CT file or DICOM folder, or every validation series."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from p2ch_app.cli.options import (
    app_command,
    comment_option,
    device_option,
    model_options,
    require_dir,
    runs_dir_option,
    settings_from,
    val_stride_option,
)
from p2ch_app.errors import UserError
from p2ch_app.files import check_writable


@app_command("nodule-analyze")
@click.argument("series_uid", required=False)
@click.option("--ct", "ct_path", type=click.Path(path_type=Path), default=None,
              help="Analyse this CT instead: .mhd/.mha, .nii/.nii.gz or a DICOM series folder.")
@click.option("--validation", is_flag=True,
              help="Analyse every validation series of --data-root and score them against the annotations.")
@click.option("--include-train", is_flag=True, help="With --validation: the training series too.")
@val_stride_option
@model_options
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Nodule probability from which a candidate is reported and scored for malignancy.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Candidate crops per classifier batch (small batches run fastest on CPU; raise it on a GPU).")
@click.option("--keep-outside/--no-keep-outside", default=False, help="Keep candidates outside the patient's body.")
@click.option("--fast/--no-fast", default=False,
              help="Reduced precision (float16 on CUDA, bfloat16 on CPU): faster on GPUs and on CPUs with bf16 "
                   "instructions, ignored with a note on other CPUs; probabilities move slightly (README: GPUs).")
@click.option("--tta/--no-tta", default=False,
              help="Average the classifiers over four mirror images of each crop (left-right, front-back): a better "
                   "ranking of small nodules for up to 4x the classification time; nodule candidates under "
                   "probability 0.05 keep their single pass.")
@click.option("--split/--no-split", default=False,
              help="Also propose the pieces left when the mask is eroded once more: a nodule touching a vessel "
                   "is one component with it, whose centre can lie outside the nodule.")
@click.option("--dedupe/--no-dedupe", default=False,
              help="Drop a candidate whose centre lies within the estimated diameter of a more probable one: "
                   "pieces of one nodule's mask, each otherwise a false positive beside the hit.")
@click.option("--lung-only/--no-lung-only", default=False,
              help="Keep only candidates whose centre lies in a lung mask found in the CT (air inside the body, "
                   "holes filled, a 5 mm margin): drops false positives in the bowel, stomach and mediastinum. "
                   "A CT without lungs keeps the body mask's candidates, with a note.")
@click.option("--recentre/--no-recentre", default=False,
              help="Move each candidate's centre onto the dense tissue within 3 mm of it before classifying: the "
                   "U-Net's mark of a small nodule often lies a slice off it, and one merged with a vessel lies "
                   "between the two, so the candidate misses the nodule by LUNA16's rule (within its radius).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the rows to FILE.json or FILE.csv.")
@click.option("--submission", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write every candidate (all probabilities) to FILE.csv in the LUNA16 submission format "
                   "(seriesuid,coordX,coordY,coordZ,probability), for the challenge's evaluation script.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write a PNG (axial, coronal, sagittal views) per reported nodule, an index.html, a 3D Slicer "
                   "point list (detections.mrk.json), a label map of their voxels (candidates.nii.gz) and the "
                   "lung mask (lungs.nii.gz) to DIR.")
@click.option("--dicomweb", metavar="URL", default=None,
              help="Fetch the CT from this DICOMweb server (a PACS; e.g. http://localhost:8042/dicom-web) instead.")
@click.option("--study", metavar="UID", default=None, help="With --dicomweb: the study to analyse.")
@click.option("--series", metavar="UID", default=None,
              help="With --dicomweb: the CT series, when the study holds several.")
@click.option("--store", is_flag=True, help="With --dicomweb: store the SEG and SR back (STOW-RS).")
@click.option("--dicomweb-token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --dicomweb: a file holding a bearer token to sign in with.")
@click.option("--dicomweb-user", default=None, help="With --dicomweb: the user name to sign in with.")
@click.option("--dicomweb-password-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --dicomweb-user: a file holding the password.")
@device_option
@runs_dir_option
@comment_option
def analyze(**opts):
    """Find nodules in a CT: segment, group voxels into candidates, classify, score malignancy.

    Give a LUNA series UID (looked up under --data-root), --ct PATH, --dicomweb URL --study UID (a
    series fetched from a PACS; --store sends the SEG and SR back), or --validation to run every
    validation series and print the confusion table and the LUNA16 FROC/CPM (results, FROC curve
    and TensorBoard logs under runs/nodule-analyze/). Candidates outside the patient's body (tubes,
    table, cables) are dropped unless --keep-outside; with --lung-only, those outside the lungs too
    (recommended: --tta --dedupe --lung-only).
    """
    from p2ch_app.inference.distributed import start_ranks, stop_ranks

    _check_analyze_options(opts)
    ranks, device = start_ranks(opts["device"])
    try:
        _run(opts, ranks, device)
    finally:
        stop_ranks()


def _run(opts: dict, ranks, device) -> None:
    from p2ch_app.checkpoints import model_paths
    from p2ch_app.inference.distributed import barrier
    from p2ch_app.inference.pipeline import AnalysisSettings, load_models
    from p2ch_app.inference.runtime import reduced_precision_pays

    if ranks.is_main:  # one rank checks: another's probe files would make --report look in use
        _check_outputs(opts)
    barrier(ranks)  # no rank writes a report page before rank 0 has checked the outputs
    paths = model_paths(opts["runs_dir"], opts["seg_model"], opts["cls_model"], opts["mal_model"])
    if opts["fast"] and not reduced_precision_pays(device):
        if ranks.is_main:
            click.echo("nodule-analyze: note: --fast ignored: this CPU has no bfloat16 instructions, so reduced "
                       "precision would run slower; running in float32", err=True)
        opts["fast"] = False
    settings = settings_from(AnalysisSettings, opts)
    if opts["validation"]:
        require_dir(opts["data_root"], "data root", "pass --data-root DIR (or run luna-synth to make one)")
        _validation(opts, load_models(paths["seg"], paths["cls"], paths["mal"], device), settings, device, ranks)
    else:
        _one_ct(opts, paths, settings, device)


def _check_analyze_options(opts: dict) -> None:
    from p2ch_app.inference.distributed import launched_world

    if sum((opts["series_uid"] is not None, opts["ct_path"] is not None, opts["validation"],
            opts["dicomweb"] is not None)) != 1:
        raise UserError("give either a SERIES_UID, --ct PATH, --dicomweb URL or --validation (exactly one)")
    if (opts["dicomweb"] is None) != (opts["study"] is None):
        raise UserError("--dicomweb and --study go together; give both")
    pacs_only = ("series", "store", "dicomweb_token_file", "dicomweb_user", "dicomweb_password_file")
    given = [name for name in pacs_only if opts[name] not in (None, False)]
    if given and opts["dicomweb"] is None:
        raise UserError(f"--{given[0].replace('_', '-')} only goes with --dicomweb; give --dicomweb URL --study UID")
    if opts["include_train"] and not opts["validation"]:
        raise UserError("--include-train only goes with --validation")
    output, submission = opts["output"], opts["submission"]
    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--output {output}: use a .json or .csv file name")
    if submission is not None and submission.suffix.lower() != ".csv":
        raise UserError(f"--submission {submission}: use a .csv file name (LUNA16 submissions are CSV)")
    if submission is not None and output is not None and submission.resolve() == output.resolve():
        raise UserError(f"--submission and --output both name {output}; give them different files")
    if not opts["validation"] and launched_world() > 1:
        raise UserError(f"torchrun started {launched_world()} processes, but only --validation shares its series "
                        "among them; analyse one CT without torchrun")


def _check_outputs(opts: dict) -> None:
    """Before the analysis, whose results a failed write would lose."""
    output, report_dir, submission = opts["output"], opts["report_dir"], opts["submission"]
    if output is not None:
        check_writable(output, "--output")
    if submission is not None:
        check_writable(submission, "--submission")
    if report_dir is not None and any(check_writable(report_dir, "--report", folder=True).iterdir()):
        raise UserError(f"--report {report_dir} is not empty; choose a new folder")
    if opts["validation"]:
        check_writable(opts["runs_dir"] / "nodule-analyze", "--runs-dir", folder=True)


def _note(message: str) -> None:
    """A note from the analysis on a line of its own, above any progress bar."""
    tqdm.write(f"nodule-analyze: note: {message}", file=sys.stderr)


def _one_ct(opts: dict, paths: dict, settings, device) -> None:
    from p2ch_app.data.ct import load_ct, load_series

    if opts["dicomweb"] is not None:
        _from_pacs(opts, paths, settings, device)
    elif opts["ct_path"] is not None:
        ct = load_ct(opts["ct_path"])
        _analyse(opts, ct, opts["ct_path"] if opts["ct_path"].is_dir() else None, paths, settings, device)
    else:
        _analyse(opts, load_series(opts["data_root"], opts["series_uid"]), None, paths, settings, device)


def _from_pacs(opts: dict, paths: dict, settings, device) -> None:
    """Fetch the series, analyse it, store the SEG and SR back with --store."""
    from p2ch_app.inference.dicomweb import Pacs, choose_series, connect, fetched_series, read_fetched, store

    client = connect(Pacs(opts["dicomweb"], opts["dicomweb_token_file"], opts["dicomweb_user"],
                          opts["dicomweb_password_file"]))
    series = choose_series(client, opts["study"], opts["series"])
    with fetched_series(client, opts["study"], series) as folder:
        objects = _analyse(opts, read_fetched(folder, series, client), folder, paths, settings, device)
    if opts["store"]:
        for what in store(client, objects):
            click.echo(f"stored {what} in {client.base_url}")


def _analyse(opts: dict, ct, dicom_folder: Path | None, paths: dict, settings, device):
    """Analyse one CT and write what the options ask for; for a DICOM series (dicom_folder) whose SEG
    and SR are wanted (--report, --store), returns them."""
    from p2ch_app.inference.outputs import detection_table, write_detections, write_submission
    from p2ch_app.inference.pipeline import analyze as run_analysis
    from p2ch_app.inference.pipeline import load_models
    from p2ch_app.inference.summary import summarize

    models = load_models(paths["seg"], paths["cls"], paths["mal"], device)
    found = run_analysis(ct, models, settings, device, progress=True, note=_note)
    rows = [d for d in found if d.nodule_prob >= settings.threshold]
    summary = summarize(rows, models.malignancy is not None)
    click.echo(f"{ct.series_uid}: {len(found)} candidates, {len(rows)} with nodule probability >= "
               f"{settings.threshold}")
    click.echo(detection_table(rows, summary))
    if opts["output"] is not None:
        write_detections(opts["output"], [(ct.series_uid, d) for d in rows], models.paths, {ct.series_uid: summary})
        click.echo(f"wrote {opts['output']}")
    if opts["submission"] is not None:
        write_submission(opts["submission"], [(ct.series_uid, d) for d in found])
        click.echo(f"wrote {opts['submission']} ({len(found)} candidates)")
    objects = None
    if dicom_folder is not None and (opts["report_dir"] is not None or opts["store"]):
        from p2ch_app.inference.dicom_objects import objects_for_series

        objects = objects_for_series(dicom_folder, ct, rows, summary, models.paths, settings)
    if opts["report_dir"] is not None:
        from p2ch_app.inference.report import write_report  # matplotlib: imported only when needed

        title = f"nodule-analyze {ct.series_uid}"
        click.echo(f"wrote {write_report(opts['report_dir'], ct, rows, summary, title=title)}")
        if objects is not None:
            from p2ch_app.inference.dicom_objects import write_objects

            click.echo(f"wrote {', '.join(str(p) for p in write_objects(opts['report_dir'], objects))}")
    return objects


def _validation(opts: dict, models, settings, device, ranks) -> None:
    """Every validation series; under torchrun this rank's share of them, and only rank 0 prints."""
    from p2ch_app.evaluation.results import format_summary
    from p2ch_app.evaluation.series import ValidationRun, run_validation

    run = settings_from(ValidationRun, opts)
    done = run_validation(run, models, settings, device, ranks, note=_note)
    if done is None:  # not rank 0
        return
    metrics, run_dir = done
    click.echo(format_summary(metrics))
    click.echo(f"results in {run_dir} (metrics.json, froc.png, detections.csv, TensorBoard: make tensorboard)")
    if run.submission is not None:
        click.echo(f"wrote {run.submission} (every candidate of {len(metrics['series'])} series)")
