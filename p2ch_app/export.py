"""luna-export's library: a checkpoint's network as a TorchScript or ONNX file, verified on CT inputs
against the eager model before the file gets its name.

- TorchScript: torch.jit.script, not trace. A trace records the one path the example input takes,
  so the U-Net's padding to a multiple of 2**(depth-1) and the crops of its skip connections would be
  frozen at the example's size; the scripted module keeps them as code and takes any slice size.
- ONNX: the torch.export-based exporter (torch.onnx.export(dynamo=True)), torch's default since 2.9.
  The older TorchScript-based one (dynamo=False) is deprecated and warns on every call. Batch (and,
  for the U-Net, height and width) are declared dynamic. The U-Net pads unconditionally while it is
  exported (models._exporting), so the graph pads every size. It needs onnxscript, and the
  verification needs onnxruntime: both come with the `export` extra.

The file carries its network's config (CONFIG_KEY: ONNX metadata, a TorchScript extra file), so a
classifier's crop size and zoom travel with its weights.

Every export is checked before it is written: the saved file is loaded back into its own runtime and
run beside the eager model on crops of a CT. The U-Net gets 7-slice stacks at several batch sizes and
slice sizes, one of them odd, so the padding path runs. The classifier gets batches of candidate-sized
crops. The largest absolute difference of any output must stay within 1e-5 (float32). Where it does
not, the eager model's own float32 error on that input is measured (against the same model in
float64), and the export passes if it differs from the eager model by at most twice that: two float32
computations of one network, each within e of the exact result, can differ by up to 2e. This is the
ONNX U-Net's case on CT stacks: its probabilities differ from PyTorch's by 3e-5 to 8e-5, while PyTorch's own
float32 result is 7e-5 to 1.5e-4 from float64 there (and moves by 1.3e-4 with the memory layout alone).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from p2ch_app.checkpoints import CLASSIFIER, SEGMENTER, load_checkpoint, load_model, model_kind
from p2ch_app.data.ct import HU_MAX, HU_MIN, context_stacks, gather_crops, load_ct
from p2ch_app.data.synth import SynthGeometry, make_series
from p2ch_app.errors import UserError
from p2ch_app.files import check_writable, write_atomic
from p2ch_app.models import ClassifierConfig

FORMATS = ("torchscript", "onnx")
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
ONNX_INSTALL = "pip install p2ch_app[export]"
SYNTH_SEED = 0
SYNTH_GEOMETRY = SynthGeometry(512, (0.6, 0.8), (5.0, 5.0))  # full-size slices, few of them: made in ~2 s
INPUT_NAMES = {SEGMENTER: "stack", CLASSIFIER: "crops"}
OUTPUT_NAMES = {SEGMENTER: ["probability"], CLASSIFIER: ["logits", "probability"]}
Runner = Callable[[np.ndarray], "list[np.ndarray]"]
# the network's config as JSON inside the file (ONNX metadata, TorchScript extra file): how its inputs are
# cut (a classifier's crop size and zoom, a U-Net's context slices) travels with the weights
CONFIG_KEY = "p2ch_app.model_config"


@dataclass(frozen=True)
class VerifyPlan:
    """The inputs an export is checked on, and how close it must come to the eager model. U-Net stacks
    are (batch, rows, cols), cut from the middle of the CT (clipped to its size, odd sizes kept odd)."""

    stacks: tuple[tuple[int, int, int], ...] = ((1, 512, 512), (3, 512, 512), (3, 256, 320), (1, 257, 319))
    crop_batches: tuple[int, ...] = (1, 8)
    tolerance: float = 1e-5


@dataclass(frozen=True)
class Sample:
    name: str  # what the input is, for the printed check: "stack 3x7x256x320 (slices 24-26, ...)"
    x: np.ndarray  # float32, as the network takes it


@dataclass(frozen=True)
class Check:
    """One input's verdict: the largest absolute difference of any output between export and eager model,
    and, where it exceeded the tolerance, the eager model's own float32 error on that input."""

    name: str
    diff: float
    tolerance: float
    eager_error: float | None = None  # max |eager float32 - eager float64|, measured only when diff > tolerance

    @property
    def bound(self) -> float:
        return self.tolerance if self.eager_error is None else max(self.tolerance, 2 * self.eager_error)

    @property
    def passed(self) -> bool:
        return self.diff <= self.bound  # False for NaN too

    def line(self) -> str:
        if self.eager_error is None:
            return f"  {self.name}: max abs diff {self.diff:.3g}"
        return (f"  {self.name}: max abs diff {self.diff:.3g}, over {self.tolerance:g}; the eager model's own "
                f"float32 error here is {self.eager_error:.3g} (vs float64), so the bound is {self.bound:.3g}")


