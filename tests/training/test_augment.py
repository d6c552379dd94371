import pytest
import torch

from p2ch_app.training.augment import augment, parse_augmentations, random_affines


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_only_mirrors_each_sample_and_its_mask_exactly_on_some_axes():
    images = torch.randn(16, 1, 6, 8, 10)
    masks = images > 1
    out, moved = augment(images, ["flip"], generator(), masks=masks)
    theta = random_affines(16, 3, ["flip"], generator(), "cpu")
    for i in range(16):
        signs = theta[i].diagonal()  # affine axes are (x, y, z) = (col, row, index)
        flip_dims = [3 - k for k in range(3) if signs[k] < 0]  # sample dims (C, D, H, W)
        assert torch.equal(out[i], images[i].flip(flip_dims) if flip_dims else images[i])
        assert torch.equal(moved[i], masks[i].flip(flip_dims) if flip_dims else masks[i])
    assert not torch.equal(out, images)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    resampled = torch.nn.functional.grid_sample(images, grid, align_corners=False)
    assert torch.allclose(out, resampled, atol=1e-5)  # what the general path computes, less exactly


def test_identity_returns_the_input():
    images = torch.randn(4, 7, 12, 14)
    same, masks = augment(images, [], generator())
    assert same is images and masks is None
    grid = torch.nn.functional.affine_grid(torch.eye(2, 3).repeat(4, 1, 1), list(images.shape), align_corners=False)
    resampled = torch.nn.functional.grid_sample(images, grid, align_corners=False)
    assert torch.allclose(resampled, images, atol=1e-5)


def test_noise_has_the_asked_standard_deviation():
    images = torch.zeros(8, 1, 16, 32, 32)
    for names in (["noise"], ["flip", "noise"]):
        out, _ = augment(images, names, generator())
        assert out.std().item() == pytest.approx(25, rel=0.05), names


def test_masks_follow_their_images():
    images = torch.full((6, 1, 40, 40), -900.0)
    masks = torch.zeros(6, 1, 40, 40, dtype=torch.bool)
    images[:, :, 10:18, 22:30] = 100.0  # an off-centre square nodule
    masks[:, :, 10:18, 22:30] = True
    out, moved = augment(images, ["flip", "offset", "scale", "rotate"], generator(3), masks=masks)
    assert moved.dtype == torch.bool and moved.shape == masks.shape
    for i in range(6):
        inside, outside = out[i][moved[i]], out[i][~moved[i]]
        assert inside.numel() > 20 and inside.mean() > 0 and outside.mean() < -800


def test_same_generator_same_augmentation():
    images = torch.randn(4, 1, 8, 8, 8)
    a, _ = augment(images, ["flip", "rotate", "noise"], generator(5))
    b, _ = augment(images, ["flip", "rotate", "noise"], generator(5))
    assert torch.equal(a, b)


def test_parse_augmentations():
    assert parse_augmentations("flip, noise") == ("flip", "noise")
    assert parse_augmentations("") == ()
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        parse_augmentations("flip,blur")


@pytest.mark.parametrize("names", [["flip", "offset", "scale", "rotate"], ["scale"], ["offset", "rotate"]])
def test_3d_resampling_is_a_3d_grid_sample(names):
    """The separable 3D path gives what one trilinear grid_sample of the whole crop gives (the path it
    replaced): equal up to float rounding for images, and equal for masks."""
    images = torch.randn(12, 2, 9, 14, 16) * 400
    masks = images > 300
    out, moved = augment(images, names, generator(7), masks=masks)
    theta = random_affines(12, 3, names, generator(7), "cpu")
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
    expected_masks = torch.nn.functional.grid_sample(masks.float(), grid, mode="nearest", align_corners=False) > 0.5
    assert not torch.allclose(out, images, atol=1)
    assert torch.allclose(out, expected, atol=0.01)  # HU
    assert torch.equal(moved, expected_masks)
