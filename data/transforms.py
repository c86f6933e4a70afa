"""The one implementation of slice preprocessing, shared by preprocessing, training and inference.

A slice goes through: orientation (volumes only) -> intensity normalisation to [0, 1] -> resize to
``size x size`` (bilinear for images, nearest for masks). The parameters live in a small dict,
``{"size": 256, "norm": "window", "window": [-1000, 400]}``, that preprocessing writes to meta.json and
training copies into every checkpoint, so inference rebuilds exactly the same input pipeline.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

NORMS = ("minmax", "window")
DEFAULT_WINDOW = (-1000.0, 400.0)  # HU: air to dense soft tissue; keeps GGO (-700..-300) mid-range
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_IMAGE_SIDE = 8192  # refuse larger 2D images instead of exhausting memory (a CT slice is 512)
MAX_VOLUME_VOXELS = 2048 * 2048 * 2048 // 8  # 1.07e9 voxels, 4 GiB as float32 (a 512x512x1000 CT is 0.26e9)
MASK_LABEL_MAX = 10  # masks whose values are all <= this are label maps (0/1/2...), not 0/255 images


class InputError(ValueError):
    """Bad user input: the message names the file and the problem, and is shown without a traceback."""


def make_preprocessing(size: int = 256, norm: str = "window", window=DEFAULT_WINDOW) -> dict:
    """Validate and return the preprocessing record saved in meta.json and checkpoints."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if size < 16 or size % 16:
        raise ValueError(f"size must be a positive multiple of 16 (the U-Net pools 4 times), got {size}")
    low, high = (float(v) for v in window)
    if norm == "window" and not high > low:
        raise ValueError(f"window must be LOW < HIGH in HU, got {low} {high}")
    return {"size": int(size), "norm": norm, "window": [low, high] if norm == "window" else None}


def normalize(x: np.ndarray, norm: str, window=None) -> np.ndarray:
    """Map intensities to [0, 1], slice by slice.

    Args:
        x: (..., H, W) array; HU for ``window``, anything for ``minmax``.
        norm: "minmax" (per-slice min-max, as the seed code does) or "window" (fixed HU window, clipped).
        window: (low, high) in HU for ``window``.
    Returns:
        float32 array of x's shape in [0, 1]. A constant slice under ``minmax`` becomes all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    if norm == "window":
        low, high = window
        if not high > low:
            raise ValueError(f"degenerate window {low}..{high}: need LOW < HIGH")
        return np.clip((x - low) / (high - low), 0.0, 1.0, dtype=np.float32)
    if norm == "minmax":
        lo, hi = x.min(axis=(-2, -1), keepdims=True), x.max(axis=(-2, -1), keepdims=True)
        # a slice whose max - min overflows float32 (values beyond +-1.7e38) is halved first, which is exact
        # at that scale; every other slice is scaled by 1 and gets (x - min) / (max - min) bit for bit
        with np.errstate(over="ignore"):
            scale = np.where(np.isinf(hi - lo), np.float32(0.5), np.float32(1.0))
        lo, span = lo * scale, hi * scale - lo * scale
        return np.divide(x * scale - lo, span, out=np.zeros_like(x), where=span > 0)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def resize_images(x: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (N, H, W) float images to (N, *size)."""
    t = torch.as_tensor(x, dtype=torch.float32)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t.clone()
    shrink = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    out = F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0]


