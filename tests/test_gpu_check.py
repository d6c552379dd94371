"""scripts/gpu_check.py (make gpu-check) where no GPU is: it says so at once; and its parts that need none."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT, requires_shared, script_module

SCRIPT = PROJECT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    with script_module("gpu_check") as module:
        yield module


def _script(*args) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - start


def test_without_cuda_it_says_so_and_stops_at_once():
    results = PROJECT / "bench-results" / "gpu-check.json"
    before = results.read_bytes() if results.is_file() else None
    done, seconds = _script()
    assert done.returncode == 2 and done.stdout == "" and seconds < 60
    (line,) = done.stderr.splitlines()
    assert line.startswith("gpu-check: error: no CUDA device: torch ")
    assert "sees no GPU here; run make gpu-check" in line
    assert (results.read_bytes() if results.is_file() else None) == before  # the saved figures are kept


def test_an_unknown_step_is_refused():
    done, _ = _script("golden", "--device", "cpu")
    assert done.returncode == 2 and "unknown step(s) golden; choose from cuda_tests, golden_exact" in done.stderr


def test_pytest_summaries_are_counted(gpu_check):
    out = "....\n==== short test summary info ====\nSKIPPED [1] x\n4 passed, 1 skipped, 612 deselected in 9.10s\n"
    assert gpu_check.pytest_counts(out) == {"passed": 4, "skipped": 1, "deselected": 612}
    assert gpu_check.pytest_counts("F.\n1 failed, 1 passed, 2 errors in 1.0s") == {"failed": 1, "passed": 1, "error": 2}
    assert gpu_check.pytest_counts("no tests ran in 0.01s") == {}


def test_a_step_passes_fails_or_is_skipped_and_the_others_still_run(gpu_check, capsys):
    def skipped():
        raise gpu_check.Skipped("the real CT is absent")

    def broken():
        raise RuntimeError("nodule-analyze exited with 2")

    steps = {"good": gpu_check.attempt("good", lambda: {"ok": True, "median_s": 1.23456, "gpus": 1}),
             "bad": gpu_check.attempt("bad", lambda: {"ok": False, "max_prob_diff": 0.5}),
             "absent": gpu_check.attempt("absent", skipped), "broken": gpu_check.attempt("broken", broken)}
    assert [s["status"] for s in steps.values()] == ["pass", "FAIL", "skip", "FAIL"]
    assert steps["broken"]["problem"] == "RuntimeError: nodule-analyze exited with 2"
    assert "good: step_s=" in capsys.readouterr().out
    device = {"gpu": "NVIDIA H100", "gpus": 1, "torch": "2.13", "cuda": "12.8"}
    table = gpu_check.table({"device": device, "total_s": 301.4, "steps": steps}).splitlines()
    assert table[0] == "gpu-check on 1x NVIDIA H100, torch 2.13, CUDA 12.8: 301 s in all (budget 480 s)"
    assert table[2].split() == ["good", "pass", "median_s=1.235", "gpus=1"]
    assert table[4].split()[:3] == ["absent", "skip", "reason=the"] and len(table) == 6


@requires_shared
def test_the_serve_step_rehearses_on_the_cpu(gpu_check, tmp_path):
    """The /predict load of make gpu-check, on the CPU: a real nodule-serve process, the book's classifier."""
    figures = gpu_check.step_serve_predict(gpu_check.Check(tmp_path, "cpu"), clients=4, seconds=1.0)
    assert figures["ok"], figures
    assert figures["prob_diff_to_cpu"] <= 1e-6 and figures["requests_per_s"] > 0 and figures["p99_ms"] > 0


def test_the_train_stages_step_rehearses_on_the_cpu(gpu_check, prepared_synth, tmp_path):
    """Every trainer's stages measured for real (scripts/train_stages.py, which make bench train prints too)."""
    figures = gpu_check.step_train_stages(gpu_check.Check(tmp_path, "cpu"), prepared_synth, samples=32,
                                          loader_samples=64)
    assert figures.pop("ok")
    for kind in ("cls", "seg", "mal"):
        assert figures[f"{kind}_limit"] in ("loader", "augment", "compute")
        assert all(figures[f"{kind}_{stage}"] > 0 for stage in ("whole", "loader_w2", "augment", "compute"))
        assert 0 <= figures[f"{kind}_gpu_waits_share"] < 1
