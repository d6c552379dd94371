"""The candidate classifiers as trainer tasks: balanced draws, initial weights, malignancy fine-tuning."""

from dataclasses import astuple

import numpy as np
import pytest
import torch

from p2ch_app.checkpoints import CLASSIFIER, load_checkpoint, load_model
from p2ch_app.cli import finetune_mal, train_cls
from p2ch_app.data.cache import LunaCache, default_cache_dir
from p2ch_app.data.datasets import interleave
from p2ch_app.data.index import build_index
from p2ch_app.errors import UserError
from p2ch_app.models import ClassifierConfig, NoduleClassifier, subsolid
from p2ch_app.training.classification import NoduleSettings, fine_tunable, fit_calibration, nodule_task
from p2ch_app.training.loop import Sampling
from tests.conftest import BOOK_MODELS, TINY, only_run_dir, requires_shared, run, tensorboard_tags


def test_balanced_epochs_are_balanced_sized_and_reshuffled():
    rng = np.random.default_rng(0)
    positives, negatives = np.arange(0, 5), np.arange(100, 200)
    epoch = interleave([positives, negatives], [0, 1, 1], 300, rng)
    assert len(epoch) == 300 and np.sum(epoch < 100) == 100
    assert set(epoch[epoch < 100]) == set(positives)  # every positive used, each 20 times
    assert len(set(epoch[epoch >= 100])) == 100  # no negative repeats before all are used
    again = interleave([positives, negatives], [0, 1, 1], 300, np.random.default_rng(1))
    assert not np.array_equal(epoch, again)


def test_balance_option_sets_the_ratio_and_zero_is_natural(prepared_synth, tmp_path):
    index = build_index(prepared_synth)
    is_val = index.is_validation(3)
    for balance, expected in ((1, 0.5), (3, 0.25)):
        sampling = Sampling(tmp_path, prepared_synth, val_stride=3, epoch_samples=400)
        task = nodule_task(index, NoduleSettings(sampling, balance))
        labels = task.labels[task.train_dataset(1).rows]
        assert labels.mean() == pytest.approx(expected, abs=0.01)
    sampling = Sampling(tmp_path, prepared_synth, val_stride=3, epoch_samples=400)
    natural = nodule_task(index, NoduleSettings(sampling, balance=0))
    labels = natural.labels[natural.train_dataset(1).rows]
    assert labels.mean() < 0.15  # nodules are rare among candidates
    assert not np.array_equal(natural.train_dataset(1).rows, natural.train_dataset(2).rows)
    val = natural.val_dataset().rows
    assert np.all(is_val[val]) and len(val) == is_val.sum()  # all validation candidates, unbalanced


def test_finetune_malignancy_from_our_classifier(cls_run, prepared_synth, tmp_path):
    source = cls_run[0] / "best.pt"
    result = run(finetune_mal, ["--data-root", prepared_synth, *TINY, "--runs-dir", tmp_path, "--from", source,
                                "--depth", 2])
    assert result.exit_code == 0, result.output
    assert "diameter_auc" in result.output
    run_dir = only_run_dir(tmp_path, "luna-finetune-mal")
    best = load_checkpoint(run_dir / "best.pt")
    assert best["best_metric"] == "auc" and "diameter_auc" in best["metrics"]["val"]
    before, after = load_checkpoint(source)["model_state"], best["model_state"]
    for frozen in ("tail_batchnorm.running_mean", "block1.conv1.weight", "block3.conv2.weight"):
        assert torch.equal(before[frozen], after[frozen]), frozen
    for trained in ("block4.conv1.weight", "head_linear.weight"):
        assert not torch.equal(before[trained], after[trained]), trained
    assert "val/diameter_auc" in tensorboard_tags(run_dir)["scalars"]
    # 6 validation nodules cannot fit a calibration: the network's own softmax stands
    assert "too few validation nodules to calibrate" in result.output
    assert best["model_config"]["calibration"] is None


