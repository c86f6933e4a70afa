"""The one implementation of slice preprocessing, shared by preprocessing, training and inference.

A slice goes through: orientation (volumes only) -> intensity normalisation to [0, 1] -> resize to
``size x size`` (bilinear for images, nearest for masks). The parameters live in a small dict,
``{"size": 256, "norm": "window", "window": [-1000, 400]}``, that preprocessing writes to meta.json and
training copies into every checkpoint, so inference rebuilds exactly the same input pipeline.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from base import InputError

NORMS = ("minmax", "window")
DEFAULT_WINDOW = (-1000.0, 400.0)  # HU: air to dense soft tissue; keeps GGO (-700..-300) mid-range
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_IMAGE_SIDE = 8192  # refuse larger 2D images instead of exhausting memory (a CT slice is 512)
MAX_VOLUME_VOXELS = 2048 * 2048 * 2048 // 8  # 1.07e9 voxels, 4 GiB as float32 (a 512x512x1000 CT is 0.26e9)
MASK_LABEL_MAX = 10  # masks whose values are all <= this are label maps (0/1/2...), not 0/255 images
MASK_FEW_LEVELS = 16  # a lossless mask of at most this many values is a label map or binary, not smeared


def make_preprocessing(size: int = 256, norm: str = "window", window=DEFAULT_WINDOW) -> dict:
    """Validate and return the preprocessing record saved in meta.json and checkpoints (InputError if bad)."""
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    if size < 16 or size % 16:
        raise InputError(f"size must be a positive multiple of 16 (the U-Net pools 4 times), got {size}")
    low, high = (float(v) for v in window)
    if norm == "window" and not high > low:
        raise InputError(f"window must be LOW < HIGH in HU, got {low} {high}")
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
    t = torch.as_tensor(np.ascontiguousarray(m, dtype=np.uint8))  # display slices may be a flipped view
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
    # a zero column (or an all-zero sform) leaves voxel size and orientation unknown: every later step
    # (reorientation, volumes in mL) would fail or be wrong, so say which file before any of them
    linear = img.affine[:3, :3]
    if not np.isfinite(img.affine).all() or not (np.linalg.norm(linear, axis=0) > 0).all() \
            or not abs(np.linalg.det(linear)) > 0:
        raise InputError(f"{path}: {kind} has a degenerate affine (zero or non-finite voxel axes: "
                         f"{np.round(linear, 4).tolist()}); fix the file's sform/qform so voxel size and "
                         f"orientation are known")
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


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray, slope: float | None = None) -> bytes:
    """Serialise a volume to .nii.gz bytes with a fixed gzip header (mtime 0, no name): same data, same bytes.

    The affine goes into both qform and sform (code 1, scanner coordinates), so every viewer places the
    volume the same way; units are millimetres. ``slope``: the header's scl_slope, the value of one unit of
    the stored integers (viewers and nibabel's get_fdata show data * slope).
    """
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # level 1: CT noise barely compresses, and it is 3x faster than level 6 for 2% more bytes
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def voxel_spacing(img) -> list[float]:
    return [float(s) for s in img.header.get_zooms()[:3]]


# ----------------------------------------------------------------------------- ground-truth volumes
# A mask must lie on its image's voxel grid: the voxel axes may differ by this fraction of their length
# (float32 headers round at ~1e-7; a resampled mask differs by far more), the origins by this many voxels.
AFFINE_AXES_RTOL = 1e-3
AFFINE_ORIGIN_VOXELS = 0.5


def _image_name(image_img) -> str:
    name = image_img.get_filename()
    return Path(name).name if name else "the image"


def check_mask_header(mask_img, image_img, path: str | Path, kind: str = "lesion mask") -> None:
    """Refuse a mask volume that does not lie on its image's voxel grid, from the headers alone.

    Shape, voxel order (orientation) and the whole affine must agree: axes within AFFINE_AXES_RTOL of
    their length, origins within AFFINE_ORIGIN_VOXELS voxels. Raises InputError naming the mask.
    """
    name = _image_name(image_img)
    if tuple(mask_img.shape) != tuple(image_img.shape):
        raise InputError(f"{path}: {kind} is {tuple(mask_img.shape)}, image {name} is {tuple(image_img.shape)}; "
                         f"resample it onto the image")
    # masks are reoriented with the image's affine: a mask stored in another voxel order would be mirrored
    if not np.array_equal(nib.io_orientation(mask_img.affine), nib.io_orientation(image_img.affine)):
        raise InputError(f"{path}: {kind} is stored {''.join(nib.aff2axcodes(mask_img.affine))}, image "
                         f"{name} is {''.join(nib.aff2axcodes(image_img.affine))}; resample it onto the image")
    a, b = np.asarray(mask_img.affine, np.float64), np.asarray(image_img.affine, np.float64)
    axes_off = np.linalg.norm(a[:3, :3] - b[:3, :3], axis=0) / np.linalg.norm(b[:3, :3], axis=0)
    origin_off = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])  # in voxels of the image
    if axes_off.max() > AFFINE_AXES_RTOL or np.abs(origin_off).max() > AFFINE_ORIGIN_VOXELS:
        shift = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
        raise InputError(f"{path}: {kind} is placed {shift:.3g} mm (voxel axes {100 * axes_off.max():.2g}%) away "
                         f"from image {name}; its affine must match the image's: resample it onto the image")


def read_mask_volume(path: str | Path, image_img, kind: str = "lesion mask") -> tuple[np.ndarray, list[int]]:
    """Read a ground-truth mask volume against its image, as preprocessing and evaluation both do.

    Checks the headers (:func:`check_mask_header`), then the voxels: finite, whole numbers, labels 0..255
    (a background of -1 is refused, not read as lesion). Raises InputError naming the mask.

    Returns:
        (uint8 label slices (Z, H, W) in the image's display orientation, the label values present).
    """
    mask_img = load_nifti(path, kind)
    check_mask_header(mask_img, image_img, path, kind)
    data = read_volume_data(mask_img, path, kind)
    labels = np.rint(data)
    off = np.abs(data - labels) > 1e-3
    if off.any():
        raise InputError(f"{path}: {kind} holds non-integer values (e.g. {np.unique(data[off])[:3].tolist()}); "
                         f"masks are labels: resample them with nearest neighbour")
    values = [int(v) for v in np.unique(labels)]
    if values[0] < 0:
        raise InputError(f"{path}: {kind} has negative labels {[v for v in values if v < 0][:5]} (values "
                         f"{values[:8]}); background must be 0 and labels 0..255")
    if values[-1] > 255:
        raise InputError(f"{path}: {kind} labels must be 0..255, found {values[0]}..{values[-1]}")
    return to_axial_slices(labels.astype(np.uint8), image_img.affine), values


def warn_if_not_ct(img, data: np.ndarray, path: str | Path, prep: dict) -> bool:
    """Print one warning line (stderr) when a volume to be HU-windowed holds values that cannot be HU.

    8-bit data (type uint8, or every value in 0..255) is a display export, not CT in Hounsfield units: the
    window would map it to a nearly constant image. Not an error, as it may be intended. Returns True if warned.
    """
    if prep.get("norm") != "window":
        return False
    eight_bit = img.get_data_dtype() == np.uint8 or (data.size and data.min() >= 0 and data.max() <= 255)
    if eight_bit:
        print(f"warning: {path}: image values lie in 0..255 (8-bit data), not Hounsfield units; the HU window "
              f"{prep.get('window')} will map it to a nearly constant image (preprocess with --norm minmax if "
              f"this is not CT in HU)", file=sys.stderr)
    return bool(eight_bit)


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


def _decode_mask(path: Path) -> tuple[np.ndarray, bool]:
    """A mask file's values and whether they are labels: (label map as stored, True) or, for a binary
    image thresholded at half its range, (uint8 {0, 1}, False). The rules are :func:`read_mask`'s."""
    img = _open_image(path)
    if img.mode == "P":
        arr = np.asarray(img)  # palette indices are the labels
    elif img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "1"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("L"))
    top = arr.max(initial=0)
    if top <= MASK_LABEL_MAX:
        return arr, True
    eight_bit = arr.dtype == np.uint8 or img.mode == "L"
    full = 255.0 if eight_bit else float(top)
    half = 128 if eight_bit else full / 2
    values = np.unique(arr)
    # JPEG smears a binary mask into many values near 0 and full scale; a lossless file of a few levels
    # must be binary: every level near 0 or near full scale
    middle = values[(values > full / 8) & (values < full * 7 / 8)]
    if (img.format != "JPEG" and len(values) <= MASK_FEW_LEVELS and middle.size) or top < half:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise InputError(f"{path}: mask values {{{shown}}} are neither 0/1, 0/255 nor labels 0..{MASK_LABEL_MAX} "
                         f"(a label map saved as gray levels?); save it as 0/255, or with the labels as values")
    return (arr >= half).astype(np.uint8), False


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary lesion mask image as uint8 (H, W) in {0, 1}.

    Label maps (palette indices, or values all <= MASK_LABEL_MAX such as 0/1/2) count every label > 0
    as lesion; binary images (0/255, 16-bit 0/65535, JPEG-compressed masks) are thresholded at half their
    range. Anything else is refused, naming its values: a lossless mask of a few gray levels other than
    0 and full scale (0/38/75: a viewer's gray or RGB export of a palette label map) or one with no value
    reaching the threshold would otherwise read as an empty mask.
    """
    arr, _ = _decode_mask(Path(path))
    return (arr > 0).astype(np.uint8)


def read_label_mask(path: str | Path) -> tuple[np.ndarray, bool]:
    """Read a mask image keeping its labels: uint8 (H, W) and whether the file was a label map.

    Palette indices, or 8/16-bit values all <= MASK_LABEL_MAX, are the labels (COVID-SemiSeg's multi-class
    masks: 0 background, 1 ground-glass opacity, 2 consolidation). A binary image (0/255, 0/65535, JPEG)
    reads as {0, 1}, exactly as :func:`read_mask`, and is not a label map: its 1 means "any lesion",
    which a caller needing lesion types must refuse. Values are checked as read_mask checks them; a label
    map with fractional or negative values is refused as well.

    Returns:
        (labels uint8 (H, W), True for a label map / False for a binary image).
    """
    path = Path(path)
    arr, is_label_map = _decode_mask(path)
    if is_label_map and arr.dtype.kind in "fi":  # float (mode F) or signed (mode I) files
        bad = arr[(arr < 0) | (arr != np.round(arr))]
        if bad.size:
            raise InputError(f"{path}: mask values such as {float(bad[0]):g} are not labels 0..{MASK_LABEL_MAX}; "
                             f"save the label map with whole-number labels")
    return arr.astype(np.uint8), is_label_map


def move_window(gray: np.ndarray, shown_in, to) -> np.ndarray:
    """8-bit gray levels of a slice shown in the HU window ``shown_in`` as they would be in window ``to``.

    gray -> HU on ``shown_in``'s line (0 at its low end, 255 at its high end) -> gray on ``to``'s, clipped
    to 0..255 (what ``to`` would have saturated, it saturates). Shape: any; returns float32.
    """
    (a, b), (c, d) = shown_in, to
    hu = a + np.asarray(gray, dtype=np.float32) * np.float32((b - a) / 255)
    return np.clip((hu - c) * np.float32(255 / (d - c)), 0, 255).astype(np.float32)


def load_image_slice(path: str | Path, prep: dict, shown_in=None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read a 2D image file and preprocess it as ``prep`` says, for training and inference alike.

    Image files carry no Hounsfield units. For a min-max ``prep`` they are min-max normalised. For an HU
    ``window`` one, an 8-bit image (any mode: L, RGB, palette, ...) is taken as a slice already shown in
    that window, value / 255 -> [0, 1], which is exactly what data.export_png writes; a 16-bit or float
    image cannot be mapped to the window and is refused (see :func:`image_files_note`).

    ``shown_in``: the HU window (low, high) an 8-bit file was shown in when it differs from the look the
    model learned (``prep["look"]["window"]``, or the HU ``window`` of a volume-trained ``prep``): its gray
    levels are first moved into that look (:func:`move_window`). Used for unlabelled slices from other
    sources (train.py --unlabeled); a ``prep`` with neither window has no look to move into.

    Returns:
        (image float32 (size, size) in [0, 1], original (H, W)).
    """
    arr = read_image(path)
    if shown_in is not None:
        target = target_window(prep)
        if target is None:
            raise InputError(f"{path}: cannot move it from the window {shown_in[0]:g}..{shown_in[1]:g} HU into "
                             f"a model's look: the preprocessing record {prep} has no HU window")
        arr = move_window(np.clip(arr, 0, 255), shown_in, target)
    if prep.get("norm") != "window":
        return resize_images(normalize(arr[None], "minmax"), prep["size"])[0], arr.shape
    with Image.open(path) as img:  # the header only: read_image has decoded the file already
        mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        low, high = prep["window"]
        raise InputError(f"{path}: a 16-bit or float image (mode {mode}) holds no HU, so it cannot be put in this "
                         f"checkpoint's HU window {low:g}..{high:g}; use the NIfTI volume, or an 8-bit slice shown "
                         f"in that window")
    return resize_images(arr[None] / np.float32(255), prep["size"])[0], arr.shape


def target_window(prep: dict) -> tuple[float, float] | None:
    """The HU window the slices of a preprocessing record are shown in: its look's (image files), its own
    (volumes normalised with an HU window), or None (min-max normalised volumes)."""
    look = prep.get("look")
    if look:
        return tuple(look["window"])
    return tuple(prep["window"]) if prep.get("norm") == "window" else None


def image_files_note(prep: dict) -> str | None:
    """The one line to print once per run when a checkpoint trained with an HU window reads image files
    (see :func:`load_image_slice`); None for a min-max checkpoint, whose image files are read as always."""
    if prep.get("norm") != "window":
        return None
    low, high = prep["window"]
    return (f"note: this checkpoint was trained on CT in the HU window {low:g}..{high:g}; image files are read "
            f"as 8-bit slices already shown in that window (value / 255, as data.export_png writes them), and "
            f"16-bit or float images are refused: give the NIfTI volume for exact HU")
