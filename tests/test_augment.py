"""data.augment: the batch warp keeps image and mask aligned, labels integer, and is off when asked."""
from __future__ import annotations

import pytest
import torch

from data.augment import SpatialAugment


def blobs(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are their own masks: smooth discs at random places, plus a 3-class mask version."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        cy, cx = torch.randint(16, size - 16, (2,), generator=g)
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 1
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 2
    return masks[:, None].float() / 2, masks


def test_image_and_mask_move_together_and_labels_stay_integer():
    images, masks = blobs()
    torch.manual_seed(1)
    out, labels = SpatialAugment(p=1.0, noise=0.0)(images, masks)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert labels.shape == masks.shape and labels.dtype == masks.dtype
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(labels, masks)  # p=1: every sample moved
    # the image is the mask / 2, so the warped image read back as labels matches the warped mask
    agree = ((out[:, 0] * 2).round().long() == labels).float().mean()
    assert agree > 0.98, agree


def test_p_zero_without_noise_is_the_identity():
    images, masks = blobs()
    out, labels = SpatialAugment(p=0.0, noise=0.0)(images, masks)
    assert torch.equal(labels, masks)
    assert torch.allclose(out, images, atol=1e-4)


def test_draws_follow_the_seed_and_vary_between_samples():
    images, masks = blobs()
    aug = SpatialAugment(p=1.0)
    torch.manual_seed(3)
    a = aug(images, masks)
    torch.manual_seed(3)
    b = aug(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    grid = aug.sampling_grid(2, 16, 16, torch.device("cpu"))
    assert not torch.allclose(grid[0], grid[1])


def test_noise_stays_in_the_image_range():
    images, masks = blobs()
    out, labels = SpatialAugment(p=0.0, noise=0.5)(images, masks)
    assert torch.equal(labels, masks) and not torch.allclose(out, images)
    assert out.min() >= 0 and out.max() <= 1


def test_bad_shapes_and_parameters_are_refused():
    images, masks = blobs()
    with pytest.raises(ValueError, match="masks are"):
        SpatialAugment()(images, masks[:, None])
    with pytest.raises(ValueError, match="bad parameters"):
        SpatialAugment(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="bad parameters"):
        SpatialAugment(p=1.5)