@dataclass
class ExportReport:
    output: Path
    fmt: str
    kind: str
    source: str  # which CT the inputs came from
    checks: list[Check]
    seconds: float

    @property
    def max_diff(self) -> float:
        return max(check.diff for check in self.checks)


def require_onnx() -> None:
    """ONNX export is an optional extra: without it, one line saying what to install."""
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(ONNX_MODULES)} ({', '.join(missing)} not installed); "
                        f"install them with: {ONNX_INSTALL} (in a source checkout: pip install -e '.[export]')")


def verification_ct(ct_path: Path | None) -> tuple[np.ndarray, str]:
    """The CT the inputs are cut from, in clipped HU, and a line saying which it is: the CT given, else
    a synthetic chest CT (p2ch_app.data.synth) with full-size slices."""
    if ct_path is not None:
        hu = load_ct(ct_path).hu
        return hu, f"CT {ct_path} ({'x'.join(map(str, hu.shape))} voxels)"
    hu = np.clip(make_series(SYNTH_SEED, SYNTH_GEOMETRY).hu, HU_MIN, HU_MAX).astype(np.int16)
    return hu, (f"a synthetic chest CT (p2ch_app.data.synth, seed {SYNTH_SEED}, {'x'.join(map(str, hu.shape))} "
                "voxels); pass --ct for a real scan")


def _fit(n: int, limit: int) -> int:
    """n, or at most limit with n's parity: an odd size asked for stays odd, so padding is still tested."""
    return n if n <= limit else limit - (limit % 2 != n % 2)


def stack_samples(hu: np.ndarray, context: int, plan: VerifyPlan) -> list[Sample]:
    """U-Net inputs: for each (batch, rows, cols) of the plan, the stacks of `batch` neighbouring centre
    slices from the middle of the CT, each with its context slices (the edge slice repeated beyond the
    volume, as the pipeline feeds them), cut to the middle rows x cols."""
    samples = []
    depth, height, width = hu.shape
    for batch, rows, cols in plan.stacks:
        batch, rows, cols = min(batch, depth), _fit(rows, height), _fit(cols, width)
        first, top, left = (depth - batch) // 2, (height - rows) // 2, (width - cols) // 2
        stacks = context_stacks(hu[:, top:top + rows, left:left + cols], first, first + batch, context)
        x = np.ascontiguousarray(stacks.transpose(0, 3, 1, 2), dtype=np.float32)
        name = (f"stack {'x'.join(map(str, x.shape))} (slices {first}-{first + batch - 1}, "
                f"rows {top}-{top + rows - 1}, cols {left}-{left + cols - 1})")
        samples.append(Sample(name, x))
    return samples


def crop_samples(hu: np.ndarray, config: ClassifierConfig, plan: VerifyPlan) -> list[Sample]:
    """Classifier inputs, cut as the classifier crops (its size and zoom): batches of crops centred on a
    2x2x2 grid through the chest (at 35% and 65% of each axis: lung, vessels, mediastinum), repeated for
    batches larger than eight."""
    grid = np.array([(i, r, c) for i in (0.35, 0.65) for r in (0.35, 0.65) for c in (0.35, 0.65)])
    centers = grid * (np.array(hu.shape) - 1)
    samples = []
    for batch in plan.crop_batches:
        chosen = centers[np.arange(batch) % len(centers)]
        crops = gather_crops(hu, chosen, config.crop_size, zoom=config.crop_zoom)
        x = np.ascontiguousarray(crops[:, None], dtype=np.float32)
        samples.append(Sample(f"crops {'x'.join(map(str, x.shape))} (centres on a grid at 35% and 65% of "
                              "each axis)", x))
    return samples


def eager_outputs(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """The outputs of a torch module (eager or TorchScript) as numpy arrays: one, or the classifier's
    logits and probabilities."""
    with torch.inference_mode():
        out = model(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def config_json(model: torch.nn.Module) -> str:
    """What an exported file says of its network: class name and architecture, as in our checkpoints."""
    return json.dumps({"model_name": type(model).__name__, **asdict(model.config)})


def read_config(path: Path, fmt: str) -> dict:
    """The config an exported file carries (config_json); {} for a file without one."""
    if fmt == "torchscript":
        files = {CONFIG_KEY: ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        text = files[CONFIG_KEY]
    else:
        import onnx

        text = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}.get(CONFIG_KEY)
    return json.loads(text) if text else {}


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; it is the format LibTorch loads
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
        torch.jit.script(model).save(str(path), _extra_files={CONFIG_KEY: config_json(model)})


def save_onnx(model: torch.nn.Module, kind: str, path: Path) -> None:
    """One self-contained .onnx file (weights inside), batch dynamic, and the U-Net's height and width; its
    config in the model's metadata."""
    from torch.export import Dim

    if kind == SEGMENTER:  # batch 2: torch.export would take a size-1 dimension for a constant
        example = torch.zeros(2, model.config.in_channels, 64, 64)
        dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    else:
        example, dims = torch.zeros(2, 1, *model.config.crop_size), {0: Dim("batch")}
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed": nothing here needs it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own internals, nothing the user can change
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, dynamic_shapes={"x": dims},
                                        input_names=[INPUT_NAMES[kind]], output_names=OUTPUT_NAMES[kind])
    finally:
        registration.setLevel(level)
    program.model.metadata_props[CONFIG_KEY] = config_json(model)
    program.save(str(path), external_data=False)


def load_export(path: Path, fmt: str, threads: int | None = None) -> Runner:
    """An exported file in its own runtime (TorchScript in torch.jit, ONNX in ONNX Runtime on the CPU), as
    a function from a float32 batch to the list of its outputs. threads: ONNX Runtime's intra-op threads
    (None: its default, one per physical core); TorchScript runs on torch's threads."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")

        return lambda x: eager_outputs(module, x)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _max_diff(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest absolute difference over all outputs; inf when their number or shapes differ."""
    if len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got)):
        return float("inf")
    return max(float(np.abs(w.astype(np.float64) - g).max()) for w, g in zip(want, got))


