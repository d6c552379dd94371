"""Config files: one TOML loader for every command.

A config file has top-level keys, applied to every command that has an option of that name, and
one table per command (`[luna-prep]`, `[luna-train-cls]`, ...) whose keys override the top level.
Keys are option names with underscores (`--epoch-samples` -> `epoch_samples`). A key that no
command knows is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from p2ch_app.errors import UserError


def read_config(path: Path, options: dict[str, set[str]]) -> dict[str, dict]:
    """Parse and validate a config file against `options` (command name -> option names).

    Returns {command: {key: value}} with the top-level keys already merged into each command
    that has them, so callers only look up their own command.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass an existing file to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); fix the syntax") from None

    everyone = set().union(*options.values())
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for key in top:
        if key not in everyone:
            raise UserError(f"unknown key '{key}' in {path}; no command has an option --{key.replace('_', '-')}")
    merged = {}
    for command, known in options.items():
        merged[command] = {k: v for k, v in top.items() if k in known}
    for section, table in raw.items():
        if not isinstance(table, dict):
            continue
        if section not in options:
            raise UserError(f"unknown section [{section}] in {path}; sections are the command names: "
                            + ", ".join(sorted(options)))
        for key, value in table.items():
            if key not in options[section]:
                raise UserError(f"unknown key '{key}' in [{section}] of {path}; "
                                f"{section} --help lists its options")
            merged[section][key] = value
    return merged
