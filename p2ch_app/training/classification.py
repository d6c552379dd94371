"""The candidate classifiers as tasks for the training loop: nodule vs non-nodule (luna-train-cls)
and, fine-tuned from it, malignant vs benign (luna-finetune-mal)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import DataLoader

from p2ch_app.checkpoints import CLASSIFIER, load_checkpoint, load_model, save_checkpoint
from p2ch_app.data.datasets import CropDataset, interleave
from p2ch_app.data.index import BENIGN, MALIGNANT, LunaIndex
from p2ch_app.errors import UserError
from p2ch_app.metrics import binary_metrics, roc_auc
from p2ch_app.models import Calibration, ClassifierConfig, NoduleClassifier, subsolid
from p2ch_app.training.augment import augment
from p2ch_app.training.loop import Draws, Sampling, Task


@dataclass(frozen=True)
class NoduleSettings:
    sampling: Sampling
    balance: int = 1  # negatives per positive in training batches; 0: the natural ratio
    crop_zoom: float = 1.0  # ClassifierConfig.crop_zoom of the network trained


@dataclass(frozen=True)
class MalignancySettings:
    sampling: Sampling
    from_checkpoint: Path  # the nodule classifier to fine-tune
    depth: int = 1  # blocks that train, counted from the head (1: the head only)


class CandidateTask(Task):
    """Classify candidate crops: nodule vs non-nodule, or malignant vs benign."""

    memory_format = torch.channels_last_3d
    label_names = ("non-nodule", "nodule")

    def __init__(self, name: str, index: LunaIndex, labels: np.ndarray, sampling: Sampling, draws: Draws,
                 config: ClassifierConfig, make_model: Callable[[], nn.Module]):
        """config is the architecture make_model builds: the crops follow its crop_size and crop_zoom."""
        self.name, self.index, self.labels, self.sampling, self.draws = name, index, labels, sampling, draws
        self.config, self.make_model = config, make_model
        self._uids = index.uids()

    def model(self) -> nn.Module:
        return self.make_model()

    def _dataset(self, rows):
        return CropDataset(self.sampling.cache(), self._uids, self.index.center_xyz, self.labels, rows,
                           self.config.crop_size, self.config.crop_zoom)

    def train_dataset(self, epoch: int):
        rng = np.random.default_rng([self.sampling.seed, epoch])
        return self._dataset(interleave(self.draws.groups, self.draws.pattern, self.sampling.epoch_samples, rng))

    def val_dataset(self):
        return self._dataset(self.draws.val_rows)

    def _forward(self, model, x, labels, rows, device):
        logits, probs = model(x.contiguous(memory_format=self.memory_format))
        losses = F.cross_entropy(logits.float(), labels.to(device), reduction="none")
        record = {"label": labels.numpy(), "prob": probs[:, 1].detach().float().cpu().numpy(),
                  "loss": losses.detach().cpu().numpy(), "row": rows.numpy()}
        return losses.mean(), record

    def train_step(self, model, batch, device, generator):
        crops, labels, rows = batch
        x = crops.to(device, non_blocking=True).float()
        if self.sampling.augmentations:
            x, _ = augment(x, self.sampling.augmentations, generator)
        return self._forward(model, x, labels, rows, device)

    def val_step(self, model, batch, device):
        crops, labels, rows = batch
        return self._forward(model, crops.to(device, non_blocking=True).float(), labels, rows, device)[1]

    def summarize(self, record: dict) -> dict[str, float]:
        if not record:
            return {}
        return binary_metrics(record["label"], record["prob"], loss=record["loss"].mean())

    def log_extra(self, writer, phase, record, step, epoch, model):
        if not record:
            return
        labels, probs = record["label"].astype(bool), record["prob"]
        writer.add_pr_curve(f"{phase}/pr_curve", labels, probs, step)
        for flag, name in ((True, self.label_names[1]), (False, self.label_names[0])):
            if np.any(labels == flag):
                writer.add_histogram(f"{phase}/prob_{name.replace('-', '_')}", probs[labels == flag], step)


def nodule_task(index: LunaIndex, settings: NoduleSettings) -> CandidateTask:
    """Nodule vs non-nodule; settings.balance negatives per positive. Mined rows and candidates.csv's
    take turns: mined look-alikes with the CSV's non-nodules, and mined hits (a U-Net's candidates on
    nodules) with the CSV's nodules, so however many were mined, each kind is half of its class."""
    is_val = index.is_validation(settings.sampling.val_stride)
    labels = index.is_nodule.astype(np.int64)
    if settings.balance == 0:
        draws = Draws([np.flatnonzero(~is_val)], [0], np.flatnonzero(is_val))
    else:
        draws = _balanced_draws(index, is_val, labels, settings.balance)
    config = ClassifierConfig(crop_zoom=settings.crop_zoom)
    return CandidateTask("luna-train-cls", index, labels, settings.sampling, draws, config,
                         partial(NoduleClassifier, config))


