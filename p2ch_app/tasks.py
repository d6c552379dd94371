"""The trainers, as Tasks for the shared loop: they differ only in data, model, loss and metrics."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from p2ch_app.analysis import MINED_CLEARANCE_MM, in_pieces, load_segmenter, mine_lookalikes
from p2ch_app.augment import augment
from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import nearest_voxels
from p2ch_app.data.datasets import CropDataset, SliceDataset, interleave, pad_collate
from p2ch_app.data.index import LunaIndex
from p2ch_app.errors import UserError
from p2ch_app.files import write_atomic
from p2ch_app.metrics import binary_metrics, roc_auc, scores_from_counts
from p2ch_app.models import NoduleClassifier, NoduleSegmenter, SegmenterConfig
from p2ch_app.checkpoints import load_weights
from p2ch_app.training import Task


def require_cached(cache_dir: Path, index: LunaIndex, data_root: Path) -> None:
    cache = LunaCache(cache_dir)
    cached = set(cache.cached_uids()) if (Path(cache_dir) / "meta").is_dir() else set()
    missing = [u for u in index.series_uids if u not in cached]
    if missing:
        raise UserError(f"{len(missing)} series (e.g. {missing[0]}) are not in the cache {cache_dir}; "
                        f"run luna-prep --data-root {data_root} first")


class CandidateTask(Task):
    """Classify candidate crops: nodule vs non-nodule, or malignant vs benign."""

    memory_format = torch.channels_last_3d

    def __init__(self, name: str, cache_dir: Path, index: LunaIndex, labels: np.ndarray,
                 train_groups: list[np.ndarray], pattern: list[int], val_rows: np.ndarray, epoch_samples: int,
                 augmentations: tuple[str, ...], seed: int, best_metric: str,
                 make_model: Callable[[], nn.Module], label_names: tuple[str, str] = ("non-nodule", "nodule")):
        self.name, self.best_metric, self.seed = name, best_metric, seed
        self.cache_dir, self.index, self.labels = cache_dir, index, labels
        self.train_groups, self.pattern, self.val_rows = train_groups, pattern, val_rows
        self.epoch_samples, self.augmentations = epoch_samples, tuple(augmentations)
        self.make_model, self.label_names = make_model, label_names
        self._uids = index.uids()

    def model(self) -> nn.Module:
        return self.make_model()

    def _dataset(self, rows):
        return CropDataset(self.cache_dir, self._uids, self.index.center_xyz, self.labels, rows)

    def train_dataset(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        return self._dataset(interleave(self.train_groups, self.pattern, self.epoch_samples, rng))

    def val_dataset(self):
        return self._dataset(self.val_rows)

    def step(self, model, batch, device, generator):
        crops, labels, rows = batch
        x = crops.to(device, non_blocking=True).float()
        if generator is not None and self.augmentations:
            x, _ = augment(x, self.augmentations, generator)
        logits, probs = model(x.contiguous(memory_format=self.memory_format))
        losses = F.cross_entropy(logits.float(), labels.to(device), reduction="none")
        record = {"label": labels.numpy(), "prob": probs[:, 1].detach().float().cpu().numpy(),
                  "loss": losses.detach().cpu().numpy(), "row": rows.numpy()}
        return losses.mean(), record

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


MINING_VERSION = 1  # part of the mined look-alikes' cache key: raise it when propose() or mining changes


def with_mined_lookalikes(cache_dir: Path, index: LunaIndex, val_stride: int, seg_checkpoint: Path,
                          device: torch.device) -> tuple[LunaIndex, bool]:
    """(the index plus, as non-nodules, the candidates this U-Net proposes in the training series away
    from every nodule (analysis.mine_lookalikes), whether they were found in the cache).

    Validation series are left as they are. Mining runs the U-Net over every training CT, so its
    result is kept in the cache under a key of everything it depends on (the checkpoint's bytes,
    the training series and their nodules): a resumed or repeated run does not mine again."""
    segmenter, context = load_segmenter(seg_checkpoint, device)  # first: a bad file fails with its own message
    cache = LunaCache(cache_dir)
    train_codes = np.flatnonzero(~index.validation_series(val_stride))
    key = hashlib.sha256(Path(seg_checkpoint).read_bytes())
    nodules = ~index.is_validation(val_stride) & index.is_nodule
    for code in train_codes:
        uid = index.series_uids[code]
        key.update(f"{uid} {cache.record(uid).fingerprint}".encode())
    for values in (index.series_code[nodules], index.center_xyz[nodules], index.diameter_mm[nodules],
                   np.array([MINED_CLEARANCE_MM, MINING_VERSION])):
        key.update(np.ascontiguousarray(values).tobytes())
    path = cache.dir / "mined" / f"{key.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            code_of = {uid: code for code, uid in enumerate(index.series_uids)}
            codes = np.array([code_of[uid] for uid in saved["uids"]], np.int32)
            return index.with_negatives(codes, saved["centers_xyz"]), True
    codes, centers = mine_lookalikes(cache, index, train_codes, segmenter, context, device, progress=True)
    path.parent.mkdir(exist_ok=True)
    uids = np.array([index.series_uids[code] for code in codes], dtype=str)
    write_atomic(path, lambda tmp: np.savez(tmp, uids=uids, centers_xyz=centers))
    return index.with_negatives(codes, centers), False


def nodule_task(cache_dir: Path, index: LunaIndex, is_val: np.ndarray, balance: int, epoch_samples: int,
                augmentations, seed: int) -> CandidateTask:
    """Nodule vs non-nodule; `balance` negatives per positive (0: the natural ratio). Mined look-alikes
    (rows from no CSV, see with_mined_lookalikes) and candidates.csv's non-nodules then take turns, so
    however many were mined, each kind is half the negatives."""
    labels = index.is_nodule.astype(np.int64)
    positives = np.flatnonzero(~is_val & (labels == 1))
    negatives = np.flatnonzero(~is_val & (labels == 0) & (index.line >= 0))
    mined = np.flatnonzero(~is_val & (labels == 0) & (index.line < 0))
    if balance > 0:
        if len(positives) == 0 or len(negatives) == 0:
            raise UserError("the training series hold no nodules or no non-nodules, so --balance cannot pair them; "
                            "add series or use --balance 0")
        groups, pattern = [positives, negatives], [0] + [1] * balance
        if len(mined):
            groups, pattern = groups + [mined], pattern + [0] + [2] * balance
    else:
        groups, pattern = [np.flatnonzero(~is_val)], [0]
    return CandidateTask("luna-train-cls", cache_dir, index, labels, groups, pattern, np.flatnonzero(is_val),
                         epoch_samples, augmentations, seed, "f1", NoduleClassifier)


class MalignancyTask(CandidateTask):
    """Benign vs malignant, fine-tuned; also reports the diameter-only baseline AUC."""

    summary_metrics = ("loss", "auc", "diameter_auc", "f1")

    def summarize(self, record):
        metrics = super().summarize(record)
        if record:
            rows = record["row"]
            nodules = self.index.has_annotation[rows]
            metrics["diameter_auc"] = roc_auc(record["label"][nodules], self.index.diameter_mm[rows][nodules])
        return metrics


def malignancy_task(cache_dir: Path, index: LunaIndex, is_val: np.ndarray, epoch_samples: int, augmentations,
                    seed: int, from_checkpoint: Path, depth: int) -> MalignancyTask:
    """Training draws malignant / benign / non-nodule in turn, so non-nodules are learnt as not
    malignant; validation is the validation series' benign and malignant nodules."""
    labels = (index.malignancy == 1).astype(np.int64)
    known = index.has_annotation & (index.malignancy >= 0)
    groups = [np.flatnonzero(~is_val & known & (index.malignancy == 1)),
              np.flatnonzero(~is_val & known & (index.malignancy == 0)),
              np.flatnonzero(~is_val & ~index.is_nodule)]
    if any(len(g) == 0 for g in groups):
        raise UserError("the training series need malignant, benign and non-nodule candidates; malignancy comes "
                        "from annotations_with_malignancy.csv in the data root")
    val_rows = np.flatnonzero(is_val & known)
    if len(val_rows) == 0:
        raise UserError("the validation series hold no nodules of known malignancy; add series or change --val-stride")
    state = load_weights(NoduleClassifier(), from_checkpoint, "a nodule classifier of this architecture").state_dict()
    make_model = lambda: fine_tunable(state, depth)
    return MalignancyTask("luna-finetune-mal", cache_dir, index, labels, groups, [0, 1, 2], val_rows, epoch_samples,
                          augmentations, seed, "auc", make_model, label_names=("benign", "malignant"))


