"""The one training loop of every trainer: device, precision, distribution, checkpoints, logging.

A trainer is a `Task` (its model, data, loss and metrics); `fit` does the rest, as a sequence of
short steps: start, then per epoch train_one_epoch, evaluate (from cfg.validate_from on), gather, and
end_epoch (log, save, report). Launched under torchrun it runs DistributedDataParallel (ranks start in
inference/distributed.py), each rank on its own share of every epoch; only rank 0 prints, logs and saves.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from p2ch_app.checkpoints import load_checkpoint, load_weights, model_entries, save_checkpoint
from p2ch_app.data.cache import LunaCache
from p2ch_app.errors import UserError
from p2ch_app.files import new_run_dir, plain
from p2ch_app.inference.distributed import Ranks, gather_objects, start_ranks


@dataclass(frozen=True)
class TrainConfig:
    """How the loop trains, whatever the task."""

    command: str
    epochs: int = 10
    validate_from: int = 1  # earlier epochs only train: validation costs time and the best epoch comes late
    batch_size: int = 32
    workers: int = 2
    lr: float = 1e-3
    optimizer: str = "sgd"  # or "adam"
    momentum: float = 0.99
    weight_decay: float = 1e-4
    device: str = "auto"
    seed: int = 0
    comment: str = ""
    runs_dir: Path = Path("runs")
    resume: Path | None = None  # continue this run's last.pt
    init: Path | None = None  # start from these weights (ours or the book's) instead of random ones
    options: dict = field(default_factory=dict)  # the command's resolved options, saved for --resume

    def __post_init__(self):
        if self.init is not None and self.resume is not None:
            raise UserError("--init and --resume exclude each other: --resume continues a run with its own weights")
        if self.validate_from > self.epochs:
            raise UserError(f"--validate-from {self.validate_from} is past the last epoch ({self.epochs}): no epoch "
                            "would validate, so nothing would choose best.pt; lower it or raise --epochs")


@dataclass(frozen=True)
class Sampling:
    """What every trainer draws its samples from and with."""

    cache_dir: Path
    data_root: Path  # the cache is read as this root's: records another root built are refused
    val_stride: int = 10  # every Nth series (sorted by UID) validates
    epoch_samples: int = 20000  # training samples per epoch, drawn afresh every epoch
    augmentations: tuple[str, ...] = ()
    seed: int = 0

    def cache(self) -> LunaCache:
        """The cache as this data root sees it (its own records only)."""
        return LunaCache(self.cache_dir, self.data_root)


@dataclass(frozen=True)
class Draws:
    """Which rows a task trains and validates on: each epoch draws from `groups` in turns given by
    `pattern` (e.g. [0, 1]: a positive, then a negative), in proportion to `weights` where a group has them."""

    groups: list[np.ndarray]
    pattern: list[int]
    val_rows: np.ndarray
    weights: list[np.ndarray | None] | None = None


class Task:
    """What a trainer brings. Records are dicts of per-sample numpy arrays (or per-batch sums)."""

    name = "task"
    best_metric = "f1"  # validation metric that picks the best checkpoint (higher is better)
    summary_metrics = ("loss", "precision", "recall", "f1", "auc")
    memory_format = torch.contiguous_format  # channels_last(_3d) makes oneDNN/cuDNN convolutions ~2x faster
    collate = None  # a DataLoader collate_fn, when items do not stack as they are

    def model(self) -> nn.Module:
        raise NotImplementedError

    def train_dataset(self, epoch: int) -> Dataset:
        """This epoch's training samples, in order; the loop shards them over ranks."""
        raise NotImplementedError

    def val_dataset(self) -> Dataset:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch, device: torch.device, generator: torch.Generator):
        """Forward one augmented training batch: (mean loss, record)."""
        raise NotImplementedError

    def val_step(self, model: nn.Module, batch, device: torch.device) -> dict:
        """Forward one validation batch, as it is: its record."""
        raise NotImplementedError

    def summarize(self, record: dict) -> dict[str, float]:
        raise NotImplementedError

    def log_extra(self, writer, phase: str, record: dict, step: int, epoch: int, model: nn.Module) -> None:
        """Optional TensorBoard extras (curves, histograms, images)."""


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _merge(records: list[dict]) -> dict:
    if not records:
        return {}
    return {k: np.concatenate([np.atleast_1d(r[k]) for r in records]) for k in records[0]}


