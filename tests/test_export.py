"""luna-export: TorchScript and ONNX files that take every batch and slice size the eager networks take,
verified against them on CT crops before they are written; the ONNX extra optional."""

import importlib.util
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import p2ch_app.export as export_module
from p2ch_app.checkpoints import CLASSIFIER, SEGMENTER, model_entries, model_kind, save_checkpoint
from p2ch_app.cli import export
from p2ch_app.errors import UserError
from p2ch_app.export import (
    CONFIG_KEY,
    VerifyPlan,
    crop_samples,
    eager_outputs,
    export_checkpoint,
    load_export,
    read_config,
    require_onnx,
    stack_samples,
)
from p2ch_app.models import Calibration, ClassifierConfig, NoduleClassifier, NoduleSegmenter, SegmenterConfig
from tests.conftest import BOOK_MODELS, REAL_DICOM, assert_one_line_error, requires_shared, run, write_image

ONNX_MISSING = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
requires_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING), reason=f"{', '.join(ONNX_MISSING)} not installed (pip install -e '.[export]')")
SMALL_PLAN = VerifyPlan(stacks=((1, 64, 64), (3, 48, 40), (2, 37, 45)), crop_batches=(1, 5))
ODD_SIZES = [(1, 30, 50), (3, 33, 17), (2, 61, 62)]  # none of them the size the export was made with


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A 20x70x66 CT in HU: noisy lung with a solid sphere, so the inputs are CT-like, not zeros."""
    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 60, (20, 70, 66))
    grid = np.indices(hu.shape)
    hu[sum((g - c) ** 2 for g, c in zip(grid, (10, 35, 30))) <= 36] = 40
    return write_image(tmp_path_factory.mktemp("ct") / "ct.mha", np.round(hu).astype(np.int16), (0.7, 0.7, 2.0))


def saved(tmp_path, model, name="model.pt"):
    torch.manual_seed(0)
    for module in model.modules():  # trained-looking batch-norm statistics, not the identity
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    first = model.input_batchnorm if isinstance(model, NoduleSegmenter) else model.tail_batchnorm
    first.running_mean.fill_(-600)  # the first one normalises HU, as a trained network's does
    first.running_var.fill_(300**2)
    path = tmp_path / name
    save_checkpoint(path, model_entries(model))
    return path


SEGMENTERS = {
    "book architecture, narrower": SegmenterConfig(width_factor=2),
    "upsample, max pooling, depth 4": SegmenterConfig(width_factor=2, depth=4, up_mode="upsample", pooling="max"),
    "unpadded convolutions": SegmenterConfig(context=2, width_factor=2, depth=2, padding=False),
}


@pytest.mark.parametrize("name", SEGMENTERS)
def test_torchscript_unet_matches_eager_at_every_size(tmp_path, small_ct, name):
    torch.manual_seed(1)
    model = NoduleSegmenter(SEGMENTERS[name]).eval()
    out = tmp_path / "seg.pt"
    report = export_checkpoint(saved(tmp_path, model), "torchscript", out, small_ct, SMALL_PLAN)
    assert report.kind == SEGMENTER and [c.diff for c in report.checks] == [0.0, 0.0, 0.0]
    assert read_config(out, "torchscript")["context"] == model.config.context
    assert [c.name.split(" (")[0] for c in report.checks] == [
        f"stack 1x{model.config.in_channels}x64x64", f"stack 3x{model.config.in_channels}x48x40",
        f"stack 2x{model.config.in_channels}x37x45"]
    run_export = load_export(out, "torchscript")
    for batch, rows, cols in ODD_SIZES:  # sizes that are no multiple of 4 or 8: the padding path
        x = np.random.default_rng(rows).normal(-500, 400, (batch, model.config.in_channels, rows, cols))
        x = x.astype(np.float32)
        want, got = eager_outputs(model, x), run_export(x)
        assert got[0].shape == want[0].shape and np.abs(got[0] - want[0]).max() <= 1e-5


def test_a_trace_would_freeze_the_padding_which_is_why_export_scripts(tmp_path):
    """The reason for torch.jit.script: a trace of the U-Net at 64x64 never pads, so at 62x66 it silently
    returns a 60x64 map; the scripted U-Net pads and crops back as the eager one does."""
    model = NoduleSegmenter(SegmenterConfig(width_factor=2)).eval()
    with pytest.warns(Warning):
        traced = torch.jit.trace(model, torch.randn(1, 7, 64, 64))
    x = torch.randn(1, 7, 62, 66)
    with torch.inference_mode():
        assert traced(x).shape == (1, 1, 60, 64)
        assert torch.equal(torch.jit.script(model)(x), model(x))


def test_torchscript_classifier_from_bare_weights(tmp_path, small_ct):
    """A file with weights alone: the kind comes from the parameter names, the architecture is the book's."""
    model = NoduleClassifier().eval()
    path = tmp_path / "bare.pt"
    torch.save({"model_state": model.state_dict()}, path)
    assert model_kind(path) == CLASSIFIER
    report = export_checkpoint(path, "torchscript", tmp_path / "cls.pt", small_ct, SMALL_PLAN)
    assert report.kind == CLASSIFIER
    assert [c.name.split(" (")[0] for c in report.checks] == ["crops 1x1x32x48x48", "crops 5x1x32x48x48"]
    assert max(c.diff for c in report.checks) == 0.0
    logits, probs = torch.jit.load(str(tmp_path / "cls.pt"))(torch.zeros(2, 1, 32, 48, 48))
    assert logits.shape == probs.shape == (2, 2)
    assert read_config(tmp_path / "cls.pt", "torchscript") == {"model_name": "NoduleClassifier", "width": 8,
                                                              "crop_size": [32, 48, 48], "classes": 2,
                                                              "crop_zoom": 1.0, "calibration": None}


