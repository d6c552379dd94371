"""What every command shares: one-line errors, config files, and the click options declared once.

An option's value comes from the command line if given there, else from the run being resumed
(--resume), else from the config file, else from the default shown in --help.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm import tqdm

from p2ch_app.cli.config import read_config
from p2ch_app.errors import UserError
from p2ch_app.files import os_error

DEFAULT_DATA_ROOT = Path("data-unversioned/luna")
COMMANDS: dict[str, click.Command] = {}


class AppCommand(click.Command):
    """Turns a UserError (or an OSError: a full disk, a folder that cannot be written) into one line
    on stderr and exit code 2; Ctrl-C into one line and exit code 130. Progress bars still on screen
    are closed first, so the line starts on a line of its own and no bar is redrawn over it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            self._fail(ctx, f"error: {err}", 2)
        except OSError as err:
            self._fail(ctx, f"error: {os_error(err)}", 2)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted; finished work is kept, rerun to continue", 130)

    def _fail(self, ctx: click.Context, message: str, code: int) -> None:
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        click.echo(f"{self.name}: {message}", err=True)
        ctx.exit(code)


def app_command(name: str, **settings):
    """Declare a command with --config and --data-root; its function receives the resolved options."""

    def decorate(fn):
        def callback(**_):
            ctx = click.get_current_context()
            return fn(**resolve_options(ctx))

        callback.__doc__ = fn.__doc__
        callback.__click_params__ = list(getattr(fn, "__click_params__", []))  # the command's own options
        options = [
            click.option("--config", type=click.Path(path_type=Path, dir_okay=False),
                         help="TOML config file; its values replace defaults, command-line options win."),
            click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
                         default=DEFAULT_DATA_ROOT, show_default=True,
                         help="LUNA16-layout folder: subset*/<uid>.mhd|.raw and the CSVs."),
        ]
        for option in reversed(options):
            callback = option(callback)
        command = click.command(name, cls=AppCommand, help=fn.__doc__, **settings)(callback)
        COMMANDS[name] = command
        return command

    return decorate


def resolve_options(ctx: click.Context) -> dict:
    """Merge the config file (and a resumed run's options) into the options not given on the command line."""
    params = dict(ctx.params)
    by_name = {p.name: p for p in ctx.command.params}
    layers = []  # later layers win over earlier ones; the command line wins over all
    if params.get("config") is not None:
        names = {cmd: {p.name for p in c.params if p.name != "config"} for cmd, c in COMMANDS.items()}
        layers.append((str(params["config"]), read_config(params["config"], names)[ctx.command.name]))
    if params.get("resume") is not None:
        from p2ch_app.checkpoints import saved_options
        from p2ch_app.training.loop import load_resumable

        saved = saved_options(load_resumable(params["resume"], ctx.command.name))
        moot = ("resume", "init")  # a resumed run continues its own weights
        layers.append((str(params["resume"]), {k: v for k, v in saved.items() if k in by_name and k not in moot}))
    for source, values in layers:
        for name, value in values.items():
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                continue
            expected = _expected_in_config(by_name[name], value)
            if expected is not None:
                raise UserError(f"bad value {value!r} for '{name}' in {source}: expected {expected}, not "
                                f"{_kind(value)}; correct the value there")
            try:
                params[name] = by_name[name].type_cast_value(ctx, value)
            except click.BadParameter as err:
                raise UserError(f"bad value {value!r} for '{name}' in {source}: {err.message}") from None
    return params


_TOML_TYPES = (  # click type -> what a config value of that option must be, as the Python types TOML reads
    (click.types.BoolParamType, "true or false", (bool,)),
    (click.types.IntParamType, "an integer", (int,)),  # IntRange too
    (click.types.FloatParamType, "a number", (int, float)),  # FloatRange too
    ((click.types.StringParamType, click.Choice, click.Path), "a string", (str,)),
)


def _fits(param_type: click.ParamType, value) -> bool:
    for kinds, _, python in _TOML_TYPES:
        if isinstance(param_type, kinds):
            return isinstance(value, python) and (bool in python or not isinstance(value, bool))
    return True  # a type the table does not know: its own conversion decides


def _describe(param_type: click.ParamType) -> str:
    return next((what for kinds, what, _ in _TOML_TYPES if isinstance(param_type, kinds)), "a value")


