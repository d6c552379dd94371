"""The one training loop through the trainers: runs, checkpoints, logs, resume, DDP."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.cli import finetune_mal, train_cls
from p2ch_app.data.index import build_index
from p2ch_app.errors import UserError
from p2ch_app.training.classification import NoduleSettings, nodule_task
from p2ch_app.training.loop import Sampling, TrainConfig, fit
from tests.conftest import PROJECT, TINY, only_run_dir, run, tensorboard_tags


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
    sampling = Sampling(data_root / "cache", data_root, val_stride=3, epoch_samples=32, augmentations=("flip", "noise"),
                        seed=3)
    task = nodule_task(index, NoduleSettings(sampling))
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


@pytest.mark.parametrize("trainer", ["luna-train-seg", "luna-finetune-mal"])
def test_resuming_another_trainers_run_is_refused_before_its_options_are_used(cls_run, tmp_path, trainer):
    from p2ch_app.cli import COMMANDS

    last = cls_run[0] / "last.pt"
    result = run(COMMANDS[trainer], ["--resume", last])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == (f"{trainer}: error: {last} is a checkpoint of luna-train-cls, not of {trainer}; "
                             "resume it with luna-train-cls --resume\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    result = run(COMMANDS[trainer], ["--resume", tmp_path / "empty.pt"])
    assert result.exit_code == 2 and result.stderr.startswith(f"{trainer}: error: checkpoint {tmp_path}/empty.pt is "
                                                              "empty (0 bytes)")


def test_training_needs_the_cache(tiny_root, tmp_path):
    result = run(train_cls, ["--data-root", tiny_root.root, *TINY, "--runs-dir", tmp_path])
    assert result.exit_code == 2 and "run luna-prep --data-root" in result.output


def test_a_run_whose_metric_is_undefined_still_has_a_best_checkpoint(prepared_synth, tmp_path):
    # one epoch on a validation set of a single class: AUC is NaN, yet best.pt must exist
    index = build_index(prepared_synth)
    sampling = Sampling(prepared_synth / "cache", prepared_synth, val_stride=3, epoch_samples=16)
    task = nodule_task(index, NoduleSettings(sampling))
    task.best_metric = "auc"
    val_rows = task.draws.val_rows
    task.draws = replace(task.draws, val_rows=val_rows[task.labels[val_rows] == 0][:8])
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


def test_loader_workers_do_not_change_what_a_seeded_run_learns(prepared_synth, tmp_path):
    """The same seed gives the same weights whether batches come from the main process or from two
    workers: each epoch's samples and augmentations are drawn from (seed, epoch), never per worker.
    The timing also says how long the loop waited for batches."""
    index = build_index(prepared_synth)
    sampling = Sampling(prepared_synth / "cache", prepared_synth, val_stride=3, epoch_samples=48,
                        augmentations=("flip", "rotate", "noise"), seed=2)
    states = []
    for workers in (0, 2):
        cfg = TrainConfig(command="luna-train-cls", epochs=2, batch_size=8, workers=workers, device="cpu",
                          runs_dir=tmp_path / f"w{workers}")
        model, run_dir = fit(nodule_task(index, NoduleSettings(sampling)), cfg, progress=False)
        states.append(model.state_dict())
        timing = load_checkpoint(run_dir / "last.pt")["timing"]
        assert 0 <= timing["loader_wait_share"] < 1 and timing["train_samples_per_s"] > 0
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_epochs_before_validate_from_train_alike_and_do_not_validate(prepared_synth, tmp_path):
    """Skipping the early validations changes nothing the run learns, only which epochs compete for
    best.pt; the console line of an unvalidated epoch has no validation part."""
    args = ["--data-root", prepared_synth, *TINY, "--epochs", 3, "--seed", 4]
    whole = run(train_cls, [*args, "--runs-dir", tmp_path / "every"])
    late = run(train_cls, [*args, "--runs-dir", tmp_path / "late", "--validate-from", 3])
    assert whole.exit_code == 0 and late.exit_code == 0, whole.output + late.output
    every, last_only = (load_checkpoint(only_run_dir(tmp_path / name, "luna-train-cls") / "last.pt")
                        for name in ("every", "late"))
    for name, tensor in every["model_state"].items():
        assert torch.equal(tensor, last_only["model_state"][name]), name
    assert every["metrics"]["val"] == last_only["metrics"]["val"]
    lines = [line for line in late.output.splitlines() if "luna-train-cls epoch" in line]
    assert ["| val " in line for line in lines] == [False, False, True]
    best = load_checkpoint(only_run_dir(tmp_path / "late", "luna-train-cls") / "best.pt")
    assert best["epoch"] == 3  # the only validated epoch, whatever epoch 1 scored
    assert last_only["config"]["validate_from"] == 3

    too_late = run(train_cls, [*args, "--runs-dir", tmp_path / "never", "--validate-from", 4])
    assert too_late.exit_code == 2 and "--validate-from 4 is past the last epoch (3)" in too_late.output