def _sample_bar(loader: DataLoader, desc: str, show: bool) -> tqdm:
    """A progress bar counted in samples, so its rate reads in samples/s."""
    return tqdm(total=len(loader.dataset), desc=desc, unit="sample", leave=False, disable=not show)


def _batch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _set_train_mode(model: nn.Module) -> None:
    """Train mode, except batch norms whose parameters are all frozen: their statistics stay put."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()



@dataclass
class _Run:
    """One training run's state, so each step of fit takes it whole."""

    task: Task
    cfg: TrainConfig
    ddp: Ranks
    device: torch.device
    model: nn.Module  # unwrapped: what is saved and validated
    wrapped: nn.Module  # what trains: the model, or the model in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run_dir: Path | None = None
    writer: object = None  # TensorBoard SummaryWriter, rank 0 only
    first_epoch: int = 1
    samples_seen: int = 0
    best: float = float("-inf")
    progress: bool = True

    @property
    def shows(self) -> bool:
        return self.progress and self.ddp.is_main


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, both with weight decay, over the parameters that train."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")


def _initial_model(task: Task, cfg: TrainConfig) -> nn.Module:
    model = task.model()
    if cfg.init is not None:
        load_weights(model, cfg.init, f"a {cfg.command} model of this architecture")
    return model


def load_resumable(resume: Path, command: str) -> dict:
    """The checkpoint `command --resume` continues, refused when it is not a training checkpoint of ours
    or is another trainer's, before its saved options fill in anything."""
    checkpoint = load_checkpoint(resume)
    if "optimizer_name" not in checkpoint or "rng" not in checkpoint:
        raise UserError(f"{resume} is not a p2ch_app training checkpoint; --resume continues our own runs")
    saved = checkpoint.get("config", {}).get("command")
    if saved != command:
        raise UserError(f"{resume} is a checkpoint of {saved}, not of {command}; resume it with {saved} --resume")
    return checkpoint


def _restore(run: _Run, resume: Path) -> None:
    """Continue a run of ours where its last.pt left off: weights, optimizer, scaler, RNGs, counters."""
    checkpoint = load_resumable(resume, run.cfg.command)
    load_weights(run.model, resume, f"a {run.cfg.command} checkpoint of this architecture", checkpoint)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer_state"])
    except (ValueError, KeyError) as err:
        raise UserError(f"{resume}: its optimizer state does not fit this run ({err}); "
                        "resume with the run's own options") from None
    _set_rng_state(checkpoint["rng"])
    if checkpoint.get("scaler_state"):
        run.scaler.load_state_dict(checkpoint["scaler_state"])
    run.first_epoch, run.samples_seen = checkpoint["epoch"] + 1, checkpoint["samples_seen"]
    run.best = checkpoint.get("best_value", run.best)
    run.run_dir = Path(resume).parent


def start(task: Task, cfg: TrainConfig, progress: bool = True) -> _Run:
    """Everything before the first epoch: ranks, device, seeds, model, optimizer, resume, run folder, logs."""
    ddp, device = start_ranks(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model = _initial_model(task, cfg).to(device, memory_format=task.memory_format)
    run = _Run(task, cfg, ddp, device, model, model, make_optimizer(model, cfg),
               torch.amp.GradScaler("cuda", enabled=device.type == "cuda"), progress=progress)
    if cfg.resume is not None:
        _restore(run, cfg.resume)
    if ddp.is_main and run.run_dir is None:
        run.run_dir = new_run_dir(cfg.runs_dir, cfg.command, cfg.comment)
    if ddp.distributed:  # under torchrun, even with one process: the same code path on one GPU as on eight
        run.wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if ddp.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir))
    return run