def _expected_in_config(param: click.Parameter, value) -> str | None:
    """What a config (or resumed) value of param must be, when its type does not fit; else None. click
    would cast it silently (1.9 -> 1, true -> 1) where the command line refuses the same values."""
    if value is None:  # an option a resumed run left unset
        return None
    if isinstance(param.type, click.Tuple):
        types = list(param.type.types)
        ok = isinstance(value, list) and len(value) == len(types) and all(map(_fits, types, value))
        return None if ok else "[" + ", ".join(map(_describe, types)) + "]"
    if param.multiple:
        ok = isinstance(value, list) and all(_fits(param.type, v) for v in value)
        return None if ok else f"[{_describe(param.type)}, ...]"
    return None if _fits(param.type, value) else _describe(param.type)


def _kind(value) -> str:
    """A TOML value's type in words; a list's as [its items' types]."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_kind, value[:4])) + (", ..." if len(value) > 4 else "") + "]"
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", dict: "a table"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def settings_from(cls, opts: dict, **given):
    """A settings dataclass filled from the options of the same names (and `given`)."""
    return cls(**{f.name: opts[f.name] for f in fields(cls) if f.name in opts and f.name not in given}, **given)


def require_dir(path: Path, what: str, fix: str) -> Path:
    if not Path(path).is_dir():
        raise UserError(f"{what} {path} does not exist; {fix}")
    return Path(path)


def cache_dir_of(opts: dict) -> Path:
    """--cache-dir, or the data root's own cache folder."""
    from p2ch_app.data.cache import default_cache_dir

    return opts["cache_dir"] if opts["cache_dir"] is not None else default_cache_dir(opts["data_root"])


def _compose(*options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
runs_dir_option = click.option(
    "--runs-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"), show_default=True,
    help="Where runs go (runs/<command>/<time>-<comment>/); nodule-analyze finds the newest models there.")
model_options = _compose(
    click.option("--seg-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="Segmentation checkpoint [default: newest runs/luna-train-seg/*/best.pt]."),
    click.option("--cls-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="Nodule classifier checkpoint [default: newest runs/luna-train-cls/*/best.pt]."),
    click.option("--mal-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="Malignancy checkpoint [default: newest runs/luna-finetune-mal/*/best.pt, if any]."))
comment_option = click.option("--comment", default="", help="Suffix of the run folder name.")
val_stride_option = click.option("--val-stride", type=click.IntRange(2), default=10, show_default=True,
                                 help="Every Nth series (sorted by UID) validates, in training and evaluation.")
cache_dir_option = click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                                help="The luna-prep cache [default: <data-root>/cache].")
workers_default = min(4, os.cpu_count() or 1)


def training_options(epochs: int, lr: float, optimizer: str, epoch_samples: int):
    """The options every trainer shares, with the defaults of the calling trainer."""
    from p2ch_app.training import AUGMENTATIONS, FULL_AUGMENTATION

    return _compose(
        cache_dir_option,
        click.option("--epochs", type=click.IntRange(1), default=epochs, show_default=True),
        click.option("--validate-from", type=click.IntRange(1), default=1, show_default=True, metavar="EPOCH",
                     help="Validate from this epoch on; earlier ones only train, and best.pt is chosen among the "
                          "validated ones (validating is a third of a demo U-Net epoch)."),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
        click.option("--workers", type=click.IntRange(0), default=workers_default, show_default=True,
                     help="Data-loading processes (0: load in the training process)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                     help="Learning rate."),
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=optimizer, show_default=True,
                     help="sgd: momentum 0.99; both with weight decay 1e-4."),
        click.option("--epoch-samples", type=click.IntRange(1), default=epoch_samples, show_default=True,
                     help="Training samples per epoch (drawn afresh every epoch)."),
        click.option("--augment", default=FULL_AUGMENTATION, show_default=True,
                     help=f"Comma-separated: {','.join(AUGMENTATIONS)}."),
        click.option("--no-augment", is_flag=True, help="Train without augmentation."),
        val_stride_option, device_option,
        click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same run."),
        click.option("--resume", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Continue a run from its last.pt; its saved options fill in what you do not give."),
        comment_option, runs_dir_option)


init_option = click.option(
    "--init", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Start from this checkpoint's weights (ours or the book's .state, same architecture) instead of random "
         "ones: transfer learning, far fewer samples to a useful model.")