def fine_tunable(state: dict, depth: int) -> NoduleClassifier:
    """A nodule classifier from `state` (a NoduleClassifier's own) whose last `depth` blocks train (1: the
    head only); the head starts afresh, everything before the trained blocks is frozen."""
    model = NoduleClassifier()
    model.load_state_dict(state, strict=True)
    blocks = model.blocks()
    if not 1 <= depth <= len(blocks):
        raise UserError(f"--depth must be between 1 (head only) and {len(blocks)} (everything), got {depth}")
    fresh = NoduleClassifier()
    model.head_linear.load_state_dict(fresh.head_linear.state_dict())
    for i, block in enumerate(blocks):
        block.requires_grad_(i >= len(blocks) - depth)
    return model


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
    # rounding gave a different, by chance worse, demo U-Net); validation inputs go channels-last in step().
    summary_metrics = ("loss", "precision", "recall", "f1", "f2")
    collate = staticmethod(pad_collate)

    def __init__(self, cache_dir: Path, uids: list[str], train_samples: np.ndarray, val_samples: np.ndarray,
                 context: int, crop: int, window: int, epoch_samples: int, augmentations, seed: int,
                 fn_weight: float, make_model: Callable[[], nn.Module], train_groups: list[np.ndarray],
                 pattern: list[int], group_weights: list[np.ndarray | None], bce_weight: float = 0.0,
                 label_margin: int = 0, image_every: int = 2, images: int = 4):
        self.cache_dir, self.uids, self.context = cache_dir, uids, context
        self.train_samples, self.val_samples = train_samples, val_samples
        self.crop, self.window, self.epoch_samples = crop, window, epoch_samples
        self.augmentations, self.seed, self.fn_weight = tuple(augmentations), seed, fn_weight
        self.bce_weight, self.label_margin = bce_weight, label_margin
        self.make_model, self.image_every, self.images = make_model, image_every, images
        self.train_groups, self.pattern, self.group_weights = train_groups, pattern, group_weights

    def model(self) -> nn.Module:
        return self.make_model()

    def train_dataset(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        picks = interleave(self.train_groups, self.pattern, self.epoch_samples, rng, self.group_weights)
        return SliceDataset(self.cache_dir, self.uids, self.train_samples[picks], self.context, self.crop,
                            self.window, self.seed, epoch, self.label_margin)

    def val_dataset(self):
        return SliceDataset(self.cache_dir, self.uids, self.val_samples, self.context, margin=self.label_margin)

    def step(self, model, batch, device, generator):
        stacks, masks = batch
        x, target = stacks.to(device, non_blocking=True).float(), masks.to(device, non_blocking=True)
        if generator is not None and self.augmentations:
            x, target = augment(x, self.augmentations, generator, masks=target)
        if generator is None:  # validation: whole slices, in channels-last (1.5x faster on CPU) and in pieces
            pred = in_pieces(model, x.contiguous(memory_format=torch.channels_last)).float()
        else:
            pred = model(x).float()
        truth = target.float()
        losses = dice_loss(pred, truth) + self.fn_weight * dice_loss(pred * truth, truth)
        if self.bce_weight:
            with torch.autocast(device.type, enabled=False):  # BCE on probabilities is unsafe in float16
                bce = F.binary_cross_entropy(pred, truth, reduction="none").mean(dim=(1, 2, 3))
            losses = losses + self.bce_weight * bce
        with torch.no_grad():
            hard = pred > 0.5
            counts = {k: torch.sum(v).item() for k, v in
                      (("tp", hard & target), ("fp", hard & ~target), ("fn", ~hard & target))}
        record = {"loss": losses.detach().cpu().numpy(), **{k: np.array([v]) for k, v in counts.items()}}
        return losses.mean(), record

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


def nodule_slices(cache_dir: Path, index: LunaIndex, series_codes, margin: int = 0) -> np.ndarray:
    """(uid code, slice) for every slice holding nodule label voxels (grown by margin) in the given series."""
    cache = LunaCache(cache_dir)
    rows = [(code, k) for code in series_codes for k in cache.record(index.series_uids[code]).label_slices(margin)]
    return np.array(rows, np.int64).reshape(-1, 2)


def lookalike_pixels(cache_dir: Path, index: LunaIndex, series_codes) -> np.ndarray:
    """(uid code, slice, row, col) of every non-nodule candidate of the given series inside its CT."""
    cache, rows = LunaCache(cache_dir), []
    for code in series_codes:
        record = cache.record(index.series_uids[code])
        irc = nearest_voxels(index.center_xyz[(index.series_code == code) & ~index.is_nodule], record.geometry,
                             record.shape)
        rows.append(np.column_stack([np.full(len(irc), code), irc]))
    return np.concatenate(rows).reshape(-1, 4) if rows else np.zeros((0, 4), np.int64)


def per_nodule_weights(cache_dir: Path, index: LunaIndex, samples: np.ndarray, margin: int = 0) -> np.ndarray:
    """A weight per (uid code, slice) sample: the sum, over the nodules the slice shows (grown by
    margin), of 1 / that nodule's slice count. Drawn by these weights, every nodule is trained on
    equally often: drawn by slice, a 10 mm nodule at 1.5 mm slices shows up three times as often as
    a 3 mm one, and small nodules are the ones the U-Net misses. A nodule is the label component
    holding its centre; label fragments off every centre weigh nothing."""
    cache, weights = LunaCache(cache_dir), np.zeros(len(samples))
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


def segmentation_task(cache_dir: Path, index: LunaIndex, val_stride: int, architecture: SegmenterConfig, crop: int,
                      window: int, epoch_samples: int, augmentations, seed: int, fn_weight: float,
                      bce_weight: float = 0.0, label_margin: int = 0,
                      lookalike_share: float = 0.0, per_nodule: bool = False) -> SegmentationTask:
    """Training: the nodule slices of the training series, cropped around a nodule, and with
    lookalike_share that share of crops centred on a non-nodule candidate instead (vessels and other
    look-alikes the U-Net should leave unmarked). Validation: the whole nodule slices of the
    validation series plus as many nodule-free slices, evenly spaced."""
    codes = np.arange(len(index.series_uids))
    is_val = index.validation_series(val_stride)
    train = nodule_slices(cache_dir, index, codes[~is_val], label_margin)
    val = nodule_slices(cache_dir, index, codes[is_val], label_margin)
    if len(train) == 0 or len(val) == 0:
        raise UserError("segmentation needs nodules in both the training and the validation series; "
                        "add series or change --val-stride")
    nodule_weights = per_nodule_weights(cache_dir, index, train, label_margin) if per_nodule else None
    train = np.pad(train, ((0, 0), (0, 2)), constant_values=-1)
    groups, pattern = [np.arange(len(train))], [0]
    if lookalike_share > 0:
        lookalikes = lookalike_pixels(cache_dir, index, codes[~is_val])
        if len(lookalikes) == 0:
            raise UserError("the training series hold no non-nodule candidates to learn look-alikes from; "
                            "use --lookalike-share 0")
        groups.append(len(train) + np.arange(len(lookalikes)))
        shown = round(20 * lookalike_share)
        pattern = [0] * (20 - shown) + [1] * shown
        train = np.concatenate([train, lookalikes])
    cache = LunaCache(cache_dir)
    empty = []
    for code in codes[is_val]:
        record = cache.record(index.series_uids[code])
        free = np.setdiff1d(np.arange(record.shape[0]), record.label_slices(label_margin))
        want = int(np.sum(val[:, 0] == code))
        empty += [(code, k) for k in free[np.linspace(0, len(free) - 1, min(want, len(free))).astype(int)]]
    val = np.concatenate([val, np.array(empty, np.int64).reshape(-1, 2)])
    make_model = lambda: NoduleSegmenter(architecture)
    return SegmentationTask(cache_dir, index.series_uids, train, val, architecture.context, crop, window, epoch_samples,
                            augmentations, seed, fn_weight, make_model, groups, pattern,
                            [nodule_weights] + [None] * (len(groups) - 1), bce_weight, label_margin)
