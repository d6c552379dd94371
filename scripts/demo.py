"""`make demo`: the whole pipeline on the synthetic demo dataset, command by command.

Each step is the command a user would type; it is printed before it runs. Re-running is cheap:
luna-prep only builds what is missing, and an existing demo dataset is kept.

Both networks start from the book's published checkpoints when they are found (P2CH_PRETRAINED,
default ../shared/models/book): a few minutes of CPU are far too few to learn nodules from random
weights. From random weights the demo's U-Net left 7 of the 22 validation nodules without a
candidate (CPM 0.59); one run fine-tuned from the book's left 2 to 6, by training seed. So each
network is then trained twice, with seeds N and N + 1000, and the two runs' weights are averaged
(luna-average): the averaged U-Nets left 1 to 3 (docs/experiments.md). The classifier also learns
from the U-Net's own candidates away from the nodules (--mine-with, in every other training CT):
diaphragm domes and heart borders, which candidates.csv lacks, were its most confident false
positives. The demo's CTs have ~1.3 mm pixels, twice LUNA16's, so the classifier's crops are zoomed
2x in-plane (crop_zoom in configs/demo.toml): the book's classifier then sees nodules at the size it
learnt them.

Malignancy needs more nodules than the 57 of the training series: the malignancy model is fine-tuned
on a nodule-rich set of its own (8 nodules per series, luna-synth --nodules), and scored on a
further nodule-rich set that nothing was trained or selected on (docs/experiments.md).

Independent commands run side by side, each with its share of the cores (on 2 cores, one thread
each): the two runs of each network. On 2 cores the U-Nets' runs finish 1.28x and the classifiers' 1.2x
sooner than one after the other with two threads each (docs/benchmarks.md). Their output goes to log
files under runs/demo-logs/; the demo prints each one's summary lines. The evaluations share out their
series among one process per core (torchrun), one evaluation after the other.

`make demo SEED=N` trains all three models with training seed N (the dataset stays the same):
results vary a little with the seed, and with the CPU, whose float kernels differ.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from p2ch_app.inference.distributed import cpu_threads, usable_cores

CONFIG = "configs/demo.toml"
DATA_ROOT = Path("data-unversioned/demo")
# the malignancy sets: (data root, series, seed); luna-finetune-mal trains on the first
MALIGNANCY_SET = (Path("data-unversioned/demo-malignancy"), 32, 2)
FURTHER_SET = (Path("data-unversioned/demo-further"), 12, 3)
NODULES_PER_SERIES = 8
RUNS = Path("runs")
BIN = Path(sys.executable).parent
PRETRAINED = Path(os.environ.get("P2CH_PRETRAINED", "../shared/models/book"))
SECOND_SEED = 1000  # each averaged network's second run: seed N + 1000, so no two demo seeds share a run
LOGS = RUNS / "demo-logs"
MINE_WORKERS = "2"  # processes mining with the U-Net, each with its share of the cores
PROGRESS_BAR = re.compile(r"\d+%\|")
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between its nested bars
HEARTBEAT_S = 30  # how often side-by-side runs' progress is shown
EVAL_RANKS = 4  # at most this many processes share an evaluation's 10-12 series


def step(*args: str, ranks: int = 1) -> None:
    """Run one command, printed first; with ranks > 1, as that many processes under torchrun."""
    shown, launch, env = list(args), [str(BIN / args[0]), *args[1:]], None
    if ranks > 1:
        torchrun = ["--standalone", f"--nproc-per-node={ranks}"]
        shown = ["torchrun", *torchrun, *shown]
        launch = [sys.executable, "-m", "torch.distributed.run", *torchrun, *launch]
        # torchrun would set (and announce) one thread per process: each takes its share of the cores
        env = {**os.environ, "OMP_NUM_THREADS": str(cpu_threads(ranks))}
    print(f"\n$ {' '.join(shown)}", flush=True)
    done = subprocess.run(launch, env=env)
    if done.returncode != 0:
        sys.exit(f"demo stopped: {args[0]} failed with exit code {done.returncode}")


def together(*commands: tuple[str, ...]) -> None:
    """Run the commands at once, each with an equal share of the cores, output in a log file each;
    then print each log's lines that are not progress bars. Stop the demo if one fails."""
    LOGS.mkdir(parents=True, exist_ok=True)
    threads = str(cpu_threads(len(commands)))
    running = []
    for number, args in enumerate(commands, 1):
        log = LOGS / f"{time.strftime('%Y-%m-%d_%H.%M.%S')}-{number}-{args[0]}.log"
        print(f"\n$ {' '.join(args)}   (side by side, {threads} thread(s), output in {log})", flush=True)
        with open(log, "w") as out:
            running.append((args, log, subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=out,
                                                        stderr=subprocess.STDOUT,
                                                        env={**os.environ, "OMP_NUM_THREADS": threads})))
    shown = time.monotonic()
    while any(process.poll() is None for _, _, process in running):
        time.sleep(0.5)
        if time.monotonic() - shown >= HEARTBEAT_S:
            shown = time.monotonic()
            print("  " + "   ".join(f"[{n}] {_last_line(log)}" for n, (_, log, _) in enumerate(running, 1)),
                  flush=True)
    failed = [(args, log) for args, log, process in running if process.wait() != 0]
    for args, log, _ in running:
        lines = [line.rsplit("\r", 1)[-1].strip() for line in _read(log).splitlines()]
        print(f"\n{args[0]} ({log}):\n" + "\n".join(line for line in lines if line and not PROGRESS_BAR.search(line)))
    if failed:
        sys.exit(f"demo stopped: {failed[0][0][0]} failed; see {failed[0][1]}")


def _read(log: Path) -> str:
    return TERMINAL_CODES.sub("", log.read_text(errors="replace"))