def _balanced_draws(index: LunaIndex, is_val: np.ndarray, labels: np.ndarray, balance: int) -> Draws:
    """Training draws of one positive, then `balance` negatives, with mined and CSV rows taking turns."""
    positives = np.flatnonzero(~is_val & (labels == 1) & ~index.mined)
    negatives = np.flatnonzero(~is_val & (labels == 0) & ~index.mined)
    if len(positives) == 0 or len(negatives) == 0:
        raise UserError("the training series hold no nodules or no non-nodules, so --balance cannot pair them; "
                        "add series or use --balance 0")
    mined_positives = np.flatnonzero(~is_val & (labels == 1) & index.mined)
    mined_negatives = np.flatnonzero(~is_val & (labels == 0) & index.mined)
    kinds = [[rows for rows in (positives, mined_positives) if len(rows)],
             [rows for rows in (negatives, mined_negatives) if len(rows)]]
    pattern = []
    for turn in range(max(map(len, kinds))):  # 1 turn, or 2 when either class has mined rows
        pattern += [turn % len(kinds[0])] + [len(kinds[0]) + turn % len(kinds[1])] * balance
    return Draws(kinds[0] + kinds[1], pattern, np.flatnonzero(is_val))


class MalignancyTask(CandidateTask):
    """Benign vs malignant, fine-tuned; also reports the diameter-only baseline AUC."""

    summary_metrics = ("loss", "auc", "diameter_auc", "f1")
    best_metric = "auc"
    label_names = ("benign", "malignant")

    def summarize(self, record):
        metrics = super().summarize(record)
        if record:
            rows = record["row"]
            nodules = self.index.has_annotation[rows]
            metrics["diameter_auc"] = roc_auc(record["label"][nodules], self.index.diameter_mm[rows][nodules])
        return metrics


def malignancy_task(index: LunaIndex, settings: MalignancySettings) -> MalignancyTask:
    """Training draws malignant / benign / non-nodule in turn, so non-nodules are learnt as not
    malignant; validation is the validation series' benign and malignant nodules."""
    is_val = index.is_validation(settings.sampling.val_stride)
    malignant, benign = index.malignancy == MALIGNANT, index.malignancy == BENIGN
    groups = [np.flatnonzero(~is_val & malignant), np.flatnonzero(~is_val & benign),
              np.flatnonzero(~is_val & ~index.is_nodule)]
    if any(len(g) == 0 for g in groups):
        raise UserError("the training series need malignant, benign and non-nodule candidates; malignancy comes "
                        "from annotations_with_malignancy.csv in the data root")
    val_rows = np.flatnonzero(is_val & (malignant | benign))
    if len(val_rows) == 0:
        raise UserError("the validation series hold no nodules of known malignancy; add series or change --val-stride")
    source = load_model(settings.from_checkpoint, CLASSIFIER)
    state, config = source.state_dict(), replace(source.config, calibration=None)  # fitted anew at the end
    return MalignancyTask("luna-finetune-mal", index, malignant.astype(np.int64), settings.sampling,
                          Draws(groups, [0, 1, 2], val_rows), config,
                          lambda: fine_tunable(NoduleClassifier(config), state, settings.depth))


