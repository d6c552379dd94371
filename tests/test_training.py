"""The shared loop through its two candidate trainers: runs, checkpoints, logs, resume, DDP."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from p2ch_app.cli import finetune_mal, train_cls
from p2ch_app.data.datasets import interleave
from p2ch_app.data.index import build_index
from p2ch_app.errors import UserError
from p2ch_app.tasks import fine_tunable, nodule_task
from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.training import TrainConfig, fit, select_device
from tests.conftest import BOOK_MODELS, PROJECT, requires_shared

TINY = ["--epochs", "2", "--epoch-samples", "32", "--batch-size", "16", "--workers", "0", "--val-stride", "3"]


def run(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result


def only_run_dir(runs: Path, command: str) -> Path:
    dirs = list((runs / command).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def tensorboard_tags(run_dir: Path) -> dict:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


@pytest.fixture(scope="module")
def cls_run(prepared_synth, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", runs, "--comment", "tiny"])
    assert result.exit_code == 0, result.output
    return only_run_dir(runs, "luna-train-cls"), result


def test_train_cls_writes_checkpoints_and_tensorboard(cls_run):
    run_dir, result = cls_run
    assert run_dir.name.endswith("-tiny")
    assert "luna-train-cls epoch 2/2: train loss" in result.output and "samples/s" in result.output
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["samples_seen"] == 64 and last["model_name"] == "NoduleClassifier"
    assert set(last) >= {"model_state", "optimizer_state", "rng", "config", "metrics", "best_value"}
    assert last["config"]["options"]["balance"] == 1
    assert set(last["metrics"]["val"]) >= {"loss", "accuracy_pos", "accuracy_neg", "precision", "recall", "f1", "auc"}
    best = load_checkpoint(run_dir / "best.pt")
    assert best["metrics"]["val"]["f1"] == max(best["best_value"], last["metrics"]["val"]["f1"])
    tags = tensorboard_tags(run_dir)
    for phase in ("train", "val"):
        for name in ("loss", "accuracy_pos", "accuracy_neg", "precision", "recall", "f1", "auc"):
            assert f"{phase}/{name}" in tags["scalars"]
        assert f"{phase}/prob_nodule" in tags["histograms"] and f"{phase}/prob_non_nodule" in tags["histograms"]
        assert f"{phase}/pr_curve" in tags["tensors"]


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
        task = nodule_task(tmp_path, index, is_val, balance, 400, (), seed=0)
        labels = task.labels[task.train_dataset(1).rows]
        assert labels.mean() == pytest.approx(expected, abs=0.01)
    natural = nodule_task(tmp_path, index, is_val, 0, 400, (), seed=0)
    labels = natural.labels[natural.train_dataset(1).rows]
    assert labels.mean() < 0.15  # nodules are rare among candidates
    assert not np.array_equal(natural.train_dataset(1).rows, natural.train_dataset(2).rows)
    val = natural.val_dataset().rows
    assert np.all(is_val[val]) and len(val) == is_val.sum()  # all validation candidates, unbalanced


def test_mined_lookalikes_are_half_the_negatives_however_many(prepared_synth, tmp_path):
    index = build_index(prepared_synth)
    train = np.flatnonzero(~index.is_validation(3) & ~index.is_nodule)
    for copies in (1, 10):  # few or many mined rows: the same share
        rows = np.tile(train, copies)
        grown = index.with_negatives(index.series_code[rows], index.center_xyz[rows] + 0.5)
        task = nodule_task(tmp_path, grown, grown.is_validation(3), 1, 800, (), seed=0)
        drawn = task.train_dataset(1).rows
        mined = drawn >= len(index)
        assert task.labels[drawn].mean() == pytest.approx(0.5, abs=0.01)
        assert mined.mean() == pytest.approx(0.25, abs=0.01) and not task.labels[drawn[mined]].any()
        assert np.all(task.val_dataset().rows < len(index))  # validation is candidates.csv's alone


RUN_TO_KILL = """
import sys
from p2ch_app.cli import train_cls
train_cls(sys.argv[1:])
"""


def test_killed_run_resumes_exactly_where_it_stopped(prepared_synth, tmp_path):
    args = ["--data-root", str(prepared_synth), "--epochs", "2", "--epoch-samples", "64", "--batch-size", "16",
            "--workers", "0", "--val-stride", "3", "--seed", "5"]
    whole = run(train_cls, [*args, "--runs-dir", tmp_path / "whole"])
    assert whole.exit_code == 0, whole.output
    reference = load_checkpoint(only_run_dir(tmp_path / "whole", "luna-train-cls") / "last.pt")

    runs = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RUN_TO_KILL, *args, "--runs-dir", str(runs)], cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.glob("luna-train-cls/*/last.pt"))
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None and load_checkpoint(last)["epoch"] == 1, "the run must be killed after epoch 1"

    resumed = run(train_cls, ["--resume", last])  # every other option comes from the checkpoint
    assert resumed.exit_code == 0, resumed.output
    final = load_checkpoint(last)
    assert final["epoch"] == 2 and final["samples_seen"] == reference["samples_seen"]
    for name, tensor in reference["model_state"].items():
        assert torch.equal(tensor, final["model_state"][name]), name
    assert final["metrics"] == reference["metrics"]


def _ddp_rank(rank: int, world: int, port: int, data_root: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    index = build_index(data_root)
    task = nodule_task(data_root / "cache", index, index.is_validation(3), 1, 32, ("flip", "noise"), seed=3)
    cfg = TrainConfig(command="ddp", epochs=2, batch_size=8, workers=0, device="cpu", runs_dir=out / "runs")
    model, _ = fit(task, cfg, progress=False)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_cpu_with_gloo_keeps_ranks_identical(prepared_synth, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(2, port, prepared_synth, tmp_path), nprocs=2)
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert len(list((tmp_path / "runs" / "ddp").iterdir())) == 1  # only rank 0 writes a run
    checkpoint = load_checkpoint(next((tmp_path / "runs" / "ddp").iterdir()) / "last.pt")
    assert checkpoint["samples_seen"] == 64  # 2 epochs x 32 samples, shared by the two ranks


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


def test_fine_tunable_depth_and_fresh_head():
    state = fine_tunable.__globals__["NoduleClassifier"]().state_dict()
    head_only = fine_tunable(state, 1)
    trainable = {n for n, p in head_only.named_parameters() if p.requires_grad}
    assert trainable == {"head_linear.weight", "head_linear.bias"}
    assert not torch.equal(head_only.head_linear.weight, state["head_linear.weight"])
    everything = fine_tunable(state, 6)
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(UserError, match="--depth must be between 1"):
        fine_tunable(state, 7)


class _Payload:
    """Pickles as a call to os.system: loading it without weights_only would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path, prepared_synth):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(UserError, match="refused to load .*evil.pt"):
        load_checkpoint(evil)
    result = run(finetune_mal, ["--data-root", prepared_synth, "--from", evil, *TINY, "--runs-dir", tmp_path])
    assert result.exit_code == 2 and "refused to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_bad_checkpoints_and_options(tmp_path, prepared_synth):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    result = run(train_cls, ["--data-root", prepared_synth, "--augment", "flip,blur", *TINY, "--runs-dir", tmp_path])
    assert result.exit_code == 2 and "unknown augmentation 'blur'" in result.output
    result = run(finetune_mal, ["--data-root", prepared_synth, *TINY])
    assert result.exit_code == 2 and "--from CHECKPOINT is required" in result.output


