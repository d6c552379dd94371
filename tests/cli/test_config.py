from pathlib import Path

import pytest

from p2ch_app.cli import prep
from p2ch_app.cli.config import read_config
from p2ch_app.cli.options import DEFAULT_DATA_ROOT, resolve_options
from p2ch_app.errors import UserError

OPTIONS = {"luna-prep": {"data_root", "workers"}, "luna-synth": {"data_root", "series"}}


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_top_level_keys_reach_every_command_that_has_them_and_sections_override(tmp_path):
    config = read_config(write(tmp_path, 'data_root = "a"\nworkers = 3\n[luna-prep]\ndata_root = "b"\n'), OPTIONS)
    assert config["luna-prep"] == {"data_root": "b", "workers": 3}
    assert config["luna-synth"] == {"data_root": "a"}


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\n", "unknown key 'bogus' in .*c.toml; no command has an option --bogus"),
    ("[luna-prep]\nseries = 2\n", r"unknown key 'series' in \[luna-prep\] of .*c.toml"),
    ("[luna-prepp]\nworkers = 2\n", r"unknown section \[luna-prepp\] in .*c.toml"),
    ("workers = \n", "is not valid TOML"),
])
def test_bad_config_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_config(write(tmp_path, text), OPTIONS)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_config(tmp_path / "none.toml", OPTIONS)


def resolved(args):
    return resolve_options(prep.make_context("luna-prep", list(args)))


def test_precedence_command_line_over_config_over_default(tmp_path):
    config = write(tmp_path, 'data_root = "from-config"\n[luna-prep]\nworkers = 1\n')
    defaults = resolved([])
    assert defaults["data_root"] == DEFAULT_DATA_ROOT and defaults["workers"] >= 1
    from_file = resolved(["--config", str(config)])
    assert from_file["data_root"] == Path("from-config") and from_file["workers"] == 1
    both = resolved(["--config", str(config), "--workers", "3", "--data-root", "cli"])
    assert both["workers"] == 3 and both["data_root"] == Path("cli")


def test_config_value_of_the_wrong_type(tmp_path):
    config = write(tmp_path, '[luna-prep]\nworkers = "many"\n')
    with pytest.raises(UserError, match="bad value 'many' for 'workers'"):
        resolved(["--config", str(config)])


@pytest.mark.parametrize("name", ["default.toml", "demo.toml"])
def test_shipped_configs_are_valid_for_every_command(name):
    from p2ch_app.cli import COMMANDS

    for command in COMMANDS.values():
        resolve_options(command.make_context(command.name, ["--config", str(Path("configs") / name)]))


def test_a_flag_the_config_turns_on_can_be_turned_off_on_the_command_line(tmp_path):
    from p2ch_app.cli import analyze

    config = write(tmp_path, "[nodule-analyze]\ntta = true\ndedupe = true\n")

    def flags(*args):
        opts = resolve_options(analyze.make_context("nodule-analyze", ["--config", str(config), *args]))
        return opts["tta"], opts["dedupe"], opts["split"]

    assert flags() == (True, True, False)
    assert flags("--no-dedupe", "--split") == (True, False, True)


@pytest.mark.parametrize("command, text, message", [
    ("luna-train-cls", "epochs = 1.9\n", "bad value 1.9 for 'epochs' in .*c.toml: expected an integer, not a float"),
    ("luna-prep", "[luna-prep]\nworkers = true\n", "bad value True for 'workers' .*expected an integer, not a boolean"),
    ("luna-train-seg", "lr = true\n", "'lr' .*expected a number, not a boolean"),
    ("nodule-analyze", "[nodule-analyze]\ntta = 1\n", "'tta' .*expected true or false, not an integer"),
    ("luna-prep", "data_root = 3\n", "bad value 3 for 'data_root' .*expected a string, not an integer"),
    ("luna-train-seg", "optimizer = 1\n", "'optimizer' .*expected a string, not an integer"),
    ("luna-synth", "[luna-synth]\ninplane_mm = [1.0]\n", r"expected \[a number, a number\], not \[a float\]"),
    ("luna-synth", "[luna-synth]\nslice_mm = [1, 'a']\n", r"expected \[a number, a number\], not \[an integer, a str"),
    ("luna-prep", "[luna-prep]\nseries_uids = '1.2'\n", r"expected \[a string, \.\.\.\], not a string"),
])
def test_config_values_are_type_checked_as_on_the_command_line(tmp_path, command, text, message):
    from p2ch_app.cli import COMMANDS

    config = write(tmp_path, text)
    with pytest.raises(UserError, match=message + ".*; correct the value there$"):
        resolve_options(COMMANDS[command].make_context(command, ["--config", str(config)]))


def test_config_values_of_the_right_type_pass(tmp_path):
    from p2ch_app.cli import COMMANDS

    config = write(tmp_path, 'lr = 1\nepochs = 3\n[luna-synth]\ninplane_mm = [1, 2.5]\n'
                             '[luna-prep]\nseries_uids = ["1.2"]\n[nodule-analyze]\ntta = true\n')
    opts = {name: resolve_options(COMMANDS[name].make_context(name, ["--config", str(config)]))
            for name in ("luna-train-seg", "luna-synth", "luna-prep", "nodule-analyze")}
    assert opts["luna-train-seg"]["lr"] == 1.0 and opts["luna-train-seg"]["epochs"] == 3
    assert opts["luna-synth"]["inplane_mm"] == (1.0, 2.5) and opts["luna-prep"]["series_uids"] == ("1.2",)
    assert opts["nodule-analyze"]["tta"] is True
