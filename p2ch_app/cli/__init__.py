"""Command-line entry points: thin click commands that parse options and call the library.

Every command takes --config FILE and --data-root DIR (cli/options.py); `python -m p2ch_app.cli
COMMAND ...` runs one by name.
"""

from p2ch_app.cli.analyze import analyze
from p2ch_app.cli.data import prep, synth
from p2ch_app.cli.export import export
from p2ch_app.cli.options import COMMANDS
from p2ch_app.cli.serve import serve
from p2ch_app.cli.train import average, finetune_mal, train_cls, train_seg

__all__ = ["COMMANDS", "analyze", "average", "export", "finetune_mal", "prep", "serve", "synth", "train_cls",
           "train_seg"]
