"""The trainers: luna-train-cls, luna-finetune-mal, luna-train-seg. Each builds its settings from
the options and hands a task to the one training loop."""

from __future__ import annotations

from pathlib import Path

import click

from p2ch_app.cli.options import app_command, cache_dir_of, init_option, require_dir, settings_from, training_options
from p2ch_app.errors import UserError
from p2ch_app.files import check_writable


def _training_data(opts: dict, command: str):
    """(TrainConfig, index, Sampling) every trainer starts from, once the cache is known to hold every
    series and the run folder (a new one, or the resumed run's) to be writable."""
    from p2ch_app.data.cache import require_cached
    from p2ch_app.data.index import build_index
    from p2ch_app.training.augment import parse_augmentations
    from p2ch_app.training.loop import Sampling, TrainConfig

    cfg = settings_from(TrainConfig, opts, command=command, init=opts.get("init"), options=opts)
    require_dir(opts["data_root"], "data root", "pass --data-root DIR (or run luna-synth to make one)")
    index = build_index(opts["data_root"])
    cache_dir = cache_dir_of(opts)
    require_cached(cache_dir, index, opts["data_root"])
    if opts["resume"] is not None:
        check_writable(opts["resume"].parent, "--resume's run folder", folder=True)
    else:
        check_writable(opts["runs_dir"] / command, "--runs-dir", folder=True)
    try:
        augmentations = () if opts["no_augment"] else parse_augmentations(opts["augment"])
    except ValueError as err:
        raise UserError(f"--augment: {err}") from None
    return cfg, index, settings_from(Sampling, opts, cache_dir=cache_dir, augmentations=augmentations)


def _fit(task, cfg) -> Path | None:
    """Train; the run directory on rank 0 (None on the others)."""
    from p2ch_app.inference.distributed import stop_ranks
    from p2ch_app.training.loop import fit

    try:
        _, run_dir = fit(task, cfg)
    finally:
        stop_ranks()  # under torchrun: leave the process group before exiting
    if run_dir is not None:
        click.echo(f"{cfg.command}: checkpoints in {run_dir} (best.pt by validation {task.best_metric}, last.pt); "
                   f"see the curves with: make tensorboard")
    return run_dir


@app_command("luna-train-cls")
@training_options(epochs=10, lr=0.001, optimizer="sgd", epoch_samples=20000)
@init_option
@click.option("--balance", type=click.IntRange(0), default=1, show_default=True,
              help="Negatives per positive in training batches (0: the natural ratio).")
@click.option("--mine-with", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A U-Net checkpoint: its candidates in the training series that lie away from every nodule join "
                   "the non-nodules, and those within a nodule's radius the nodules, so the classifier learns "
                   "the crops nodule-analyze will show it.")
@click.option("--mine-workers", type=click.IntRange(1), default=1, show_default=True,
              help="Processes that run --mine-with's U-Net over the training CTs on the CPU, each with its share "
                   "of the cores (on 2 cores, 2 mine about 1.2x faster than 1).")
@click.option("--mine-every", type=click.IntRange(1), default=1, show_default=True,
              help="Mine every Nth training series only (1: all). Each mined CT gives a few hundred look-alikes; "
                   "a short run sees only some of them, so mining half the CTs saves half the mining time.")
@click.option("--crop-zoom", type=click.FloatRange(0.25, 4), default=1.0, show_default=True,
              help="Sample the crops' rows and columns this many times finer than the CT's pixels (linear "
                   "interpolation; slices as they are). Saved with the weights, so nodule-analyze crops alike. "
                   "1 is the book's; the book's classifier learnt LUNA16's ~0.7 mm pixels, so data with coarser "
                   "pixels (the demo's ~1.3 mm: 2) fine-tunes it far better zoomed.")
