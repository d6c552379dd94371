"""luna-export: a trained network as a TorchScript or ONNX file, verified against PyTorch before it is written."""

from __future__ import annotations

from pathlib import Path

import click

from p2ch_app.cli.options import app_command
from p2ch_app.errors import UserError


@app_command("luna-export")
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--format", "format", type=click.Choice(["torchscript", "onnx"]), default=None,
              help="torchscript (torch.jit.load, LibTorch) or onnx (ONNX Runtime; needs pip install p2ch_app[export]).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The file to write (.pt for TorchScript, .onnx for ONNX, by convention).")
@click.option("--ct", "ct_path", type=click.Path(path_type=Path), default=None,
              help="Check the export on crops of this CT (.mhd/.mha, .nii/.nii.gz or DICOM folder) "
                   "[default: a synthetic chest CT].")
def export(**opts):
    """Export the network of CHECKPOINT (a U-Net or a classifier; ours or the book's .state) to TorchScript
    or ONNX, with a dynamic batch (and, for the U-Net, dynamic slice height and width).

    Before the file is written, the export is loaded back into its runtime and run beside the PyTorch
    model on crops of a CT: U-Net stacks at batch 1 and 3 and several slice sizes (one odd), classifier
    crops at batch 1 and 8. Every output must agree within 1e-5 (float32), or, where PyTorch's own float32
    result is further than that from float64, within twice that error; the differences are printed. A failed
    check writes nothing and exits with code 2.
    """
    from p2ch_app.export import export_checkpoint, summary

    if opts["checkpoint"] is None or opts["format"] is None or opts["output"] is None:
        raise UserError("give a CHECKPOINT, --format torchscript|onnx and --output FILE")
    report = export_checkpoint(opts["checkpoint"], opts["format"], opts["output"], opts["ct_path"],
                               say=click.echo)
    click.echo(summary(report))
