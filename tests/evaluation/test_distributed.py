"""nodule-analyze --validation under torchrun: ranks share the series, rank 0 writes what one process writes."""

import csv
import gzip
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2ch_app.checkpoints import model_entries, save_checkpoint
from p2ch_app.inference import distributed
from p2ch_app.inference.distributed import SINGLE, Ranks, cpu_threads, gather_in_order, shard, start_ranks
from p2ch_app.models import ClassifierConfig, NoduleClassifier, NoduleSegmenter, SegmenterConfig
from tests.conftest import PROJECT, run


def threshold_unet(hu_min: float) -> NoduleSegmenter:
    """A real U-Net (one level, one channel) weighted by hand: probability > 0.5 exactly where the
    centre slice is denser than hu_min, so its candidates are the CT's dense structures."""
    model = NoduleSegmenter(SegmenterConfig(context=1, depth=1, width_factor=0, batch_norm=False))
    first, second = model.unet.down_path[0].block[0], model.unet.down_path[0].block[3]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.input_batchnorm.weight.fill_(1.0)
        first.weight[0, 1, 1, 1], first.bias[0] = 0.01, -0.01 * (hu_min - 50)  # relu((hu - hu_min + 50) / 100)
        second.weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0, 0, 0], model.unet.last.bias[0] = 10.0, -5.0  # > 0 from hu_min on
    return model.eval()


def small_classifier(seed: int = 0) -> NoduleClassifier:
    """A random narrow classifier whose input norm maps HU to about [-1, 1]: probabilities spread a little."""
    torch.manual_seed(seed)
    model = NoduleClassifier(ClassifierConfig(width=2))
    with torch.no_grad():
        model.tail_batchnorm.running_mean.fill_(-500.0)
        model.tail_batchnorm.running_var.fill_(500.0 ** 2)
        model.head_linear.weight.mul_(0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    save_checkpoint(folder / "seg.pt", model_entries(threshold_unet(0.0)))
    save_checkpoint(folder / "cls.pt", model_entries(small_classifier()))
    return folder / "seg.pt", folder / "cls.pt"


def _outputs(folder: Path) -> list[str]:
    return ["--runs-dir", folder / "runs", "--output", folder / "out.csv", "--submission", folder / "sub.csv",
            "--report", folder / "report"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes by path; gzip files decompressed (their header holds a time stamp)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "events.out.tfevents" not in p.name):
        data = path.read_bytes()
        found[str(path.relative_to(folder))] = gzip.decompress(data) if path.suffix == ".gz" else data
    return found


def _without_run_dir(folder: Path) -> dict[str, bytes]:
    """_files with the run folder's time-stamped name taken out of the paths."""
    (run_dir,) = (folder / "runs" / "nodule-analyze").iterdir()
    return {name.replace(str(run_dir.relative_to(folder)), "RUN"): data for name, data in _files(folder).items()}


def _summary(stdout: str) -> list[str]:
    """The printed summary without the lines that name this run's own folders."""
    return [line for line in stdout.splitlines() if not line.startswith(("results in ", "wrote "))]


def _single_process(args: list, folder: Path):
    """nodule-analyze in this process with the torch threads of one of two CPU ranks on this machine,
    so both runs compute each series with the same kernels."""
    from p2ch_app.cli import analyze

    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(2))
    try:
        return run(analyze, [*args, *_outputs(folder)])
    finally:
        torch.set_num_threads(threads)


def _torchrun(args: list, folder: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(folder.with_name("logs")), "--redirects", "3",
               "-m", "p2ch_app.cli", "nodule-analyze", *[str(a) for a in [*args, *_outputs(folder)]]]
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)


def _rank_logs(folder: Path, rank: int) -> tuple[str, str]:
    (attempt,) = folder.with_name("logs").glob(f"*/attempt_0/{rank}")
    return ((attempt / "stdout.log").read_text(encoding="utf-8"),
            (attempt / "stderr.log").read_text(encoding="utf-8"))