def test_a_calibrated_malignancy_model_exports_with_its_calibration(tmp_path, small_ct):
    """The calibration is part of the network's forward: TorchScript runs it, ground-glass term included."""
    calibration = Calibration(0.7, 1.2, -0.9)
    model = NoduleClassifier(ClassifierConfig(calibration=calibration)).eval()
    report = export_checkpoint(saved(tmp_path, model), "torchscript", tmp_path / "mal.pt", small_ct, SMALL_PLAN)
    assert max(c.diff for c in report.checks) == 0.0
    assert read_config(tmp_path / "mal.pt", "torchscript")["calibration"] == {"bias": 0.7, "scale": 1.2,
                                                                             "ground_glass": -0.9}
    crops = torch.full((2, 1, 32, 48, 48), 30.0)
    crops[1, 0, 16, 23:26, 23:26] = -400.0
    scripted = torch.jit.load(str(tmp_path / "mal.pt"))
    with torch.no_grad():
        assert torch.equal(scripted(crops)[1], model(crops)[1])


def test_the_kind_of_a_checkpoint(tmp_path):
    assert model_kind(saved(tmp_path, NoduleSegmenter(SegmenterConfig(width_factor=2)))) == SEGMENTER
    torch.save({"model_state": NoduleSegmenter(SegmenterConfig(width_factor=2)).state_dict()}, tmp_path / "s.pt")
    assert model_kind(tmp_path / "s.pt") == SEGMENTER
    torch.save({"model_state": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="neither a U-Net nor a nodule classifier"):
        model_kind(tmp_path / "other.pt")


def test_verification_inputs_are_cut_from_the_ct():
    hu = np.arange(9 * 40 * 30, dtype=np.int16).reshape(9, 40, 30)
    plan = VerifyPlan(stacks=((3, 20, 10), (2, 41, 29), (1, 64, 64)), crop_batches=(1, 9))
    stacks = stack_samples(hu, 3, plan)
    assert [s.x.shape for s in stacks] == [(3, 7, 20, 10), (2, 7, 39, 29), (1, 7, 40, 30)]  # 41: odd stays odd
    assert all(s.x.dtype == np.float32 and s.x.flags.c_contiguous for s in stacks)
    first = stacks[0].x  # centre slices 3, 4, 5, each with slices -3..+3 around it; middle rows and cols
    assert np.array_equal(first[1], hu[1:8, 10:30, 10:20]) and np.array_equal(first[0, 3], hu[3, 10:30, 10:20])
    edge = stack_samples(hu[:2], 3, VerifyPlan(stacks=((1, 8, 8),)))[0].x  # beyond the volume: the edge slice
    assert np.array_equal(edge[0], hu[[0, 0, 0, 0, 1, 1, 1], 16:24, 11:19])
    crops = crop_samples(hu, ClassifierConfig(crop_size=(4, 8, 8)), plan)
    assert [c.x.shape for c in crops] == [(1, 1, 4, 8, 8), (9, 1, 4, 8, 8)]
    assert np.array_equal(crops[1].x[8], crops[1].x[0])  # a ninth crop repeats the first centre
    zoomed = crop_samples(hu, ClassifierConfig(crop_size=(4, 8, 8), crop_zoom=2), plan)[0].x
    assert zoomed.shape == (1, 1, 4, 8, 8) and np.all(np.diff(zoomed[0, 0, 0, 4]) == 0.5)  # hu rises 1 per column


def test_a_failed_check_writes_nothing_and_exits_2(tmp_path, small_ct, monkeypatch):
    """An export that does not compute what the eager model does is refused: the earlier file stays,
    and no temporary file is left beside it."""
    model = NoduleClassifier().eval()
    path = saved(tmp_path, model)
    out = tmp_path / "out" / "cls.pt"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")
    real_save = export_module.save_torchscript

    def save_a_wrong_model(model, path):
        wrong = NoduleClassifier().eval()
        wrong.load_state_dict(model.state_dict())
        with torch.no_grad():
            wrong.head_linear.bias.add_(1e-3)
        real_save(wrong, path)

    monkeypatch.setattr(export_module, "save_torchscript", save_a_wrong_model)
    result = run(export, [path, "--format", "torchscript", "--output", out, "--ct", small_ct])
    assert_one_line_error(result, "the export disagrees with the eager model on crops 1x1x32x48x48")
    assert "nothing was written" in result.stderr
    assert out.read_bytes() == b"an earlier export" and [p.name for p in out.parent.iterdir()] == ["cls.pt"]


def test_the_command_checks_its_options_before_the_work(tmp_path):
    path = saved(tmp_path, NoduleClassifier())
    assert_one_line_error(run(export, [path, "--output", tmp_path / "x.pt"]), "--format torchscript|onnx")
    assert_one_line_error(run(export, ["--format", "onnx", "--output", tmp_path / "x.pt"]), "give a CHECKPOINT")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run(export, [path, "--format", "torchscript", "--output", tmp_path / "file" / "x.pt"]),
                          "is a file, not a folder")
    assert_one_line_error(run(export, [tmp_path / "none.pt", "--format", "torchscript", "--output", tmp_path / "x"]),
                          "checkpoint")
    assert not (tmp_path / "x").exists()