def resize_masks(m: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (N, H, W) integer masks to (N, *size); labels stay integer (uint8)."""
    t = torch.as_tensor(np.asarray(m, dtype=np.uint8))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t.clone()
    # nearest-exact samples pixel centres, so a down-then-up round trip keeps masks in place
    return F.interpolate(t[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(torch.uint8)


def prepare_slices(x: np.ndarray, prep: dict) -> torch.Tensor:
    """Normalise then resize (N, H, W) slices as ``prep`` says; returns float32 (N, size, size) in [0, 1]."""
    return resize_images(normalize(x, prep["norm"], prep.get("window")), prep["size"])


# ----------------------------------------------------------------------------- volumes
def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.png/... ("lung_001.nii.gz" -> "lung_001")."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def load_nifti(path: str | Path, kind: str = "image"):
    """Load a 3D NIfTI volume, checked, without reading its data yet.

    Returns the nibabel image. Raises InputError naming the file for an unreadable file or a volume that
    is not 3D (a 4D file with a single trailing volume is accepted).
    """
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: {kind} file not found") from None
    except Exception as e:  # nibabel raises several types for a corrupt header
        raise InputError(f"{path}: cannot read {kind} as NIfTI ({type(e).__name__}: {e})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise InputError(f"{path}: {kind} must be a 3D volume, got shape {tuple(shape)}")
    if min(img.shape) < 1:
        raise InputError(f"{path}: {kind} has an empty dimension, shape {tuple(img.shape)}")
    if np.prod(img.shape, dtype=np.float64) > MAX_VOLUME_VOXELS:
        raise InputError(f"{path}: {kind} is {'x'.join(map(str, img.shape))} voxels, more than the "
                         f"{MAX_VOLUME_VOXELS:.3g}-voxel limit")
    return img


def read_volume_data(img, path: str | Path, kind: str = "image", dtype=np.float32) -> np.ndarray:
    """Read a nibabel image's voxels (scaled), raising InputError for truncated data or NaN voxels."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # truncated gzip -> EOFError/zlib.error/OSError, short file -> ValueError
        raise InputError(f"{path}: cannot read {kind} voxels, file truncated or corrupt ({type(e).__name__}: {e})") from None
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {kind} has {n} NaN or infinite voxels")
    return data


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The orientation transform from a file's voxel axes to RAS+ (nibabel's closest canonical)."""
    return nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))


def to_axial_slices(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a volume to RAS+ and return its axial slices the way radiologists view them.

    Whatever the file's affine, slice k is the k-th from inferior to superior, displayed with anterior at
    the top and the patient's right on the image's left.

    Shape: (X, Y, Z) voxel array -> (Z, H=Y, W=X) array (a view where possible).
    """
    ras = nib.orientations.apply_orientation(data, canonical_ornt(affine))
    # RAS+ axis 0 runs towards the patient's right and axis 1 towards anterior: flip both, put z first.
    return ras[::-1, ::-1, :].transpose(2, 1, 0)


def from_axial_slices(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_axial_slices`: (Z, H, W) display slices back to the file's own voxel order."""
    ras = slices.transpose(2, 1, 0)[::-1, ::-1, :]
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, back))


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Serialise a volume to .nii.gz bytes with a fixed gzip header (mtime 0, no name): same data, same bytes.

    The affine goes into both qform and sform (code 1, scanner coordinates), so every viewer places the
    volume the same way; units are millimetres.
    """
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # level 1: CT noise barely compresses, and it is 3x faster than level 6 for 2% more bytes
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def voxel_spacing(img) -> list[float]:
    return [float(s) for s in img.header.get_zooms()[:3]]


# ----------------------------------------------------------------------------- 2D image files
def _open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        if max(img.size) > MAX_IMAGE_SIDE:
            raise InputError(f"{path}: image is {img.size[0]}x{img.size[1]}, larger than the "
                             f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} limit")
        img.load()  # decode now, so a truncated file fails here with its name
        return img
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG/JPG/... slice of any mode as one float32 channel (H, W) in its own value range.

    8/16/32-bit grayscale keep their values; RGB(A), palette and LA images are converted to luminance
    (alpha is ignored).
    """
    path = Path(path)
    img = _open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        arr = np.asarray(img)
    else:  # "P", "RGB", "RGBA", "LA", "1", "CMYK", ...
        arr = np.asarray(img.convert("RGB").convert("L"))
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():  # float TIFFs can hold NaN/inf; min-max would blank the whole slice
        raise InputError(f"{path}: image has {int((~np.isfinite(arr)).sum())} NaN or infinite pixels")
    return arr


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary lesion mask image as uint8 (H, W) in {0, 1}.

    Label maps (palette indices, or values all <= MASK_LABEL_MAX such as 0/1/2) count every label > 0
    as lesion; other images (0/255, JPEG-compressed masks, 16-bit) are thresholded at half their range.
    """
    path = Path(path)
    img = _open_image(path)
    if img.mode == "P":
        arr = np.asarray(img)  # palette indices are the labels
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "1"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("L"))
    if arr.max(initial=0) <= MASK_LABEL_MAX:
        return (arr > 0).astype(np.uint8)
    half = 128 if arr.dtype == np.uint8 or img.mode == "L" else float(arr.max()) / 2
    return (arr >= half).astype(np.uint8)


def load_image_slice(path: str | Path, prep: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read a 2D image file and preprocess it as ``prep`` says, for training and inference alike.

    Image files carry no Hounsfield units, so they are always min-max normalised (an 8-bit slice that
    was windowed for display maps back to the same [0, 1] range as the window used in training).

    Returns:
        (image float32 (size, size) in [0, 1], original (H, W)).
    """
    arr = read_image(path)
    return resize_images(normalize(arr[None], "minmax"), prep["size"])[0], arr.shape
