"""data.augment: the batch transforms keep image and mask aligned, labels integer, and are off when asked."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from data.augment import BatchAugment, SpatialAugment
from tests.test_dataset import _asymmetric_mask, _which


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


# ----------------------------------------------------------------------------- BatchAugment
def asymmetric_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """n copies of an asymmetric mask, the images 0.1 / 0.9 on it, and the mask's 8 flip/turn variants."""
    mask, variants = _asymmetric_mask()
    masks = mask.expand(n, -1, -1).clone()
    return (masks.float() * 0.8 + 0.1)[:, None], masks, mask, variants


def test_batch_augment_turns_image_and_mask_together_through_all_eight_variants():
    images, masks, _, variants = asymmetric_batch(256)
    torch.manual_seed(0)
    out, labels = BatchAugment(intensity=False)(images, masks)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert labels.shape == masks.shape and labels.dtype == torch.int64
    torch.testing.assert_close(out[:, 0], labels.float() * 0.8 + 0.1)  # each image went where its mask went
    counts = Counter(_which(m, variants) for m in labels)
    assert set(counts) == set(range(8))
    assert all(abs(c / 256 - 1 / 8) < 0.07 for c in counts.values()), counts  # PairAugment's 1/8 each


def test_batch_augment_jitters_about_half_the_images_and_never_the_masks():
    images, masks, _, _ = asymmetric_batch(256)
    torch.manual_seed(0)
    out, labels = BatchAugment(flip=False, rot90=False)(images, masks)
    assert torch.equal(labels, masks)
    assert out.min() >= 0 and out.max() <= 1
    changed = (out != images).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65
    # the jitter is monotone: in every image the lesion stays brighter than the background
    lesion, background = out[:, 0][masks == 1].view(256, -1), out[:, 0][masks == 0].view(256, -1)
    assert (lesion.min(1).values > background.max(1).values).all()
    # and within PairAugment's ranges: 0.9 -> 0.9 ** [0.8, 1.2] * [0.85, 1.15] + [-0.05, 0.05]
    top = lesion[:, 0]
    assert top.min() >= 0.9 ** 1.2 * 0.85 - 0.05 - 1e-6 and top.max() <= 1


def test_batch_augment_off_is_the_identity_and_draws_follow_the_seed():
    images, masks, _, _ = asymmetric_batch(8)
    out, labels = BatchAugment(flip=False, rot90=False, intensity=False)(images, masks)
    assert torch.equal(out, images) and torch.equal(labels, masks)
    aug = BatchAugment()
    torch.manual_seed(5)
    a = aug(images, masks)
    torch.manual_seed(5)
    b = aug(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_augment_refuses_bad_shapes():
    images, masks, _, _ = asymmetric_batch(2)
    with pytest.raises(ValueError, match="masks are"):
        BatchAugment()(images, masks[:, None])
    with pytest.raises(ValueError, match="square"):
        BatchAugment()(images[..., :8], masks[..., :8])
    out, _ = BatchAugment(rot90=False)(images[..., :8], masks[..., :8])  # flips alone need no square
    assert out.shape == (2, 1, 16, 8)
