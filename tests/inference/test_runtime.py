"""The runtime: device choice, the allocator, and the U-Net in pieces and bands giving whole results."""

import pytest
import torch
from torch import nn

from p2ch_app.errors import UserError
from p2ch_app.inference.runtime import around, in_row_bands, receptive_halo, select_device


@pytest.mark.parametrize("depth, height, rows", [(3, 200, 64), (3, 128, 50), (2, 96, 16)])
def test_row_bands_give_the_whole_slice_result(depth, height, rows):
    from p2ch_app.models import NoduleSegmenter, SegmenterConfig

    class Logits(NoduleSegmenter):  # before the sigmoid, which would hide differences
        def forward(self, x):
            return self.unet(self.input_batchnorm(x))

    torch.manual_seed(depth)
    model = Logits(SegmenterConfig(context=1, depth=depth, width_factor=2)).eval()
    for module in model.modules():  # batch norm with non-trivial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, height, 40)
    with torch.inference_mode():
        whole, banded = model(x), in_row_bands(model, x, rows)
        wrong = in_row_bands(model, x, rows, halo=0)  # zero padding at every band edge: visibly wrong
    assert banded.shape == whole.shape
    assert torch.allclose(banded, whole, rtol=0, atol=1e-5)
    assert (wrong - whole).abs().max() > 1e-3


def test_around_widens_a_span_by_the_halo_from_the_pooling_grid():
    from p2ch_app.models import NoduleSegmenter, SegmenterConfig

    model = NoduleSegmenter(SegmenterConfig(context=1, depth=3, width_factor=1))
    assert (model.multiple, receptive_halo(model)) == (4, 32)
    assert around(slice(0, 256), 256, model) == slice(0, 256)  # the whole slice: nothing to add
    assert around(slice(70, 190), 256, model) == slice(36, 222)  # 70 - 32 = 38, down to the grid's 36
    assert around(slice(20, 250), 256, model) == slice(0, 256)  # clipped at the slice's edges
    assert around(slice(40, 41), 300, model) == slice(8, 73)


@pytest.mark.parametrize("batch, height, width, batch_pixels", [(5, 32, 40, 2 * 32 * 40), (3, 128, 40, 64 * 40)])
def test_in_pieces_gives_the_whole_batch_result(batch, height, width, batch_pixels, monkeypatch):
    import p2ch_app.inference.runtime
    from p2ch_app.models import NoduleSegmenter, SegmenterConfig

    torch.manual_seed(0)
    model = NoduleSegmenter(SegmenterConfig(context=1, depth=2, width_factor=2)).eval()
    passes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward",
                        lambda x: passes.append(x.shape[0] * x.shape[2] * x.shape[3]) or real_forward(x))
    x = torch.randn(batch, 3, height, width)
    with torch.inference_mode():
        whole = real_forward(x)
        pieces = p2ch_app.inference.runtime.in_pieces(model, x, batch_pixels)
    assert pieces.shape == whole.shape and torch.allclose(pieces, whole, rtol=0, atol=1e-5)
    assert len(passes) > 1 and max(passes) <= batch_pixels + 2 * 32 * width  # a band carries its halo


def test_glibc_takes_the_allocator_settings():
    import ctypes.util

    from p2ch_app.inference.runtime import keep_freed_memory, return_freed_memory

    if "libc.so.6" not in str(ctypes.util.find_library("c")):
        pytest.skip("glibc's allocator settings: this C library is not glibc")
    assert keep_freed_memory()  # False when glibc refuses a setting (older ones cap the mmap threshold)
    return_freed_memory()


def test_device_selection():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="unknown --device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            select_device("cuda")
