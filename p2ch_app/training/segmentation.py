"""The U-Net as a task for the training loop (luna-train-seg): nodule pixels from slice stacks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import nearest_voxels
from p2ch_app.data.datasets import Patches, SliceDataset, interleave, pad_collate
from p2ch_app.data.index import LunaIndex
from p2ch_app.errors import UserError
from p2ch_app.inference.runtime import in_pieces
from p2ch_app.metrics import scores_from_counts
from p2ch_app.models import NoduleSegmenter, SegmenterConfig
from p2ch_app.training.augment import augment
from p2ch_app.training.loop import Draws, Sampling, Task


@dataclass(frozen=True)
class SegmentationSettings:
    sampling: Sampling
    architecture: SegmenterConfig = SegmenterConfig()
    crop: int = 64  # training patch size, taken at random inside a window square around a nodule
    window: int = 96
    fn_weight: float = 8.0  # extra loss weight on missed nodule pixels
    bce_weight: float = 0.0  # weight of pixelwise cross-entropy added to the Dice loss
    label_margin: int = 1  # nodule labels grown by this many voxels in 3D
    lookalike_share: float = 0.0  # share of patches centred on a non-nodule candidate
    per_nodule: bool = False  # draw so that every nodule (not every slice) comes up equally often


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample: 0 when pred matches target (or both are empty), towards 1 when disjoint."""
    dims = tuple(range(1, pred.dim()))
    overlap = (pred * target).sum(dims)
    return 1 - (2 * overlap + eps) / (pred.sum(dims) + target.sum(dims) + eps)


class SegmentationTask(Task):
    """Per-pixel nodule masks from (2C+1)-slice stacks. Loss: Dice plus fn_weight times the Dice of
    the prediction restricted to the nodule, which only a missed nodule pixel raises; plus, with
    bce_weight, pixelwise binary cross-entropy. Dice alone gives background pixels almost no
    gradient when nodules are a fraction of a percent of a patch (coarse voxels): the model marks
    everything for thousands of steps. The cross-entropy term gives every pixel its own gradient."""

    name = "luna-train-seg"
    best_metric = "f2"
    # Training keeps PyTorch's default layout (channels-last also trains ~20% faster, but its other
    # rounding gave a different, by chance worse, demo U-Net); validation runs channels-last.
    summary_metrics = ("loss", "precision", "recall", "f1", "f2")
    collate = staticmethod(pad_collate)
    image_every, images = 2, 4  # TensorBoard: this many validation slices every this many epochs

    def __init__(self, settings: SegmentationSettings, uids: list[str], train_samples: np.ndarray,
                 centred: np.ndarray, draws: Draws):
        self.settings, self.uids, self.draws = settings, uids, draws
        self.train_samples, self.centred = train_samples, centred
        self.context = settings.architecture.context

    def model(self) -> nn.Module:
        return NoduleSegmenter(self.settings.architecture)

    def train_dataset(self, epoch: int):
        sampling = self.settings.sampling
        rng = np.random.default_rng([sampling.seed, epoch])
        picks = interleave(self.draws.groups, self.draws.pattern, sampling.epoch_samples, rng, self.draws.weights)
        patches = Patches(self.settings.crop, self.settings.window, sampling.seed, epoch)
        return SliceDataset(sampling.cache(), self.uids, self.train_samples[picks], self.context, patches,
                            self.settings.label_margin, self.centred[picks])

    def val_dataset(self):
        return SliceDataset(self.settings.sampling.cache(), self.uids, self.draws.val_rows, self.context,
                            margin=self.settings.label_margin)

    def _loss(self, pred: torch.Tensor, target: torch.Tensor, device: torch.device):
        truth = target.float()
        losses = dice_loss(pred, truth) + self.settings.fn_weight * dice_loss(pred * truth, truth)
        if self.settings.bce_weight:
            with torch.autocast(device.type, enabled=False):  # BCE on probabilities is unsafe in float16
                bce = F.binary_cross_entropy(pred, truth, reduction="none").mean(dim=(1, 2, 3))
            losses = losses + self.settings.bce_weight * bce
        with torch.no_grad():
            hard = pred > 0.5
            counts = {k: torch.sum(v).item() for k, v in
                      (("tp", hard & target), ("fp", hard & ~target), ("fn", ~hard & target))}
        record = {"loss": losses.detach().cpu().numpy(), **{k: np.array([v]) for k, v in counts.items()}}
        return losses.mean(), record

    def train_step(self, model, batch, device, generator):
        stacks, masks = batch
        x, target = stacks.to(device, non_blocking=True).float(), masks.to(device, non_blocking=True)
        if self.settings.sampling.augmentations:
            x, target = augment(x, self.settings.sampling.augmentations, generator, masks=target)
        return self._loss(model(x).float(), target, device)

    def val_step(self, model, batch, device):
        """Whole slices, channels-last (1.5x faster on CPU) and in pieces, as nodule-analyze runs them."""
        stacks, masks = batch
        x = stacks.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        return self._loss(in_pieces(model, x).float(), masks.to(device, non_blocking=True), device)[1]

    def summarize(self, record: dict) -> dict[str, float]:
        if not record:
            return {}
        scores = scores_from_counts(record["tp"].sum(), record["fp"].sum(), record["fn"].sum())
        return {"loss": float(record["loss"].mean()), **scores}

    def log_extra(self, writer, phase, record, step, epoch, model):
        """Every image_every epochs: fixed validation slices, CT in grey, prediction red, label green."""
        if phase != "val" or (epoch - 1) % self.image_every:
            return
        dataset = self.val_dataset()
        items = [dataset[i] for i in range(min(self.images, len(dataset)))]
        if not items:
            return
        stacks, masks = pad_collate(items)
        device = next(model.parameters()).device
        with torch.inference_mode():
            pred = model(stacks.to(device).float()).cpu()[:, 0] > 0.5
        grey = ((stacks[:, self.context].float().clamp(-1000, 400) + 1000) / 1400)
        rgb = grey[:, None].repeat(1, 3, 1, 1)
        rgb[:, 0][pred] = 1.0
        rgb[:, 1][masks[:, 0]] = 1.0
        writer.add_images("val/slices_red_predicted_green_label", rgb, step)


