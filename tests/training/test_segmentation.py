"""The segmentation trainer: Dice loss, slice stacks, and a tiny run through the shared loop."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.cli import train_seg
from p2ch_app.data.cache import LunaCache
from p2ch_app.data.datasets import Patches, SliceDataset, pad_collate
from p2ch_app.data.index import build_index
from p2ch_app.models import NoduleSegmenter, SegmenterConfig
from p2ch_app.training.loop import Sampling
from p2ch_app.training.segmentation import (
    SegmentationSettings,
    dice_loss,
    lookalike_pixels,
    nodule_slices,
    segmentation_task,
)
from tests.conftest import BOOK_MODELS, requires_shared

BOOK, SMALL = SegmenterConfig(), SegmenterConfig(depth=2, width_factor=3)


def seg_settings(root, architecture, crop, window, epoch_samples, **given) -> SegmentationSettings:
    """Segmentation settings over the prepared data, validating every third series, unaugmented."""
    sampling = Sampling(root / "cache", root, val_stride=3, epoch_samples=epoch_samples)
    return SegmentationSettings(sampling, architecture, crop, window, label_margin=given.pop("label_margin", 0),
                                **given)


def square(size=20, lo=5, hi=15) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def test_dice_loss_perfect_empty_and_half():
    target = square()  # 100 pixels
    assert dice_loss(target, target).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss(torch.zeros_like(target), torch.zeros_like(target)).item() == pytest.approx(0)
    assert dice_loss(torch.zeros_like(target), target).item() == pytest.approx(1 - 1 / 101)
    half = target.clone()
    half[..., 10:15, :] = 0  # the prediction covers 50 of the 100 pixels and nothing else
    assert dice_loss(half, target).item() == pytest.approx(1 - (2 * 50 + 1) / (50 + 100 + 1))


def test_missed_pixels_cost_more_than_extra_ones_with_fn_weight():
    target = square()
    missing = target.clone()
    missing[..., 5:10, 5:15] = 0  # 50 nodule pixels missed
    extra = target.clone()
    extra[..., 15:20, 5:15] = 1  # 50 false pixels added
    weighted = lambda p: (dice_loss(p, target) + 8 * dice_loss(p * target, target)).item()
    assert weighted(missing) > 5 * weighted(extra)


def test_slice_stacks_repeat_edges_and_crop_around_a_nodule(prepared_synth):
    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    samples = nodule_slices(cache, index, range(len(index.series_uids)))
    assert len(samples) > 0
    code, k = samples[0]
    record = cache.record(index.series_uids[code])
    assert np.array_equal(record.mask_slice(k), record.mask()[k])
    cropped = SliceDataset(cache, index.series_uids, samples, context=3,
                           patches=Patches(crop=32, window=48))
    for i in range(len(samples)):
        stack, mask = cropped[i]
        assert stack.shape == (7, 32, 32) and mask.shape == (1, 32, 32) and mask.any()
    whole = SliceDataset(cache, index.series_uids, [(code, 0)], context=3)
    stack, mask = whole[0]
    volume = cache.volume(index.series_uids[code])
    assert stack.shape == (7, *volume.shape[1:])
    for channel, source in enumerate([0, 0, 0, 0, 1, 2, 3]):  # slices above the first repeat it
        assert np.array_equal(stack[channel].numpy(), volume[source])


@pytest.mark.parametrize("margin", [0, 2])
def test_patches_are_cut_from_the_whole_slice_as_drawn(prepared_synth, margin):
    """The loader's fast path (label pixels found in their box only) gives each patch exactly what the
    plain one does: a nodule pixel drawn from the whole grown slice mask, the window placed by the
    same draws, stack and mask cut there (the samples of a seeded run do not change)."""
    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    samples = nodule_slices(cache, index, range(len(index.series_uids)), margin)
    patches = Patches(crop=24, window=40, seed=4, epoch=2)
    dataset = SliceDataset(cache, index.series_uids, samples, context=2, patches=patches, margin=margin)
    for i, (code, k) in enumerate(samples):
        record, volume = cache.record(index.series_uids[code]), cache.volume(index.series_uids[code])
        whole = record.mask_slice(k, margin)
        rng = np.random.default_rng([4, 2, i])
        ys, xs = np.nonzero(whole)
        pick = rng.integers(len(ys))
        dy, dx = rng.integers(0, 40 - 24 + 1, size=2)
        r0 = int(np.clip(ys[pick] - 20 + dy, 0, whole.shape[0] - 24))
        c0 = int(np.clip(xs[pick] - 20 + dx, 0, whole.shape[1] - 24))
        stack, mask = dataset[i]
        assert np.array_equal(mask[0].numpy(), whole[r0:r0 + 24, c0:c0 + 24]), i
        assert np.array_equal(stack[2].numpy(), volume[k, r0:r0 + 24, c0:c0 + 24]), i


def test_pad_collate_stacks_different_slice_sizes():
    items = [(torch.zeros(7, 10, 12, dtype=torch.int16), torch.ones(1, 10, 12, dtype=torch.bool)),
             (torch.zeros(7, 14, 9, dtype=torch.int16), torch.ones(1, 14, 9, dtype=torch.bool))]
    stacks, masks = pad_collate(items)
    assert stacks.shape == (2, 7, 14, 12) and masks.shape == (2, 1, 14, 12)
    assert stacks[0, :, 10:].eq(-1000).all() and not masks[1, :, :, 9:].any() and masks[1, :, :, :9].all()


def test_tiny_segmentation_run(prepared_synth, tmp_path):
    args = ["--data-root", prepared_synth, "--epochs", 1, "--epoch-samples", 16, "--batch-size", 8, "--crop", 32,
            "--window", 48, "--workers", 0, "--val-stride", 3, "--runs-dir", tmp_path, "--up-mode", "upsample",
            "--context", 2, "--unet-depth", 2, "--width-factor", 3, "--fn-weight", 4, "--bce-weight", 0.5,
            "--label-margin", 2, "--lookalike-share", 0.5, "--per-nodule"]
    result = CliRunner().invoke(train_seg, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "luna-train-seg epoch 1/1" in result.output and "f2" in result.output
    run_dir = next((tmp_path / "luna-train-seg").iterdir())
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["best_metric"] == "f2"
    assert set(checkpoint["metrics"]["val"]) >= {"loss", "precision", "recall", "f1", "f2"}
    model = NoduleSegmenter(SegmenterConfig(context=2, depth=2, width_factor=3, up_mode="upsample"))
    model.load_state_dict(checkpoint["model_state"], strict=True)
    assert checkpoint["config"]["options"]["fn_weight"] == 4 and checkpoint["config"]["options"]["bce_weight"] == 0.5
    assert checkpoint["config"]["options"]["label_margin"] == 2
    assert checkpoint["config"]["options"]["lookalike_share"] == 0.5 and checkpoint["config"]["options"]["per_nodule"]
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "val/slices_red_predicted_green_label" in events.Tags()["images"]
    assert {"train/recall", "val/precision", "val/f2"} <= set(events.Tags()["scalars"])


def test_bce_weight_adds_pixelwise_cross_entropy(prepared_synth):
    index = build_index(prepared_synth)
    make = lambda weight: segmentation_task(index, seg_settings(prepared_synth, BOOK, 32, 48, 8, bce_weight=weight))
    plain, mixed = make(0.0), make(2.0)
    batch = pad_collate([plain.train_dataset(1)[i] for i in range(4)])
    torch.manual_seed(0)
    model = plain.model().eval()
    with torch.no_grad():
        loss_plain = plain.val_step(model, batch, torch.device("cpu"))["loss"].mean()
        loss_mixed = mixed.val_step(model, batch, torch.device("cpu"))["loss"].mean()
        pred = model(batch[0].float())
        bce = torch.nn.functional.binary_cross_entropy(pred, batch[1].float(), reduction="none").mean(dim=(1, 2, 3))
    assert loss_mixed.item() == pytest.approx(loss_plain.item() + 2.0 * bce.mean().item(), rel=1e-5)


def test_validation_step_runs_channels_last_with_the_same_results(prepared_synth):
    index = build_index(prepared_synth)
    task = segmentation_task(index, seg_settings(prepared_synth, BOOK, 32, 48, 8))
    batch = pad_collate([task.val_dataset()[i] for i in range(4)])
    torch.manual_seed(0)
    model = task.model().eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        val_record = task.val_step(model, batch, torch.device("cpu"))
        train_loss, train_record = task.train_step(model, batch, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert seen == [False, True]  # validation input channels-last, training input in the default layout
    assert val_record["loss"].mean() == pytest.approx(train_loss.item(), abs=1e-5)
    assert all(abs(int(val_record[k][0]) - int(train_record[k][0])) <= 2 for k in ("tp", "fp", "fn"))


def test_label_margin_grows_the_task_labels_in_3d(prepared_synth):
    from scipy import ndimage

    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    plain = segmentation_task(index, seg_settings(prepared_synth, SMALL, 32, 48, 8))
    grown = segmentation_task(index, seg_settings(prepared_synth, SMALL, 32, 48, 8, label_margin=1))
    assert len(grown.train_samples) > len(plain.train_samples)  # the slices next to each nodule join
    code, k = grown.draws.val_rows[0]
    label = cache.record(index.series_uids[code]).mask()
    expected = ndimage.binary_dilation(label, ndimage.generate_binary_structure(3, 1))[k]
    _, mask = grown.val_dataset()[0]
    assert np.array_equal(mask[0].numpy(), expected) and expected.sum() > label[k].sum()


def test_lookalike_share_centres_that_share_of_crops_on_non_nodule_candidates(prepared_synth):
    from p2ch_app.data.ct import xyz_to_irc

    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    task = segmentation_task(index, seg_settings(prepared_synth, SMALL, 32, 48, 40, lookalike_share=0.25))
    is_val = index.validation_series(3)
    lookalikes = lookalike_pixels(cache, index, np.flatnonzero(~is_val))
    expected = sum(int(np.sum((index.series_code == c) & ~index.is_nodule)) for c in np.flatnonzero(~is_val))
    assert len(lookalikes) == expected > 0  # every look-alike of the synthetic series lies inside its CT
    code, *irc = lookalikes[0]
    record = cache.record(index.series_uids[code])
    centers = index.center_xyz[(index.series_code == code) & ~index.is_nodule]
    assert np.array_equal(np.rint(xyz_to_irc(centers[0], record.geometry)), irc)

    dataset = task.train_dataset(1)
    centred = dataset.centred
    assert centred.sum() == 10 and np.all(dataset.samples[~centred, 2:] == 0)  # 5 of every 20 crops
    for i in np.flatnonzero(centred)[:3]:
        code, k, row, col = dataset.samples[i]
        stack, _ = dataset[i]
        volume = cache.volume(index.series_uids[code])
        matches = [(r, c) for r in range(volume.shape[1] - 31) for c in range(volume.shape[2] - 31)
                   if r <= row < r + 32 and c <= col < c + 32
                   and np.array_equal(stack[3].numpy(), volume[k, r:r + 32, c:c + 32])]
        assert matches  # the crop holds the look-alike's pixel
    plain = segmentation_task(index, seg_settings(prepared_synth, SMALL, 32, 48, 40))
    assert not plain.train_dataset(1).centred.any()


def test_per_nodule_draws_every_nodule_equally_often(prepared_synth):
    from scipy import ndimage

    from p2ch_app.data.ct import xyz_to_irc

    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    make = lambda per_nodule: segmentation_task(index, seg_settings(prepared_synth, SMALL, 32, 48, 30000,
                                                                    per_nodule=per_nodule))
    slices = []  # (uid code, first, last slice) of each nodule's label component
    for code in np.unique(make(False).train_samples[:, 0]):
        record = cache.record(index.series_uids[code])
        labels, _ = ndimage.label(record.mask())
        for center in index.center_xyz[(index.series_code == code) & index.is_nodule]:
            component = labels[tuple(np.rint(xyz_to_irc(center, record.geometry)).astype(int))]
            z = np.flatnonzero(np.any(labels == component, axis=(1, 2)))
            slices.append((code, z.min(), z.max()))
    alone = [(c, a, b) for c, a, b in slices  # nodules sharing no slice with another one
             if not any(c2 == c and a2 <= b and b2 >= a and (a2, b2) != (a, b) for c2, a2, b2 in slices)]
    assert len(alone) >= 4
    slices = alone

    def draws(task) -> np.ndarray:
        drawn = task.train_dataset(1).samples
        return np.array([np.sum((drawn[:, 0] == code) & (drawn[:, 1] >= first) & (drawn[:, 1] <= last))
                         for code, first, last in slices])

    even, by_slice = draws(make(True)), draws(make(False))
    spans = np.array([last - first + 1 for _, first, last in slices])
    assert spans.max() >= 2 * spans.min()  # nodules of different thickness
    assert even.max() < 1.2 * even.min()  # equal up to sampling noise
    assert by_slice.max() > 1.5 * by_slice.min()


@requires_shared
def test_segmentation_starts_from_the_book_unet(prepared_synth, tmp_path):
    book = next(BOOK_MODELS.glob("seg_*.state"))
    args = ["--data-root", prepared_synth, "--epochs", 1, "--epoch-samples", 8, "--batch-size", 8, "--crop", 32,
            "--window", 48, "--workers", 0, "--val-stride", 3, "--runs-dir", tmp_path, "--init", book, "--lr", 1e-12]
    result = CliRunner().invoke(train_seg, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    started = load_checkpoint(next((tmp_path / "luna-train-seg").iterdir()) / "last.pt")["model_state"]
    name = "unet.down_path.0.block.0.weight"
    assert torch.allclose(started[name], load_checkpoint(book)["model_state"][name], atol=1e-6)
