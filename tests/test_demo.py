"""scripts/demo.py (make demo): the commands it runs, in order, and what each one is given."""

import re
import time

import pytest

from p2ch_app.inference.distributed import usable_cores
from tests.conftest import script_module


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The demo script with its commands recorded instead of run; a trainer 'writes' a best.pt."""
    with script_module("demo") as module:
        yield _recording(module, tmp_path, monkeypatch)


def _recording(module, tmp_path, monkeypatch):
    data_root, books = tmp_path / "demo", tmp_path / "book"
    data_root.mkdir()
    (data_root / "candidates.csv").write_text("")
    monkeypatch.setattr(module, "DATA_ROOT", data_root)
    monkeypatch.setattr(module, "MALIGNANCY_SET", (tmp_path / "mal", 32, 2))
    monkeypatch.setattr(module, "FURTHER_SET", (tmp_path / "further", 12, 3))
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(module, "PRETRAINED", books)
    commands = []

    def step(*args, ranks=1):
        commands.append(args)
        module.ranks.append(ranks)
        if args[0].startswith("luna-train") or args[0] == "luna-finetune-mal":
            run = tmp_path / "runs" / args[0] / f"run{len(commands)}-{_given(args, '--comment')}"
            run.mkdir(parents=True)
            (run / "best.pt").write_bytes(b"")
            time.sleep(0.01)  # newest() goes by modification time

    def together(*commands_at_once):
        for args in commands_at_once:
            step(*args)
        module.side_by_side.append(len(commands_at_once))

    monkeypatch.setattr(module, "step", step)
    monkeypatch.setattr(module, "together", together)
    monkeypatch.setattr(module, "usable_cores", lambda: 2)
    module.commands, module.books, module.side_by_side, module.ranks = commands, books, [], []
    return module


def _given(command: tuple, option: str) -> str:
    return command[command.index(option) + 1]


def test_demo_averages_two_seeds_of_each_fine_tuned_network(demo, monkeypatch, tmp_path, capsys):
    demo.books.mkdir()
    for name in ("seg_book.state", "cls_book.state"):
        (demo.books / name).write_bytes(b"")
    monkeypatch.setattr("sys.argv", ["demo.py", "--seed", "2"])
    demo.main()
    assert re.search(r"demo finished in \d+ s \(data \d+ s, U-Nets \d+ s, mining and classifiers \d+ s, "
                     r"malignancy \d+ s, evaluations \d+ s\)", capsys.readouterr().out)
    names = [c[0] for c in demo.commands]
    assert names == ["luna-prep"] + ["luna-synth", "luna-prep"] * 2 + [
        "luna-train-seg", "luna-train-seg", "luna-average", "luna-train-cls", "luna-train-cls", "luna-average",
        "luna-finetune-mal", "nodule-analyze", "nodule-analyze"]
    synth_mal, prep_mal, synth_further, prep_further = demo.commands[1:5]
    seg_a, seg_b, seg_mean, cls_a, cls_b, cls_mean, mal, analyze, further = demo.commands[5:]
    assert [_given(c, "--seed") for c in (seg_a, seg_b, cls_a, cls_b)] == ["2", "1002", "2", "1002"]
    assert _given(seg_a, "--init") == _given(seg_b, "--init") == str(demo.books / "seg_book.state")
    assert _given(cls_a, "--init") == _given(cls_b, "--init") == str(demo.books / "cls_book.state")
    assert _given(cls_a, "--mine-with") == _given(cls_b, "--mine-with") == _given(seg_mean, "--output")
    assert seg_mean[1:3] == (str(tmp_path / "runs/luna-train-seg/run6-demo-seed2/best.pt"),
                             str(tmp_path / "runs/luna-train-seg/run7-demo-seed2-b/best.pt"))
    assert demo.side_by_side == [2, 2]  # the runs of each network
    assert demo.ranks[-2:] == [2, 2] and set(demo.ranks[:-2]) == {1}  # each evaluation's series over 2 processes
    assert _given(cls_a, "--mine-workers") == _given(cls_b, "--mine-workers") == "2"
    assert _given(mal, "--from") == _given(cls_mean, "--output") == _given(analyze, "--cls-model")
    assert _given(analyze, "--seg-model") == _given(seg_mean, "--output")
    # malignancy: fine-tuned on a nodule-rich set, scored on another that nothing trained on
    assert _given(synth_mal, "--nodules") == _given(synth_further, "--nodules") == "8"
    assert _given(mal, "--data-root") == _given(synth_mal, "--data-root") == _given(prep_mal, "--data-root")
    assert _given(further, "--data-root") == _given(synth_further, "--data-root") == _given(prep_further, "--data-root")
    assert "--include-train" in further and _given(further, "--mal-model") == _given(analyze, "--mal-model")
    assert _given(synth_mal, "--seed") != _given(synth_further, "--seed")


def test_demo_without_the_books_weights_trains_one_run_of_each(demo, monkeypatch):
    monkeypatch.setattr("sys.argv", ["demo.py"])
    demo.main()
    names = [c[0] for c in demo.commands]
    assert names == ["luna-prep"] + ["luna-synth", "luna-prep"] * 2 + [
        "luna-train-seg", "luna-train-cls", "luna-finetune-mal", "nodule-analyze", "nodule-analyze"]
    assert "--seed" not in demo.commands[5] and "--init" not in demo.commands[5]


def test_demo_evaluates_side_by_side_on_one_core(demo, monkeypatch):
    monkeypatch.setattr(demo, "usable_cores", lambda: 1)
    monkeypatch.setattr("sys.argv", ["demo.py"])
    demo.main()
    assert demo.side_by_side == [2] and set(demo.ranks) == {1}


def test_step_with_ranks_runs_the_command_under_torchrun(monkeypatch, tmp_path, capfd):
    with script_module("demo") as module:
        monkeypatch.setattr(module, "BIN", tmp_path)
        (tmp_path / "hello").write_text("import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], "
                                        "'threads', os.environ['OMP_NUM_THREADS'])\n")
        module.step("hello", ranks=2)
        shown = capfd.readouterr().out
        assert "$ torchrun --standalone --nproc-per-node=2 hello" in shown
        threads = max(1, usable_cores() // 2)
        assert f"rank 0 of 2 threads {threads}" in shown and f"rank 1 of 2 threads {threads}" in shown


def test_together_runs_commands_at_once_and_prints_their_summaries(monkeypatch, tmp_path, capsys):
    with script_module("demo") as module:
        monkeypatch.setattr(module, "LOGS", tmp_path / "logs")
        monkeypatch.setattr(module, "BIN", tmp_path)
        monkeypatch.setattr(module, "HEARTBEAT_S", 0.2)
        script = ("#!/bin/sh\nprintf 'step  50%%|#####     | 1/2\\rstep 100%%|##########| 2/2\\n'\n"
                  "sleep 1\necho \"threads $OMP_NUM_THREADS\"\n")
        (tmp_path / "ok").write_text(script)
        (tmp_path / "ok").chmod(0o755)
        (tmp_path / "broken").write_text("#!/bin/sh\necho 'no such file'\nexit 2\n")
        (tmp_path / "broken").chmod(0o755)
        module.together(("ok", "a"), ("ok", "b"))
        shown = capsys.readouterr().out
        logs = sorted((tmp_path / "logs").glob("*.log"))
        assert len(logs) == 2
        for log in logs:  # each log's summary: its lines without the progress bars
            assert f"ok ({log}):\nthreads {max(1, usable_cores() // 2)}\n" in shown  # half the cores each
        assert "[1] step 100%|##########| 2/2   [2] step 100%" in shown  # the progress while they run
        with pytest.raises(SystemExit, match="broken failed"):
            module.together(("ok", "c"), ("broken",))
        assert "no such file" in capsys.readouterr().out