def nodule_slices(cache: LunaCache, index: LunaIndex, series_codes, margin: int = 0) -> np.ndarray:
    """(uid code, slice) for every slice holding nodule label voxels (grown by margin) in the given series."""
    rows = [(code, k) for code in series_codes for k in cache.record(index.series_uids[code]).label_slices(margin)]
    return np.array(rows, np.int64).reshape(-1, 2)


def lookalike_pixels(cache: LunaCache, index: LunaIndex, series_codes) -> np.ndarray:
    """(uid code, slice, row, col) of every non-nodule candidate of the given series inside its CT."""
    rows = []
    for code in series_codes:
        record = cache.record(index.series_uids[code])
        irc = nearest_voxels(index.center_xyz[(index.series_code == code) & ~index.is_nodule], record.geometry,
                             record.shape)
        rows.append(np.column_stack([np.full(len(irc), code), irc]))
    return np.concatenate(rows).reshape(-1, 4) if rows else np.zeros((0, 4), np.int64)


def per_nodule_weights(cache: LunaCache, index: LunaIndex, samples: np.ndarray, margin: int = 0) -> np.ndarray:
    """A weight per (uid code, slice) sample: the sum, over the nodules the slice shows (grown by
    margin), of 1 / that nodule's slice count. Drawn by these weights, every nodule is trained on
    equally often: drawn by slice, a 10 mm nodule at 1.5 mm slices shows up three times as often as
    a 3 mm one, and small nodules are the ones the U-Net misses. A nodule is the label component
    holding its centre; label fragments off every centre weigh nothing."""
    weights = np.zeros(len(samples))
    for code in np.unique(samples[:, 0]):
        record = cache.record(index.series_uids[code])
        labels, _ = ndimage.label(record.mask())
        centers = nearest_voxels(index.center_xyz[(index.series_code == code) & index.is_nodule], record.geometry,
                                 record.shape)
        nodules = np.unique(labels[tuple(centers.T)])
        rows = np.flatnonzero(samples[:, 0] == code)
        boxes = ndimage.find_objects(labels)
        for component in nodules[nodules > 0]:
            box = boxes[component - 1]
            first, last = box[0].start - margin, box[0].stop - 1 + margin
            shows = (samples[rows, 1] >= first) & (samples[rows, 1] <= last)
            weights[rows[shows]] += 1 / (last - first + 1)
    return weights


def _with_empty_slices(cache: LunaCache, index: LunaIndex, val: np.ndarray, codes: np.ndarray,
                       margin: int) -> np.ndarray:
    """The nodule slices `val` of these series plus as many of their nodule-free slices, evenly spaced."""
    empty = []
    for code in codes:
        record = cache.record(index.series_uids[code])
        free = np.setdiff1d(np.arange(record.shape[0]), record.label_slices(margin))
        want = int(np.sum(val[:, 0] == code))
        empty += [(code, k) for k in free[np.linspace(0, len(free) - 1, min(want, len(free))).astype(int)]]
    return np.concatenate([val, np.array(empty, np.int64).reshape(-1, 2)])


def segmentation_task(index: LunaIndex, settings: SegmentationSettings) -> SegmentationTask:
    """Training: the nodule slices of the training series, patches around a nodule, and with
    lookalike_share that share of patches centred on a non-nodule candidate instead (vessels and
    other look-alikes the U-Net should leave unmarked). Validation: the whole nodule slices of the
    validation series plus as many nodule-free slices, evenly spaced."""
    cache, margin = settings.sampling.cache(), settings.label_margin
    codes = np.arange(len(index.series_uids))
    is_val = index.validation_series(settings.sampling.val_stride)
    train = nodule_slices(cache, index, codes[~is_val], margin)
    val = nodule_slices(cache, index, codes[is_val], margin)
    if len(train) == 0 or len(val) == 0:
        raise UserError("segmentation needs nodules in both the training and the validation series; "
                        "add series or change --val-stride")
    val = _with_empty_slices(cache, index, val, codes[is_val], margin)
    weights = [per_nodule_weights(cache, index, train, margin) if settings.per_nodule else None]
    train = np.pad(train, ((0, 0), (0, 2)))
    groups, pattern, centred = [np.arange(len(train))], [0], np.zeros(len(train), bool)
    if settings.lookalike_share > 0:
        lookalikes = lookalike_pixels(cache, index, codes[~is_val])
        if len(lookalikes) == 0:
            raise UserError("the training series hold no non-nodule candidates to learn look-alikes from; "
                            "use --lookalike-share 0")
        groups.append(len(train) + np.arange(len(lookalikes)))
        shown = round(20 * settings.lookalike_share)
        pattern, weights = [0] * (20 - shown) + [1] * shown, weights + [None]
        train = np.concatenate([train, lookalikes])
        centred = np.concatenate([centred, np.ones(len(lookalikes), bool)])
    return SegmentationTask(settings, index.series_uids, train, centred, Draws(groups, pattern, val, weights))
