"""python -m p2ch_app.cli COMMAND [OPTIONS]: any command by name, where the entry points are not installed."""

import sys

from p2ch_app.cli import COMMANDS

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.exit(f"usage: python -m p2ch_app.cli {{{','.join(COMMANDS)}}} [OPTIONS]")
COMMANDS[sys.argv.pop(1)]()
