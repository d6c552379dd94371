"""`make gpu-check`: what only a CUDA GPU can show, in one run of a few minutes on a one-GPU machine.

Steps, in order (each prints one line of figures; a failed step is marked and the others still run):
  cuda_tests        the tests marked cuda (pytest -m cuda)
  golden_exact      nodule-analyze on the real CT (../shared) on CUDA beside the book's own candidates: the
                    same candidates one to one within 0.01 mm, equal voxel counts, probabilities within 1e-4
  golden_fast       the same with --fast (float16 autocast): how far it moves candidates and probabilities
  real_ct_command   the whole default command on CUDA, process start included: median of 3
  real_ct_analysis  analyze() alone in this process, CT and models loaded: median of 3 after a warm-up
  serve_predict     nodule-serve on the GPU: /predict from 16 clients for 10 s, batched on CUDA, its answer the
                    book's classifier's on the CPU within 1e-4: requests/s, p50/p99
  amp_trainers      each trainer, one short epoch on tiny synthetic data (luna-synth, luna-prep), under AMP
  train_stages      each trainer's stages on the GPU (scripts/train_stages.py): samples/s of the whole step,
                    the loader alone (2 workers), the augmentation and the step's compute alone; the share
                    of the whole step the GPU waits on the loader (1 - whole / compute) and which stage limits
  ddp_nccl          luna-train-cls under torchrun, one rank per GPU here, over NCCL
Then a table of every figure, also saved to bench-results/gpu-check.json. Exit code 0 when every step
passed, 1 when one failed, and 2 at once where torch sees no CUDA GPU. Run from anywhere.

`gpu_check.py STEP ...` runs only those steps. `--device cpu` rehearses them on the CPU (slowly, and
without the figures' meaning: no AMP, no NCCL there) to check this script itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
REAL_CT = SHARED / "data" / "real-ct" / "cptac-C3N-00247-lung-3.0-B70f"
REFERENCE = SHARED / "data" / "reference" / "cptac-book-candidates.csv"
BOOK_MODELS = SHARED / "models" / "book"
RESULTS = PROJECT / "bench-results" / "gpu-check.json"
PROB_TOLERANCE = 1e-4  # exact mode against the book's probabilities
ANALYSIS_GOAL_S = 2.0  # the real CT on one H100, process start excluded
BUDGET_S = 8 * 60
TRAIN = ["--epochs", 1, "--epoch-samples", 256, "--batch-size", 32, "--workers", 2, "--val-stride", 3]


@dataclass(frozen=True)
class Check:
    work: Path  # a temporary folder for every step's files
    device: str = "cuda"  # "cpu" only to rehearse the script
    gpus: int = 1


class Skipped(Exception):
    """A step that cannot run here (its inputs are absent): noted, not a failure."""


def cuda_device() -> dict | None:
    """The GPUs torch sees, or None where it sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def no_cuda_message() -> str:
    import torch

    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (f"gpu-check: error: no CUDA device: torch {torch.__version__} ({build}) sees no GPU here; "
            "run make gpu-check on a machine with an NVIDIA GPU and a CUDA build of torch")


def cli(command: str, *args) -> list[str]:
    """A p2ch_app command as a process of its own (the way a user runs it, process start included)."""
    return [sys.executable, "-m", "p2ch_app.cli", command, *map(str, args)]


def run(command: list, timeout: int = 300, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """(seconds, finished process); a failed command raises with its last line of output."""
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in command], cwd=PROJECT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"{' '.join(map(str, command[1:5]))} ... exited with {done.returncode}: {tail[:300]}")
    return seconds, done


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("4 passed, 1 skipped, 300 deselected in 9.1s")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", lines[-1] if lines else "")
    return {name.rstrip("s") if name.startswith("error") else name: int(n) for n, name in found}


def step_cuda_tests(check: Check) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests",
               "--basetemp", check.work / "pytest"]
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in command], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    counts = pytest_counts(done.stdout)
    ok = done.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {"ok": ok, "seconds": time.perf_counter() - start, **{k: counts.get(k, 0) for k in (
        "passed", "failed", "skipped", "error")}}