def _loader(run: _Run, dataset: Dataset, drop_uneven: bool) -> DataLoader:
    """This rank's share of dataset in batches; drop_uneven gives every rank as many samples."""
    if run.ddp.world > 1:
        n = len(dataset) // run.ddp.world * run.ddp.world if drop_uneven else len(dataset)
        dataset = torch.utils.data.Subset(dataset, range(run.ddp.rank, n, run.ddp.world))
    return batch_loader(dataset, run.task, run.cfg, run.device)


def batch_loader(dataset: Dataset, task: Task, cfg: TrainConfig, device: torch.device) -> DataLoader:
    """The DataLoader every trainer reads its batches through (in order: each epoch's draw is its own)."""
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda", collate_fn=task.collate)


def _autocast(run: _Run):
    """float16 autocast on CUDA (AMP, with the gradient scaler); nothing on CPU."""
    return torch.autocast(run.device.type, dtype=torch.float16, enabled=run.device.type == "cuda")


@dataclass(frozen=True)
class EpochTiming:
    """How one training pass went: samples over all ranks, seconds, and the seconds this rank spent
    waiting for its next batch (on a CPU the model does not run meanwhile; on CUDA the GPU may still
    be finishing the previous step, so the wait is an upper bound of the GPU's idle time)."""

    samples: int
    seconds: float
    loader_wait: float

    def figures(self) -> dict[str, float]:
        """What the checkpoint's `timing` keeps."""
        return {"train_seconds": self.seconds, "train_samples_per_s": self.samples / max(self.seconds, 1e-9),
                "loader_wait_share": self.loader_wait / max(self.seconds, 1e-9)}


class _WaitedFor:
    """A loader's batches, adding up the seconds spent waiting for each."""

    def __init__(self, loader: DataLoader):
        self.loader, self.seconds = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            started = time.monotonic()
            batch = next(batches, None)
            self.seconds += time.monotonic() - started
            if batch is None:
                return
            yield batch


def optimizer_step(run: _Run, batch, generator: torch.Generator) -> dict:
    """One step on one batch: forward (float16 autocast on CUDA), backward, optimizer; its record."""
    run.optimizer.zero_grad(set_to_none=True)
    with _autocast(run):
        loss, record = run.task.train_step(run.wrapped, batch, run.device, generator)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return record


def train_one_epoch(run: _Run, epoch: int) -> tuple[dict, EpochTiming]:
    """One pass over this epoch's training samples: the merged record and its timing."""
    started = time.monotonic()
    generator = torch.Generator(device=run.device).manual_seed(_batch_seed(run.cfg.seed, epoch, run.ddp.rank))
    _set_train_mode(run.wrapped)
    records, samples = [], 0
    loader = _loader(run, run.task.train_dataset(epoch), drop_uneven=True)
    batches = _WaitedFor(loader)
    with _sample_bar(loader, f"epoch {epoch} train", run.shows) as bar:
        for batch in batches:
            records.append(optimizer_step(run, batch, generator))
            samples += len(batch[0]) * run.ddp.world
            bar.update(len(batch[0]))
    if run.ddp.world > 1:  # DDP syncs buffers (batch-norm statistics) only at the next forward
        for buffer in run.model.buffers():
            dist.broadcast(buffer, 0)
    return _merge(records), EpochTiming(samples, time.monotonic() - started, batches.seconds)


def evaluate(run: _Run, dataset: Dataset, epoch: int) -> dict:
    """The model in eval mode over this rank's share of the validation samples: the merged record."""
    run.model.eval()
    records = []
    loader = _loader(run, dataset, drop_uneven=False)
    with _sample_bar(loader, f"epoch {epoch} val", run.shows) as bar, torch.inference_mode():
        for batch in loader:
            with _autocast(run):
                records.append(run.task.val_step(run.model, batch, run.device))
            bar.update(len(batch[0]))
    return _merge(records)


