"""Where a trainer's time goes (issue #36): each stage of a training step alone, and the whole step.

For one trainer (cls: luna-train-cls, seg: luna-train-seg, mal: luna-finetune-mal) on one data root:
  whole      samples/s of the training loop's own epoch (loader workers, augmentation, step)
  loader     samples/s the DataLoader delivers with 0, 1 and 2 workers, nothing consuming them
  augment    samples/s of the augmentation alone, on ready batches on the device
  compute    samples/s of forward + backward + optimizer step alone, on ready (unaugmented) batches
  floor      samples/s if every convolution of the step ran at the best rate that any of this
             model's convolutions reaches here (its forward, input-gradient and weight-gradient FLOPs)
and which stage limits the trainer. Used by scripts/bench.py (`make bench train`) and, on CUDA, by
scripts/gpu_check.py.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from p2ch_app.checkpoints import model_entries, save_checkpoint
from p2ch_app.data.index import LunaIndex, build_index
from p2ch_app.models import ClassifierConfig, NoduleClassifier
from p2ch_app.training import AUGMENTATIONS
from p2ch_app.training.augment import augment
from p2ch_app.training.classification import MalignancySettings, NoduleSettings, malignancy_task, nodule_task
from p2ch_app.training.loop import Sampling, TrainConfig, batch_loader, optimizer_step, start, train_one_epoch
from p2ch_app.training.segmentation import SegmentationSettings, segmentation_task

COMMANDS = {"cls": "luna-train-cls", "seg": "luna-train-seg", "mal": "luna-finetune-mal"}


@dataclass(frozen=True)
class StageRun:
    """What every stage of one trainer is measured with."""

    kind: str  # cls, seg or mal
    root: Path  # a luna-synth data root, cached by luna-prep
    batch_size: int
    workers: int = 2  # of the whole step; the loader alone is measured with 0, 1 and 2
    samples: int = 480  # per measured epoch
    loader_samples: int = 3000  # for the loader alone: enough that starting its workers does not dominate
    val_stride: int = 4  # as the demo's: 4 leaves benign and malignant nodules on both sides
    augmentations: tuple[str, ...] = AUGMENTATIONS
    device: str = "cpu"
    runs_dir: Path = Path(tempfile.gettempdir()) / "p2ch-train-stages"


def make_task(setup: StageRun, index: LunaIndex, augmentations: tuple[str, ...]):
    """The trainer's own task over the index of setup.root, as its command builds it with default options."""
    root = setup.root
    sampling = Sampling(root / "cache", root, val_stride=setup.val_stride, epoch_samples=setup.samples,
                        augmentations=augmentations)
    if setup.kind == "cls":
        return nodule_task(index, NoduleSettings(sampling))
    if setup.kind == "seg":
        return segmentation_task(index, SegmentationSettings(sampling))
    source = setup.runs_dir / "stage-classifier.pt"  # speed does not depend on the weights fine-tuned
    if not source.is_file():
        setup.runs_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(source, model_entries(NoduleClassifier(ClassifierConfig())))
    return malignancy_task(index, MalignancySettings(sampling, source))


def _config(setup: StageRun) -> TrainConfig:
    return TrainConfig(COMMANDS[setup.kind], epochs=1, batch_size=setup.batch_size, workers=setup.workers,
                       device=setup.device, runs_dir=setup.runs_dir, comment="stages")


def _loader(task, setup: StageRun, workers: int) -> DataLoader:
    """The first epoch's batches, through the DataLoader the training loop uses, with this many workers."""
    cfg = replace(_config(setup), workers=workers)
    return batch_loader(task.train_dataset(1), task, cfg, torch.device(setup.device))


def loader_rate(setup: StageRun, index: LunaIndex, workers: int) -> float:
    """Samples/s the DataLoader delivers over loader_samples samples, workers started included,
    nothing consuming the batches."""
    task = make_task(replace(setup, samples=setup.loader_samples), index, setup.augmentations)
    started = time.perf_counter()
    n = sum(len(batch[0]) for batch in _loader(task, setup, workers))
    return n / (time.perf_counter() - started)


def _median_seconds(fn, repeats: int) -> float:
    """Median seconds of fn over repeats runs, after one warm-up run (oneDNN builds its kernels then)."""
    fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augment_rate(batches: list, setup: StageRun, device: torch.device) -> float:
    """Samples/s of the trainer's augmentation alone, on batches already on the device."""
    generator = torch.Generator(device=device).manual_seed(0)
    masked = setup.kind == "seg"

    def run():
        for batch in batches:
            augment(batch[0].float(), setup.augmentations, generator, masks=batch[1] if masked else None)
        _sync(device)
    return sum(len(b[0]) for b in batches) / _median_seconds(run, 3)


