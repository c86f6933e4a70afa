"""The look of the slices a model learned from, and CT volumes presented in that look.

A model trained on image files (COVID-SemiSeg's 8-bit JPEGs) saw slices already shown in some HU window
and cropped to the lungs, stretched to ``size x size``; a volume's HU slices at full field of view are a
different picture of the same anatomy (measured: the COVID-SemiSeg ensemble labelled the chest wall as
lesion that way). The look is recorded with the preprocessing record, in every checkpoint:

    {"size": 256, "norm": "minmax", "window": None, "look": {"window": [-1090.0, 270.0], "crop": "lungs"}}

and volume inference presents each HU slice in it (:func:`present_volume`): the HU window, 8-bit levels as
in the training files, the crop, then the record's own normalisation and resize, as for the image files;
predictions go back to the full slice with :func:`restore_volume`. A record without "look" (a model trained
on volumes, or an older checkpoint) is the full field in the record's own normalisation, as before.

How the look of a folder of image files is measured (:func:`describe_images`):
- window: the two modes of their gray levels, aerated lung (dark) and soft tissue (bright), are mapped to
  LUNG_HU and SOFT_TISSUE_HU; the straight line through them gives the window's ends at gray 0 and 255.
- crop: slices with less than half of their border dark (outside air) are cropped to the lungs
  (COVID-SemiSeg's labelled slices: 0-2% of their border is dark); otherwise they show the full field.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from base import InputError
from data.transforms import DEFAULT_WINDOW, normalize, read_image, resize_images

CROPS = ("lungs", "body", "none")
# anchors of the window estimate: the mode of aerated lung parenchyma (the expert-masked real COVID CT of
# ../shared/data measures a median of -800..-827 HU inside the lungs, lesions and vessels included, so the
# mode of the air-filled parenchyma lies below) and of soft tissue (muscle, heart and blood 35..55 HU)
LUNG_HU, SOFT_TISSUE_HU = -850.0, 40.0
MODE_GAP = 40  # the soft-tissue mode lies at least this many gray levels above the lung's
DARK_LEVEL = 20  # gray levels below this are air (outside the body) in an 8-bit slice
# slices whose border is less than this share of dark pixels are cropped (a full field's border is outside
# air nearly all round; a box around the lungs meets outside air at its corners only, if at all)
CROPPED_AIR_SHARE = 0.5
SAMPLE_IMAGES = 200  # the look of a large folder is measured on this many images, evenly spaced
BODY_HU, AIR_HU = -500.0, -400.0  # body: denser than this; lungs: air-like voxels inside the body
CROP_MARGIN = 0.04  # the crop box grows by this share of its side on every side (the chest wall in view)
WORK_SIDE = 128  # the crop box is found on slices block-averaged to about this size
EDGE_PX = 2  # ...where the body's outermost pixels (about 5 mm) are not searched for lung


def make_look(window, crop: str) -> dict:
    """Validate and return a look record (InputError if bad)."""
    if crop not in CROPS:
        raise InputError(f"look crop must be one of {CROPS}, got {crop!r}")
    low, high = (round(float(v), 1) for v in window)
    if not high > low:
        raise InputError(f"look window must be LOW < HIGH in HU, got {low} {high}")
    return {"window": [low, high], "crop": crop}


# ----------------------------------------------------------------------------- measuring a folder's look
def _gray_modes(hist: np.ndarray) -> tuple[int, int] | None:
    """The dark (lung) and bright (soft tissue) modes of an 8-bit histogram, or None without both."""
    smooth = np.convolve(hist, np.ones(5) / 5, mode="same")
    # the highest peak, then the highest at least MODE_GAP from it on either side (gray 0 is padding as
    # often as air; 250+ is bone and saturation); in a wide window soft tissue sits below gray 128 and
    # may be the higher of the two
    first = int(np.argmax(smooth[1:250])) + 1
    below, above = smooth[1:max(1, first - MODE_GAP + 1)], smooth[first + MODE_GAP:250]
    if not len(below) and not len(above):
        return None
    if len(above) and (not len(below) or above.max() >= below.max()):
        second = int(np.argmax(above)) + first + MODE_GAP
    else:
        second = int(np.argmax(below)) + 1
    dark, bright = sorted((first, second))
    # both must be real peaks, not the flank of a single one
    if smooth[dark] < 2 * smooth[(dark + bright) // 2] or smooth[bright] < 2 * smooth[(dark + bright) // 2]:
        return None
    return dark, bright


def estimate_window(hist: np.ndarray) -> tuple[float, float] | None:
    """The HU window an 8-bit histogram of CT slices was shown in, from its lung and soft-tissue modes.

    Gray g = 255 * (HU - low) / (high - low); the modes give two points of that line (LUNG_HU at the dark
    mode, SOFT_TISSUE_HU at the bright one). Returns (low, high) rounded to 10 HU, or None when the
    histogram has no two such modes.
    """
    modes = _gray_modes(np.asarray(hist, dtype=np.float64))
    if modes is None:
        return None
    dark, bright = modes
    hu_per_gray = (SOFT_TISSUE_HU - LUNG_HU) / (bright - dark)
    low = LUNG_HU - dark * hu_per_gray
    return round(low, -1), round(low + 255 * hu_per_gray, -1)


def _sample(paths: list[Path]) -> list[Path]:
    """Up to SAMPLE_IMAGES of ``paths``, evenly spaced."""
    return paths[::max(1, len(paths) // SAMPLE_IMAGES)]


def _gray_share(gray: np.ndarray) -> np.ndarray:
    """The share of an 8-bit slice's pixels at each gray level (256,): histograms of slices of any size add up."""
    return np.bincount(gray.astype(np.uint8).ravel(), minlength=256) / gray.size


