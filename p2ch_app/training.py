"""The one training loop of every trainer: device, precision, distribution, checkpoints, logging.

A trainer is a `Task` (its model, data, loss and metrics); `fit` does the rest. Launched under
torchrun (WORLD_SIZE > 1) it runs DistributedDataParallel, each rank on its own share of every
epoch; only rank 0 prints, logs and saves.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from p2ch_app.checkpoints import load_checkpoint, model_entries, save_checkpoint
from p2ch_app.errors import UserError
from p2ch_app.files import plain


@dataclass
class TrainConfig:
    command: str
    epochs: int = 10
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
    options: dict = field(default_factory=dict)  # the command's resolved options, saved for --resume


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

    def step(self, model: nn.Module, batch, device: torch.device, generator: torch.Generator | None):
        """Forward one batch: (mean loss, record). generator is None during validation (no augmentation)."""
        raise NotImplementedError

    def summarize(self, record: dict) -> dict[str, float]:
        raise NotImplementedError

    def log_extra(self, writer, phase: str, record: dict, step: int, epoch: int, model: nn.Module) -> None:
        """Optional TensorBoard extras (curves, histograms, images)."""


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when present (this rank's GPU under torchrun), else CPU; `name` forces one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


@dataclass
class _Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_distributed(device_name: str) -> _Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Distributed()
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_name != "cpu"
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return _Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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


def new_run_dir(runs_dir: Path, command: str, comment: str = "") -> Path:
    """runs/<command>/<timestamp>[-comment], never an existing folder."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H.%M.%S")
    base = Path(runs_dir) / command / (f"{stamp}-{comment}" if comment else stamp)
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


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


def fit(task: Task, cfg: TrainConfig, resume: Path | None = None, model: nn.Module | None = None,
        progress: bool = True) -> tuple[nn.Module, Path | None]:
    """Train task for cfg.epochs (continuing a checkpoint when resume is given).

    Returns the trained (unwrapped) model and, on rank 0, the run directory.
    """
    ddp = _start_distributed(cfg.device)
    device = select_device(cfg.device, ddp.local_rank)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model = (model or task.model()).to(device, memory_format=task.memory_format)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adam")

    start_epoch, samples_seen, best = 1, 0, float("-inf")
    run_dir, scaler_state = None, None
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        if "optimizer_name" not in checkpoint or "rng" not in checkpoint:
            raise UserError(f"{resume} is not a p2ch_app training checkpoint; --resume continues our own runs")
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        _set_rng_state(checkpoint["rng"])
        start_epoch, samples_seen = checkpoint["epoch"] + 1, checkpoint["samples_seen"]
        best = checkpoint.get("best_value", best)
        run_dir = Path(resume).parent
        scaler_state = checkpoint.get("scaler_state")
    if ddp.is_main and run_dir is None:
        run_dir = new_run_dir(cfg.runs_dir, cfg.command, cfg.comment)
    wrapped = model
    if ddp.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    writer = None
    if ddp.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir))

    def loader(dataset: Dataset, shard: bool, drop_uneven: bool) -> DataLoader:
        if ddp.world > 1 and shard:
            n = len(dataset) // ddp.world * ddp.world if drop_uneven else len(dataset)
            dataset = torch.utils.data.Subset(dataset, range(ddp.rank, n, ddp.world))
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                          pin_memory=device.type == "cuda", collate_fn=task.collate)

    val_data = task.val_dataset()
    epochs = tqdm(range(start_epoch, cfg.epochs + 1), desc=task.name, unit="epoch", disable=not (progress and ddp.is_main),
                  initial=start_epoch - 1, total=cfg.epochs)
    for epoch in epochs:
        started = time.monotonic()
        generator = torch.Generator(device=device).manual_seed(_batch_seed(cfg.seed, epoch, ddp.rank))
        _set_train_mode(wrapped)
        train_records, epoch_samples = [], 0
        train_loader = loader(task.train_dataset(epoch), shard=True, drop_uneven=True)
        bar = _sample_bar(train_loader, f"epoch {epoch} train", progress and ddp.is_main)
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss, record = task.step(wrapped, batch, device, generator)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            train_records.append(record)
            epoch_samples += len(batch[0]) * ddp.world
            bar.update(len(batch[0]))
        bar.close()
        samples_seen += epoch_samples
        if ddp.world > 1:  # DDP syncs buffers (batch-norm statistics) only at the next forward
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        train_seconds = time.monotonic() - started
        model.eval()
        val_records = []
        val_loader = loader(val_data, shard=True, drop_uneven=False)
        bar = _sample_bar(val_loader, f"epoch {epoch} val", progress and ddp.is_main)
        with torch.inference_mode():
            for batch in val_loader:
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    val_records.append(task.step(model, batch, device, None)[1])
                bar.update(len(batch[0]))
        bar.close()
        train_record, val_record = _merge(train_records), _merge(val_records)
        if ddp.world > 1:
            gathered = [None] * ddp.world
            dist.all_gather_object(gathered, (train_record, val_record))
            train_record = _merge([g[0] for g in gathered])
            val_record = _merge([g[1] for g in gathered])
        if not ddp.is_main:
            continue
        metrics = {"train": task.summarize(train_record), "val": task.summarize(val_record)}
        for phase, values in metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"{phase}/{name}", value, samples_seen)
            task.log_extra(writer, phase, train_record if phase == "train" else val_record, samples_seen, epoch, model)
        writer.flush()
        value = metrics["val"].get(task.best_metric, float("nan"))
        improved = bool(value > best)  # NaN never improves...
        best = value if improved else best
        improved = improved or not (run_dir / "best.pt").exists()  # ...but every run has a best.pt
        rate = epoch_samples / max(train_seconds, 1e-9)
        state = {**model_entries(model),
                 "optimizer_state": optimizer.state_dict(), "optimizer_name": type(optimizer).__name__,
                 "scaler_state": scaler.state_dict(),
                 "epoch": epoch, "samples_seen": samples_seen, "rng": _rng_state(),
                 "config": plain({**asdict(cfg), "options": cfg.options}), "metrics": metrics,
                 "best_metric": task.best_metric, "best_value": best,
                 "timing": {"train_seconds": train_seconds, "train_samples_per_s": rate}}
        save_checkpoint(run_dir / "last.pt", state)
        if improved:
            save_checkpoint(run_dir / "best.pt", state)
        line = " | ".join(
            f"{phase} " + " ".join(f"{k} {values[k]:.4f}" for k in task.summary_metrics if k in values)
            for phase, values in metrics.items())
        tqdm.write(f"{task.name} epoch {epoch}/{cfg.epochs}: {line} | {rate:.0f} samples/s"
                   + (f" | best {task.best_metric} so far" if improved else ""))
    if writer is not None:
        writer.close()
    return model, run_dir