def verify(run: Runner, model: torch.nn.Module, samples: list[Sample], tolerance: float,
           say: Callable[[str], None] = lambda _: None) -> list[Check]:
    """Each sample through the export and the eager model; a UserError on the first whose outputs differ
    by more than the tolerance and, then, by more than twice the eager model's own float32 error there."""
    checks, model64 = [], None
    for sample in samples:
        want, got = eager_outputs(model, sample.x), run(sample.x)
        check = Check(sample.name, _max_diff(want, got), tolerance)
        if not check.passed and np.isfinite(check.diff):
            model64 = copy.deepcopy(model).double() if model64 is None else model64
            parts = [eager_outputs(model64, item[None].astype(np.float64)) for item in sample.x]  # one at a time:
            error = _max_diff([np.concatenate(outs) for outs in zip(*parts)], want)  # float64 activations are big
            check = Check(sample.name, check.diff, tolerance, error)
        say(check.line())
        if not check.passed:
            shapes = [g.shape for g in got], [w.shape for w in want]
            found = (f"output shapes {shapes[0]} instead of {shapes[1]}" if shapes[0] != shapes[1] else
                     f"max abs diff {check.diff:.3g} > {check.bound:.3g}")
            raise UserError(f"the export disagrees with the eager model on {sample.name}: {found}; nothing was "
                            "written: report it as a bug, and meanwhile try the other --format")
        checks.append(check)
    return checks


def export_checkpoint(checkpoint_path: Path, fmt: str, output: Path, ct_path: Path | None = None,
                      plan: VerifyPlan = VerifyPlan(), say: Callable[[str], None] = lambda _: None) -> ExportReport:
    """Export the network of a checkpoint (ours or the book's .state) to output, in fmt. The file is
    written under a temporary name, loaded back and verified; only then is it renamed to output. A
    failed check is a UserError and leaves output as it was. Output's folder is created if need be."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    check_writable(output, "--output")  # before the work, whose result a failed write would lose
    start = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_path)
    kind = model_kind(checkpoint_path, checkpoint)
    model = load_model(checkpoint_path, kind, checkpoint)
    say(f"{checkpoint_path}: a {kind} ({type(model).__name__}, {model.config})")
    hu, source = verification_ct(ct_path)
    if kind == SEGMENTER:
        samples = stack_samples(hu, model.config.context, plan)
    else:
        samples = crop_samples(hu, model.config, plan)
    say(f"exporting to {fmt}, then checking it against the eager model on {source}:")
    checks = []

    def write(tmp: Path) -> None:
        if fmt == "torchscript":
            save_torchscript(model, tmp)
        else:
            save_onnx(model, kind, tmp)
        checks.extend(verify(load_export(tmp, fmt), model, samples, plan.tolerance, say))

    write_atomic(output, write)
    return ExportReport(Path(output), fmt, kind, source, checks, time.perf_counter() - start)


def summary(report: ExportReport) -> str:
    """The line that ends a successful export."""
    size_mb = report.output.stat().st_size / 2**20
    over = [check for check in report.checks if check.eager_error is not None]
    tolerance, total = report.checks[0].tolerance, len(report.checks)
    if not over:
        verdict = f"within {tolerance:g} on all {total} inputs"
    elif len(over) == total:
        verdict = f"within twice its own float32 error on all {total} inputs ({tolerance:g} is below that error here)"
    else:
        verdict = (f"within {tolerance:g} on {total - len(over)} of {total} inputs, and within twice its own float32 "
                   "error on the others")
    return (f"wrote {report.output} ({report.fmt}, {size_mb:.1f} MB, {report.seconds:.0f} s): matches the eager "
            f"model {verdict}; max abs diff {report.max_diff:.3g} (float32)")