def _border_air_share(gray: np.ndarray) -> float:
    """Share of a slice's border pixels that are dark (air outside the body)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float((border < DARK_LEVEL).mean())


def describe_images(paths: list[Path], window=None, crop: str | None = None) -> tuple[dict, str]:
    """The look of a folder of 8-bit CT slices, measured (see the module docstring) unless given.

    Args:
        paths: the image files (up to SAMPLE_IMAGES of them, evenly spaced, are read).
        window: (low, high) HU the files were shown in; None: estimated.
        crop: one of CROPS; None: "lungs" if the slices are cropped inside the body, else "none".
    Returns:
        (the look record, one line saying how it was found).
    """
    hist, air = np.zeros(256), []
    for path in _sample(paths):
        gray = np.clip(read_image(path), 0, 255).astype(np.uint8)  # 16-bit files saturate: they have no look
        hist += _gray_share(gray)
        air.append(_border_air_share(gray))
    how = []
    if window is None:
        window = estimate_window(hist)
        how.append(f"window {window[0]:g}..{window[1]:g} HU estimated from the lung and soft-tissue gray levels"
                   if window else f"no lung and soft-tissue gray levels found: window {DEFAULT_WINDOW} assumed")
        window = window or DEFAULT_WINDOW
    if crop is None:
        crop = "lungs" if np.median(air) < CROPPED_AIR_SHARE else "none"
        how.append(f"crop {crop!r} ({100 * np.median(air):.0f}% of the border is outside air)")
    look = make_look(window, crop)
    return look, ("look of the training images: " + "; ".join(how) if how else "")


def series_of(path: Path) -> str:
    """The series an image file belongs to: its folder and its name without a trailing slice number
    ("scans/Data-1_coronacases_org_001_17.jpg" -> "scans/Data-1_coronacases_org_001")."""
    return str(Path(path).parent / re.sub(r"[_\-. ]*\d+$", "", Path(path).stem))


def series_windows(paths: list[Path]) -> tuple[dict[str, tuple[float, float] | None], str]:
    """The HU window each series of 8-bit slices was shown in (:func:`series_of`, :func:`estimate_window`).

    Slices from several sources are seldom shown alike (COVID-SemiSeg's unlabelled volumes: -1010..1690 HU
    for some, -1090..210 for others), and one window for all would misplace every series. A series whose
    gray levels show no lung and soft-tissue modes, or that holds 16-bit or float values, gets None (read as
    it is).

    Returns:
        ({series: (low, high) or None}, one line summing them up).
    """
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(series_of(path), []).append(path)
    windows = {}
    for key, members in groups.items():
        hist = np.zeros(256)
        for path in _sample(members):
            gray = read_image(path)
            if gray.min() < 0 or gray.max() > 255:  # 16-bit or float: not a slice shown in an 8-bit window
                hist = None
                break
            hist += _gray_share(gray)
        windows[key] = None if hist is None else estimate_window(hist)
    found = [w for w in windows.values() if w]
    how = (f"{len(paths)} images in {len(groups)} series; windows estimated per series"
           + (f" (low ends {min(w[0] for w in found):g}..{max(w[0] for w in found):g} HU, high ends "
              f"{min(w[1] for w in found):g}..{max(w[1] for w in found):g} HU)" if found else ": none found")
           + (f" ({len(groups) - len(found)} series without lung and soft-tissue modes, left as they are)"
              if len(found) < len(groups) else ""))
    return windows, how


# ----------------------------------------------------------------------------- volumes in a look
def crop_box(hu: np.ndarray, crop: str) -> tuple[int, int, int, int, int, int]:
    """The box (z0, z1, y0, y1, x0, x1) of a volume's slices to show a model of the given crop.

    "lungs": the slices that hold air inside the body (lungs and airways) and, in-plane, their extent over
    all those slices (one box for the volume, so every slice keeps the same scale); "body": the body's
    extent. Grown by CROP_MARGIN of its side, clipped to the volume. "none", or a volume without body or
    lungs: the whole volume.

    Shape: hu (Z, H, W) in display orientation.
    """
    z, h, w = hu.shape
    whole = (0, z, 0, h, 0, w)
    if crop == "none":
        return whole
    f = max(1, min(h, w) // WORK_SIDE)
    small = hu[:, : h // f * f, : w // f * f].reshape(z, h // f, f, w // f, f).mean(axis=(2, 4)) if f > 1 else hu
    labels, n = ndimage.label(small > BODY_HU)
    if n == 0:
        return whole
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    if crop == "lungs":  # air inside the body, off its blurred edge (partial-volume skin reads as air)
        inner = ndimage.binary_erosion(body, np.ones((1, 3, 3), bool), iterations=EDGE_PX, border_value=1)
        region = inner & (small < AIR_HU)
    else:
        region = body
    if crop == "lungs":  # keep the large air components (lungs, trachea), not bowel gas or noise
        labels, n = ndimage.label(region)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            region = np.isin(labels, np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1)
    zs, ys, xs = (np.flatnonzero(region.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        return whole
    y0, y1, x0, x1 = ys[0] * f, (ys[-1] + 1) * f, xs[0] * f, (xs[-1] + 1) * f
    my, mx = round(CROP_MARGIN * (y1 - y0)), round(CROP_MARGIN * (x1 - x0))
    return (int(zs[0]), int(zs[-1]) + 1, int(max(0, y0 - my)), int(min(h, y1 + my)), int(max(0, x0 - mx)),
            int(min(w, x1 + mx)))


def present_volume(hu: np.ndarray, prep: dict) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A volume's slices as the checkpoint's model saw its training slices.

    Without a look: the record's normalisation and resize of every full slice. With one: the look's HU
    window at 8-bit levels, cropped to :func:`crop_box`, then the record's normalisation and resize.

    Shape: hu (Z, H, W) display orientation -> (float32 (z1 - z0, S, S) in [0, 1], the box).
    Returns:
        (slices, box (z0, z1, y0, y1, x0, x1)); see :func:`restore_volume`.
    """
    look = prep.get("look")
    if not look:
        z, h, w = hu.shape
        return resize_images(normalize(hu, prep["norm"], prep.get("window")), prep["size"]), (0, z, 0, h, 0, w)
    z0, z1, y0, y1, x0, x1 = box = crop_box(hu, look["crop"])
    shown = np.round(255 * normalize(hu[z0:z1, y0:y1, x0:x1], "window", look["window"])) / np.float32(255)
    return resize_images(normalize(shown, prep["norm"], prep.get("window")), prep["size"]), box


def restore_volume(probs: torch.Tensor, box: tuple[int, ...], shape: tuple[int, int, int],
                   chunk: int = 32) -> torch.Tensor:
    """Probability maps of the presented slices back on the volume's grid, 0 outside the box.

    Shape: probs (z1 - z0, S, S) -> float32 ``shape`` (Z, H, W). Resized in chunks of slices (a 512x512x300
    float volume is 300 MB).
    """
    z0, z1, y0, y1, x0, x1 = box
    full = torch.zeros(shape, dtype=torch.float32)
    for i in range(0, len(probs), chunk):
        part = probs[i:i + chunk]  # the last chunk may be short: fill its own slices only, not up to the chunk
        full[z0 + i: z0 + i + len(part), y0:y1, x0:x1] = resize_images(part, (y1 - y0, x1 - x0))
    return full