def test_without_the_extra_onnx_says_what_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(export_module.importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    with pytest.raises(UserError, match="onnxruntime not installed"):
        require_onnx()
    result = run(export, [saved(tmp_path, NoduleClassifier()), "--format", "onnx", "--output", tmp_path / "m.onnx"])
    assert_one_line_error(result, "pip install p2ch_app[export]")
    assert not (tmp_path / "m.onnx").exists()


@requires_onnx
def test_onnx_unet_takes_any_batch_and_slice_size(tmp_path, small_ct):
    """Depth 4 (padding to multiples of 8) with bilinear up-sampling; the book's architecture is exported
    with the book's weights below."""
    import onnx

    torch.manual_seed(2)
    model = NoduleSegmenter(SEGMENTERS["upsample, max pooling, depth 4"]).eval()
    out = tmp_path / "seg.onnx"
    report = export_checkpoint(saved(tmp_path, model), "onnx", out, small_ct, SMALL_PLAN)
    assert all(c.passed for c in report.checks) and len(report.checks) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("seg", ".seg"))] == ["seg.onnx"]  # one file
    graph = onnx.load(str(out)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 7, "height", "width"] and graph.input[0].name == "stack"
    assert read_config(out, "onnx")["pooling"] == "max"
    run_export = load_export(out, "onnx")
    for batch, rows, cols in ODD_SIZES:
        x = np.random.default_rng(cols).normal(-500, 400, (batch, 7, rows, cols)).astype(np.float32)
        want, got = eager_outputs(model, x), run_export(x)
        assert got[0].shape == want[0].shape and np.abs(got[0] - want[0]).max() <= 1e-4