def _gather(ddp: Ranks, *records: dict) -> tuple[dict, ...]:
    """Every rank's records merged, on every rank."""
    if ddp.world == 1:
        return records
    gathered = gather_objects(records, ddp)
    return tuple(_merge([g[i] for g in gathered]) for i in range(len(records)))


def _log(run: _Run, epoch: int, metrics: dict, records: dict) -> None:
    for phase, values in metrics.items():
        for name, value in values.items():
            run.writer.add_scalar(f"{phase}/{name}", value, run.samples_seen)
        run.task.log_extra(run.writer, phase, records[phase], run.samples_seen, epoch, run.model)
    run.writer.flush()


def _save(run: _Run, epoch: int, metrics: dict, timing: dict) -> bool:
    """last.pt always, best.pt when validation improved (or none exists yet): whether best.pt was written."""
    value = metrics.get("val", {}).get(run.task.best_metric, float("nan"))
    improved = bool(value > run.best)  # NaN never improves...
    run.best = value if improved else run.best
    improved = improved or not (run.run_dir / "best.pt").exists()  # ...but every run has a best.pt
    state = {**model_entries(run.model),
             "optimizer_state": run.optimizer.state_dict(), "optimizer_name": type(run.optimizer).__name__,
             "scaler_state": run.scaler.state_dict(), "epoch": epoch, "samples_seen": run.samples_seen,
             "rng": _rng_state(), "config": plain(asdict(run.cfg)), "metrics": metrics,
             "best_metric": run.task.best_metric, "best_value": run.best, "timing": timing}
    save_checkpoint(run.run_dir / "last.pt", state)
    if improved:
        save_checkpoint(run.run_dir / "best.pt", state)
    return improved


def end_epoch(run: _Run, epoch: int, records: dict, timing: EpochTiming) -> None:
    """Rank 0 after each epoch: metrics to TensorBoard, checkpoints, one console line."""
    metrics = {phase: run.task.summarize(record) for phase, record in records.items()}
    _log(run, epoch, metrics, records)
    figures = timing.figures()
    run.writer.add_scalar("timing/loader_wait_share", figures["loader_wait_share"], run.samples_seen)
    rate = figures["train_samples_per_s"]
    improved = _save(run, epoch, metrics, figures)
    line = " | ".join(
        f"{phase} " + " ".join(f"{k} {values[k]:.4f}" for k in run.task.summary_metrics if k in values)
        for phase, values in metrics.items())
    tqdm.write(f"{run.task.name} epoch {epoch}/{run.cfg.epochs}: {line} | {rate:.0f} samples/s"
               + (f" | best {run.task.best_metric} so far" if improved else ""))


def fit(task: Task, cfg: TrainConfig, progress: bool = True) -> tuple[nn.Module, Path | None]:
    """Train task for cfg.epochs (continuing cfg.resume when given). Returns the trained (unwrapped)
    model and, on rank 0, the run directory."""
    run = start(task, cfg, progress)
    val_data = task.val_dataset()
    try:
        for epoch in tqdm(range(run.first_epoch, cfg.epochs + 1), desc=task.name, unit="epoch",
                          disable=not run.shows, initial=run.first_epoch - 1, total=cfg.epochs):
            train_record, timing = train_one_epoch(run, epoch)
            records = {"train": train_record}
            if epoch >= cfg.validate_from:
                records["val"] = evaluate(run, val_data, epoch)
            records = dict(zip(records, _gather(run.ddp, *records.values())))
            run.samples_seen += timing.samples
            if run.ddp.is_main:
                end_epoch(run, epoch, records, timing)
    finally:
        if run.writer is not None:
            run.writer.close()
    return run.model, run.run_dir