def compute_rate(run, batches: list) -> float:
    """Samples/s of forward + backward + optimizer step alone (no augmentation), on ready batches."""
    generator = torch.Generator(device=run.device).manual_seed(0)
    run.model.train()

    def steps():
        for batch in batches:
            optimizer_step(run, batch, generator)
        _sync(run.device)
    return sum(len(b[0]) for b in batches) / _median_seconds(steps, 3)


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor, int]]:
    """(convolution, its input, FLOPs of its forward multiply-adds) in the order one forward pass runs them."""
    seen = []

    def record(layer, inputs, output):
        kernel = math.prod(layer.kernel_size) * layer.in_channels * layer.out_channels // layer.groups
        positions = inputs[0].numel() // layer.in_channels if layer.transposed else output.numel() // layer.out_channels
        seen.append((layer, inputs[0].detach(), 2 * kernel * positions))

    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    hooks = [m.register_forward_hook(record) for m in convs]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def _training_flops(layers: list, model: torch.nn.Module) -> list[int]:
    """Each convolution's FLOPs in one training step: its forward, its weight gradient when its weight
    trains, its input gradient when a parameter registered before it trains (our networks register
    their layers in the order they run them, so a frozen stem passes no gradient back)."""
    params = list(model.parameters())
    position = {id(p): i for i, p in enumerate(params)}
    flops = []
    for layer, _, forward in layers:
        before = params[:position[id(layer.weight)]]
        flops.append(forward * (1 + layer.weight.requires_grad + any(p.requires_grad for p in before)))
    return flops


def _layer_step_rate(layer: torch.nn.Module, x: torch.Tensor, forward_flops: int) -> float:
    """GFLOP/s of one convolution's forward and both gradients on its real training input."""
    layer = copy.deepcopy(layer).train().requires_grad_(True)  # a frozen layer's rate too
    x = x.clone().requires_grad_(True)

    def run():
        out = layer(x)
        grads = torch.autograd.grad(out, (x, layer.weight), torch.ones_like(out))
        _sync(grads[0].device)
    return 3 * forward_flops / _median_seconds(run, 3) / 1e9


def flop_floor(model: torch.nn.Module, batch: torch.Tensor) -> dict:
    """The step's convolution FLOPs per sample and the samples/s they allow at the best rate any of the
    model's convolutions reaches here (forward and both gradients on its real input)."""
    layers = conv_flops(model, batch)
    step = sum(_training_flops(layers, model)) / len(batch)
    best = max(_layer_step_rate(layer, x, f) for layer, x, f in layers)
    return {"gflop_per_sample": step / 1e9, "best_conv_gflops": best, "floor_samples_per_s": best * 1e9 / step}


def _ready_batches(task, setup: StageRun, device: torch.device, most: int = 20) -> list:
    """The epoch's first `most` unaugmented batches, loaded beforehand; images (and seg's masks) on the device."""
    moved = 2 if setup.kind == "seg" else 1  # cls and mal keep labels and rows on the CPU for their records
    batches = itertools.islice(_loader(task, setup, 0), most)
    return [tuple(t.to(device) if i < moved else t for i, t in enumerate(batch)) for batch in batches]


def _trained_epoch(task, setup: StageRun) -> dict:
    """The training loop's own epoch: its samples/s and the share of it spent waiting for batches."""
    run = start(task, _config(setup), progress=False)
    try:
        _, timing = train_one_epoch(run, 1)
    finally:
        run.writer.close()
    figures = timing.figures()
    return {"whole": figures["train_samples_per_s"], "loader_wait_share": figures["loader_wait_share"]}


def measure(setup: StageRun) -> dict:
    """Every stage of one trainer, and which one limits it: the slowest of the loader (with the step's
    workers), the augmentation and the step's compute."""
    index = build_index(setup.root)
    task, plain = make_task(setup, index, setup.augmentations), make_task(setup, index, ())
    out = {f"loader_w{w}": loader_rate(setup, index, w) for w in (0, 1, 2)}
    run = start(plain, replace(_config(setup), workers=0), progress=False)
    run.writer.close()
    batches = _ready_batches(plain, setup, run.device)
    out["augment"] = augment_rate(batches, setup, run.device) if setup.augmentations else math.inf
    out["compute"] = compute_rate(run, batches)  # first: the epoch below then finds oneDNN's kernels built,
    out.update(_trained_epoch(task, setup))  # as every epoch after a run's first does
    example = batches[0][0].float().contiguous(memory_format=task.memory_format)
    out.update(flop_floor(run.model, example))
    stages = {"loader": out[f"loader_w{setup.workers}"], "augment": out["augment"], "compute": out["compute"]}
    out["limit"] = min(stages, key=stages.get)
    out["whole_vs_compute"] = out["compute"] / out["whole"]
    out["compute_vs_floor"] = out["floor_samples_per_s"] / out["compute"]
    return out


def table(results: dict[str, dict]) -> str:
    """The figures of measure() for several trainers as a Markdown table (samples/s)."""
    head = ("| trainer | whole | loader 0 / 1 / 2 workers | augment | compute | FLOP floor | limit "
            "| whole vs compute | loader wait |")
    rows = [head, "|" + " --- |" * 9]
    for name, r in results.items():
        rows.append(f"| {name} | {r['whole']:.1f} | {r['loader_w0']:.0f} / {r['loader_w1']:.0f} / {r['loader_w2']:.0f} "
                    f"| {r['augment']:.0f} | {r['compute']:.1f} | {r['floor_samples_per_s']:.0f} "
                    f"({r['gflop_per_sample']:.2f} GFLOP at {r['best_conv_gflops']:.0f} GFLOP/s) | {r['limit']} "
                    f"| {r['whole_vs_compute']:.2f}x | {100 * r['loader_wait_share']:.0f}% |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Per-stage training speed of one trainer on one cached data root.")
    parser.add_argument("kind", choices=sorted(COMMANDS))
    parser.add_argument("root", type=Path)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    result = measure(StageRun(args.kind, args.root, args.batch_size, args.workers, args.samples, device=args.device))
    print(json.dumps(result, indent=1))
    print(table({args.kind: result}))
