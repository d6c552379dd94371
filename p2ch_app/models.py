"""The two networks: a 3D CNN that classifies candidate crops, a 2D U-Net that segments slices.

Parameter names follow the book's published checkpoints (tail_batchnorm, block1.conv1, ...,
input_batchnorm, unet.down_path.N.block.M, ...) so those files load with strict=True. Each
network is built from a frozen config that travels in our checkpoints (checkpoints.py), so the
network that runs is always the one that was trained, down to parameter-free parts like pooling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class _ConvPool3d(nn.Module):
    """Two 3x3x3 convolutions with ReLU, then a 2x max-pool: halves the crop, widens the features."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.relu_(self.conv2(F.relu_(self.conv1(x)))), 2)


GROUND_GLASS_HU = -200.0  # a nodule whose centre is fainter than this is ground glass (subsolid)


@dataclass(frozen=True)
class Calibration:
    """How luna-finetune-mal turns a malignancy network's logit into log-odds, fitted on its validation
    nodules: bias + scale * logit, + ground_glass where the crop's centre is under GROUND_GLASS_HU. A few
    hundred nodules teach the network size but not density, which radiologists' ratings weigh (solid or
    subsolid is the first split of Lung-RADS); the crop's centre shows it directly (docs/experiments.md)."""

    bias: float
    scale: float
    ground_glass: float


@dataclass(frozen=True)
class ClassifierConfig:
    """The classifier's architecture; the defaults are the book's LunaModel."""

    width: int = 8  # channels of the first block, doubling per block
    crop_size: tuple[int, int, int] = (32, 48, 48)
    classes: int = 2
    # the crop's rows and columns sample the CT this many times finer than its pixels (slices as they
    # are): 1 is the book's; 2 on the demo's ~1.3 mm pixels shows the network LUNA16's ~0.65 mm
    crop_zoom: float = 1.0
    calibration: Calibration | None = None  # a fine-tuned malignancy model's; None: the network's own softmax


def subsolid(crops: torch.Tensor, level_hu: float = GROUND_GLASS_HU) -> torch.Tensor:
    """Per N x 1 x D x H x W crop: whether the mean HU of its middle slice's central 3x3 voxels lies
    under level_hu (a ground-glass nodule, when the crop is centred on one)."""
    d, h, w = crops.shape[2] // 2, crops.shape[3] // 2, crops.shape[4] // 2
    return crops[:, 0, d, h - 1:h + 2, w - 1:w + 2].float().mean(dim=(1, 2)) < level_hu


class NoduleClassifier(nn.Module):
    """Nodule vs non-nodule (or benign vs malignant) from a 1x32x48x48 HU crop."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        width, crop_size, classes = config.width, config.crop_size, config.classes
        self.tail_batchnorm = nn.BatchNorm3d(1)  # normalises raw HU; the book's name for it
        self.block1 = _ConvPool3d(1, width)
        self.block2 = _ConvPool3d(width, width * 2)
        self.block3 = _ConvPool3d(width * 2, width * 4)
        self.block4 = _ConvPool3d(width * 4, width * 8)
        features = width * 8 * math.prod(s // 16 for s in crop_size)
        self.head_linear = nn.Linear(features, classes)
        # plain attributes, not parameters: the weights stay the book's layout, and TorchScript keeps them
        calibration = config.calibration or Calibration(0.0, 1.0, 0.0)
        self.calibrated = config.calibration is not None
        self.bias, self.scale, self.ground_glass = calibration.bias, calibration.scale, calibration.ground_glass
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def blocks(self) -> list[nn.Module]:
        """Trainable stages from input to head, for fine-tuning the last N of them."""
        return [self.tail_batchnorm, self.block1, self.block2, self.block3, self.block4, self.head_linear]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.block4(self.block3(self.block2(self.block1(self.tail_batchnorm(x)))))  # TorchScript compiles a chain
        logits = self.head_linear(y.flatten(1))
        if self.calibrated:
            logits = self._calibrated(logits, x)
        return logits, logits.softmax(dim=1)

    def _calibrated(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Two-class logits whose difference is the calibrated log-odds of class 1."""
        ground_glass = self.ground_glass * subsolid(x).to(logits.dtype)
        odds = self.bias + self.scale * (logits[:, 1] - logits[:, 0]) + ground_glass
        return torch.stack([torch.zeros_like(odds), odds], dim=1)


