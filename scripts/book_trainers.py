"""The book's own trainers, unmodified, on our synthetic data: their training rate beside ours (issue #36).

The book's code (github.com/deep-learning-with-pytorch/dlwpt-code: p2ch13, p2ch14, util) is not ours to
commit or edit. It lives in data-unversioned/dlwpt-code (git-ignored) and runs in a child process whose
working folder is laid out as the book expects. What today's libraries and a CPU-only machine need is
patched from here (`apply_shim`), before the book's modules are imported, never in their files.

    python scripts/book_trainers.py --book-code data-unversioned/dlwpt-code \\
        --data-root data-unversioned/book-synth --trainer cls --batch-size 24 --workers 2 --samples 480
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from p2ch_app.errors import UserError

BOOK_REPO = "https://github.com/deep-learning-with-pytorch/dlwpt-code"
BOOK_DIRS = ("p2ch13", "p2ch14", "util")
DEFAULT_BOOK_CODE = Path("data-unversioned/dlwpt-code")
# The trainer's package and its app class; both trainers' __main__ blocks are `<App>().main()`.
TRAINERS = {"cls": ("p2ch14", "ClassificationTrainingApp"), "seg": ("p2ch13", "SegmentationTrainingApp")}
# What the book's dsets.py files read, relative to the folder it runs in.
BOOK_CSV_DIR = Path("data/part2/luna")
BOOK_CT_DIR = Path("data-unversioned/part2/luna")
BOOK_CACHE_DIR = Path("data-unversioned/cache")
NEEDED_CSVS = ("candidates.csv", "annotations_with_malignancy.csv")
SCRIPTS = Path(__file__).resolve().parent
WARMUP_BATCHES = 2  # left out of the steady rate: the first passes through a network are several times slower


def get_instructions(book_code: Path) -> str:
    return (f"git clone {BOOK_REPO} && python scripts/book_trainers.py --install-from dlwpt-code/.git "
            f"--book-code {book_code} --data-root ... (or: git -C dlwpt-code archive HEAD {' '.join(BOOK_DIRS)} "
            f"| tar -x -C {book_code}, and its commit in {book_code}/COMMIT)")


def install_book_code(git_dir: Path, book_code: Path) -> str:
    """Copy the book's trainers out of a clone (or bare mirror) of its repository; returns the commit."""
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    book_code.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit, *BOOK_DIRS], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(book_code)], input=archive, check=True)
    (book_code / "COMMIT").write_text(commit + "\n")
    return commit


# ---- the shim: runs in the child process, before any of the book's modules is imported ----

def _stay_on_cpu(tensor, *args, **kwargs):
    return tensor


def _linspace_with_default_steps(linspace):
    def with_default_steps(start, end, steps=100, **kwargs):
        return linspace(start, end, steps, **kwargs)
    return with_default_steps


def apply_shim() -> list[str]:
    """Patch what the book's code (late 2020: torch 1.7, diskcache 4, numpy 1.19) needs today; returns
    what it patched. Each patch is the smallest that lets the book's own lines run as written."""
    import diskcache.core
    import torch

    patched = []
    # util/disk.py does `from diskcache.core import BytesType, MODE_BINARY, BytesIO`; diskcache 5 dropped
    # its Python 2 aliases BytesType (= bytes) and BytesIO (= io.BytesIO), so the import fails.
    for name, value in (("BytesType", bytes), ("BytesIO", io.BytesIO)):
        if not hasattr(diskcache.core, name):
            setattr(diskcache.core, name, value)
            patched.append(f"diskcache.core.{name}")
    # p2ch14/model.py's augment3d (called on every training batch) moves its affine matrix with an
    # unconditional `.cuda()`; without a GPU that raises. On a CPU-only machine the tensor stays put.
    # (numpy 2 brought np.bool back, which p2ch13/dsets.py uses; np.int is only in p2ch14's
    # nodule_analysis, which is not run here, so numpy needs no patch.)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = _stay_on_cpu
        patched.append("torch.Tensor.cuda (no-op without a GPU)")
    # The book's DataLoader workers must see these patches, so they are forked from this process, as
    # they were on Linux in 2020; Python 3.14 made forkserver Linux's default, which would re-import
    # the book's modules unpatched in each worker.
    if sys.platform == "linux" and multiprocessing.get_start_method() != "fork":
        multiprocessing.set_start_method("fork", force=True)
        patched.append("multiprocessing start method: fork")
    # p2ch14/training.py's logMetrics calls torch.linspace(1, 0) for its ROC thresholds; torch < 2.0
    # defaulted steps to 100 (with a deprecation warning), torch 2 requires it.
    try:
        torch.linspace(1, 0)
    except TypeError:
        torch.linspace = _linspace_with_default_steps(torch.linspace)
        patched.append("torch.linspace (steps=100 by default)")
    return patched