def book_model(prefix: str) -> Path:
    found = sorted(BOOK_MODELS.glob(f"{prefix}_*.state"))
    if not REAL_CT.is_dir() or not REFERENCE.is_file() or not found:
        raise Skipped(f"the real CT, its reference candidates or the book's models are absent under {SHARED}")
    return found[0]


def analyze_command(check: Check, *extra) -> list[str]:
    """nodule-analyze on the real CT with the book's models on the first GPU."""
    return cli("nodule-analyze", "--ct", REAL_CT, "--seg-model", book_model("seg"), "--cls-model", book_model("cls"),
               "--device", check.device, "--runs-dir", check.work / "runs", *extra)


def step_golden(check: Check, fast: bool) -> dict:
    """Every candidate of the real CT (--keep-outside --threshold 0) beside the book's; with fast, also the
    detections (probability > 0.5) matched within 1 mm, as --fast may move a centre by a voxel."""
    from p2ch_app.evaluation.reference import compare, read_candidates

    out = check.work / ("fast.csv" if fast else "exact.csv")
    seconds, _ = run(analyze_command(check, "--keep-outside", "--threshold", 0, "--output", out,
                                     *(["--fast"] if fast else [])))
    ours, reference = read_candidates(out), read_candidates(REFERENCE)
    same = compare(ours, reference)
    figures = {"ok": True if fast else same.exact(PROB_TOLERANCE), "seconds": seconds, "candidates": same.ours,
               "book_candidates": same.reference, "unmatched_0.01mm": same.unmatched,
               "voxels_equal": same.voxels_equal, "max_centre_mm": same.max_centre_mm,
               "max_prob_diff": same.max_prob_diff}
    if fast:
        near = compare(ours, reference, tolerance_mm=1.0)
        figures.update(detections=near.our_detections, book_detections=near.reference_detections,
                       lost_detections=near.lost_detections, extra_detections=near.extra_detections,
                       max_prob_diff_1mm=near.max_prob_diff)
    return figures


