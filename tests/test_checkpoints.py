"""Checkpoints rebuild the network that was trained: ours with their saved architecture, ours from
before it was saved as they were trained (max pooling), the book's as the book's."""

import pytest
import torch

from p2ch_app.checkpoints import (
    CLASSIFIER,
    SEGMENTER,
    average_checkpoints,
    load_model,
    model_config,
    model_entries,
    save_checkpoint,
    saved_options,
)
from p2ch_app.errors import UserError
from p2ch_app.models import Calibration, ClassifierConfig, NoduleClassifier, NoduleSegmenter, SegmenterConfig
from tests.conftest import BOOK_MODELS, assert_one_line_error, requires_shared, run


def outputs_equal(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_a_checkpoint_of_ours_rebuilds_its_architecture(tmp_path):
    torch.manual_seed(0)
    config = SegmenterConfig(context=2, depth=2, width_factor=3, up_mode="upsample", pooling="max")
    trained = NoduleSegmenter(config)
    save_checkpoint(tmp_path / "seg.pt", {**model_entries(trained), "config": {"options": {}}})
    rebuilt = load_model(tmp_path / "seg.pt", SEGMENTER)
    assert rebuilt.config == config
    assert outputs_equal(rebuilt, trained, torch.randn(1, 5, 24, 24))
    save_checkpoint(tmp_path / "cls.pt", model_entries(NoduleClassifier(ClassifierConfig(width=4))))
    assert load_model(tmp_path / "cls.pt", CLASSIFIER).config == ClassifierConfig(width=4)


def test_a_malignancy_models_calibration_travels_and_is_not_averaged(tmp_path):
    """The calibration is rebuilt with the network; two runs' calibrations belong to their own weights,
    so their mean is the mean network with its own softmax."""
    paths = []
    for seed, calibration in ((1, Calibration(0.7, 1.1, -0.8)), (2, Calibration(0.5, 0.9, -0.6))):
        torch.manual_seed(seed)
        model = NoduleClassifier(ClassifierConfig(width=4, calibration=calibration))
        paths.append(tmp_path / f"mal{seed}.pt")
        save_checkpoint(paths[-1], {**model_entries(model), "config": {"options": {"from_checkpoint": "cls.pt"}}})
    rebuilt = load_model(paths[0], CLASSIFIER)
    assert rebuilt.config.calibration == Calibration(0.7, 1.1, -0.8) and rebuilt.calibrated
    soup = average_checkpoints(paths)
    save_checkpoint(tmp_path / "soup.pt", soup)
    assert load_model(tmp_path / "soup.pt", CLASSIFIER).config == ClassifierConfig(width=4)
    assert not load_model(tmp_path / "soup.pt", CLASSIFIER).calibrated


def test_a_unet_saved_before_the_architecture_was_keeps_its_max_pooling(tmp_path):
    """Our U-Nets were trained with max pooling until the architecture went into the checkpoint;
    their options name the shape but not the pooling."""
    torch.manual_seed(0)
    trained = NoduleSegmenter(SegmenterConfig(context=1, depth=2, width_factor=2, pooling="max"))
    options = {"context": 1, "unet_depth": 2, "width_factor": 2, "up_mode": "upconv", "epochs": 3}
    old = {"model_state": trained.state_dict(), "model_name": "NoduleSegmenter", "config": {"options": options}}
    torch.save(old, tmp_path / "old.pt")
    rebuilt = load_model(tmp_path / "old.pt", SEGMENTER)
    assert rebuilt.config.pooling == "max" and rebuilt.config.depth == 2
    assert outputs_equal(rebuilt, trained, torch.randn(1, 3, 16, 16))
    assert saved_options(old)["pooling"] == "max"  # so --resume goes on with max pooling too
    assert "pooling" not in saved_options({**old, "model_config": {}})


def test_bare_weights_get_the_books_architecture():
    assert model_config({"model_state": {}}, SEGMENTER) == SegmenterConfig(pooling="avg")
    assert model_config({"model_state": {}}, CLASSIFIER) == ClassifierConfig()


def test_classifiers_saved_before_crop_zoom_crop_as_they_were_trained():
    saved = {"width": 8, "crop_size": [32, 48, 48], "classes": 2}  # model_config as written before crop_zoom
    assert model_config({"model_state": {}, "model_config": saved}, CLASSIFIER).crop_zoom == 1.0
    zoomed = model_entries(NoduleClassifier(ClassifierConfig(crop_zoom=2)))
    assert model_config(zoomed, CLASSIFIER) == ClassifierConfig(crop_zoom=2)


def test_a_checkpoint_of_the_wrong_kind_is_a_one_line_error(tmp_path):
    save_checkpoint(tmp_path / "cls.pt", model_entries(NoduleClassifier()))
    with pytest.raises(UserError, match="holds a classifier .*not a segmenter"):
        load_model(tmp_path / "cls.pt", SEGMENTER)
    torch.save({"model_state": NoduleClassifier().state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="is not a segmentation"):
        load_model(tmp_path / "bare.pt", SEGMENTER)
    torch.save({**model_entries(NoduleSegmenter()), "model_config": {"pooling": "median"}}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="architecture this version cannot build"):
        load_model(tmp_path / "odd.pt", SEGMENTER)


@requires_shared
def test_the_books_files_load_as_the_books_networks():
    seg = load_model(next(BOOK_MODELS.glob("seg_*.state")), SEGMENTER)
    cls = load_model(next(BOOK_MODELS.glob("cls_*.state")), CLASSIFIER)
    assert seg.config == SegmenterConfig() and seg.config.pooling == "avg" and cls.config == ClassifierConfig()
    assert not seg.training and not cls.training


def test_newest_best(tmp_path):
    import os

    from p2ch_app.checkpoints import newest_best

    assert newest_best(tmp_path, "luna-train-cls") is None
    for i, name in enumerate(["2026-01-01_10.00.00", "2026-01-02_10.00.00"]):
        path = tmp_path / "luna-train-cls" / name / "best.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    assert newest_best(tmp_path, "luna-train-cls").parent.name == "2026-01-02_10.00.00"


@pytest.mark.parametrize("content, message", [
    (b"", r"checkpoint .*empty.pt is empty \(0 bytes\); pass a complete checkpoint"),
    (b"PK\x03\x04", r"empty.pt is not a readable checkpoint \(.+\); it may be truncated"),
])
def test_an_empty_or_cut_checkpoint_is_a_one_line_error(tmp_path, content, message):
    from p2ch_app.checkpoints import load_checkpoint

    (tmp_path / "empty.pt").write_bytes(content)
    with pytest.raises(UserError, match=message) as caught:
        load_checkpoint(tmp_path / "empty.pt")
    assert "\n" not in str(caught.value)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UserError, match=r"cannot write .*last.pt: disk full"):
        save_checkpoint(tmp_path / "last.pt", model_entries(NoduleClassifier(ClassifierConfig(width=4))))
    assert not list(tmp_path.iterdir())


def _run_of(tmp_path, name: str, seed: int, init: str | None, config=SegmenterConfig(depth=2, width_factor=2),
            options: dict | None = None):
    """A checkpoint as luna-train-seg writes one, with random weights standing in for trained ones."""
    torch.manual_seed(seed)
    model = NoduleSegmenter(config)
    for module in model.modules():  # batch-norm statistics differ between runs too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(seed + 10)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {**model_entries(model), "config": {"command": "luna-train-seg", "init": init,
                                                              "options": options or {}}})
    return path, model