def _last_line(log: Path) -> str:
    """What a log's progress bar or last line says now, shortened to fit beside another."""
    text = _read(log).rstrip()
    return text.rsplit("\n", 1)[-1].rsplit("\r", 1)[-1].strip()[:70]


def evaluate(*commands: tuple[str, ...]) -> None:
    """The evaluations. On CPUs, one after the other, each with its series shared out among one process
    per core (torchrun, up to EVAL_RANKS): side by side, the shorter one left a core idle for its last
    ~40 s. With CUDA, side by side: a torchrun rank takes the GPU of its local rank, which one GPU
    lacks for rank 1."""
    ranks = min(usable_cores(), EVAL_RANKS)
    if torch.cuda.is_available() or ranks < 2:
        together(*commands)
        return
    for command in commands:
        step(*command, ranks=ranks)


@contextlib.contextmanager
def timed(stage: str, times: dict[str, float]) -> Iterator[None]:
    """times[stage]: the seconds the block took. The demo's last line lists them: a shared or cloud
    machine's speed drifts (ours by up to 25% within hours), and the stages tell that from more work."""
    start = time.monotonic()
    try:
        yield
    finally:
        times[stage] = time.monotonic() - start


def newest(folder: Path, comment: str) -> Path:
    """The newest run folder of a command with this run comment."""
    return max((p for p in folder.iterdir() if p.name.endswith(f"-{comment}")),
               key=lambda p: p.stat().st_mtime)


def pretrained(prefix: str) -> list[str]:
    """--init with the book's published checkpoint for this model, or nothing when it is absent."""
    found = sorted(PRETRAINED.glob(f"{prefix}_*.state")) if PRETRAINED.is_dir() else []
    if found:
        print(f"starting from the published weights {found[-1]}", flush=True)
        return ["--init", str(found[-1])]
    print(f"no published {prefix}_*.state in {PRETRAINED} (set P2CH_PRETRAINED=DIR to point at the book's "
          "checkpoints); training from random weights, which gives a far weaker demo", flush=True)
    return []


def trained_as(comment: str, seed: int | None) -> list[str]:
    """A trainer's options: the demo config, a run comment, and a seed (None: the config's, 0)."""
    return ["--config", CONFIG, "--comment", comment] + ([] if seed is None else ["--seed", str(seed)])


def train_averaged(command: str, comment: str, seed: int | None, init: list[str], extra: tuple[str, ...] = ()) -> Path:
    """The mean of two runs of `command` fine-tuned from the book's weights with seeds N and N + SECOND_SEED
    (luna-average). What one short run learns of the small nodules hangs on its seed; the mean of two
    much less so. Runs from random weights do not average, so without `init` one run is the model."""
    if not init:
        step(command, *trained_as(comment, seed), *extra)
        return newest(RUNS / command, comment) / "best.pt"
    together((command, *trained_as(comment, seed), *extra, *init),
             (command, *trained_as(f"{comment}-b", (seed or 0) + SECOND_SEED), *extra, *init))
    first, second = (newest(RUNS / command, name) / "best.pt" for name in (comment, f"{comment}-b"))
    averaged = RUNS / "luna-average" / f"{command}-{first.parent.name}.pt"
    step("luna-average", str(first), str(second), "--output", str(averaged))
    return averaged


def make_dataset(*options: str) -> None:
    """luna-synth (unless the data root already holds a dataset) and luna-prep, with the demo config."""
    root = Path(options[options.index("--data-root") + 1]) if "--data-root" in options else DATA_ROOT
    if (root / "candidates.csv").is_file():
        print(f"demo dataset already in {root} (make clean to regenerate it)")
    else:
        step("luna-synth", "--config", CONFIG, *options)
    step("luna-prep", "--config", CONFIG, "--data-root", str(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="training seed of all three models [config's: 0]")
    seed = parser.parse_args().seed
    comment = "demo" if seed is None else f"demo-seed{seed}"
    trained = trained_as(comment, seed)
    start, times = time.monotonic(), {}
    with timed("data", times):
        make_dataset()
        for root, series, data_seed in (MALIGNANCY_SET, FURTHER_SET):
            make_dataset("--data-root", str(root), "--series", str(series), "--seed", str(data_seed),
                         "--nodules", str(NODULES_PER_SERIES))
    with timed("U-Nets", times):
        segmenter = train_averaged("luna-train-seg", comment, seed, pretrained("seg"))
    with timed("mining and classifiers", times):
        classifier = train_averaged("luna-train-cls", comment, seed, pretrained("cls"),
                                    ("--mine-with", str(segmenter), "--mine-workers", MINE_WORKERS))
    with timed("malignancy", times):
        step("luna-finetune-mal", *trained, "--data-root", str(MALIGNANCY_SET[0]), "--from", str(classifier))
    models = ("--seg-model", str(segmenter), "--cls-model", str(classifier),
              "--mal-model", str(newest(RUNS / "luna-finetune-mal", comment) / "best.pt"))
    with timed("evaluations", times):
        evaluate(("nodule-analyze", "--validation", "--config", CONFIG, "--comment", comment, *models),
                 ("nodule-analyze", "--validation", "--include-train", "--config", CONFIG, "--data-root",
                  str(FURTHER_SET[0]), "--comment", f"{comment}-further", *models))
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in times.items())
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s ({stages}). The dataset is in {DATA_ROOT}, "
          f"its cache in {DATA_ROOT / 'cache'}, the trained models and the evaluation in {RUNS}/.\n"
          "See the training curves and the FROC curve with:  make tensorboard   (then open http://localhost:6006)\n"
          f"Analyse one scan:  .venv/bin/nodule-analyze --ct PATH --report report/   (or a series UID with "
          f"--data-root {DATA_ROOT})")


if __name__ == "__main__":
    main()