def fine_tunable(model: NoduleClassifier, state: dict, depth: int) -> NoduleClassifier:
    """model with `state`'s weights, whose last `depth` blocks train (1: the head only); the head
    starts afresh, everything before the trained blocks is frozen."""
    model.load_state_dict(state, strict=True)
    blocks = model.blocks()
    if not 1 <= depth <= len(blocks):
        raise UserError(f"--depth must be between 1 (head only) and {len(blocks)} (everything), got {depth}")
    fresh = NoduleClassifier(model.config)
    model.head_linear.load_state_dict(fresh.head_linear.state_dict())
    for i, block in enumerate(blocks):
        block.requires_grad_(i >= len(blocks) - depth)
    return model


MIN_CALIBRATION_NODULES = 20  # fewer validation nodules, or one class absent: the network's own softmax stands
PRIOR_SD = 2.0  # a Gaussian prior on scale - 1 and the ground-glass weight keeps the fit finite on separable data


def fit_calibration(malignant: np.ndarray, logits: np.ndarray, subsolid: np.ndarray) -> Calibration:
    """Penalised maximum likelihood of malignant ~ bias + scale * logit + ground_glass * subsolid."""
    y, logits, subsolid = (np.asarray(a, float) for a in (malignant, logits, subsolid))

    def loss(w):
        odds = w[0] + w[1] * logits + w[2] * subsolid
        penalty = ((w[1] - 1) ** 2 + w[2] ** 2) / (2 * PRIOR_SD ** 2)
        return np.sum(np.logaddexp(0, odds) - y * odds) + penalty

    bias, scale, ground_glass = minimize(loss, np.array([0.0, 1.0, 0.0]), method="BFGS").x
    return Calibration(float(bias), float(scale), float(ground_glass))


def _validation_nodules(task: MalignancyTask) -> tuple[np.ndarray, torch.Tensor]:
    """The task's validation nodules: their labels and crops, read from the cache once for every checkpoint."""
    labels, crops = [], []
    for batch, label, _ in DataLoader(task.val_dataset(), batch_size=32):
        labels.append(label.numpy())
        crops.append(batch.float())
    return np.concatenate(labels), torch.cat(crops)


def _logit_margins(model: NoduleClassifier, crops: torch.Tensor, memory_format) -> np.ndarray:
    """The network's class-1 logit minus its class-0 logit for each crop."""
    margins = []
    with torch.inference_mode():
        for batch in crops.split(32):
            logits, _ = model(batch.contiguous(memory_format=memory_format))
            margins.append((logits[:, 1] - logits[:, 0]).float().numpy())
    return np.concatenate(margins)


def calibrate_run(run_dir: Path, task: MalignancyTask) -> Calibration | None:
    """Fit each of the run's checkpoints' Calibration on the validation nodules, which the network did not
    train on, and write it into the checkpoint; best.pt's is returned. None (nothing written) where the
    validation set is too small to fit it."""
    malignant, crops = _validation_nodules(task)
    if len(malignant) < MIN_CALIBRATION_NODULES or malignant.min() == malignant.max():
        return None
    ground_glass = subsolid(crops).numpy()
    for name in ("last.pt", "best.pt"):
        path = run_dir / name
        checkpoint = load_checkpoint(path)
        model = load_model(path, CLASSIFIER, checkpoint)
        found = fit_calibration(malignant, _logit_margins(model, crops, task.memory_format), ground_glass)
        save_checkpoint(path, {**checkpoint, "model_config": asdict(replace(model.config, calibration=found))})
    return found