def test_training_needs_the_cache(tiny_root, tmp_path):
    result = run(train_cls, ["--data-root", tiny_root.root, *TINY, "--runs-dir", tmp_path])
    assert result.exit_code == 2 and "run luna-prep --data-root" in result.output


def test_device_selection():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="unknown --device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            select_device("cuda")


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


def test_a_run_whose_metric_is_undefined_still_has_a_best_checkpoint(prepared_synth, tmp_path):
    # one epoch on a validation set of a single class: AUC is NaN, yet best.pt must exist
    index = build_index(prepared_synth)
    is_val = index.is_validation(3)
    task = nodule_task(prepared_synth / "cache", index, is_val, 1, 16, (), seed=0)
    task.best_metric = "auc"
    task.val_rows = task.val_rows[task.labels[task.val_rows] == 0][:8]
    _, run_dir = fit(task, TrainConfig(command="nan", epochs=1, batch_size=8, workers=0, device="cpu",
                                       runs_dir=tmp_path), progress=False)
    assert np.isnan(load_checkpoint(run_dir / "best.pt")["metrics"]["val"]["auc"])


def test_training_options_reach_the_run(prepared_synth, tmp_path):
    import shutil

    cache = tmp_path / "elsewhere"
    shutil.copytree(prepared_synth / "cache", cache)
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--cache-dir", cache, "--optimizer", "adam", "--lr", 0.01, "--no-augment",
                             "--balance", 2])
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(only_run_dir(tmp_path, "luna-train-cls") / "last.pt")
    assert checkpoint["optimizer_name"] == "Adam"
    assert checkpoint["optimizer_state"]["param_groups"][0]["lr"] == 0.01
    options = checkpoint["config"]["options"]
    assert options["no_augment"] is True and options["balance"] == 2 and options["cache_dir"] == str(cache)


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
    assert not (tmp_path / "luna-train-cls").exists()