@requires_onnx
@pytest.mark.parametrize("calibration", [None, Calibration(0.7, 1.2, -0.9)])
def test_onnx_classifier_takes_any_batch_and_carries_its_config(tmp_path, small_ct, calibration):
    """A malignancy model's calibration runs in the ONNX graph too, ground-glass term included."""
    import onnx
    import onnxruntime

    model = NoduleClassifier(ClassifierConfig(width=4, crop_size=(16, 32, 32), crop_zoom=2,
                                              calibration=calibration)).eval()
    out = tmp_path / "cls.onnx"
    report = export_checkpoint(saved(tmp_path, model), "onnx", out, small_ct, SMALL_PLAN)
    # how its crops are cut travels in the file, where ONNX Runtime reads it too
    assert read_config(out, "onnx") == {"model_name": "NoduleClassifier", "width": 4, "crop_size": [16, 32, 32],
                                        "classes": 2, "crop_zoom": 2,
                                        "calibration": calibration and asdict(calibration)}
    crops = np.full((2, 1, 16, 32, 32), 30.0, np.float32)
    crops[1, 0, 8, 15:18, 15:18] = -400.0  # a ground-glass centre
    with torch.no_grad():
        eager = model(torch.from_numpy(crops))[1].numpy()
    assert np.abs(load_export(out, "onnx")(crops)[1] - eager).max() <= 1e-5
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map[CONFIG_KEY])["crop_zoom"] == 2
    assert [c.name.split(" (")[0] for c in report.checks] == ["crops 1x1x16x32x32", "crops 5x1x16x32x32"]
    assert all(c.diff <= 1e-5 and c.eager_error is None for c in report.checks)
    model_proto = onnx.load(str(out))
    assert [o.name for o in model_proto.graph.output] == ["logits", "probability"]
    logits, probs = load_export(out, "onnx")(np.zeros((3, 1, 16, 32, 32), np.float32))
    assert logits.shape == probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-6)


@requires_shared
def test_book_unet_to_torchscript_on_the_real_ct(tmp_path):
    """The command on the book's .state file and the real CT: 512x512 and 256x320 stacks at batch 1 and 3,
    and an odd 257x319 one; TorchScript runs the very kernels of the eager model, so it matches exactly."""
    out = tmp_path / "seg.pt"
    result = run(export, [next(BOOK_MODELS.glob("seg_*.state")), "--format", "torchscript", "--output", out,
                          "--ct", REAL_DICOM])
    assert result.exit_code == 0, result.output
    for shape in ("stack 1x7x512x512", "stack 3x7x512x512", "stack 3x7x256x320", "stack 1x7x257x319"):
        assert f"{shape} (" in result.output and f"{REAL_DICOM}" in result.output
    assert result.output.count("max abs diff 0\n") == 4 and "within 1e-05 on all 4 inputs" in result.output
    assert torch.jit.load(str(out))(torch.zeros(1, 7, 100, 90)).shape == (1, 1, 100, 90)


@requires_shared
@requires_onnx
def test_book_classifier_to_onnx_on_the_real_ct(tmp_path):
    out = tmp_path / "cls.onnx"
    result = run(export, [next(BOOK_MODELS.glob("cls_*.state")), "--format", "onnx", "--output", out,
                          "--ct", REAL_DICOM])
    assert result.exit_code == 0, result.output
    assert "crops 8x1x32x48x48" in result.output and "within 1e-05 on all 2 inputs" in result.output


@requires_shared
@requires_onnx
def test_book_unet_to_onnx_is_within_float32_rounding_on_the_real_ct(tmp_path):
    """ONNX Runtime's convolutions round differently from PyTorch's: on CT stacks the U-Net's probabilities
    differ by more than 1e-5, but by less than PyTorch's own float32 result differs from float64."""
    plan = VerifyPlan(stacks=((1, 160, 192), (3, 97, 131)))
    report = export_checkpoint(next(BOOK_MODELS.glob("seg_*.state")), "onnx", tmp_path / "seg.onnx", REAL_DICOM,
                               plan)
    assert all(c.passed for c in report.checks)
    assert all(c.diff <= 1e-5 or c.diff <= 2 * c.eager_error for c in report.checks)
    assert report.max_diff < 2e-4


def test_without_a_ct_the_inputs_come_from_a_synthetic_one(tmp_path):
    result = run(export, [saved(tmp_path, NoduleClassifier()), "--format", "torchscript", "--output",
                          tmp_path / "cls.pt"])
    assert result.exit_code == 0, result.output
    assert "a synthetic chest CT (p2ch_app.data.synth, seed 0, 50x512x512 voxels)" in result.output