def train_cls(**opts):
    """Train the 3D CNN that tells nodules from non-nodules among candidate crops.

    The best checkpoint is the one with the highest validation F1 (on candidates.csv, mined
    look-alikes or not, so runs compare).
    """
    from p2ch_app.training.classification import NoduleSettings, nodule_task

    cfg, index, sampling = _training_data(opts, "luna-train-cls")
    if opts["mine_with"] is not None:
        from p2ch_app.inference.runtime import select_device
        from p2ch_app.training.mining import with_mined

        before = len(index)
        index, reused = with_mined(sampling.cache(), index, sampling.val_stride, opts["mine_with"],
                                   select_device(opts["device"]), opts["mine_workers"], opts["mine_every"])
        hits = int(index.is_nodule[before:].sum())
        click.echo(f"mined {len(index) - before - hits} look-alikes and {hits} nodule hits in the training series "
                   f"with {opts['mine_with']}" + (" (found in the cache from an earlier run)" if reused else ""))
    _fit(nodule_task(index, NoduleSettings(sampling, opts["balance"], opts["crop_zoom"])), cfg)


@app_command("luna-finetune-mal")
@training_options(epochs=10, lr=0.001, optimizer="sgd", epoch_samples=3000)
@click.option("--from", "from_checkpoint", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A nodule classifier checkpoint (ours or the book's .state) to start from.  [required]")
@click.option("--depth", type=click.IntRange(1), default=1, show_default=True,
              help="How many blocks, counted from the head, to train (1: the head only).")
def finetune_mal(**opts):
    """Fine-tune a nodule classifier into a benign/malignant classifier.

    The best checkpoint is the one with the highest validation ROC AUC; the diameter-only
    baseline AUC is printed and logged beside it. Then each checkpoint's probabilities are calibrated on
    the validation nodules, with a term for ground glass (a crop centre under -200 HU), which a network
    fine-tuned on a few hundred nodules does not learn.
    """
    from p2ch_app.training.classification import MalignancySettings, calibrate_run, malignancy_task

    if opts["from_checkpoint"] is None:
        raise UserError("--from CHECKPOINT is required: a nodule classifier from luna-train-cls or the book")
    cfg, index, sampling = _training_data(opts, "luna-finetune-mal")
    settings = MalignancySettings(sampling, opts["from_checkpoint"], opts["depth"])
    task = malignancy_task(index, settings)
    run_dir = _fit(task, cfg)
    if run_dir is not None:
        found = calibrate_run(run_dir, task)
        click.echo("luna-finetune-mal: too few validation nodules to calibrate; the network's own probabilities stand"
                   if found is None else
                   f"luna-finetune-mal: calibrated on the validation nodules: log-odds {found.bias:+.2f} "
                   f"+ {found.scale:.2f} x the network's, {found.ground_glass:+.2f} for ground glass")


@app_command("luna-train-seg")
@training_options(epochs=10, lr=0.001, optimizer="adam", epoch_samples=20000)
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
    from p2ch_app.training.segmentation import SegmentationSettings, segmentation_task

    cfg, index, sampling = _training_data(opts, "luna-train-seg")
    architecture = SegmenterConfig(context=opts["context"], depth=opts["unet_depth"], width_factor=opts["width_factor"],
                                   up_mode=opts["up_mode"], pooling=opts["pooling"])
    settings = settings_from(SegmentationSettings, opts, sampling=sampling, architecture=architecture)
    _fit(segmentation_task(index, settings), cfg)


@app_command("luna-average")
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The averaged checkpoint to write.  [required]")
def average(**opts):
    """Average the weights of two or more CHECKPOINTS of one network fine-tuned from the same weights
    (--init, or luna-finetune-mal's --from), for example luna-train-seg runs with different --seed
    ("model soup").

    The result runs as fast as one model and is steadier: which small nodules a short run learns to
    mark depends on its seed, the mean of a few runs much less. nodule-analyze, luna-train-cls
    --mine-with and luna-export take it as they take any checkpoint.
    """
    from p2ch_app.checkpoints import average_checkpoints, save_checkpoint

    if opts["output"] is None:
        raise UserError("--output FILE is required: where to write the averaged checkpoint")
    check_writable(opts["output"], "--output")
    save_checkpoint(opts["output"], average_checkpoints(list(opts["checkpoints"])))
    click.echo(f"luna-average: the mean of {len(opts['checkpoints'])} runs' weights in {opts['output']}")