def test_train_cls_mines_lookalikes_with_a_unet(prepared_synth, tmp_path):
    from p2ch_app.analysis import load_segmenter, mine_lookalikes
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.models import NoduleSegmenter

    unet = NoduleSegmenter()
    with torch.no_grad():
        unet.unet.last.weight.fill_(0.0)
        unet.unet.last.bias.fill_(50.0)  # marks everything: one candidate per CT, near its middle
    torch.save({"model_state": unet.state_dict()}, tmp_path / "seg.pt")
    index = build_index(prepared_synth)
    segmenter, context = load_segmenter(tmp_path / "seg.pt", torch.device("cpu"))
    train_codes = np.flatnonzero(~index.validation_series(3))
    codes, _ = mine_lookalikes(LunaCache(prepared_synth / "cache"), index, train_codes, segmenter, context,
                               torch.device("cpu"))
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert 0 < len(codes) <= len(train_codes)
    assert f"mined {len(codes)} look-alikes in the training series" in result.output
    options = load_checkpoint(only_run_dir(tmp_path, "luna-train-cls") / "last.pt")["config"]["options"]
    assert Path(options["mine_with"]) == tmp_path / "seg.pt"
    assert "found in the cache" not in result.output
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path / "again",
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert f"mined {len(codes)} look-alikes in the training series with {tmp_path / 'seg.pt'} (found in the cache" \
        in result.output
    with torch.no_grad():
        unet.unet.last.bias.fill_(-50.0)  # other weights mark nothing: mined afresh, none found
    torch.save({"model_state": unet.state_dict()}, tmp_path / "seg.pt")
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path / "other",
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert "mined 0 look-alikes" in result.output and "found in the cache" not in result.output
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", tmp_path / "x",
                             "--mine-with", tmp_path / "missing.pt"])
    assert result.exit_code != 0 and "missing.pt" in result.output and "Traceback" not in result.output


@requires_shared
def test_train_cls_init_from_the_book_classifier(prepared_synth, tmp_path):
    book = next(BOOK_MODELS.glob("cls_*.state"))
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--init", book, "--optimizer", "adam", "--lr", 1e-12])
    assert result.exit_code == 0, result.output
    started = load_checkpoint(only_run_dir(tmp_path, "luna-train-cls") / "last.pt")["model_state"]
    assert torch.allclose(started["block1.conv1.weight"], load_checkpoint(book)["model_state"]["block1.conv1.weight"],
                          atol=1e-6)
