"""data.augment: the batch transforms keep image and mask aligned, labels integer, and are off when asked;
PairAugment (per item) and BatchAugment (per batch) draw the same distribution; and training really feeds
the model augmented slices on both data paths."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from data.augment import BatchAugment, SpatialAugment
from data.dataset import PairAugment
from tests.script_fixtures import processed, run_train, slice_rows, train_argv  # noqa: F401
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


# ----------------------------------------------------------------------------- PairAugment = BatchAugment
DRAWS = 4000


def _draws(per_batch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DRAWS augmentations of one asymmetric slice (image 0.2 off the mask, 0.7 on it), per item through
    PairAugment or as one batch through BatchAugment: (flip/turn variant index, value 0.2 became, 0.7 became)."""
    mask, variants = _asymmetric_mask()
    image = torch.where(mask == 1, 0.7, 0.2)
    torch.manual_seed(0)
    if per_batch:
        images, masks = BatchAugment()(image.expand(DRAWS, 1, -1, -1).clone(), mask.expand(DRAWS, -1, -1).clone())
        pairs = list(zip(images[:, 0], masks))
    else:
        pairs = [PairAugment()(image, mask) for _ in range(DRAWS)]
    which = torch.tensor([_which(m, variants) for _, m in pairs])
    background = torch.stack([img[m == 0][0] for img, m in pairs])
    lesion = torch.stack([img[m == 1][0] for img, m in pairs])
    return which, background, lesion


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = [torch.searchsorted(x.sort().values, grid, right=True) / len(x) for x in (a, b)]
    return float((cdf[0] - cdf[1]).abs().max())


def test_pair_and_batch_augment_draw_the_same_distribution():
    """The per-item path (DataLoader workers) and the per-batch path (data on the device) must augment
    alike, or a run's result would depend on where its data sits. Compared over DRAWS seeded draws each."""
    pair, batch = _draws(per_batch=False), _draws(per_batch=True)
    # each of the 8 flips/turns 1/8 of the time: the frequencies agree within 4 binomial standard deviations
    tolerance = 4 * (2 * (1 / 8) * (7 / 8) / DRAWS) ** 0.5
    for variant in range(8):
        p, b = ((which == variant).float().mean() for which, _, _ in (pair, batch))
        assert abs(p - b) < tolerance and abs(p - 1 / 8) < tolerance, (variant, float(p), float(b))
    # the jitter about half the time, with the same parameters: the jittered values of 0.2 and 0.7 agree in
    # distribution (Kolmogorov-Smirnov at the 0.1% level)
    jittered = [(bg != 0.2) | (le != 0.7) for _, bg, le in (pair, batch)]
    tolerance = 4 * (2 * 0.25 / DRAWS) ** 0.5
    assert all(abs(j.float().mean() - 0.5) < tolerance for j in jittered), [float(j.float().mean()) for j in jittered]
    for k, (value, low, high) in enumerate(((0.2, 0.2 ** 1.2 * 0.85 - 0.05, 0.2 ** 0.8 * 1.15 + 0.05),
                                            (0.7, 0.7 ** 1.2 * 0.85 - 0.05, 0.7 ** 0.8 * 1.15 + 0.05)), start=1):
        a, b = (draws[k][j] for draws, j in zip((pair, batch), jittered))
        n, m = len(a), len(b)
        assert _ks(a, b) < 1.95 * ((n + m) / (n * m)) ** 0.5, (value, _ks(a, b))
        for x in (a, b):  # within PairAugment's ranges: gamma [0.8, 1.2], contrast [0.85, 1.15], +-0.05
            assert low - 1e-6 <= x.min() and x.max() <= high + 1e-6, (value, float(x.min()), float(x.max()))
            assert x.max() - x.min() > 0.5 * (high - low), value  # spread over the range, not one value


# ----------------------------------------------------------------------------- what training feeds the model
def _dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(im, k, (-2, -1)) for im in (image, image.flip(-1)) for k in range(4)]


def _is_monotone_image_of(x: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``x`` is ``source`` through a non-decreasing map of values (equal stays equal)."""
    order = source.flatten().argsort(stable=True)
    s, v = source.flatten()[order], x.flatten()[order]
    step, moved = s.diff(), v.diff()
    return bool((moved[step > 0] >= -1e-6).all() and (moved[step == 0].abs() <= 1e-6).all())


def _within_jitter(x: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether every value of ``x`` lies where the jitter can take its value in ``source``: gamma in
    [0.8, 1.2], contrast [0.85, 1.15], brightness [-0.05, 0.05], clipped to [0, 1]."""
    low, high = ((source ** g * c + b).clamp(0, 1) for g, c, b in ((1.2, 0.85, -0.05), (0.8, 1.15, 0.05)))
    return bool(((x >= low - 1e-5) & (x <= high + 1e-5)).all())


def _explain(x: torch.Tensor, slices: torch.Tensor) -> tuple[int, bool]:
    """(the flip/turn variant of a training slice that ``x`` is, whether its values were jittered); fails if
    ``x`` is no flip/turn of any slice, or its values are no monotone map of that slice's within the jitter's."""
    for source in slices:
        for k, variant in enumerate(_dihedral(source)):
            if torch.equal(x, variant):
                return k, False
            if _is_monotone_image_of(x, variant) and _within_jitter(x, variant):
                return k, True
    raise AssertionError("a training batch holds an image that is no flip/turn (and jitter) of a training slice")


@pytest.mark.parametrize("placement", ["--data-on-device", "--no-data-on-device"])
def test_training_feeds_the_model_flipped_turned_and_jittered_slices(processed, tmp_path, placement):
    """The images the model sees in training are the training slices, flipped/turned (a permutation of their
    pixels) and about half of them intensity-jittered (values moved, order kept): an augmentation that does
    nothing, on either data path (BatchAugment on the device, PairAugment in the loader), fails this."""
    images = torch.from_numpy(np.load(processed / "images.npy"))[slice_rows(processed, "train")]
    seen = []

    def record(module, args):
        if type(module).__name__ == "UNet" and module.training:
            seen.append(args[0].detach().float().cpu())

    handle = register_module_forward_pre_hook(record)
    try:
        run_train(train_argv(processed, tmp_path, placement, "--amp", "off", epochs=1))
    finally:
        handle.remove()
    batches = torch.cat(seen)[:, 0]
    assert len(batches) == len(images), len(batches)  # one epoch: every training slice once
    explained = [_explain(x, images) for x in batches]
    variants, jittered = Counter(k for k, _ in explained), sum(j for _, j in explained)
    # of 16 slices, 14 expected moved (7/8) over several variants, 8 jittered (1/2); the seed is fixed
    assert sum(c for k, c in variants.items() if k) >= len(batches) // 2 and len(variants) >= 4, variants
    assert len(batches) // 5 <= jittered <= len(batches) * 4 // 5, jittered
