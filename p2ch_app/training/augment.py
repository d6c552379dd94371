"""Batched augmentation on the training device: one random affine per sample, applied to the
whole batch by a single affine_grid + grid_sample, so images and their masks move together.
Flips alone are plain mirrors of the batch: they need no resampling.

Works for 3D crops (N, C, D, H, W) and 2D slice stacks (N, C, H, W). Rotation is about the
index (slice) axis only: CT voxels are rarely isotropic along it. So a 3D affine never mixes the
index axis with the others, and its trilinear resampling splits into a bilinear one of every slice
(one 2D grid_sample over all slices) and a linear one along the index axis: the same weights and
border clamping, 3x faster than a 3D grid_sample, equal up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from p2ch_app.training import AUGMENTATIONS


def parse_augmentations(text: str | None) -> tuple[str, ...]:
    """'flip,noise' -> ('flip', 'noise'); '' or None -> none; an unknown name is a ValueError."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {','.join(AUGMENTATIONS)}")
    return names


def random_affines(n: int, dims: int, enabled, generator: torch.Generator, device,
                   max_offset: float = 0.1, max_scale: float = 0.2) -> torch.Tensor:
    """(n, dims, dims + 1) matrices in affine_grid's normalised coordinates (x = last axis first)."""
    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    matrix = torch.eye(dims, device=device).repeat(n, 1, 1)
    if "flip" in enabled:
        signs = torch.where(uniform(n, dims) < 0.5, -1.0, 1.0)
        matrix = matrix * signs[:, None, :]
    if "scale" in enabled:
        matrix = matrix * (1 + max_scale * (2 * uniform(n, dims) - 1))[:, None, :]
    if "rotate" in enabled:
        angle = uniform(n) * 2 * math.pi
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.eye(dims, device=device).repeat(n, 1, 1)
        rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = cos, -sin, sin, cos
        matrix = rotation @ matrix
    shift = torch.zeros(n, dims, 1, device=device)
    if "offset" in enabled:
        shift = (2 * max_offset * (2 * uniform(n, dims, 1) - 1))  # the crop spans 2 normalised units
    return torch.cat([matrix, shift], dim=2)


def augment(images: torch.Tensor, enabled, generator: torch.Generator, masks: torch.Tensor | None = None,
            noise_hu: float = 25.0):
    """Augment a batch of HU images (and masks, moved identically); returns (images, masks)."""
    enabled = tuple(enabled)
    geometric = [e for e in enabled if e != "noise"]
    dims = images.dim() - 2
    if geometric:
        theta = random_affines(images.shape[0], dims, geometric, generator, images.device)
        if set(geometric) == {"flip"}:  # mirrors need no resampling: exact, and far cheaper than grid_sample
            images, masks = _mirror(images, theta), None if masks is None else _mirror(masks, theta)
        elif dims == 3:
            images = _resample_3d(images, theta)
            masks = None if masks is None else _resample_3d(masks.float(), theta, nearest=True) > 0.5
        else:
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
            if masks is not None:
                moved = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
                masks = moved > 0.5
    if "noise" in enabled:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        images = images + noise_hu * noise
    return images, masks


def _resample_3d(batch: torch.Tensor, theta: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """grid_sample of (N, C, D, H, W) by affines that keep the index axis apart (theta's last row
    touches z alone): every slice resampled in-plane at once, then each output slice interpolated
    between its two source slices. Border padding (bilinear), or zeros and nearest for masks."""
    n, c, depth, height, width = batch.shape
    planar = F.affine_grid(theta[:, :2][:, :, [0, 1, 3]], [n, c * depth, height, width], align_corners=False)
    mode, padding = ("nearest", "zeros") if nearest else ("bilinear", "border")
    slices = F.grid_sample(batch.reshape(n, c * depth, height, width), planar, mode=mode, padding_mode=padding,
                           align_corners=False).view(n, c, depth, height, width)
    z = torch.linspace(-1 + 1 / depth, 1 - 1 / depth, depth, device=batch.device, dtype=theta.dtype)
    source = ((theta[:, 2, 2:3] * z + theta[:, 2, 3:4] + 1) * depth - 1) / 2  # (N, D) in slice units
    if nearest:
        index = torch.round(source)  # grid_sample's nearest rounds half to even, as torch.round does
        inside = (index >= 0) & (index <= depth - 1)
        picked = slices.gather(2, _along_index(index.clamp(0, depth - 1).long(), slices))
        return picked * _along_index(inside, slices)
    source = source.clamp(0, depth - 1)
    below = source.floor().long()
    above, weight = (below + 1).clamp(max=depth - 1), source - below
    lower, upper = slices.gather(2, _along_index(below, slices)), slices.gather(2, _along_index(above, slices))
    return torch.lerp(lower, upper, _along_index(weight.to(slices.dtype), slices))


def _along_index(per_slice: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, D) values broadcast (expanded, no copy) to like's (N, C, D, H, W)."""
    return per_slice[:, None, :, None, None].expand(like.shape[0], like.shape[1], -1, like.shape[3], like.shape[4])


def _mirror(batch: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each sample flipped along the axes whose entry on theta's diagonal is negative (affine axis k
    is the k-th dimension from the end: x = columns first)."""
    for k in range(theta.shape[1]):
        flipped = (theta[:, k, k] < 0).view(-1, *[1] * (batch.dim() - 1))
        batch = torch.where(flipped, batch.flip(-1 - k), batch)
    return batch