def cap_epoch(dataset_cls: type, samples: int) -> None:
    """The book's balanced training sets claim a fixed epoch (p2ch14: 50,000 samples, p2ch13: 300,000)
    and draw from their lists modulo their lengths; cap that claim so that one epoch is `samples`."""
    claimed = dataset_cls.__len__
    dataset_cls.__len__ = lambda self: min(claimed(self), samples)


def run_book_module(module: str, argv: list[str]) -> None:
    """`python -m <module> <argv>` with the shim applied first (the child of a prepcache run)."""
    import runpy

    apply_shim()
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _timed_epoch(app, train_dl) -> tuple[float, list[float], object]:
    """The book's doTraining for epoch 1, timed whole, with the time each batch's step began."""
    batch_starts = []
    compute = app.computeBatchLoss

    def noting_start(*args, **kwargs):
        batch_starts.append(time.perf_counter())
        return compute(*args, **kwargs)

    app.computeBatchLoss = noting_start
    start = time.perf_counter()
    metrics = app.doTraining(1, train_dl)
    end = time.perf_counter()
    return end - start, [end - t for t in batch_starts], metrics


def train_here(trainer: str, argv: list[str], samples: int, result_file: str) -> None:
    """One training epoch of the book's trainer in this process (a child run in the laid-out folder).

    This is the book's `main()` up to its first epoch's training metrics: the app built from its own
    command line, its training DataLoader, `doTraining` (the one thing timed) and `logMetrics('trn')`.
    Validation, `saveModel` and p2ch13's `logImages` are left out: they are not the training rate, and
    p2ch13's validation and images assume 512x512 slices, which demo-size data does not have."""
    import importlib

    patched = apply_shim()
    package, app_name = TRAINERS[trainer]
    training = importlib.import_module(f"{package}.training")
    app = getattr(training, app_name)(argv)
    train_dl = app.initTrainDl()
    cap_epoch(type(train_dl.dataset), samples)
    seconds, left_at_batch, metrics = _timed_epoch(app, train_dl)
    app.logMetrics(1, "trn", metrics)
    app.trn_writer.close()
    app.val_writer.close()
    n = len(train_dl.dataset)
    result = {"samples": n, "seconds": seconds, "loss": float(metrics[training.METRICS_LOSS_NDX].detach().mean()),
              "patched": patched}
    if len(left_at_batch) > WARMUP_BATCHES + 1:  # from the third batch on: oneDNN's first passes are slow
        steady = n - WARMUP_BATCHES * train_dl.batch_size
        result["steady_samples_per_s"] = steady / left_at_batch[WARMUP_BATCHES]
    Path(result_file).write_text(json.dumps(result))


# ---- the parent side: layout, cache, timing ----