def step_command_time(check: Check, runs: int = 3) -> dict:
    """The default command, as a user runs it: whole-process seconds."""
    seconds = [run(analyze_command(check))[0] for _ in range(runs)]
    return {"ok": True, "median_s": statistics.median(seconds), "runs_s": [round(s, 2) for s in seconds]}


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so a time covers it (nothing to wait for on a CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_analyses(ct, models, settings, device, runs: int) -> list[float]:
    """Seconds of analyze(), runs + 1 times: the first warms up (CUDA context, cuDNN plans)."""
    from p2ch_app.inference.pipeline import analyze

    seconds = []
    for _ in range(runs + 1):
        synchronize(device)
        start = time.perf_counter()
        analyze(ct, models, settings, device)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def step_analysis_time(check: Check, runs: int = 3) -> dict:
    """analyze() alone, the CT read and the models on the GPU: default options, a batch of 64 crops, and
    --fast with it. The goal is for the default options."""
    import torch

    from p2ch_app.data.ct import load_ct
    from p2ch_app.inference.pipeline import AnalysisSettings, load_models

    seg, cls, device = book_model("seg"), book_model("cls"), torch.device(check.device)
    start = time.perf_counter()
    ct = load_ct(REAL_CT)
    figures = {"ok": True, "load_ct_s": time.perf_counter() - start}
    start = time.perf_counter()
    models = load_models(seg, cls, None, device)
    figures["load_models_s"] = time.perf_counter() - start
    chosen = (("default", AnalysisSettings()), ("batch64", AnalysisSettings(batch_size=64)),
              ("fast_batch64", AnalysisSettings(batch_size=64, fast=True)))
    for name, settings in chosen if device.type == "cuda" else chosen[:1]:
        seconds = timed_analyses(ct, models, settings, device, runs)
        figures[f"{name}_first_s"], figures[f"{name}_median_s"] = seconds[0], statistics.median(seconds[1:])
    if device.type == "cuda":
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del models
        torch.cuda.empty_cache()  # the trainers that follow run in processes of their own
    figures[f"goal_{ANALYSIS_GOAL_S:g}s_met"] = figures["default_median_s"] <= ANALYSIS_GOAL_S
    return figures


def step_serve_predict(check: Check, clients: int = 16, seconds: float = 10.0) -> dict:
    """nodule-serve on the device with the book's classifier: /predict (the book's protocol) from
    `clients` concurrent clients for `seconds`, its batches on the GPU; the answer matches the book's
    computation on the CPU within PROB_TOLERANCE, and nothing is refused."""
    import numpy as np
    import torch

    from p2ch_app.checkpoints import CLASSIFIER, load_model
    from p2ch_app.serve.client import Client, free_port, launch, predict_load, stop

    seg, cls = book_model("seg"), book_model("cls")
    crop = np.random.default_rng(0).normal(-600, 300, (1, 32, 48, 48)).astype(np.float32)
    with torch.no_grad():
        expected = load_model(cls, CLASSIFIER)(torch.from_numpy(crop)[None])[1][0, 1].item()
    port = free_port()
    process = launch(port, ["--device", check.device, "--seg-model", str(seg), "--cls-model", str(cls),
                            "--results-dir", str(check.work / "serve")])
    try:
        url = f"http://127.0.0.1:{port}"
        status, answer = Client(url).predict(crop)
        figures = predict_load(url, crop, clients, seconds)
    finally:
        figures_peak = stop(process)
    diff = abs(answer.get("prob_malignant", float("nan")) - expected)
    return {"ok": status == 200 and diff <= PROB_TOLERANCE and figures["refused_503"] == 0, "clients": clients,
            "prob_diff_to_cpu": diff, **figures, "server_peak_rss_gib": figures_peak}


def make_tiny_data(check: Check) -> Path:
    """Six small synthetic chest CTs (128x128 slices, a whole chest across) and their cache."""
    root = check.work / "luna"
    run(cli("luna-synth", "--data-root", root, "--series", 6, "--subsets", 2, "--seed", 0, "--matrix", 128,
            "--inplane-mm", 2.4, 2.8, "--slice-mm", 2.5, 3.0, "--workers", 4))
    run(cli("luna-prep", "--data-root", root, "--workers", 4))
    return root


def only_run(runs: Path, command: str) -> Path:
    (found,) = (runs / command).iterdir()
    return found


def step_amp_trainers(check: Check, root: Path) -> dict:
    """Each trainer for one epoch of 256 samples on CUDA; AMP shows as the gradient scaler's state."""
    from p2ch_app.checkpoints import load_checkpoint

    runs, figures = check.work / "amp-runs", {"ok": True}
    for command, short in (("luna-train-cls", "cls"), ("luna-train-seg", "seg"), ("luna-finetune-mal", "mal")):
        extra = ["--from", only_run(runs, "luna-train-cls") / "best.pt"] if short == "mal" else []
        seconds, _ = run(cli(command, "--data-root", root, *TRAIN, "--device", check.device, "--runs-dir", runs,
                             *extra))
        last = load_checkpoint(only_run(runs, command) / "last.pt")
        amp = "scale" in last["scaler_state"]
        figures.update({f"{short}_s": seconds, f"{short}_samples_per_s": last["timing"]["train_samples_per_s"],
                        f"{short}_loader_wait_share": last["timing"]["loader_wait_share"], f"{short}_amp": amp})
        figures["ok"] = figures["ok"] and amp
    return figures


def step_ddp(check: Check, root: Path) -> dict:
    """luna-train-cls under torchrun with a rank per GPU (one GPU: a one-rank NCCL group, still DDP)."""
    from p2ch_app.checkpoints import load_checkpoint

    runs, gpus = check.work / "ddp-runs", check.gpus
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", gpus,
               *cli("luna-train-cls", "--data-root", root, *TRAIN, "--device", check.device, "--runs-dir", runs)[1:]]
    seconds, done = run(command, env={"NCCL_DEBUG": "VERSION"})
    version = re.search(r"NCCL version (\S+)", done.stdout + done.stderr)
    folders = list((runs / "luna-train-cls").iterdir())
    last = load_checkpoint(folders[0] / "last.pt")
    return {"ok": len(folders) == 1 and last["samples_seen"] == 256 // gpus * gpus, "gpus": gpus, "seconds": seconds,
            "nccl": version.group(1) if version else "not printed", "samples_per_s":
            last["timing"]["train_samples_per_s"], "run_folders": len(folders)}


