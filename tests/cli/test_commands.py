"""The commands through click: bad input gives one line naming problem and fix, exit 2, nothing harmed;
good input runs end to end."""

import subprocess
import sys

import pytest

from p2ch_app.cli import COMMANDS, prep
from tests.conftest import BOOK_MODELS, assert_one_line_error, requires_shared, run, snapshot


@pytest.fixture
def prepared(tiny_root):
    """A data root whose first series is already cached, so we can see that failures keep it."""
    result = run(prep, ["--data-root", tiny_root.root, "--series", tiny_root.series[0].uid, "--workers", 1])
    assert result.exit_code == 0, result.output
    return tiny_root


def break_csv(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


CASES = {
    "missing CSV": (lambda r: (r / "candidates.csv").unlink(), "candidates.csv is missing"),
    "empty CSV": (lambda r: (r / "annotations.csv").write_text(""), "annotations.csv is empty"),
    "missing field": (lambda r: break_csv(r / "candidates.csv", ",1\n", ",\n"), "field class is missing"),
    "non-numeric field": (lambda r: break_csv(r / "annotations.csv", "\n1.2.840.99.1,", "\n1.2.840.99.1,x"),
                          "annotations.csv:2: field coordX 'x"),
    "raw missing": (lambda r: (r / "subset1" / "1.2.840.99.2.raw").unlink(), "1.2.840.99.2.raw, which is missing"),
    "raw truncated": (lambda r: (r / "subset1" / "1.2.840.99.2.raw").write_bytes(b"\0" * 100), "is truncated"),
    "annotation outside CT": (lambda r: (r / "annotations.csv").write_text(
        (r / "annotations.csv").read_text() + "1.2.840.99.3,500,500,500,6\n"), "lies outside CT 1.2.840.99.3"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_keeps_data_and_cache(prepared, case):
    root = prepared.root
    breaks, message = CASES[case]
    breaks(root)
    before = snapshot(root)
    result = run(prep, ["--data-root", root, "--workers", 1])
    assert_one_line_error(result, message)
    after = snapshot(root)
    assert all(after.get(k) == v for k, v in before.items())  # new entries may appear, nothing changes


@pytest.mark.parametrize("args, message", [
    (["--data-root", "{tmp}/nowhere"], "data root {tmp}/nowhere does not exist"),
    (["--series", "1.2.840.99.9"], "series 1.2.840.99.9 is not on disk"),
    (["--series", "../subset0/1.2.840.99.1"], "'../subset0/1.2.840.99.1' is not a series UID"),
    (["--series", "1.2.*"], "'1.2.*' is not a series UID"),
    (["--config", "{tmp}/bad.toml"], "unknown key 'wokers' in [luna-prep]"),
])
def test_bad_arguments(prepared, tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("[luna-prep]\nwokers = 2\n")
    before = snapshot(prepared.root)
    args = [a.format(tmp=tmp_path) for a in args]
    result = run(prep, ["--data-root", prepared.root, *args])
    assert_one_line_error(result, message.format(tmp=tmp_path))
    assert snapshot(prepared.root) == before


def test_every_command_has_help():
    for name, command in COMMANDS.items():
        result = run(command, ["--help"])
        assert result.exit_code == 0 and "--config" in result.output and "--data-root" in result.output, name


def test_prep_into_another_cache_dir(tiny_root, tmp_path):
    result = run(prep, ["--data-root", tiny_root.root, "--cache-dir", tmp_path / "c", "--workers", 1])
    assert result.exit_code == 0, result.output
    from p2ch_app.data.cache import LunaCache

    assert len(LunaCache(tmp_path / "c", tiny_root.root).cached_uids()) == 3 and not (tiny_root.root / "cache").exists()


def test_prep_reports_what_it_built(tiny_root):
    result = run(prep, ["--data-root", tiny_root.root, "--workers", 2])
    assert result.exit_code == 0, result.output
    assert "built 3, already current 0; 3 series" in result.stdout and "MB per CT" in result.stdout
    result = run(prep, ["--data-root", tiny_root.root])
    assert "built 0, already current 3" in result.stdout


def test_synth_writes_refuses_to_overwrite_then_overwrites(tmp_path):
    from p2ch_app.cli import synth

    root = tmp_path / "synth"
    args = ["--data-root", root, "--series", 2, "--subsets", 1, "--matrix", 64, "--inplane-mm", 5, 5.5,
            "--slice-mm", 5, 5.5, "--size", "demo"]
    result = run(synth, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 synthetic series" in result.stdout
    assert len(list(root.glob("subset0/*.mhd"))) == 2 and not (root / "subset1").exists()
    mhd = next(root.glob("subset0/*.mhd"))
    assert "DimSize = 64 64" in mhd.read_text()
    before = snapshot(root)
    assert_one_line_error(run(synth, args), "already holds a dataset")
    assert snapshot(root) == before
    assert run(synth, [*args, "--overwrite", "--seed", 5, "--workers", 1]).exit_code == 0
    assert snapshot(root) != before


def test_synth_and_prep_run_without_loading_torch(tmp_path):
    """Their processes (each spawned worker imports the command again) start in a fraction of a second."""
    script = ("import sys\nfrom p2ch_app.cli import prep, synth\n"
              f"root = {str(tmp_path / 'data')!r}\n"
              "synth.main(['--data-root', root, '--series', '2', '--matrix', '64', '--inplane-mm', '5', '5.5',\n"
              "            '--slice-mm', '5', '5.5', '--workers', '2'], standalone_mode=False)\n"
              "prep.main(['--data-root', root, '--workers', '2'], standalone_mode=False)\n"
              "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 synthetic series" in done.stdout and done.stdout.rstrip().endswith("no torch")


def test_synth_rejects_an_empty_spacing_range(tmp_path):
    from p2ch_app.cli import synth

    result = run(synth, ["--data-root", tmp_path, "--inplane-mm", 0.9, 0.5])
    assert_one_line_error(result, "--inplane-mm 0.9 0.5: give 0 < MIN <= MAX")
    assert not list(tmp_path.iterdir())


def test_analyze_needs_exactly_one_input_and_trained_models(tmp_path, tiny_root):
    from p2ch_app.cli import analyze

    assert_one_line_error(run(analyze, ["--runs-dir", tmp_path]),
                          "give either a SERIES_UID, --ct PATH, --dicomweb URL or --validation")
    assert_one_line_error(run(analyze, ["--dicomweb", "http://localhost:8042/dicom-web"]),
                          "--dicomweb and --study go together")
    assert_one_line_error(run(analyze, ["1.2.3", "--store"]), "--store only goes with --dicomweb")
    assert_one_line_error(run(analyze, ["--dicomweb", "localhost:8042", "--study", "1.2", "--runs-dir", tmp_path]),
                          "no trained model")  # the models are found first; then the URL is refused (test_dicomweb)
    assert_one_line_error(run(analyze, ["1.2.3", "--ct", tiny_root.series[0].mhd]), "exactly one")
    assert_one_line_error(run(analyze, ["--ct", tiny_root.series[0].mhd, "--runs-dir", tmp_path]),
                          "train one with luna-train-seg")
    assert_one_line_error(run(analyze, ["../subset0/x", "--data-root", tiny_root.root, "--seg-model", "a.pt",
                                        "--cls-model", "b.pt"]), "is not a series UID")
    assert_one_line_error(run(analyze, ["--ct", tiny_root.series[0].mhd, "--output", tmp_path / "out.txt"]),
                          "use a .json or .csv file name")
    assert_one_line_error(run(analyze, ["--ct", tiny_root.series[0].mhd, "--submission", tmp_path / "sub.json"]),
                          "--submission {}: use a .csv file name".format(tmp_path / "sub.json"))
    assert_one_line_error(run(analyze, ["--ct", tiny_root.series[0].mhd, "--submission", tmp_path / "a.csv",
                                        "--output", tmp_path / "a.csv"]), "give them different files")


@requires_shared
def test_analyze_a_synthetic_series_with_the_book_models(prepared_synth, tmp_path):
    import csv
    import json

    from p2ch_app.cli import analyze
    from p2ch_app.data.index import build_index

    uid = build_index(prepared_synth).series_uids[0]
    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    common = [uid, "--data-root", prepared_synth, "--seg-model", seg, "--cls-model", cls, "--runs-dir", tmp_path,
              "--threshold", 0.0]
    result = run(analyze, [*common, "--output", tmp_path / "out.json", "--report", tmp_path / "report"])
    assert result.exit_code == 0, result.output
    assert f"{uid}: " in result.stdout and "rank" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == [f"{i:03d}.png" for i in range(1, len(report["detections"]) + 1)]
    assert 'src="001.png"' in (tmp_path / "report" / "index.html").read_text()
    assert_one_line_error(run(analyze, [*common, "--report", tmp_path / "report"]), "is not empty")
    assert report["series_uid"] == uid and report["models"]["seg"] == str(seg) and report["models"]["mal"] is None
    assert run(analyze, [*common, "--output", tmp_path / "out.csv"]).exit_code == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report["detections"])
    for row, detection in zip(rows, report["detections"]):
        assert row["series_uid"] == uid and float(row["nodule_prob"]) == pytest.approx(detection["nodule_prob"])
    # the submission holds every candidate, whatever --threshold; --ct names the series by its file
    mhd = next(prepared_synth.glob(f"subset*/{uid}.mhd"))
    for source in ([uid, "--data-root", prepared_synth], ["--ct", mhd]):
        result = run(analyze, [*source, *common[1:-2], "--threshold", 0.99, "--submission", tmp_path / "sub.csv"])
        assert result.exit_code == 0, result.output
        lines = (tmp_path / "sub.csv").read_text().splitlines()
        assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability" and len(lines) == len(rows) + 1
        for line, row in zip(lines[1:], rows):
            assert line.split(",") == [uid, row["x_mm"], row["y_mm"], row["z_mm"], row["nodule_prob"]]
    probs = [d["nodule_prob"] for d in report["detections"]]
    assert probs == sorted(probs, reverse=True)
    # the book classifier stands in as a malignancy model; outside-body candidates are kept
    result = run(analyze, [*common, "--mal-model", cls, "--keep-outside", "--batch-size", 4, "--device", "cpu",
                           "--output", tmp_path / "all.json"])
    assert result.exit_code == 0, result.output
    everything = json.loads((tmp_path / "all.json").read_text())
    assert len(everything["detections"]) >= len(report["detections"])
    assert all(d["malignancy_prob"] is not None for d in everything["detections"])
    assert everything["models"]["mal"] == str(cls)


@requires_shared
def test_analyze_validation_scores_the_validation_series(prepared_synth, tmp_path):
    import csv
    import json

    from p2ch_app.cli import analyze
    from p2ch_app.data.index import build_index

    index = build_index(prepared_synth)
    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    args = ["--validation", "--val-stride", 3, "--data-root", prepared_synth, "--seg-model", seg, "--cls-model", cls,
            "--mal-model", cls, "--runs-dir", tmp_path / "runs", "--comment", "check", "--threshold", 0.3]
    result = run(analyze, args)
    assert result.exit_code == 0, result.output
    assert "Complete miss" in result.stdout and "CPM " in result.stdout and "diameter-only baseline" in result.stdout
    run_dir = next((tmp_path / "runs" / "nodule-analyze").glob("*-check"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    uids = [u for u, v in zip(index.series_uids, index.validation_series(3)) if v]
    assert metrics["series"] == uids and metrics["scans"] == len(uids)
    assert metrics["tta"] is metrics["dedupe"] is metrics["split"] is metrics["recentre"] is False
    assert metrics["nodules"] == int(sum(index.for_series(u).has_annotation.sum() for u in uids))
    table = metrics["confusion"]
    assert sum(table["Benign"].values()) + sum(table["Malignant"].values()) == metrics["nodules"]
    assert 0 <= metrics["cpm"] <= 1 and f"CPM {metrics['cpm']:.3f}" in result.stdout
    assert (run_dir / "froc.png").stat().st_size > 1000 and list(run_dir.glob("events.out.tfevents.*"))
    with open(run_dir / "detections.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["series_uid"] for r in rows} <= set(uids) and all(r["inside_body"] == "True" for r in rows)
    assert_one_line_error(run(analyze, ["--validation", "--ct", "x"]), "exactly one")
    assert_one_line_error(run(analyze, [uids[0], "--include-train"]), "--include-train only goes with --validation")
    # every series, with a report per series under one index
    args = [*args[:-2], "--comment", "all", "--include-train", "--report", tmp_path / "report", "--tta", "--dedupe",
            "--split", "--lung-only", "--recentre", "--submission", tmp_path / "submission.csv"]
    assert run(analyze, args).exit_code == 0
    metrics = json.loads((next((tmp_path / "runs" / "nodule-analyze").glob("*-all")) / "metrics.json").read_text())
    assert metrics["series"] == index.series_uids and metrics["include_train"] is True and metrics["tta"] is True
    assert metrics["dedupe"] is metrics["split"] is metrics["lung_only"] is metrics["recentre"] is True
    top = (tmp_path / "report" / "index.html").read_text()
    assert all(f"{uid}/index.html" in top and (tmp_path / "report" / uid / "index.html").is_file()
               for uid in index.series_uids)
    for uid in index.series_uids:  # the viewer files per series (tests/inference/test_viewer.py reads them back)
        assert {"detections.mrk.json", "candidates.nii.gz", "lungs.nii.gz"} <= {
            p.name for p in (tmp_path / "report" / uid).iterdir()}
    with open(next((tmp_path / "runs" / "nodule-analyze").glob("*-all")) / "detections.csv", newline="") as f:
        every = list(csv.DictReader(f))
    with open(tmp_path / "submission.csv", newline="") as f:
        submitted = list(csv.DictReader(f))
    assert len(submitted) == len(every) and {r["seriesuid"] for r in submitted} == set(index.series_uids)
    assert [float(r["probability"]) for r in submitted] == [float(r["nodule_prob"]) for r in every]
    assert metrics["excluded_findings"] > 0  # luna-synth's annotations_excluded.csv reached the score


@requires_shared
def test_analyze_lung_only_without_lungs_says_so_and_keeps_the_candidates(tmp_path):
    """An abdomen-only CT: --lung-only finds no lungs, prints one note and keeps what the body mask keeps."""
    import json

    from p2ch_app.cli import analyze
    from tests.conftest import write_image
    from tests.inference.test_lungs import no_lungs

    ct = no_lungs("abdomen")
    mhd = write_image(tmp_path / "abdomen.mhd", ct.hu, tuple(ct.geometry.spacing), tuple(ct.geometry.origin))
    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    common = ["--ct", mhd, "--seg-model", seg, "--cls-model", cls, "--runs-dir", tmp_path, "--threshold", 0.0]
    plain = run(analyze, [*common, "--output", tmp_path / "plain.json"])
    lung_only = run(analyze, [*common, "--lung-only", "--output", tmp_path / "lung.json"])
    assert plain.exit_code == lung_only.exit_code == 0, lung_only.output
    notes = [line for line in lung_only.stderr.splitlines() if "note:" in line]
    assert notes == ["nodule-analyze: note: no lungs found in abdomen; keeping its candidates inside the body"]
    assert "note:" not in plain.stderr
    found = [json.loads((tmp_path / name).read_text())["detections"] for name in ("plain.json", "lung.json")]
    assert found[0] == found[1] and len(found[0]) > 0


@requires_shared
def test_analyze_fast_finds_the_same_candidates_with_close_probabilities(prepared_synth, tmp_path, monkeypatch):
    import json

    import p2ch_app.inference.runtime
    from p2ch_app.cli import analyze
    from p2ch_app.data.index import build_index

    uid = build_index(prepared_synth).series_uids[1]
    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    common = [uid, "--data-root", prepared_synth, "--seg-model", seg, "--cls-model", cls, "--runs-dir", tmp_path,
              "--threshold", 0.0]
    found, notes = {}, {}
    for name, extra, pays in (("exact", [], True), ("fast", ["--fast"], True), ("ignored", ["--fast"], False)):
        monkeypatch.setattr(p2ch_app.inference.runtime, "reduced_precision_pays", lambda device, pays=pays: pays)
        result = run(analyze, [*common, *extra, "--output", tmp_path / f"{name}.json"])
        assert result.exit_code == 0
        notes[name] = "--fast ignored" in result.output
        found[name] = {(round(d["index"]), round(d["row"]), round(d["col"])): d["nodule_prob"]
                       for d in json.loads((tmp_path / f"{name}.json").read_text())["detections"]}
    assert notes == {"exact": False, "fast": False, "ignored": True}
    assert found["ignored"] == found["exact"]  # a CPU without bf16 runs the exact float32 path
    common_keys = found["exact"].keys() & found["fast"].keys()
    # bfloat16 flips a few mask voxels near 0.5, which can split or merge small components (86% kept here)
    assert len(found["exact"]) > 10 and len(common_keys) >= 0.8 * len(found["exact"])
    assert max(abs(found["exact"][k] - found["fast"][k]) for k in common_keys) < 0.05


def assert_error_ends_stderr(result):
    """The error line starts a line of its own (no progress bar before it on that line) and nothing is
    drawn after it."""
    line = next(line for line in result.stderr.splitlines() if "error:" in line)
    assert result.stderr.endswith(f"\n{line}\n") or result.stderr == f"{line}\n", repr(result.stderr)
    assert line.split(": ")[1] == "error", line


def test_an_error_prints_below_a_closed_progress_bar(prepared):
    (prepared.root / "subset1" / "1.2.840.99.2.raw").write_bytes(b"\0" * 100)
    result = run(prep, ["--data-root", prepared.root, "--workers", 1])
    assert_one_line_error(result, "is truncated")
    assert "luna-prep:" in result.stderr.split("error:")[0]  # a bar was on screen
    assert_error_ends_stderr(result)


def test_prep_names_only_its_own_options(prepared):
    result = run(prep, ["--data-root", prepared.root, "--series", "1.2.x"])
    assert_one_line_error(result, "'1.2.x' is not a series UID")
    assert "--ct" not in result.stderr and "pass --series with a UID listed in candidates.csv" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "afile" / "out.json", "--output {tmp}/afile/out.json: {tmp}/afile is a file, not a folder"),
    (lambda t: t / ("x" * 300 + ".json"), "name too long; choose a shorter name"),
    (lambda t: t / "ro" / "out.csv", "--output {tmp}/ro/out.csv: permission denied; choose a folder you can write"),
    (lambda t: t / "full" / "out.csv", "--output {tmp}/full/out.csv: disk full (no space left on device)"),
])
def test_analyze_refuses_an_output_it_cannot_write_before_the_analysis(tiny_root, tmp_path, monkeypatch, make,
                                                                       message):
    import errno

    from p2ch_app.cli import analyze
    from tests.test_files import refuse_writes_under

    (tmp_path / "afile").write_text("x")
    refuse_writes_under(monkeypatch, tmp_path / "ro", errno.EACCES)
    refuse_writes_under(monkeypatch, tmp_path / "full", errno.ENOSPC)
    # the models do not exist: the output is checked first, so no analysis is lost to it
    common = ["--ct", tiny_root.series[0].mhd, "--seg-model", tmp_path / "no.pt", "--cls-model", tmp_path / "no.pt"]
    assert_one_line_error(run(analyze, [*common, "--output", make(tmp_path)]), message.format(tmp=tmp_path))
    assert_one_line_error(run(analyze, [*common, "--report", make(tmp_path).with_suffix("")]),
                          message.format(tmp=tmp_path).replace("--output", "--report").replace(".json", "")
                          .replace(".csv", ""))


def test_analyze_refuses_a_submission_it_cannot_write_before_the_analysis(tiny_root, tmp_path, monkeypatch):
    import errno

    from p2ch_app.cli import analyze
    from tests.test_files import refuse_writes_under

    refuse_writes_under(monkeypatch, tmp_path / "ro", errno.EACCES)
    common = ["--ct", tiny_root.series[0].mhd, "--seg-model", tmp_path / "no.pt", "--cls-model", tmp_path / "no.pt"]
    assert_one_line_error(run(analyze, [*common, "--submission", tmp_path / "ro" / "sub.csv"]),
                          f"--submission {tmp_path}/ro/sub.csv: permission denied; choose a folder you can write")


def test_run_folders_that_cannot_be_written_are_refused_before_the_work(tiny_root, tmp_path):
    from p2ch_app.cli import analyze, train_seg
    from tests.conftest import TINY

    (tmp_path / "afile").write_text("x")
    runs = tmp_path / "afile" / "runs"
    result = run(analyze, ["--validation", "--data-root", tiny_root.root, "--runs-dir", runs, "--seg-model",
                           tmp_path / "no.pt", "--cls-model", tmp_path / "no.pt"])
    assert_one_line_error(result, f"--runs-dir {runs}/nodule-analyze: {tmp_path}/afile is a file, not a folder")
    assert run(prep, ["--data-root", tiny_root.root, "--workers", 1]).exit_code == 0
    result = run(train_seg, ["--data-root", tiny_root.root, *TINY, "--runs-dir", runs])
    assert_one_line_error(result, f"--runs-dir {runs}/luna-train-seg: {tmp_path}/afile is a file, not a folder")


def test_prep_refuses_a_cache_folder_it_cannot_write_before_building(tiny_root, tmp_path, monkeypatch):
    import errno

    from tests.test_files import refuse_writes_under

    (tmp_path / "afile").write_text("x")
    result = run(prep, ["--data-root", tiny_root.root, "--cache-dir", tmp_path / "afile" / "cache"])
    assert_one_line_error(result, f"--cache-dir {tmp_path}/afile/cache: {tmp_path}/afile is a file, not a folder")
    refuse_writes_under(monkeypatch, tmp_path / "ro", errno.EROFS)
    result = run(prep, ["--data-root", tiny_root.root, "--cache-dir", tmp_path / "ro"])
    assert_one_line_error(result, f"--cache-dir {tmp_path}/ro: read-only file system; choose a folder on a writable")


def test_prep_with_a_damaged_cache_database_is_one_line(prepared):
    (prepared.root / "cache" / "meta" / "cache.db").write_bytes(b"junk" * 1000)
    assert_one_line_error(run(prep, ["--data-root", prepared.root, "--workers", 1]),
                          "is damaged (file is not a database); delete")


def test_ctrl_c_during_a_parallel_prep_is_one_line_and_exit_130(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import SimpleITK as sitk

    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.ct import load_series
    from tests.conftest import PROJECT, make_tiny_root

    tiny = make_tiny_root(tmp_path / "luna", n_series=12, shape=(60, 192, 192))
    for series in tiny.series:  # compressed: cached as int16 volumes, not mapped in place, so prep takes a while
        sitk.WriteImage(sitk.ReadImage(str(series.mhd)), str(series.mhd), True)
        series.mhd.with_suffix(".raw").unlink()
    # its own process group, as a terminal's foreground job: Ctrl-C reaches the parent and its workers
    # Ctrl-C handled as in a terminal even where this test runs with SIGINT ignored (a background job of a
    # non-interactive shell), which the child would inherit
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv = ['luna-prep'] + sys.argv[1:]; runpy.run_module('p2ch_app.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launch, "luna-prep", "--workers", "2", "--data-root",
                             str(tiny.root)], cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # once a volume is being written: the workers run, and the parent, which ignores Ctrl-C while it starts
    # them (workers.py), listens again
    volumes = tiny.root / "cache" / "volumes"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not (volumes.is_dir() and any(volumes.iterdir())):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and not re.match(r"luna-prep:\s+\d+%\|", line)]
    assert lines == ["luna-prep: interrupted; finished work is kept, rerun to continue"], err
    assert err.rstrip("\n").endswith(lines[0])  # no bar drawn after it
    cache = LunaCache(tiny.root / "cache", tiny.root)
    assert not list((tiny.root / "cache" / "volumes").glob("*.tmp.npy"))
    for uid in cache.cached_uids():  # what looks cached is whole
        assert (cache.volume(uid) == load_series(tiny.root, uid).hu).all()
