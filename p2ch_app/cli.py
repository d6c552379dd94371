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
        from p2ch_app.training import load_checkpoint

        saved = load_checkpoint(params["resume"]).get("config", {}).get("options", {})
        layers.append((str(params["resume"]), {k: v for k, v in saved.items() if k in by_name and k != "resume"}))
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
              help="demo: 128x128 slices, coarse spacing (CPU-friendly); full: 512x512, LUNA16 spacing.")
@click.option("--matrix", type=click.IntRange(32), default=None, help="In-plane pixels (overrides --size).")
@click.option("--inplane-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of in-plane spacing in mm (overrides --size).")
@click.option("--slice-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of slice spacing in mm (overrides --size).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --data-root.")
def synth(data_root, config, series, subsets, seed, size, matrix, inplane_mm, slice_mm, overwrite):
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
                            overwrite=overwrite)
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
    from p2ch_app.training import TrainConfig, fit

    keys = ("epochs", "batch_size", "workers", "lr", "optimizer", "device", "seed", "comment", "runs_dir")
    cfg = TrainConfig(command=command, options=opts, **{k: opts[k] for k in keys})
    _, run_dir = fit(task, cfg, resume=opts["resume"])
    if run_dir is not None:
        click.echo(f"{command}: checkpoints in {run_dir} (best.pt by validation {task.best_metric}, last.pt); "
                   f"see the curves with: make tensorboard")


@app_command("luna-train-cls")
@training_options(epochs=10, lr=0.001, optimizer="sgd", epoch_samples=20000, augment="flip,offset,scale,rotate,noise")
@click.option("--balance", type=click.IntRange(0), default=1, show_default=True,
              help="Negatives per positive in training batches (0: the natural ratio).")
def train_cls(**opts):
    """Train the 3D CNN that tells nodules from non-nodules among candidate crops.

    The best checkpoint is the one with the highest validation F1.
    """
    from p2ch_app.tasks import nodule_task

    index, is_val, cache_dir = _training_data(opts)
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
@click.option("--unet-depth", type=click.IntRange(1), default=3, show_default=True)
@click.option("--width-factor", type=click.IntRange(1), default=4, show_default=True,
              help="First-level filters = 2**width_factor, doubling per level.")
@click.option("--up-mode", type=click.Choice(["upconv", "upsample"]), default="upconv", show_default=True,
              help="Transposed convolution or bilinear up-sampling.")
def train_seg(**opts):
    """Train the 2D U-Net that marks nodule pixels from 7-slice context stacks.

    The best checkpoint is the one with the highest validation F2 (pixel recall weighted twice).
    """
    from p2ch_app.tasks import segmentation_task

    index, _, cache_dir = _training_data(opts)
    task = segmentation_task(cache_dir, index, opts["val_stride"], opts["context"], opts["crop"], opts["window"],
                             opts["epoch_samples"], _augmentations(opts), opts["seed"], opts["fn_weight"],
                             opts["unet_depth"], opts["width_factor"], opts["up_mode"], opts["bce_weight"])
    _fit(task, opts, "luna-train-seg")


def _not_built(name: str, issue: str):
    @app_command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command(data_root, config):
        raise UserError(f"{name} is not built yet ({issue}); every other command works in this version")

    command.help = f"Not built yet: {issue}."
    return command


analyze = _not_built("nodule-analyze", "the end-to-end analysis")


if __name__ == "__main__":  # python -m p2ch_app.cli <command> ...
    COMMANDS[sys.argv.pop(1)]()
