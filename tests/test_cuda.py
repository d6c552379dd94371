"""What only a CUDA GPU can show: the pipeline there gives the CPU's results, AMP training and channels-last
layouts work there. Marked cuda: skipped where torch sees no GPU, run by make gpu-check (pytest -m cuda)."""

import numpy as np
import pytest
import torch

from p2ch_app.checkpoints import load_checkpoint, model_entries, save_checkpoint
from p2ch_app.inference.pipeline import AnalysisSettings, Models, analyze, classify, load_models, slice_probabilities
from p2ch_app.inference.runtime import precision
from p2ch_app.models import NoduleSegmenter
from tests.evaluation.test_distributed import small_classifier, threshold_unet
from tests.inference.test_pipeline import hand_made_ct

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def book_shaped_unet(seed: int = 0) -> NoduleSegmenter:
    """The book's U-Net architecture with random weights, its input norm mapping HU to about [-1, 1] so
    that its probabilities stay away from 0 and 1, where any difference would hide."""
    torch.manual_seed(seed)
    model = NoduleSegmenter()
    with torch.no_grad():
        model.input_batchnorm.running_mean.fill_(-500.0)
        model.input_batchnorm.running_var.fill_(500.0 ** 2)
    return model.eval()


def test_exact_mode_turns_tf32_off_on_cuda_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with precision(CUDA, fast=False):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        with precision(CPU, fast=False):
            assert torch.backends.cudnn.allow_tf32  # nothing to change off CUDA
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.cuda
def test_the_networks_on_cuda_give_the_cpu_probabilities():
    hu = hand_made_ct().hu
    unet = book_shaped_unet()
    probs = []
    for device in (CPU, CUDA):
        model = unet.to(device, memory_format=torch.channels_last)
        with torch.inference_mode(), precision(device, fast=False):
            probs.append(slice_probabilities(hu, model, device, 10, 26).cpu().numpy())
    assert 0.01 < probs[0].mean() < 0.99  # not saturated: differences would show
    assert np.abs(probs[1] - probs[0]).max() <= 1e-4
    centres = np.array([[18.0, 40.0, 28.0], [12.0, 30.0, 50.0], [20.0, 50.0, 40.0]])
    cpu, cuda = (classify(hu, centres, small_classifier().to(device, memory_format=torch.channels_last_3d), device,
                          AnalysisSettings(batch_size=2)) for device in (CPU, CUDA))
    assert np.abs(cuda - cpu).max() <= 1e-4


@pytest.mark.cuda
def test_analyze_on_cuda_finds_the_cpu_candidates():
    ct = hand_made_ct()
    found = []
    for device in (CPU, CUDA):
        models = Models(threshold_unet(0.0).to(device, memory_format=torch.channels_last),
                        small_classifier().to(device, memory_format=torch.channels_last_3d), None, {})
        found.append(analyze(ct, models, AnalysisSettings(keep_outside=True, threshold=0.0), device))
    on_cpu, on_cuda = found
    assert len(on_cuda) == len(on_cpu) >= 2
    by_centre = {d.center_irc: d for d in on_cpu}
    for d in on_cuda:
        twin = by_centre[d.center_irc]  # the same components: the same centres and voxels
        assert d.voxels == twin.voxels and abs(d.nodule_prob - twin.nodule_prob) <= 1e-4


@pytest.mark.cuda
def test_models_load_channels_last_on_cuda_and_give_the_contiguous_result(tmp_path):
    save_checkpoint(tmp_path / "seg.pt", model_entries(book_shaped_unet()))
    save_checkpoint(tmp_path / "cls.pt", model_entries(small_classifier()))
    models = load_models(tmp_path / "seg.pt", tmp_path / "cls.pt", None, CUDA)
    conv2d = models.segmenter.unet.down_path[0].block[0].weight
    conv3d = models.classifier.block1.conv1.weight
    assert conv2d.is_cuda and conv2d.is_contiguous(memory_format=torch.channels_last)
    assert conv3d.is_contiguous(memory_format=torch.channels_last_3d)
    stacks = torch.from_numpy(hand_made_ct().hu[8:15].astype(np.float32))[None].to(CUDA)
    crops = torch.randn(4, 1, 32, 48, 48, device=CUDA) * 400 - 500
    with torch.inference_mode(), precision(CUDA, fast=False):
        seg_last = models.segmenter(stacks.contiguous(memory_format=torch.channels_last))
        cls_last = models.classifier(crops.contiguous(memory_format=torch.channels_last_3d))[1]
        models.segmenter.to(memory_format=torch.contiguous_format)
        models.classifier.to(memory_format=torch.contiguous_format)
        assert (seg_last - models.segmenter(stacks)).abs().max() <= 1e-5
        assert (cls_last - models.classifier(crops)[1]).abs().max() <= 1e-5


@pytest.mark.cuda
def test_amp_training_on_cuda_scales_the_loss_and_keeps_channels_last(prepared_synth, tmp_path):
    from p2ch_app.data.index import build_index
    from p2ch_app.training.classification import NoduleSettings, nodule_task
    from p2ch_app.training.loop import Sampling, TrainConfig, fit

    sampling = Sampling(prepared_synth / "cache", prepared_synth, val_stride=3, epoch_samples=64,
                        augmentations=("flip", "noise"))
    cfg = TrainConfig(command="amp", epochs=1, batch_size=16, workers=0, device="cuda", runs_dir=tmp_path)
    model, run_dir = fit(nodule_task(build_index(prepared_synth), NoduleSettings(sampling)), cfg, progress=False)
    weight = model.block1.conv1.weight
    assert weight.is_cuda and weight.dtype == torch.float32  # AMP keeps float32 master weights
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = load_checkpoint(run_dir / "last.pt")
    assert last["scaler_state"]["scale"] > 0  # the gradient scaler ran: float16 autocast was on
    assert np.isfinite(last["metrics"]["train"]["loss"]) and last["samples_seen"] == 64
