"""Command-line entry points: thin click wrappers that resolve options and call library code.

Every command takes --config FILE and --data-root DIR. An option's value comes from the command
line if given there, else from the run being resumed (--resume), else from the config file, else
from the default shown in --help.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from p2ch_app.config import read_config
from p2ch_app.errors import UserError

DEFAULT_DATA_ROOT = Path("data-unversioned/luna")
COMMANDS: dict[str, click.Command] = {}


class AppCommand(click.Command):
    """Turns a UserError into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"{self.name}: error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(f"{self.name}: interrupted; finished work is kept, rerun to continue", err=True)
            ctx.exit(130)


def app_command(name: str, **settings):
    """Declare a command with the shared options; its callback receives resolved options."""

    def decorate(fn):
        def callback(**_):
            ctx = click.get_current_context()
            return fn(**resolve_options(ctx))

        callback.__doc__ = fn.__doc__
        callback.__click_params__ = list(getattr(fn, "__click_params__", []))  # the command's own options
        options = [
            click.option("--config", type=click.Path(path_type=Path, dir_okay=False),
                         help="TOML config file; its values replace defaults, command-line options win."),
            click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
                         default=DEFAULT_DATA_ROOT, show_default=True,
                         help="LUNA16-layout folder: subset*/<uid>.mhd|.raw and the CSVs."),
        ]
        for option in reversed(options):
            callback = option(callback)
        command = click.command(name, cls=AppCommand, help=fn.__doc__, **settings)(callback)
        COMMANDS[name] = command
        return command

    return decorate


def resolve_options(ctx: click.Context) -> dict:
    """Merge the config file into the options the user did not give on the command line."""
    params = dict(ctx.params)
    by_name = {p.name: p for p in ctx.command.params}
    layers = []  # later layers win over earlier ones; the command line wins over all
    if params.get("config") is not None:
        names = {cmd: {p.name for p in c.params if p.name != "config"} for cmd, c in COMMANDS.items()}
        layers.append((str(params["config"]), read_config(params["config"], names)[ctx.command.name]))
    if params.get("resume") is not None:
        from p2ch_app.checkpoints import load_checkpoint, saved_options

        saved = saved_options(load_checkpoint(params["resume"]))
        moot = ("resume", "init")  # a resumed run continues its own weights
        layers.append((str(params["resume"]), {k: v for k, v in saved.items() if k in by_name and k not in moot}))
    for source, values in layers:
        for name, value in values.items():
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                continue
            try:
                params[name] = by_name[name].type_cast_value(ctx, value)
            except click.BadParameter as err:
                raise UserError(f"bad value {value!r} for '{name}' in {source}: {err.message}") from None
    return params


def require_dir(path: Path, what: str, fix: str) -> Path:
    if not Path(path).is_dir():
        raise UserError(f"{what} {path} does not exist; {fix}")
    return Path(path)


def _cache_dir(data_root: Path, cache_dir: Path | None) -> Path:
    from p2ch_app.data.cache import default_cache_dir

    return cache_dir if cache_dir is not None else default_cache_dir(data_root)


@app_command("luna-synth")
@click.option("--series", type=click.IntRange(1), default=30, show_default=True, help="Number of CT series.")
@click.option("--subsets", type=click.IntRange(1, 10), default=10, show_default=True,
              help="Spread the series over subset0..subset{K-1}.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--size", type=click.Choice(["demo", "full"]), default="demo", show_default=True,
              help="demo: 256x256 slices, ~1.3 mm pixels (CPU-friendly); full: 512x512, LUNA16 spacing.")
@click.option("--matrix", type=click.IntRange(32), default=None, help="In-plane pixels (overrides --size).")
@click.option("--inplane-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of in-plane spacing in mm (overrides --size).")
@click.option("--slice-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of slice spacing in mm (overrides --size).")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              help="Processes generating series in parallel (the output does not depend on it).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --data-root.")
def synth(data_root, config, series, subsets, seed, size, matrix, inplane_mm, slice_mm, workers, overwrite):
    """Write a synthetic chest-CT dataset in the exact LUNA16 layout."""
    from dataclasses import replace

    from p2ch_app.data.synth import PRESETS, write_dataset

    geometry = PRESETS[size]
    for field, value in (("matrix", matrix), ("inplane_mm", inplane_mm), ("slice_mm", slice_mm)):
        if value is not None:
            if isinstance(value, tuple) and not 0 < value[0] <= value[1]:
                raise UserError(f"--{field.replace('_', '-')} {value[0]} {value[1]}: give 0 < MIN <= MAX")
            geometry = replace(geometry, **{field: value})
    written = write_dataset(data_root, series=series, subsets=subsets, seed=seed, geometry=geometry,
                            overwrite=overwrite, workers=workers)
    click.echo(f"wrote {len(written)} synthetic series to {data_root}")


