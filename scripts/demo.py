"""`make demo`: the whole pipeline on the synthetic demo dataset, command by command.

Each step is the command a user would type; it is printed before it runs. Re-running is cheap:
luna-prep only builds what is missing, and an existing demo dataset is kept.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/demo.toml"
DATA_ROOT = Path("data-unversioned/demo")
RUNS = Path("runs")
BIN = Path(sys.executable).parent


def step(*args: str) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    done = subprocess.run([str(BIN / args[0]), *args[1:]])
    if done.returncode != 0:
        sys.exit(f"demo stopped: {args[0]} failed with exit code {done.returncode}")


def newest(folder: Path) -> Path:
    return max(folder.iterdir(), key=lambda p: p.stat().st_mtime)


def main() -> None:
    start = time.monotonic()
    if (DATA_ROOT / "candidates.csv").is_file():
        print(f"demo dataset already in {DATA_ROOT} (make clean to regenerate it)")
    else:
        step("luna-synth", "--config", CONFIG)
    step("luna-prep", "--config", CONFIG)
    step("luna-train-seg", "--config", CONFIG, "--comment", "demo")
    step("luna-train-cls", "--config", CONFIG, "--comment", "demo")
    classifier = newest(RUNS / "luna-train-cls") / "best.pt"
    step("luna-finetune-mal", "--config", CONFIG, "--from", str(classifier), "--comment", "demo")
    step("nodule-analyze", "--validation", "--config", CONFIG, "--comment", "demo")
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s. The dataset is in {DATA_ROOT}, its cache in "
          f"{DATA_ROOT / 'cache'}, the trained models and the evaluation in {RUNS}/.\n"
          "See the training curves and the FROC curve with:  make tensorboard   (then open http://localhost:6006)\n"
          f"Analyse one scan:  .venv/bin/nodule-analyze --ct PATH --report report/   (or a series UID with "
          f"--data-root {DATA_ROOT})")


if __name__ == "__main__":
    main()
