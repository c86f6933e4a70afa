"""Batch augmentation on the training device.

The cheap, exact transforms (flips, 90-degree turns, intensity jitter) exist twice over one piece of
arithmetic: per item on the loader's CPU workers (:class:`data.dataset.PairAugment`, the DataLoader path), and
per batch on whatever device the batch is on (:class:`BatchAugment`, the path of data held on the GPU, where
no CPU worker touches a batch). Both draw each sample's transform from the same distribution.

:class:`SpatialAugment` adds the ones that need resampling (random scale, rotation, shift and elastic warp),
for a whole batch at once (one ``grid_sample`` per batch). The image is resampled bilinearly, the mask by
nearest neighbour, with the same sampling grid: they stay aligned and the mask keeps its integer labels.

Random draws come from torch's global CPU generator (train.py reseeds it every epoch), so a seeded run is
reproducible on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --augment presets of train.py: what each level turns on
AUGMENT_LEVELS = ("none", "basic", "strong")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (the random draws) on ``device``. To a GPU the copy goes from pinned memory and
    asynchronously: a plain copy would make the host wait for the GPU's queue, a sync every batch."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def intensity_jitter(image: torch.Tensor, contrast, brightness, gamma) -> torch.Tensor:
    """Mild CT intensity jitter on [0, 1] images: gamma, then contrast and brightness, clipped to [0, 1].

    The parameters are numbers or tensors that broadcast against ``image`` (one value per sample). The map
    is monotone, so it never swaps which of two pixels is brighter.
    """
    return (image.clamp(0, 1) ** gamma * contrast + brightness).clamp(0, 1)


def jitter_params(u_contrast: torch.Tensor, u_brightness: torch.Tensor, u_gamma: torch.Tensor):
    """Uniform [0, 1) draws -> (contrast in [0.85, 1.15], brightness in [-0.05, 0.05], gamma in [0.8, 1.2])."""
    return 0.85 + 0.3 * u_contrast, 0.1 * (u_brightness - 0.5), 0.8 + 0.4 * u_gamma


class BatchAugment:
    """Random horizontal flip, multiple of 90 degrees and intensity jitter of every sample of a batch.

    The batch version of :class:`data.dataset.PairAugment`, with the same probabilities (flip 1/2, each
    turn 1/4, jitter 1/2) and the same jitter ranges, for batches that already sit on the training device.
    Each choice is a ``torch.where`` over the batch: no per-sample Python loop and no host sync.

    Shape: images (N, C, S, S) float in [0, 1], masks (N, S, S) integer -> the same shapes, dtypes and device.
    """

    def __init__(self, flip: bool = True, rot90: bool = True, intensity: bool = True):
        self.flip, self.rot90, self.intensity = flip, rot90, intensity

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        if masks.shape != (n, h, w):
            raise ValueError(f"masks are {tuple(masks.shape)}, images {tuple(images.shape)}: need (N, H, W)")
        if self.rot90 and h != w:
            raise ValueError(f"images are {h}x{w}: 90-degree turns need square images")
        # drawn on the CPU generator, as PairAugment's (the same seed, the same run on any device), and
        # copied to the device once
        u = to_device(torch.rand(6, n), images.device)

        def where(pick: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(pick.view(-1, *[1] * (a.dim() - 1)), a, b)

        if self.flip:
            images, masks = where(u[0] < 0.5, images.flip(-1), images), where(u[0] < 0.5, masks.flip(-1), masks)
        if self.rot90:
            turns = (u[1] * 4).long()
            rotated_images, rotated_masks = images, masks
            for k in (1, 2, 3):
                rotated_images = where(turns == k, torch.rot90(images, k, (-2, -1)), rotated_images)
                rotated_masks = where(turns == k, torch.rot90(masks, k, (-2, -1)), rotated_masks)
            images, masks = rotated_images, rotated_masks
        if self.intensity:
            contrast, brightness, gamma = (v.view(-1, 1, 1, 1) for v in jitter_params(u[3], u[4], u[5]))
            images = where(u[2] < 0.5, intensity_jitter(images, contrast, brightness, gamma), images)
        return images.contiguous(), masks.contiguous()


class SpatialAugment:
    """Random affine + elastic warp of a batch, image and mask together.

    Args:
        p: probability that a sample is warped at all (the others pass unchanged).
        scale: zoom range (min, max), drawn log-uniformly; > 1 zooms in (a random crop), < 1 out.
        rotate: maximum rotation in degrees (uniform in +-rotate).
        shift: maximum shift as a fraction of the image side.
        elastic: standard deviation of the elastic displacement as a fraction of the image side
            (a coarse random field, bicubically upsampled, so the warp is smooth); 0 turns it off.
        grid: the coarse field's size (grid x grid control points).
        noise: maximum standard deviation of added Gaussian noise on the image (drawn per sample); 0: none.
    """

    def __init__(self, p: float = 0.8, scale: tuple[float, float] = (0.8, 1.25), rotate: float = 30.0,
                 shift: float = 0.08, elastic: float = 0.02, grid: int = 5, noise: float = 0.03):
        if not 0 <= p <= 1 or scale[0] <= 0 or scale[0] > scale[1] or rotate < 0 or shift < 0 or elastic < 0 or noise < 0:
            raise ValueError(f"SpatialAugment: bad parameters p={p} scale={scale} rotate={rotate} shift={shift} "
                             f"elastic={elastic} noise={noise}")
        self.p, self.scale, self.rotate, self.shift = p, scale, rotate, shift
        self.elastic, self.grid, self.noise = elastic, grid, noise

    def sampling_grid(self, n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The (N, H, W, 2) grid_sample grid of one random draw per sample (identity where not warped)."""
        on = (torch.rand(n) < self.p).float()
        log_lo, log_hi = math.log(self.scale[0]), math.log(self.scale[1])
        zoom = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n)) ** on
        angle = math.radians(self.rotate) * (2 * torch.rand(n) - 1) * on
        shift = self.shift * 2 * (2 * torch.rand(n, 2) - 1) * on[:, None]  # normalized coords span 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(to_device(theta, device), [n, 1, height, width], align_corners=False)
        if self.elastic > 0:
            coarse = torch.randn(n, 2, self.grid, self.grid) * (2 * self.elastic) * on[:, None, None, None]
            field = F.interpolate(to_device(coarse, device), size=(height, width), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1)
        return grid

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: images (N, C, H, W) float, masks (N, H, W) integer -> the same shapes, dtypes and device.

        Outside the warped field the image is 0 (air after min-max or windowing) and the mask background.
        """
        n, _, h, w = images.shape
        if masks.shape != (n, h, w):
            raise ValueError(f"masks are {tuple(masks.shape)}, images {tuple(images.shape)}: need (N, H, W)")
        grid = self.sampling_grid(n, h, w, images.device)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if self.noise > 0:
            sigma = to_device(self.noise * torch.rand(n, 1, 1, 1), images.device)
            out = (out + sigma * torch.randn_like(out)).clamp_(0, 1)
        return out.to(images.dtype), labels[:, 0].round().to(masks.dtype)
