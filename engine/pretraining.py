"""Self-supervised pretraining by restoration (pretrain.py): Models Genesis' corruptions of a batch of slices.

Zhou et al., "Models Genesis" (MICCAI 2019; Medical Image Analysis 2021): a network learns to restore CT
that was corrupted in ways only an understanding of anatomy can undo, and its encoder then starts a
segmentation model. Four corruptions, in their order and at their rates:

    local pixel shuffling   (p 0.5) the pixels inside many small windows permuted: texture lost, shapes kept
    non-linear intensity    (p 0.9) gray levels remapped by a random monotone Bezier curve, reversed half the
                                    time: the network must know what tissue a gray level is
    in-painting             (p 0.9 x 0.2) a few boxes replaced by noise: restored from their surroundings
    out-painting            (p 0.9 x 0.8) all but a few boxes replaced by noise: restored from the inside

Every draw comes from the ``generator`` given, so a seed gives the same corruptions. Images are
(N, 1, H, W) float in [0, 1] on any device; the corrupted batch is in [0, 1] too. :class:`RestorationPairs`
makes (original, corrupted) training items in the DataLoader's workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SHUFFLE_P, NONLINEAR_P, PAINT_P, OUTPAINT_SHARE = 0.5, 0.9, 0.9, 0.8
SHUFFLE_WINDOWS = (4, 8, 16)  # side of the windows one slice's pixels are shuffled in (one size per slice)
SHUFFLE_SHARE = 0.25  # share of a slice's windows that are shuffled
LUT_LEVELS = 256  # the intensity curve is tabulated at this many gray levels


def _uniform(generator: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def shuffle_pixels(images: torch.Tensor, generator: torch.Generator, p: float = SHUFFLE_P) -> torch.Tensor:
    """Local pixel shuffling: in each chosen slice, a SHUFFLE_SHARE of its w x w windows (w drawn from
    SHUFFLE_WINDOWS, a divisor of the side is needed) get their pixels permuted. A window's pixels stay in
    it, so each window keeps its gray levels; only their arrangement is lost."""
    out = images.clone()
    n, c, h, w = images.shape
    chosen, sizes = _uniform(generator, n) < p, torch.randint(len(SHUFFLE_WINDOWS), (n,), generator=generator)
    for i in torch.nonzero(chosen).flatten().tolist():
        size = SHUFFLE_WINDOWS[int(sizes[i])]
        if h % size or w % size:
            continue
        windows = F.unfold(images[i:i + 1], size, stride=size)  # (1, c * size * size, L)
        count = windows.shape[-1]
        order = torch.argsort(_uniform(generator, size * size, count), dim=0).to(images.device)
        order = order.repeat(c, 1)[None]  # the same permutation on every channel
        shuffled = windows.gather(1, order)
        keep = (_uniform(generator, count) >= SHUFFLE_SHARE).to(images.device)
        windows = torch.where(keep, windows, shuffled)
        out[i:i + 1] = F.fold(windows, (h, w), size, stride=size)
    return out


def intensity_curves(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random monotone gray-level maps [0, 1] -> [0, 1], tabulated at LUT_LEVELS levels: cubic Bezier
    curves from (0, 0) to (1, 1) through two random control points, half of them reversed (1 - y)."""
    t = torch.linspace(0, 1, 1000)
    ctrl = _uniform(generator, n, 2, 2)  # (n, point, xy)
    basis = torch.stack([3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3])  # the terms of P1, P2, P3
    x = basis[0] * ctrl[:, :1, 0] + basis[1] * ctrl[:, 1:, 0] + basis[2]
    y = basis[0] * ctrl[:, :1, 1] + basis[1] * ctrl[:, 1:, 1] + basis[2]
    levels = torch.linspace(0, 1, LUT_LEVELS)
    luts = torch.empty(n, LUT_LEVELS)
    for i in range(n):  # x(t) is monotone for control points in [0, 1]; sort against rounding
        xs, order = torch.sort(x[i])
        ys = y[i][order]
        j = torch.searchsorted(xs, levels).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        luts[i] = y0 + (y1 - y0) * ((levels - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    reverse = _uniform(generator, n) < 0.5
    luts[reverse] = 1 - luts[reverse]
    return luts


def remap_intensity(images: torch.Tensor, generator: torch.Generator, p: float = NONLINEAR_P) -> torch.Tensor:
    """Non-linear intensity: each chosen slice's gray levels through its own curve of :func:`intensity_curves`
    (linear between the tabulated levels)."""
    n = images.shape[0]
    chosen, luts = _uniform(generator, n) < p, intensity_curves(n, generator).to(images.device)
    scaled = images.clamp(0, 1) * (LUT_LEVELS - 1)
    low = scaled.floor().long().clamp(max=LUT_LEVELS - 2)
    frac = scaled - low
    row = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    mapped = luts[row, low] + (luts[row, low + 1] - luts[row, low]) * frac
    return torch.where(chosen.to(images.device).view(n, 1, 1, 1), mapped, images)


def _box(generator: torch.Generator, h: int, w: int, low: float, high: float) -> tuple[slice, slice]:
    """A random box whose sides are ``low``..``high`` of the image's."""
    u = _uniform(generator, 4)
    bh, bw = max(1, int(h * (low + (high - low) * u[0]))), max(1, int(w * (low + (high - low) * u[1])))
    top, left = int((h - bh) * u[2]), int((w - bw) * u[3])
    return slice(top, top + bh), slice(left, left + bw)


def paint(images: torch.Tensor, generator: torch.Generator, p: float = PAINT_P,
          outpaint_share: float = OUTPAINT_SHARE) -> torch.Tensor:
    """In-painting (1 to 5 boxes of a sixth to a third of the side filled with uniform noise) or, for an
    ``outpaint_share`` of the chosen slices, out-painting (everything noise but 1 to 4 boxes of 3/7 to 4/7
    of the side, which keep the slice)."""
    out = images.clone()
    n, c, h, w = images.shape
    u = _uniform(generator, n, 3)
    for i in range(n):
        if u[i, 0] >= p:
            continue
        outpaint = bool(u[i, 1] < outpaint_share)
        boxes = 1 + int(u[i, 2] * (4 if outpaint else 5))
        if outpaint:
            out[i] = _uniform(generator, c, h, w).to(images.device)
            for _ in range(boxes):
                rows, cols = _box(generator, h, w, 3 / 7, 4 / 7)
                out[i, :, rows, cols] = images[i, :, rows, cols]
        else:
            for _ in range(boxes):
                rows, cols = _box(generator, h, w, 1 / 6, 1 / 3)
                out[i, :, rows, cols] = _uniform(generator, c, rows.stop - rows.start,
                                                 cols.stop - cols.start).to(images.device)
    return out


def corrupt(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Models Genesis' corruption of a batch: shuffling, then intensity, then in- or out-painting."""
    return paint(remap_intensity(shuffle_pixels(images, generator), generator), generator)


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each slice flipped left-right and up-down with probability 1/2 each."""
    u = torch.rand(2, images.shape[0], generator=generator).to(images.device).view(2, -1, 1, 1, 1)
    images = torch.where(u[0] < 0.5, images.flip(-1), images)
    return torch.where(u[1] < 0.5, images.flip(-2), images)


class RestorationPairs(Dataset):
    """(original, corrupted) items of a dataset of slices (items (1, H, W) in [0, 1]): random flips, then
    :func:`corrupt`. The draws come from a generator seeded by (seed, epoch, index), so an item is the same
    whichever loader worker makes it; set ``epoch`` before each epoch's loader starts its workers."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        image = random_flips(self.dataset[index][None], state)
        return image[0], corrupt(image, state)[0]