@app_command("luna-prep")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the cache goes [default: <data-root>/cache].")
@click.option("--workers", type=click.IntRange(1), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Parallel processes.")
@click.option("--series", "series_uids", multiple=True, metavar="UID",
              help="Only this series (repeatable).")
def prep(data_root, config, cache_dir, workers, series_uids):
    """Build the cache that training and analysis read: CT volumes, nodule label masks.

    Idempotent: only missing or stale series are built, so an interrupted run resumes.
    """
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.ct import check_uid
    from p2ch_app.data.index import build_index

    require_dir(data_root, "data root", "pass --data-root DIR (or run luna-synth to make one)")
    uids = [check_uid(u) for u in series_uids] or None
    index = build_index(data_root)
    for uid in uids or []:
        if uid not in index.series_uids:
            raise UserError(f"series {uid} is not on disk under {data_root}/subset*/ or has no row in "
                            "candidates.csv; check the UID")
    cache = LunaCache(_cache_dir(data_root, cache_dir))
    done = cache.build(data_root, index, uids, workers=workers)
    mb = done["bytes"] / 2**20
    per_ct = mb / max(done["series"], 1)
    click.echo(f"cache {cache.dir}: built {done['built']}, already current {done['skipped']}; "
               f"{done['series']} series, {mb:.1f} MB ({per_ct:.1f} MB per CT)")


def training_options(epochs: int, lr: float, optimizer: str, epoch_samples: int, augment: str):
    """The options every trainer shares, with the defaults of the calling trainer."""
    options = [
        click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="The luna-prep cache [default: <data-root>/cache]."),
        click.option("--epochs", type=click.IntRange(1), default=epochs, show_default=True),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
        click.option("--workers", type=click.IntRange(0), default=min(4, os.cpu_count() or 1), show_default=True,
                     help="Data-loading processes (0: load in the training process)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                     help="Learning rate."),
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=optimizer, show_default=True,
                     help="sgd: momentum 0.99; both with weight decay 1e-4."),
        click.option("--epoch-samples", type=click.IntRange(1), default=epoch_samples, show_default=True,
                     help="Training samples per epoch (drawn afresh every epoch)."),
        click.option("--augment", default=augment, show_default=True,
                     help="Comma-separated: flip,offset,scale,rotate,noise."),
        click.option("--no-augment", is_flag=True, help="Train without augmentation."),
        click.option("--val-stride", type=click.IntRange(2), default=10, show_default=True,
                     help="Every Nth series (sorted by UID) validates."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same run."),
        click.option("--resume", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Continue a run from its last.pt; its saved options fill in what you do not give."),
        click.option("--comment", default="", help="Suffix of the run directory name."),
        click.option("--runs-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
                     show_default=True, help="Where runs/<command>/<time>-<comment>/ go."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


init_option = click.option(
    "--init", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Start from this checkpoint's weights (ours or the book's .state, same architecture) instead of random "
         "ones: transfer learning, far fewer samples to a useful model.")


def _training_data(opts: dict):
    """The index, validation mask and cache directory every candidate trainer starts from."""
    from p2ch_app.data.index import build_index
    from p2ch_app.tasks import require_cached

    require_dir(opts["data_root"], "data root", "pass --data-root DIR (or run luna-synth to make one)")
    index = build_index(opts["data_root"])
    cache_dir = _cache_dir(opts["data_root"], opts["cache_dir"])
    require_cached(cache_dir, index, opts["data_root"])
    return index, index.is_validation(opts["val_stride"]), cache_dir


def _augmentations(opts: dict) -> tuple[str, ...]:
    from p2ch_app.augment import parse_augmentations

    if opts["no_augment"]:
        return ()
    try:
        return parse_augmentations(opts["augment"])
    except ValueError as err:
        raise UserError(f"--augment: {err}") from None


def _fit(task, opts: dict, command: str) -> None:
    from p2ch_app.checkpoints import load_weights
    from p2ch_app.training import TrainConfig, fit

    keys = ("epochs", "batch_size", "workers", "lr", "optimizer", "device", "seed", "comment", "runs_dir")
    cfg = TrainConfig(command=command, options=opts, **{k: opts[k] for k in keys})
    model = None
    if opts.get("init") is not None:
        if opts["resume"] is not None:
            raise UserError("--init and --resume exclude each other: --resume continues a run with its own weights")
        model = load_weights(task.model(), opts["init"], f"a {command} model of this architecture")
    _, run_dir = fit(task, cfg, resume=opts["resume"], model=model)
    if run_dir is not None:
        click.echo(f"{command}: checkpoints in {run_dir} (best.pt by validation {task.best_metric}, last.pt); "
                   f"see the curves with: make tensorboard")


@app_command("luna-train-cls")
@training_options(epochs=10, lr=0.001, optimizer="sgd", epoch_samples=20000, augment="flip,offset,scale,rotate,noise")
@init_option
@click.option("--balance", type=click.IntRange(0), default=1, show_default=True,
              help="Negatives per positive in training batches (0: the natural ratio).")
@click.option("--mine-with", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A U-Net checkpoint: its candidates in the training series that lie away from every nodule join "
                   "the non-nodules, so the classifier learns the look-alikes nodule-analyze will show it.")
def train_cls(**opts):
    """Train the 3D CNN that tells nodules from non-nodules among candidate crops.

    The best checkpoint is the one with the highest validation F1 (on candidates.csv, mined
    look-alikes or not, so runs compare).
    """
    from p2ch_app.tasks import nodule_task

    index, is_val, cache_dir = _training_data(opts)
    if opts["mine_with"] is not None:
        from p2ch_app.tasks import with_mined_lookalikes
        from p2ch_app.training import select_device

        before = len(index)
        index, reused = with_mined_lookalikes(cache_dir, index, opts["val_stride"], opts["mine_with"],
                                              select_device(opts["device"]))
        click.echo(f"mined {len(index) - before} look-alikes in the training series with {opts['mine_with']}"
                   + (" (found in the cache from an earlier run)" if reused else ""))
        is_val = index.is_validation(opts["val_stride"])
    task = nodule_task(cache_dir, index, is_val, opts["balance"], opts["epoch_samples"], _augmentations(opts),
                       opts["seed"])
    _fit(task, opts, "luna-train-cls")


@app_command("luna-finetune-mal")
@training_options(epochs=10, lr=0.001, optimizer="sgd", epoch_samples=3000, augment="flip,offset,scale,rotate,noise")
@click.option("--from", "from_checkpoint", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A nodule classifier checkpoint (ours or the book's .state) to start from.  [required]")
@click.option("--depth", type=click.IntRange(1), default=1, show_default=True,
              help="How many blocks, counted from the head, to train (1: the head only).")
def finetune_mal(**opts):
    """Fine-tune a nodule classifier into a benign/malignant classifier.

    The best checkpoint is the one with the highest validation ROC AUC; the diameter-only
    baseline AUC is printed and logged beside it.
    """
    from p2ch_app.tasks import malignancy_task

    if opts["from_checkpoint"] is None:
        raise UserError("--from CHECKPOINT is required: a nodule classifier from luna-train-cls or the book")
    index, is_val, cache_dir = _training_data(opts)
    task = malignancy_task(cache_dir, index, is_val, opts["epoch_samples"], _augmentations(opts), opts["seed"],
                           opts["from_checkpoint"], opts["depth"])
    _fit(task, opts, "luna-finetune-mal")


@app_command("luna-train-seg")
@training_options(epochs=10, lr=0.001, optimizer="adam", epoch_samples=20000, augment="flip,offset,scale,rotate,noise")
@init_option
@click.option("--context", type=click.IntRange(0), default=3, show_default=True,
              help="Slices above and below the centre slice in each input stack (2C+1 channels).")
@click.option("--crop", type=click.IntRange(16), default=64, show_default=True,
              help="Training patch size, taken at random inside a --window square around a nodule.")
@click.option("--window", type=click.IntRange(16), default=96, show_default=True)
@click.option("--fn-weight", type=click.FloatRange(0), default=8.0, show_default=True,
              help="Extra loss weight on missed nodule pixels (recall matters more than precision).")
@click.option("--bce-weight", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Add pixelwise cross-entropy with this weight: converges far sooner on small nodules "
                   "(coarse voxels); 0 keeps the pure Dice loss.")
@click.option("--label-margin", type=click.IntRange(0), default=1, show_default=True,
              help="Grow the nodule labels by this many voxels in 3D. nodule-analyze erodes the predicted "
                   "mask once, so a margin of 1 keeps small and thin (one- or two-slice) nodules from vanishing.")
@click.option("--lookalike-share", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
              help="Share of training crops centred on a non-nodule candidate (vessel and other look-alikes) "
                   "instead of a nodule, so the U-Net learns what to leave unmarked (fewer candidates).")
@click.option("--per-nodule/--no-per-nodule", default=False,
              help="Draw training slices so that every nodule comes up equally often; by default each slice "
                   "does, so large nodules (more slices) dominate.")
@click.option("--unet-depth", type=click.IntRange(1), default=3, show_default=True)
@click.option("--width-factor", type=click.IntRange(1), default=4, show_default=True,
              help="First-level filters = 2**width_factor, doubling per level.")
@click.option("--up-mode", type=click.Choice(["upconv", "upsample"]), default="upconv", show_default=True,
              help="Transposed convolution or bilinear up-sampling.")
@click.option("--pooling", type=click.Choice(["avg", "max"]), default="avg", show_default=True,
              help="2x2 pooling between U-Net levels: average, as the book's model, or max. Saved with the "
                   "weights, so nodule-analyze runs the network as it was trained.")
def train_seg(**opts):
    """Train the 2D U-Net that marks nodule pixels from 7-slice context stacks.

    The best checkpoint is the one with the highest validation F2 (pixel recall weighted twice).
    """
    from p2ch_app.models import SegmenterConfig
    from p2ch_app.tasks import segmentation_task

    index, _, cache_dir = _training_data(opts)
    architecture = SegmenterConfig(context=opts["context"], depth=opts["unet_depth"], width_factor=opts["width_factor"],
                                   up_mode=opts["up_mode"], pooling=opts["pooling"])
    task = segmentation_task(cache_dir, index, opts["val_stride"], architecture, opts["crop"], opts["window"],
                             opts["epoch_samples"], _augmentations(opts), opts["seed"], opts["fn_weight"],
                             opts["bce_weight"],
                             opts["label_margin"], opts["lookalike_share"], opts["per_nodule"])
    _fit(task, opts, "luna-train-seg")


@app_command("nodule-analyze")
@click.argument("series_uid", required=False)
@click.option("--ct", "ct_path", type=click.Path(path_type=Path), default=None,
              help="Analyse this CT instead: .mhd/.mha, .nii/.nii.gz or a DICOM series folder.")
@click.option("--validation", is_flag=True,
              help="Analyse every validation series of --data-root and score them against the annotations.")
@click.option("--include-train", is_flag=True, help="With --validation: the training series too.")
@click.option("--val-stride", type=click.IntRange(2), default=10, show_default=True,
              help="Every Nth series (sorted by UID) is a validation series, as in training.")
@click.option("--seg-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Segmentation checkpoint [default: newest runs/luna-train-seg/*/best.pt].")
@click.option("--cls-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Nodule classifier checkpoint [default: newest runs/luna-train-cls/*/best.pt].")
@click.option("--mal-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Malignancy checkpoint [default: newest runs/luna-finetune-mal/*/best.pt, if any].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Nodule probability from which a candidate is reported and scored for malignancy.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Candidate crops per classifier batch (small batches run fastest on CPU; raise it on a GPU).")
@click.option("--keep-outside/--no-keep-outside", default=False, help="Keep candidates outside the patient's body.")
@click.option("--fast/--no-fast", default=False,
              help="Reduced precision (float16 on CUDA, bfloat16 on CPU): faster on GPUs and on CPUs with bf16 "
                   "instructions, ignored with a note on other CPUs; probabilities move slightly (README).")
@click.option("--tta/--no-tta", default=False,
              help="Average the classifiers over four mirror images of each crop (left-right, front-back): a better "
                   "ranking of small nodules for up to 4x the classification time; nodule candidates under "
                   "probability 0.05 keep their single pass (README).")
@click.option("--split/--no-split", default=False,
              help="Also propose the pieces left when the mask is eroded once more: a nodule touching a vessel "
                   "is one component with it, whose centre can lie outside the nodule (README).")
@click.option("--dedupe/--no-dedupe", default=False,
              help="Drop a candidate whose centre lies within the estimated diameter of a more probable one: "
                   "pieces of one nodule's mask, each otherwise a false positive beside the hit (README).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the rows to FILE.json or FILE.csv.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write a PNG (axial, coronal, sagittal views) per reported nodule and an index.html to DIR.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--runs-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              show_default=True, help="Where the default models are looked for and --validation results go.")
@click.option("--comment", default="", help="Suffix for the --validation run folder name.")
def analyze(data_root, config, series_uid, ct_path, validation, include_train, val_stride, seg_model, cls_model,
            mal_model, threshold, batch_size, keep_outside, fast, tta, split, dedupe, output, report_dir, device,
            runs_dir, comment):
    """Find nodules in a CT: segment, group voxels into candidates, classify, score malignancy.

    Give a LUNA series UID (looked up under --data-root), --ct PATH, or --validation to run every
    validation series and print the confusion table and the LUNA16 FROC/CPM (results, FROC curve
    and TensorBoard logs under runs/nodule-analyze/). Candidates outside the patient's body (tubes,
    table, cables) are dropped unless --keep-outside.
    """
    from p2ch_app.analysis import load_models, reduced_precision_pays
    from p2ch_app.training import select_device

    if sum((series_uid is not None, ct_path is not None, validation)) != 1:
        raise UserError("give either a SERIES_UID, --ct PATH or --validation (exactly one)")
    if include_train and not validation:
        raise UserError("--include-train only goes with --validation")
    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise UserError(f"--output {output}: use a .json or .csv file name")
    if report_dir is not None and report_dir.exists() and any(report_dir.iterdir()):
        raise UserError(f"--report {report_dir} is not empty; choose a new folder")
    paths = _model_paths(runs_dir, seg_model, cls_model, mal_model)
    torch_device = select_device(device)
    if fast and not reduced_precision_pays(torch_device):
        click.echo("nodule-analyze: note: --fast ignored: this CPU has no bfloat16 instructions, so reduced "
                   "precision would run slower; running in float32", err=True)
        fast = False
    settings = dict(threshold=threshold, batch_size=batch_size, keep_outside=keep_outside, device=torch_device,
                    fast=fast, tta=tta, dedupe=dedupe, split=split)
    if validation:
        require_dir(data_root, "data root", "pass --data-root DIR (or run luna-synth to make one)")
        models = load_models(paths["seg"], paths["cls"], paths["mal"], torch_device)
        _analyze_validation(data_root, val_stride, include_train, models, settings, output, report_dir, runs_dir,
                            comment)
        return
    from p2ch_app.analysis import analyze as run_analysis
    from p2ch_app.data.ct import load_ct, load_series

    ct = load_ct(ct_path) if ct_path is not None else load_series(data_root, series_uid)
    models = load_models(paths["seg"], paths["cls"], paths["mal"], torch_device)
    found = run_analysis(ct, models, progress=True, **settings)
    rows = [d for d in found if d.nodule_prob >= threshold]
    click.echo(f"{ct.series_uid}: {len(found)} candidates, {len(rows)} with nodule probability >= {threshold}")
    click.echo(_detection_table(rows))
    if output is not None:
        _write_detections(output, [(ct.series_uid, d) for d in rows], models.paths, ct.series_uid)
        click.echo(f"wrote {output}")
    if report_dir is not None:
        from p2ch_app.report import write_report

        click.echo(f"wrote {write_report(report_dir, ct, rows, title=f'nodule-analyze {ct.series_uid}')}")


def _model_paths(runs_dir: Path, seg_model, cls_model, mal_model) -> dict:
    from p2ch_app.analysis import newest_best

    trainers = {"seg": ("luna-train-seg", seg_model), "cls": ("luna-train-cls", cls_model)}
    paths = {}
    for key, (command, given) in trainers.items():
        paths[key] = given or newest_best(runs_dir, command)
        if paths[key] is None:
            raise UserError(f"no trained model under {runs_dir}/{command}/; train one with {command} "
                            f"or pass --{key}-model (the book's .state files work)")
    paths["mal"] = mal_model or newest_best(runs_dir, "luna-finetune-mal")
    return paths


def _analyze_validation(data_root, val_stride, include_train, models, settings, output, report_dir, runs_dir,
                        comment) -> None:
    """Every validation series (and the training ones with include_train), scored and saved in a run folder."""
    import numpy as np

    from p2ch_app.analysis import analyze_series
    from p2ch_app.data.index import build_index
    from p2ch_app.evaluation import evaluate, format_summary, save_evaluation
    from p2ch_app.training import new_run_dir

    index = build_index(data_root)
    chosen = np.ones(len(index.series_uids), bool) if include_train else index.validation_series(val_stride)
    uids = [uid for uid, keep in zip(index.series_uids, chosen) if keep]
    entries = []  # report pages, one per series, when --report is given

    def report_ct(ct, detections):
        from p2ch_app.report import write_report

        shown = [d for d in detections if d.nodule_prob >= settings["threshold"]]
        write_report(report_dir / ct.series_uid, ct, shown, title=f"nodule-analyze {ct.series_uid}")
        entries.append((ct.series_uid, f"{ct.series_uid}/index.html", len(shown)))

    results = analyze_series(data_root, index, uids, models, progress=True,
                             on_ct=report_ct if report_dir is not None else None, **settings)
    metrics = evaluate([scan for _, _, scan in results], settings["threshold"])
    metrics.update(series=uids, models=models.paths, threshold=settings["threshold"],
                   keep_outside=settings["keep_outside"], tta=settings["tta"], dedupe=settings["dedupe"],
                   split=settings["split"], include_train=include_train, val_stride=val_stride)
    run_dir = new_run_dir(runs_dir, "nodule-analyze", comment)
    save_evaluation(run_dir, metrics)
    rows = [(uid, d) for uid, detections, _ in results for d in detections]
    _write_detections(run_dir / "detections.csv", rows, models.paths, uids)
    if output is not None:
        _write_detections(output, [(uid, d) for uid, d in rows if d.nodule_prob >= settings["threshold"]],
                          models.paths, uids)
    if report_dir is not None:
        from p2ch_app.report import write_report_index

        write_report_index(report_dir, entries, title="nodule-analyze validation")
    click.echo(format_summary(metrics))
    click.echo(f"results in {run_dir} (metrics.json, froc.png, detections.csv, TensorBoard: make tensorboard)")


def _detection_table(rows) -> str:
    head = f"{'rank':>4} {'x mm':>8} {'y mm':>8} {'z mm':>8} {'index':>6} {'row':>6} {'col':>6} " \
           f"{'nodule':>7} {'malig.':>7} {'diam mm':>8}"
    lines = [head]
    for rank, d in enumerate(rows, 1):
        mal = "-" if d.malignancy_prob is None else f"{d.malignancy_prob:.3f}"
        lines.append(f"{rank:>4} {d.center_xyz[0]:>8.1f} {d.center_xyz[1]:>8.1f} {d.center_xyz[2]:>8.1f} "
                     f"{d.center_irc[0]:>6.1f} {d.center_irc[1]:>6.1f} {d.center_irc[2]:>6.1f} "
                     f"{d.nodule_prob:>7.3f} {mal:>7} {d.diameter_mm:>8.1f}")
    return "\n".join(lines)


def _write_detections(path: Path, rows, model_paths: dict, series) -> None:
    """(series UID, detection) rows, ranked within their series, with the models used, written through
    a temporary file. series: the one UID analysed, or the list of them."""
    import json

    from p2ch_app.files import write_csv_atomic, write_text_atomic

    ranks, seen = [], {}
    for uid, _ in rows:
        seen[uid] = seen.get(uid, 0) + 1
        ranks.append(seen[uid])
    records = [{"rank": rank, "series_uid": uid, "x_mm": d.center_xyz[0], "y_mm": d.center_xyz[1],
                "z_mm": d.center_xyz[2], "index": d.center_irc[0], "row": d.center_irc[1], "col": d.center_irc[2],
                "nodule_prob": d.nodule_prob, "malignancy_prob": d.malignancy_prob, "diameter_mm": d.diameter_mm,
                "voxels": d.voxels, "inside_body": d.inside_body, "seg_model": model_paths["seg"],
                "cls_model": model_paths["cls"], "mal_model": model_paths["mal"]}
               for rank, (uid, d) in zip(ranks, rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        write_text_atomic(path, json.dumps({"series_uid": series, "models": model_paths, "detections": records},
                                           indent=2))
    else:
        write_csv_atomic(path, list(records[0]) if records else ["rank", "series_uid"],
                         [list(r.values()) for r in records])


if __name__ == "__main__":  # python -m p2ch_app.cli <command> ...
    COMMANDS[sys.argv.pop(1)]()