def test_validation_with_two_gloo_ranks_equals_one_process(prepared_synth, tiny_models, tmp_path):
    seg, cls = tiny_models
    args = ["--validation", "--include-train", "--data-root", prepared_synth, "--seg-model", seg, "--cls-model", cls,
            "--mal-model", cls, "--threshold", 0.57, "--device", "cpu", "--comment", "ranks"]
    one = _single_process(args, tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = _torchrun(args, tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    stdout0, _ = _rank_logs(tmp_path / "two", 0)
    assert _summary(stdout0) == _summary(one.stdout) and "CPM " in stdout0
    assert _rank_logs(tmp_path / "two", 1) == ("", "")  # the other rank prints nothing
    expected, got = _without_run_dir(tmp_path / "one"), _without_run_dir(tmp_path / "two")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    # the comparison has something to compare: six series, each with reported and unreported candidates
    metrics = json.loads(expected["RUN/metrics.json"])
    assert metrics["scans"] == 6 and len(metrics["series"]) == 6
    rows = list(csv.DictReader(io.StringIO(expected["RUN/detections.csv"].decode())))
    output = list(csv.DictReader(io.StringIO(expected["out.csv"].decode())))
    assert len(rows) > len(output) > 6 and {r["series_uid"] for r in output} == set(metrics["series"])
    assert sum(name.startswith("report/") and name.endswith(".png") for name in expected) >= len(output)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("count, world", [(0, 2), (1, 3), (5, 2), (6, 3), (7, 4), (3, 1)])
def test_gather_in_order_undoes_shard(monkeypatch, count, world, weighted):
    items = [f"series{i}" for i in range(count)]
    costs = [(7 * i) % 5 + 1.0 for i in range(count)] if weighted else None
    shares = [shard(items, Ranks(rank, world, distributed=True), costs) for rank in range(world)]
    assert sorted(sum(shares, [])) == sorted(items)
    if not weighted:  # every world-th series
        assert shares == [items[rank::world] for rank in range(world)]
    # what each rank would send: its results, in the order it analysed its share
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, ranks: [[s.upper() for s in share]
                                                                          for share in shares])
    for rank in range(world):
        assert gather_in_order(None, Ranks(rank, world, distributed=True), costs) == [s.upper() for s in items]


def test_shares_even_out_the_ranks_costs():
    # the demo's ten validation CTs, in slices: every other one gives 732 and 817 slices
    slices = [168, 193, 137, 118, 172, 195, 133, 175, 122, 136]
    taken = distributed.shares(slices, 2)
    assert [sum(slices[i] for i in items) for items in taken] == [786, 763]
    assert all(items == sorted(items) for items in taken)
    assert distributed.shares([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3, 4, 5]]
    assert distributed.shares([], 3) == [[], [], []]


def test_a_single_process_shards_nothing_and_gathers_its_own():
    items = ["a", "b", "c"]
    assert shard(items, SINGLE) == items and gather_in_order(items, SINGLE) == items
    ranks, device = start_ranks("cpu")
    assert ranks == SINGLE and ranks.is_main and device == torch.device("cpu")


def test_cpu_ranks_split_the_cores():
    assert [cpu_threads(n, cores=16) for n in (1, 2, 3, 4, 16, 32)] == [16, 8, 5, 4, 1, 1]
    assert cpu_threads(2, cores=2) == 1 and cpu_threads(1) >= 1


def test_under_torchrun_one_process_still_starts_a_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(TORCHELASTIC_RUN_ID="test", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                            LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    ranks, device = start_ranks("cpu")
    try:
        assert ranks == Ranks(0, 1, 0, 1, distributed=True) and device == torch.device("cpu")
        assert torch.distributed.get_backend() == "gloo" and distributed.gather_objects({"a": 1}, ranks) == [{"a": 1}]
        assert torch.get_num_threads() == threads  # a node's only rank keeps every thread
    finally:
        torch.distributed.destroy_process_group()


def test_one_ct_under_several_ranks_is_refused(monkeypatch, tiny_root, tiny_models):
    from p2ch_app.cli import analyze

    monkeypatch.setenv("WORLD_SIZE", "2")
    seg, cls = tiny_models
    result = run(analyze, ["--ct", tiny_root.series[0].mhd, "--seg-model", seg, "--cls-model", cls])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == ("nodule-analyze: error: torchrun started 2 processes, but only --validation shares its "
                             "series among them; analyse one CT without torchrun\n")