def _conv_block(in_channels: int, out_channels: int, padding: bool, batch_norm: bool) -> nn.Sequential:
    layers = []
    for c_in in (in_channels, out_channels):
        layers += [nn.Conv2d(c_in, out_channels, 3, padding=int(padding)), nn.ReLU(inplace=True)]
        layers.append(nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity())
    return nn.Sequential(*layers)


class _DownStep(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, padding: bool, batch_norm: bool):
        super().__init__()
        self.block = _conv_block(in_channels, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _UpStep(nn.Module):
    """Upsample, join the skip connection (centre-cropped when unpadded convs shrank it), convolve."""

    def __init__(self, in_channels: int, out_channels: int, up_mode: str, padding: bool, batch_norm: bool):
        super().__init__()
        if up_mode == "upconv":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(in_channels, out_channels, 1))
        self.conv_block = _DownStep(in_channels, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = (skip.shape[-2] - x.shape[-2]) // 2, (skip.shape[-1] - x.shape[-1]) // 2
        skip = skip[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
        return self.conv_block(torch.cat([x, skip], dim=1))


POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, wf: int, padding: bool,
                 batch_norm: bool, up_mode: str, pooling: str = "avg"):
        super().__init__()
        self.pool = POOLS[pooling](2)  # a parameter-free module, so TorchScript can call it
        widths = [2 ** (wf + i) for i in range(depth)]
        self.down_path = nn.ModuleList(
            _DownStep(c_in, c_out, padding, batch_norm) for c_in, c_out in zip([in_channels] + widths, widths))
        self.up_path = nn.ModuleList(
            _UpStep(c_in, c_out, up_mode, padding, batch_norm)
            for c_in, c_out in zip(widths[::-1], widths[::-1][1:]))
        self.last = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i < len(self.down_path) - 1:
                skips.append(x)
                x = self.pool(x)
        for i, up in enumerate(self.up_path):  # indexed, not zip(reversed(...)): TorchScript compiles this
            x = up(x, skips[-1 - i])
        return self.last(x)


@dataclass(frozen=True)
class SegmenterConfig:
    """The U-Net's architecture; the defaults are the book's published model (UNetWrapper):
    3 context slices either side (7 channels), depth 3, 2**4 = 16 first-level filters, padding,
    batch norm, transposed-conv up-sampling and 2x2 average pooling between levels."""

    context: int = 3
    depth: int = 3
    width_factor: int = 4
    padding: bool = True
    batch_norm: bool = True
    up_mode: str = "upconv"  # or "upsample": bilinear, then a 1x1 convolution
    pooling: str = "avg"  # or "max"; pooling has no parameters, so only the config tells them apart

    def __post_init__(self):
        if self.up_mode not in ("upconv", "upsample"):
            raise ValueError(f"up_mode must be 'upconv' or 'upsample', got {self.up_mode!r}")
        if self.pooling not in POOLS:
            raise ValueError(f"pooling must be one of {sorted(POOLS)}, got {self.pooling!r}")

    @property
    def in_channels(self) -> int:
        return 2 * self.context + 1


def _exporting() -> bool:
    """Whether torch.export is tracing this call. A branch on the slice size would be traced only as the
    example input takes it, and an ONNX file of that graph would not pad other sizes; so there the U-Net
    always pads (by zero rows for a fitting size: a copy). TorchScript keeps the branch itself."""
    if torch.jit.is_scripting():
        return False
    else:
        is_exporting = getattr(torch.compiler, "is_exporting", None)  # not in every torch >= 2.1
        return is_exporting is not None and is_exporting()


class NoduleSegmenter(nn.Module):
    """Per-pixel nodule probability for the centre slice of a (2C+1)-slice stack.

    Any slice size works: inputs are padded to a multiple of 2^(depth-1) and the output cropped back.
    """

    def __init__(self, config: SegmenterConfig = SegmenterConfig()):
        super().__init__()
        self.config = config
        self.input_batchnorm = nn.BatchNorm2d(config.in_channels)
        self.unet = UNet(config.in_channels, 1, config.depth, config.width_factor, config.padding,
                         config.batch_norm, config.up_mode, config.pooling)
        self.multiple = 2 ** (config.depth - 1)
        self.padding = config.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]  # read from the input, not frozen: TorchScript and ONNX keep them dynamic
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        y = self.input_batchnorm(x)
        if _exporting() or pad_h > 0 or pad_w > 0:
            y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
        y = self.unet(y)
        if self.padding:
            y = y[..., :h, :w]
        return torch.sigmoid(y)