def step_train_stages(check: Check, root: Path, samples: int = 2048, loader_samples: int = 3000) -> dict:
    """Where each trainer's time goes on this device, at batch sizes a GPU is given (64 crops, 32 patches)."""
    from train_stages import StageRun, measure

    figures = {"ok": True}
    for kind, batch in (("cls", 64), ("seg", 32), ("mal", 64)):
        found = measure(StageRun(kind, root, batch, samples=samples, loader_samples=loader_samples, val_stride=3,
                                 device=check.device, runs_dir=check.work / "stage-runs"))
        figures.update({f"{kind}_{k}": found[k] for k in ("whole", "loader_w2", "augment", "compute", "limit")})
        figures[f"{kind}_gpu_waits_share"] = max(0.0, 1 - found["whole"] / found["compute"])
    return figures


def attempt(name: str, step) -> dict:
    """One step's figures, with its status: pass, FAIL (with the problem) or skip (with the reason)."""
    print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        figures = step()
        status = "pass" if figures.pop("ok") else "FAIL"
    except Skipped as why:
        figures, status = {"reason": str(why)}, "skip"
    except Exception as err:  # a failed step is a finding; the other steps still run
        figures, status = {"problem": f"{type(err).__name__}: {err}"[:400]}, "FAIL"
    figures = {"status": status, "step_s": time.perf_counter() - start, **figures}
    print(f"{name}: {format_figures(figures)}", flush=True)
    return figures


def format_figures(figures: dict) -> str:
    shown = {k: v for k, v in figures.items() if k != "status"}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def table(results: dict) -> str:
    """The compact table printed at the end: one row per step."""
    device = results["device"]
    lines = [f"gpu-check on {device['gpus']}x {device['gpu']}, torch {device['torch']}, CUDA {device['cuda']}: "
             f"{results['total_s']:.0f} s in all (budget {BUDGET_S} s)", f"{'step':<18}{'status':<8}figures"]
    for name, figures in results["steps"].items():
        shown = format_figures({k: v for k, v in figures.items() if k != "step_s"})
        lines.append(f"{name:<18}{figures['status']:<8}{shown}")
    return "\n".join(lines)


def steps(check: Check) -> list:
    data = {}

    def tiny_data() -> Path:
        if "root" not in data:
            data["root"] = make_tiny_data(check)
        return data["root"]

    return [("cuda_tests", lambda: step_cuda_tests(check)),
            ("golden_exact", lambda: step_golden(check, fast=False)),
            ("golden_fast", lambda: step_golden(check, fast=True)),
            ("real_ct_command", lambda: step_command_time(check)),
            ("real_ct_analysis", lambda: step_analysis_time(check)),
            ("serve_predict", lambda: step_serve_predict(check)),
            ("amp_trainers", lambda: step_amp_trainers(check, tiny_data())),
            ("train_stages", lambda: step_train_stages(check, tiny_data())),
            ("ddp_nccl", lambda: step_ddp(check, tiny_data()))]


def parse_args(argv: list[str]) -> argparse.Namespace:
    known = [name for name, _ in steps(Check(Path()))]
    parser = argparse.ArgumentParser(prog="gpu_check.py", description="make gpu-check: figures only a CUDA GPU gives.")
    parser.add_argument("steps", nargs="*", metavar="STEP", help=f"run only these: {', '.join(known)}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: rehearse the steps without a GPU, to check this script itself")
    args = parser.parse_args(argv)
    unknown = [name for name in args.steps if name not in known]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device_name, wanted = args.device, args.steps
    device = cuda_device() if device_name == "cuda" else {"gpu": "none (a CPU rehearsal)", "gpus": 1,
                                                           "torch": "-", "cuda": None, "cudnn": None}
    if device is None:
        print(no_cuda_message(), file=sys.stderr)
        return 2
    start = time.perf_counter()
    check = Check(Path(tempfile.mkdtemp(prefix="gpu-check-")), device_name, device["gpus"])
    try:
        results = {"device": device, "when": datetime.now().isoformat(timespec="seconds"),
                   "steps": {name: attempt(name, step) for name, step in steps(check) if not wanted or name in wanted}}
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - start
    print(table(results))
    if device_name == "cuda" and not wanted:  # only a whole check on a GPU replaces the saved figures
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {RESULTS}")
    return 0 if all(f["status"] != "FAIL" for f in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