def test_luna_average_writes_the_mean_of_the_runs_weights(tmp_path):
    from p2ch_app.cli import COMMANDS

    runs = [_run_of(tmp_path, f"run{seed}", seed, "book.state") for seed in (1, 2, 3)]
    result = run(COMMANDS["luna-average"], [*(path for path, _ in runs), "--output", tmp_path / "soup" / "seg.pt"])
    assert result.exit_code == 0, result.output
    soup = load_model(tmp_path / "soup" / "seg.pt", SEGMENTER)
    states = [model.state_dict() for _, model in runs]
    for name, value in soup.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(s[name] for s in states) / 3, atol=1e-7), name
        else:
            assert value == 13, name  # the largest step count
    mean_of_itself = average_checkpoints([runs[0][0], runs[0][0]])  # two copies of one run: that run
    assert all(torch.equal(mean_of_itself["model_state"][k], v) for k, v in states[0].items())
    assert mean_of_itself["averaged_from"] == [str(runs[0][0])] * 2
    # luna-finetune-mal runs start from --from's classifier, not --init: they average too
    fine_tuned = [_run_of(tmp_path, f"mal{seed}", seed, None, options={"from_checkpoint": "cls.pt"})[0]
                  for seed in (1, 2)]
    assert average_checkpoints(fine_tuned)["averaged_from"] == [str(path) for path in fine_tuned]


@pytest.mark.parametrize("case, message", [
    ("one", "give two or more checkpoints to average"),
    ("architecture", "other.pt holds another network than"),
    ("start", "started from a.state and b.state: average only runs fine-tuned from the same weights (--init"),
    ("random", "started from None: average only runs fine-tuned from the same weights"),
])
def test_luna_average_refuses_runs_whose_weights_do_not_line_up(tmp_path, case, message):
    from p2ch_app.cli import COMMANDS

    first, _ = _run_of(tmp_path, "a", 1, None if case == "random" else "a.state")
    other = {"one": lambda: [],
             "architecture": lambda: [_run_of(tmp_path, "other", 2, "a.state", SegmenterConfig(width_factor=3))[0]],
             "start": lambda: [_run_of(tmp_path, "b", 2, "b.state")[0]],
             "random": lambda: [_run_of(tmp_path, "b", 2, None)[0]]}[case]()
    result = run(COMMANDS["luna-average"], [first, *other, "--output", tmp_path / "soup.pt"])
    assert_one_line_error(result, message)
    assert not (tmp_path / "soup.pt").exists()