def _relink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _data_stamp(data_root: Path) -> str:
    """The data root and its CSVs' sizes and times: the book's cache keys hold only series uids and
    centres, so a cache filled from other data would be served as if it were this one's."""
    parts = [str(data_root)]
    for name in NEEDED_CSVS:
        st = (data_root / name).stat()
        parts.append(f"{name} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def layout(data_root: Path, work: Path) -> None:
    """Lay `work` out as the book expects to run in it: data/part2/luna/*.csv and
    data-unversioned/part2/luna/subset*/ as symlinks into data_root, its diskcache under
    data-unversioned/cache (emptied when data_root or its CSVs changed since it was filled)."""
    data_root = data_root.resolve()
    subsets = sorted(p for p in data_root.glob("subset*") if p.is_dir())
    missing = [name for name in NEEDED_CSVS if not (data_root / name).is_file()]
    if missing or not subsets:
        what = ", ".join(missing + ([] if subsets else ["subset*/"]))
        raise UserError(f"{data_root} lacks {what}; give a LUNA16-layout folder such as luna-synth writes")
    work.mkdir(parents=True, exist_ok=True)
    stamp_file, stamp = work / "data-stamp", _data_stamp(data_root)
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        shutil.rmtree(work / BOOK_CACHE_DIR, ignore_errors=True)
        shutil.rmtree(work / BOOK_CT_DIR, ignore_errors=True)
    for csv in sorted(data_root.glob("*.csv")):
        _relink(work / BOOK_CSV_DIR / csv.name, csv)
    for subset in subsets:
        _relink(work / BOOK_CT_DIR / subset.name, subset)
    (work / BOOK_CACHE_DIR).mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(stamp)


def _child(code: str, args: list[str], book_code: Path, work: Path, log: Path) -> float:
    """Run `python -c code args` in work with the book's code and this script importable; the book
    logs a line per progress step, so its output goes to `log` (appended), shown only on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(book_code.resolve()), str(SCRIPTS)]),
           "MPLBACKEND": "Agg"}  # the book's logMetrics draws a ROC figure; no display here
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"the book's code failed (exit {done.returncode}); end of {log}:\n{tail}")
    return time.perf_counter() - start


def book_cli(trainer: str, batch_size: int, workers: int, augmented: bool) -> list[str]:
    """The book's own command-line flags for one trainer. p2ch14.training has no --balanced or
    --augmented: it always trains balanced (ratio_int=1) and always augments each batch (augment3d:
    flips, a rotation about the head-foot axis), so it cannot run without augmentation."""
    flags = ["--batch-size", str(batch_size), "--num-workers", str(workers), "--epochs", "1"]
    if trainer == "cls":
        if not augmented:
            raise UserError("p2ch14.training always augments (augment3d on every batch); use augmented=True")
        return flags + ["bench"]
    return flags + (["--augmented"] if augmented else []) + ["bench"]


def book_training_rate(book_code: Path, data_root: Path, work: Path, trainer: str, batch_size: int,
                       workers: int, samples: int, augmented: bool) -> dict:
    """Training samples/s of the book's classifier (trainer "cls", p2ch14) or U-Net ("seg", p2ch13) for one
    epoch of about `samples` samples, after the book's prepcache filled its cache, so first reads are
    not timed. Returns {"skipped": reason} when the book's code is not in book_code."""
    if trainer not in TRAINERS:
        raise UserError(f"unknown trainer {trainer!r}; use one of {', '.join(TRAINERS)}")
    package = TRAINERS[trainer][0]
    if not (book_code / package / "training.py").is_file():
        return {"skipped": f"the book's code is not in {book_code}; get it with: {get_instructions(book_code)}"}
    argv = book_cli(trainer, batch_size, workers, augmented)
    work = work.resolve()  # the children run in it
    layout(data_root, work)
    log = work / f"book-{trainer}.log"
    prep_seconds = _child("import sys, book_trainers; book_trainers.run_book_module(sys.argv[1], sys.argv[2:])",
                          [f"{package}.prepcache", "--num-workers", str(workers), "--batch-size", "64"],
                          book_code, work, log)
    result_file = work / f"book-{trainer}.json"
    result_file.unlink(missing_ok=True)
    code = ("import sys, book_trainers; "
            "book_trainers.train_here(sys.argv[1], sys.argv[4:], int(sys.argv[2]), sys.argv[3])")
    _child(code, [trainer, str(samples), str(result_file), *argv], book_code, work, log)
    result = json.loads(result_file.read_text())
    commit_file = book_code / "COMMIT"
    return {"samples_per_s": result["samples"] / result["seconds"], "samples": result["samples"],
            "seconds": result["seconds"], "commit": commit_file.read_text().strip() if commit_file.is_file() else None,
            "steady_samples_per_s": result.get("steady_samples_per_s"), "module": f"{package}.training",
            "flags": argv, "loss": result["loss"], "patched": result["patched"], "prepcache_seconds": prep_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--book-code", type=Path, default=DEFAULT_BOOK_CODE,
                        help="folder holding the book's p2ch13, p2ch14, util (default: %(default)s)")
    parser.add_argument("--install-from", type=Path, metavar="GIT_DIR",
                        help="first copy the book's code into --book-code from this clone's .git (or bare mirror)")
    parser.add_argument("--data-root", type=Path, required=True, help="LUNA16-layout folder (e.g. luna-synth's)")
    parser.add_argument("--work", type=Path, help="folder the book runs in (default: <data root>-book)")
    parser.add_argument("--trainer", choices=sorted(TRAINERS), required=True,
                        help="cls: p2ch14.training; seg: p2ch13.training")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="the book's --num-workers")
    parser.add_argument("--samples", type=int, default=480, help="training samples in the timed epoch")
    parser.add_argument("--no-augment", action="store_true", help="seg only: leave out the book's --augmented")
    args = parser.parse_args()
    try:
        if args.install_from:
            print(f"book's code {install_book_code(args.install_from, args.book_code)} in {args.book_code}")
        work = args.work or args.data_root.with_name(args.data_root.name + "-book")
        print(f"running the book's trainer in {work} (its output: {work}/book-{args.trainer}.log)", file=sys.stderr)
        result = book_training_rate(args.book_code, args.data_root, work, args.trainer, args.batch_size,
                                    args.workers, args.samples, not args.no_augment)
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except RuntimeError as err:  # the book's code failed: its own output says why
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