def test_crop_zoom_is_trained_saved_and_kept_by_the_malignancy_model(prepared_synth, tmp_path):
    cache_dir = default_cache_dir(prepared_synth)
    settings = NoduleSettings(Sampling(cache_dir, prepared_synth, val_stride=3, epoch_samples=8), crop_zoom=2)
    task = nodule_task(build_index(prepared_synth), settings)
    crop, _, row = task.val_dataset()[0]
    zoomed, _ = LunaCache(cache_dir, prepared_synth).crop(task.index.uids()[row], task.index.center_xyz[row], zoom=2)
    assert crop.dtype == torch.float32 and np.array_equal(crop[0].numpy(), zoomed)
    assert task.model().config.crop_zoom == 2
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--crop-zoom", 2])
    assert result.exit_code == 0, result.output
    source = only_run_dir(tmp_path, "luna-train-cls") / "best.pt"
    assert load_checkpoint(source)["model_config"]["crop_zoom"] == 2
    result = run(finetune_mal, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                                "--from", source])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(only_run_dir(tmp_path, "luna-finetune-mal") / "best.pt")["model_config"]["crop_zoom"] == 2


def test_fine_tunable_depth_and_fresh_head():
    state = NoduleClassifier().state_dict()
    head_only = fine_tunable(NoduleClassifier(), state, 1)
    trainable = {n for n, p in head_only.named_parameters() if p.requires_grad}
    assert trainable == {"head_linear.weight", "head_linear.bias"}
    assert not torch.equal(head_only.head_linear.weight, state["head_linear.weight"])
    everything = fine_tunable(NoduleClassifier(), state, 6)
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(UserError, match="--depth must be between 1"):
        fine_tunable(NoduleClassifier(), state, 7)


@requires_shared
def test_finetune_malignancy_from_the_book_classifier(prepared_synth, tmp_path):
    book = next(BOOK_MODELS.glob("cls_*.state"))
    result = run(finetune_mal, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                                "--from", book])
    assert result.exit_code == 0, result.output
    best = load_checkpoint(only_run_dir(tmp_path, "luna-finetune-mal") / "best.pt")
    source = load_checkpoint(book)["model_state"]
    assert torch.equal(best["model_state"]["block4.conv2.weight"], source["block4.conv2.weight"])  # depth 1: frozen
    assert not torch.equal(best["model_state"]["head_linear.weight"], source["head_linear.weight"])


def test_train_cls_init_starts_from_the_given_weights(prepared_synth, tmp_path):
    from p2ch_app.models import NoduleClassifier

    torch.manual_seed(123)  # weights no seed-0 run starts from
    source = NoduleClassifier().state_dict()
    torch.save({"model_state": source}, tmp_path / "source.pt")
    args = ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--optimizer", "adam", "--lr", 1e-12]
    assert run(train_cls, [*args, "--runs-dir", tmp_path / "init", "--init", tmp_path / "source.pt"]).exit_code == 0
    assert run(train_cls, [*args, "--runs-dir", tmp_path / "fresh"]).exit_code == 0
    started = load_checkpoint(only_run_dir(tmp_path / "init", "luna-train-cls") / "last.pt")["model_state"]
    fresh = load_checkpoint(only_run_dir(tmp_path / "fresh", "luna-train-cls") / "last.pt")["model_state"]
    for name in ("block1.conv1.weight", "block4.conv2.weight", "head_linear.weight"):
        assert torch.allclose(started[name], source[name], atol=1e-6), name  # lr 1e-12: the weights stay put
        assert not torch.allclose(fresh[name], source[name], atol=1e-3), name


def test_init_refuses_another_architecture_and_resume(cls_run, prepared_synth, tmp_path):
    from p2ch_app.models import NoduleSegmenter

    seg = tmp_path / "seg.pt"
    torch.save({"model_state": NoduleSegmenter().state_dict()}, seg)
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", tmp_path, "--init", seg])
    assert result.exit_code == 2 and "is not a luna-train-cls model of this architecture" in result.output
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", tmp_path, "--init", seg,
                             "--resume", cls_run[0] / "last.pt"])
    assert result.exit_code == 2 and "--init and --resume exclude each other" in result.output
    assert not list(tmp_path.glob("luna-train-cls/*"))  # no run folder: the probe of --runs-dir leaves none


@requires_shared
def test_train_cls_init_from_the_book_classifier(prepared_synth, tmp_path):
    book = next(BOOK_MODELS.glob("cls_*.state"))
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--init", book, "--optimizer", "adam", "--lr", 1e-12])
    assert result.exit_code == 0, result.output
    started = load_checkpoint(only_run_dir(tmp_path, "luna-train-cls") / "last.pt")["model_state"]
    assert torch.allclose(started["block1.conv1.weight"], load_checkpoint(book)["model_state"]["block1.conv1.weight"],
                          atol=1e-6)


def test_fit_calibration_recovers_the_weights_that_drew_the_labels():
    rng = np.random.default_rng(0)
    margins, subsolid = rng.normal(0, 2, 20000), rng.random(20000) < 0.25
    labels = rng.random(20000) < 1 / (1 + np.exp(-(0.7 + 1.3 * margins - 1.0 * subsolid)))
    found = fit_calibration(labels, margins, subsolid)
    assert astuple(found) == pytest.approx((0.7, 1.3, -1.0), abs=0.1)
    # labels the margin separates perfectly: the prior keeps the weights finite
    separated = fit_calibration(margins > 0, margins, subsolid)
    assert np.isfinite([separated.bias, separated.scale, separated.ground_glass]).all() and separated.scale < 30


def test_finetune_malignancy_on_a_tiled_set_calibrates_on_its_validation_nodules(tmp_path):
    """luna-synth --tiles writes a set luna-prep caches and luna-finetune-mal trains and validates on; then
    both checkpoints carry the calibration fitted on the validation nodules, which their forward applies."""
    from p2ch_app.cli import prep, synth

    root = tmp_path / "tiles"
    made = run(synth, ["--data-root", root, "--series", 10, "--nodules", 8, "--tiles", "--tile-pixels", 30,
                       "--workers", 1, "--seed", 3])
    assert made.exit_code == 0, made.output
    assert run(prep, ["--data-root", root, "--workers", 1]).exit_code == 0
    index = build_index(root)
    assert index.has_annotation.sum() == 80 and (~index.is_nodule).sum() == 40  # four vessel spots per chest
    torch.manual_seed(0)
    torch.save({"model_state": NoduleClassifier().state_dict()}, tmp_path / "cls.pt")
    result = run(finetune_mal, ["--data-root", root, *TINY, "--epochs", 1, "--val-stride", 2,
                                "--runs-dir", tmp_path / "runs", "--from", tmp_path / "cls.pt"])
    assert result.exit_code == 0, result.output
    assert "diameter_auc" in result.output and "calibrated on the validation nodules" in result.output
    run_dir = only_run_dir(tmp_path / "runs", "luna-finetune-mal")
    calibration = load_model(run_dir / "best.pt", CLASSIFIER).config.calibration
    assert calibration is not None and load_model(run_dir / "last.pt", CLASSIFIER).config.calibration is not None
    plain = NoduleClassifier(ClassifierConfig()).eval()
    plain.load_state_dict(load_checkpoint(run_dir / "best.pt")["model_state"])
    calibrated = load_model(run_dir / "best.pt", CLASSIFIER)
    cache, nodules = LunaCache(default_cache_dir(root), root), np.flatnonzero(index.has_annotation)
    crops = torch.from_numpy(np.stack([cache.crop(index.uids()[row], index.center_xyz[row])[0]
                                       for row in nodules]))[:, None].float()
    assert subsolid(crops).any()  # ground glass among them: its term is checked too
    with torch.no_grad():
        margin = (lambda logits: logits[:, 1] - logits[:, 0])(plain(crops)[0])
        odds = calibration.bias + calibration.scale * margin + calibration.ground_glass * subsolid(crops).float()
        assert torch.allclose(calibrated(crops)[1][:, 1], torch.sigmoid(odds), atol=1e-5)
