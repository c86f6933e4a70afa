"""Reproducible synthetic chest-CT phantoms with lung and lesion masks.

    python -m data.synthetic --out data/synthetic --patients 12 --seed 0 [--shape 256 256 32] [--overwrite]

Each phantom is an axial chest CT volume at mid-chest level in Hounsfield units (body with fat,
muscle, ribs, sternum, spine, heart and great vessels; two lungs with a branching vessel tree and
bronchi) with a lung mask (0 background, 1 left lung, 2 right lung) and a lesion mask (0 background,
1 ground-glass opacity, 2 consolidation). One NIfTI per patient is written to each of
OUT/images/ (int16 HU), OUT/lung_masks/ and OUT/lesion_masks/ (uint8), under the same file name.
OUT is built aside and swapped in when complete. It may be absent, empty or an earlier output (only
those three folders of phantom_*.nii.gz files); any other folder is replaced only with --overwrite.

Geometry: voxel axes point to the patient's Left, Posterior and Superior (LPS, as DICOM-derived
NIfTI files usually are), so the RAS+ affine is diag(-sx, -sy, sz) plus an offset and
``nibabel.aff2axcodes`` gives ('L', 'P', 'S'). The anatomy is built in adult millimetres and the
affine reports an in-plane spacing of 0.6-0.8 mm, as a 512x512 scan has: at 512x512 the phantom is
life-size, at the default 256x256 it is the same chest scaled by about one half.

Scanner model: in-plane Gaussian blur (point-spread function), then correlated Gaussian noise, then
-1024 HU outside the circular scan field of view (real scanners often write -2048 there; -1024
keeps every voxel a valid HU) and clipping to [-1024, 3071].

The same seed gives byte-identical files, and patient i depends only on (seed, i).
"""
import argparse
import functools
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from data.transforms import nifti_gz_bytes
from base import InputError, check_replaceable_dir, partial_dir, replace_dir

DEFAULT_OUT = "data/synthetic"  # where `python -m data.synthetic` writes; data/preprocess.py reads it
DEFAULT_PATIENTS = 12
DEFAULT_SHAPE = (256, 256, 32)  # ~2 M voxels, ~1 s a patient on one CPU core
SUBFOLDERS = ("images", "lung_masks", "lesion_masks")

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit range most scanners store
LESION_FREE_PROB = 0.25  # share of patients without any lesion
MAX_BURDEN = 0.40  # largest lesion fraction of the lung volume
N_TRUNKS = 16  # vessel trunks per lung, each a tree of 2**8 - 1 segments


# ----------------------------------------------------------------------------- small numeric tools
def _gaussian_blur(a: np.ndarray, sigma: tuple) -> np.ndarray:
    """Separable Gaussian blur (sigma in voxels per axis, 0 skips the axis), edges replicated."""
    out = a
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        radius = int(np.ceil(3 * s))
        w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
        w = (w / w.sum()).astype(out.dtype)
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, wk in enumerate(w):
            acc += wk * padded[(slice(None),) * axis + (slice(k, k + n),)]  # a view, no copy
        out = acc
    return out


def _upsample_linear(a: np.ndarray, shape: tuple, factors: tuple) -> np.ndarray:
    """Linear interpolation of a coarse grid (one coarse cell = `factors` voxels, one cell of margin)."""
    for axis, (n, f) in enumerate(zip(shape, factors)):
        pos = (np.arange(n) + 0.5) / f - 0.5 + 1.0  # +1: the coarse grid has a margin cell
        i0 = np.floor(pos).astype(int)
        w = (pos - i0).astype(np.float32)
        bshape = [1] * a.ndim
        bshape[axis] = n
        w = w.reshape(bshape)
        a = np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i0 + 1, axis=axis) * w
    return a


def _smooth_noise(rng: np.random.Generator, shape: tuple, sigma: tuple) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length `sigma` voxels.

    Filtered in Fourier space on a grid coarser by int(sigma) per axis, then linearly interpolated:
    the field hardly varies within one sigma, and the FFT of the full grid costs up to 10x more.
    """
    factors = tuple(max(1, int(s)) for s in sigma)
    coarse = tuple(int(np.ceil(n / f)) + 2 for n, f in zip(shape, factors))
    white = rng.standard_normal(coarse, dtype=np.float32)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in coarse[:-1]], np.fft.rfftfreq(coarse[-1]),
                        indexing="ij", sparse=True)
    gain = np.ones(())
    for fr, s, f in zip(freqs, sigma, factors):
        gain = gain * np.exp(-2 * (np.pi * fr * s / f) ** 2)
    axes = tuple(range(len(coarse)))
    field = np.fft.irfftn(np.fft.rfftn(white, axes=axes) * gain, s=coarse, axes=axes)
    field = (field - field.mean()) / (field.std() + 1e-12)
    return _upsample_linear(field.astype(np.float32), shape, factors)


def _ellipse_sd(x, y, cx, cy, a, b, angle=0.0, power=2.0):
    """Approximate signed distance (mm, negative inside) to a rotated (super)ellipse; arrays broadcast.

    power > 2 gives a boxier outline (a chest is flatter front and back than an ellipse).
    """
    dx, dy = x - cx, y - cy
    if np.any(angle != 0):
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    if power == 2.0:  # the common case, without the slow fractional powers
        r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
        grad = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2) / np.maximum(r, 1e-6)
        return (r - 1) / np.maximum(grad, 1e-6)
    ax, ay = np.abs(dx) / a, np.abs(dy) / b
    r = (ax**power + ay**power) ** (1 / power)
    # first-order distance (r - 1) / |grad r|: exact on the boundary and good enough near it
    rp = np.maximum(r, 1e-6) ** (1 - power)
    grad = rp * np.sqrt((ax ** (power - 1) / a) ** 2 + (ay ** (power - 1) / b) ** 2)
    return (r - 1) / np.maximum(grad, 1e-6)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ----------------------------------------------------------------------------- vessel tree
def _branching_tree(rng, root, targets, depth):
    """Random bifurcating tree of straight segments from `root` towards each of `targets` (mm).

    Aiming the trunks at points inside the lung makes the tree fill the lung rather than leave it.
    Built one generation at a time, vectorized over the branches of that generation.

    Returns:
        (p0, p1, r0, r1, generation) arrays with one row per segment, in millimetres.
    """
    start = np.broadcast_to(np.asarray(root, float), targets.shape)
    d = targets - start
    dist = np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    p, d, seg_len = start, d / dist, 0.3 * dist[:, 0]
    r = rng.uniform(2.5, 4.0, len(targets))
    out = []
    for gen in range(depth + 1):
        q = p + d * seg_len[:, None]
        out.append((p, q, r, 0.9 * r, np.full(len(p), gen)))
        if gen == depth:
            break
        # two children per branch, each turned 15-40 degrees in a random plane through the parent
        perp = np.cross(d, rng.standard_normal(d.shape))
        perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-12
        ang = np.deg2rad(rng.uniform(15, 40, (2, len(p))))[..., None]
        children = np.concatenate([np.cos(ang[0]) * d - np.sin(ang[0]) * perp,
                                   np.cos(ang[1]) * d + np.sin(ang[1]) * perp])
        d = children / np.linalg.norm(children, axis=1, keepdims=True)
        p = np.concatenate([q, q])
        seg_len = np.concatenate([seg_len, seg_len]) * rng.uniform(0.72, 0.88, 2 * len(seg_len))
        r = np.concatenate([r, r]) * rng.uniform(0.74, 0.82, 2 * len(r))
    return tuple(np.concatenate(parts) for parts in zip(*out))


class _Grid(NamedTuple):
    """Voxel grid in anatomical millimetres: x to the patient's left, y posterior, z superior."""

    x: np.ndarray  # (X, 1, 1) voxel centres
    y: np.ndarray  # (1, Y, 1)
    z: np.ndarray  # (1, 1, Z), 0 at the carina
    px: float  # in-plane voxel size
    pz: float  # slice distance
    shape: tuple

    def to_index(self, p: np.ndarray) -> np.ndarray:
        """(N, 3) points in mm -> (N, 3) fractional voxel indices."""
        origin = np.array([self.x[0, 0, 0], self.y[0, 0, 0], self.z[0, 0, 0]])
        return (p - origin) / np.array([self.px, self.px, self.pz])


def _tube_occupancy(p0, p1, r0, r1, grid: _Grid, keep: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] of tubes p0->p1 (radius r0->r1, mm) on the voxel grid.

    Each tube is sampled as spheres every 0.7 voxel, each sphere splatted into its bounding box:
    the cost grows with the vessel length, not with the volume. Only spheres centred in `keep`
    are drawn.
    """
    px, pz, shape = grid.px, grid.pz, grid.shape
    occ = np.zeros(int(np.prod(shape)), np.float32)
    if len(p0) == 0:
        return occ.reshape(shape)
    seg_len = np.linalg.norm(p1 - p0, axis=1)
    counts = np.maximum(2, np.ceil(seg_len / (0.7 * px)).astype(int) + 1)
    seg = np.repeat(np.arange(len(p0)), counts)
    first = np.cumsum(counts) - counts
    frac = (np.arange(len(seg)) - first[seg]) / (counts[seg] - 1)
    pts = p0[seg] + (p1 - p0)[seg] * frac[:, None]
    rad = r0[seg] + (r1 - r0)[seg] * frac
    idx = grid.to_index(pts)
    near = np.rint(idx).astype(int)
    inside = np.all((near >= 0) & (near < np.array(shape)), axis=1)
    inside[inside] = keep[tuple(near[inside].T)]
    idx, rad = idx[inside], rad[inside]
    bxy = np.ceil(rad / px + 1).astype(int)
    bz = np.ceil((rad + pz / 2) / pz).astype(int)
    for b_xy in np.unique(bxy):
        for b_z in np.unique(bz[bxy == b_xy]):
            sel = (bxy == b_xy) & (bz == b_z)
            c, r = idx[sel], rad[sel]
            base = np.rint(c).astype(int)
            for di in range(-b_xy, b_xy + 1):
                for dj in range(-b_xy, b_xy + 1):
                    vi, vj = base[:, 0] + di, base[:, 1] + dj
                    d_xy = np.hypot(vi - c[:, 0], vj - c[:, 1]) * px
                    o_xy = np.clip(0.5 + (r - d_xy) / px, 0, 1)
                    for dk in range(-b_z, b_z + 1):
                        vk = base[:, 2] + dk
                        # overlap of the sphere's z-extent with the slab of slice vk
                        lo = np.maximum((vk - 0.5) * pz, c[:, 2] * pz - r)
                        hi = np.minimum((vk + 0.5) * pz, c[:, 2] * pz + r)
                        o = o_xy * np.clip((hi - lo) / np.minimum(pz, 2 * r), 0, 1)
                        ok = ((o > 0) & (vi >= 0) & (vi < shape[0]) & (vj >= 0) & (vj < shape[1])
                              & (vk >= 0) & (vk < shape[2]))
                        flat = np.ravel_multi_index((vi[ok], vj[ok], vk[ok]), shape)
                        np.maximum.at(occ, flat, o[ok].astype(np.float32))
    return occ.reshape(shape)


# ----------------------------------------------------------------------------- one patient
def _check_shape(shape) -> tuple:
    if shape is None:
        return DEFAULT_SHAPE
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) for n in shape):
        raise InputError(f"--shape must be three integers X Y Z, got {shape!r}")
    if shape[0] < 32 or shape[1] < 32 or shape[2] < 1:
        raise InputError(f"--shape {' '.join(map(str, shape))} is too small: need X, Y >= 32 and Z >= 1")
    return tuple(int(n) for n in shape)


def generate_patient(rng: np.random.Generator, shape: tuple | None = None) -> dict:
    """Draw one synthetic chest-CT patient.

    Args:
        rng: random generator; all randomness of the patient comes from it.
        shape: (X, Y, Z) voxels, X towards the patient's left, Y posterior, Z superior;
            None for DEFAULT_SHAPE.

    Returns:
        dict with "image" (X, Y, Z) int16 HU, "lung" (X, Y, Z) uint8 (1 left, 2 right lung),
        "lesion" (X, Y, Z) uint8 (1 ground-glass opacity, 2 consolidation, only inside the lung),
        "affine" (4, 4) float64 RAS+ voxel-to-world, "spacing" (sx, sy, sz) in mm.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be np.random.default_rng(...), got {type(rng).__name__}")
    # each step draws from rng in turn, in a fixed order: the same seed gives the same patient
    s = _sampling(rng.uniform, _check_shape(shape))
    s.hu = _tissue_values(rng.uniform)
    img = _paint_body(rng.uniform, s)
    img = _paint_bones(rng.uniform, s, img)
    img = _paint_mediastinum(rng.uniform, s, img)
    img, lung, lesion = _paint_lungs(rng, s, img)
    image = _scan(rng, img, s.hu.psf_sigma, s.hu.noise_sd)
    sx, sz = s.sx, s.sz
    affine = np.diag([-sx, -sx, sz, 1.0])
    # DICOM-like placement: world origin near the image centre; table height and couch position vary
    affine[:3, 3] = [(s.nx - 1) / 2 * sx, (s.ny - 1) / 2 * sx + rng.uniform(-20, 20), rng.uniform(-350, -100)]
    return {"image": image, "lung": lung, "lesion": lesion, "affine": affine,
            "spacing": (float(sx), float(sx), float(sz))}


def airway_lumen(hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """A phantom's trachea and main bronchi, for measuring lungs from HU: (Z, H, W) slices of its image and
    lung mask in, the air inside its body (drawn at -990 HU) that is not lung, one pixel inside the lumen's
    edge and at least three pixels from the lungs, out."""
    from scipy import ndimage  # only the measurements need it, not the phantoms

    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500]) if len(hu) else hu > -500
    lumen = body & (hu < -600) & (lung == 0)
    return ndimage.binary_erosion(lumen, np.ones((1, 3, 3), bool)) & ~ndimage.binary_dilation(
        lung > 0, np.ones((1, 5, 5), bool))


def trachea_slices(lumen: np.ndarray) -> list[int]:
    """The slices above the carina of an :func:`airway_lumen`: those where it is one piece, the trachea."""
    from scipy import ndimage

    return [z for z in range(len(lumen)) if ndimage.label(lumen[z])[1] == 1]


def _sampling(u, shape: tuple) -> SimpleNamespace:
    """Patient size and voxel sampling (adult millimetres; the affine scales them, see module doc): the
    coordinate grid every later step paints on, and the organ scale k."""
    nx, ny, nz = shape
    # --- patient size and sampling (adult millimetres; the affine scales them, see module doc)
    half_w = u(140, 180)  # body 280-360 mm wide...
    half_ap = half_w * u(0.64, 0.76)  # ...and 180-270 mm deep
    fov = 2 * half_w / u(0.84, 0.95)  # the scan field of view leaves a small margin
    px = fov / min(nx, ny)  # anatomical mm per voxel in-plane
    sx = u(0.6, 0.8)  # spacing the affine reports
    scale = sx / px
    pz = u(140, 190) / nz  # cover 14-19 cm of mid-chest...
    sz = float(np.clip(scale * pz, 1.0, 5.0))  # ...unless that needs slices outside 1-5 mm
    pz = sz / scale
    z_mid = u(-55, -30)  # volume centre in mm relative to the carina (z = 0), positive superior
    k = half_w / 160  # organ sizes follow body size

    x = ((np.arange(nx) - (nx - 1) / 2) * px).astype(np.float32).reshape(-1, 1, 1)  # + = patient left
    y = ((np.arange(ny) - (ny - 1) / 2) * px).astype(np.float32).reshape(1, -1, 1)  # + = posterior
    z = (z_mid + (np.arange(nz) - (nz - 1) / 2) * pz).astype(np.float32).reshape(1, 1, -1)
    full = (nx, ny, nz)
    grid = _Grid(x, y, z, px, pz, full)
    return SimpleNamespace(nx=nx, ny=ny, nz=nz, half_w=half_w, half_ap=half_ap, fov=fov, px=px, sx=sx, sz=sz,
                           pz=pz, k=k, x=x, y=y, z=z, full=full, grid=grid)


def _tissue_values(u) -> SimpleNamespace:
    """Tissue values in HU for one patient, and the scanner's blur and noise."""
    hu_air = -1000.0
    hu_fat = u(-120, -95)
    hu_muscle = u(35, 55)
    contrast = u() < 0.3  # a minority of chest CTs are contrast-enhanced
    hu_blood = u(150, 300) if contrast else u(35, 50)
    hu_myocardium = u(80, 120) if contrast else hu_muscle
    hu_cortical, hu_marrow = u(700, 1100), u(180, 320)
    # the real chest CT in ../shared/data/real-ct measures about -770 HU in front and -620 at
    # the back of the lung: the dependent lung is denser (gravity, patient supine)
    hu_lung_front = u(-840, -760)
    hu_lung_gradient = u(110, 180)
    hu_ggo, hu_cons = u(-600, -420), u(-40, 40)
    noise_sd = u(12, 22)
    psf_sigma = u(0.6, 1.0)  # in voxels
    return SimpleNamespace(air=hu_air, fat=hu_fat, muscle=hu_muscle, blood=hu_blood, myocardium=hu_myocardium,
                           cortical=hu_cortical, marrow=hu_marrow, lung_front=hu_lung_front,
                           lung_gradient=hu_lung_gradient, ggo=hu_ggo, cons=hu_cons, noise_sd=noise_sd,
                           psf_sigma=psf_sigma)


def _paint_body(u, s: SimpleNamespace) -> np.ndarray:
    """Body outline, fat and chest wall on the patient table; records the thoracic cavity's extents in s."""
    x, y, k, fov, half_w, half_ap, nx, ny = s.x, s.y, s.k, s.fov, s.half_w, s.half_ap, s.nx, s.ny
    hu_air, hu_fat, hu_muscle = s.hu.air, s.hu.fat, s.hu.muscle
    # --- body outline: a boxy ellipse with a flat back, on the table
    yb = -u(0.03, 0.08) * fov / 2
    back = yb + 0.92 * half_ap
    d_body = np.maximum(_ellipse_sd(x, y, 0.0, yb, half_w, half_ap, power=2.4), y - back)
    fat = u(6, 28) * k
    fat_t = fat * (0.7 + 0.6 * (x / half_w) ** 2)  # thicker on the flanks
    # spine: the vertebral body sits 7-9 cm in front of the skin of the back
    r_vert = 17 * k
    y_vert = back - 0.7 * fat - 72 * k
    y_canal = y_vert + r_vert + 9 * k
    # chest wall (muscle + ribs) is thin, but behind the vertebral body the back muscles fill the
    # space on both sides of the spine; the lungs reach far back lateral to them
    paraspinal = np.exp(-((x / (42 * k)) ** 4)) * _smoothstep((y - y_vert + 5 * k) / (30 * k))
    wall_t = (14 + 8 * _smoothstep((y - yb) / half_ap) + 60 * paraspinal) * k
    d_cavity = d_body + fat_t + wall_t

    # thoracic cavity extents (for placing organs and the lung density gradient)
    cav_front = yb - half_ap + 0.7 * fat + 14 * k
    cav_back = back - 0.7 * fat - 22 * k
    cav_half_w = half_w - 1.3 * fat - 14 * k
    cav_mid = (cav_front + cav_back) / 2
    cav_half_ap = (cav_back - cav_front) / 2

    # z-invariant structures are painted on one (X, Y, 1) slice; the first z-dependent one broadcasts
    img = np.full((nx, ny, 1), hu_air, np.float32)

    # patient table: thin carbon-fibre skins around foam, just below the back
    table_top, table_h = back + u(2, 10), 14 * k
    table = (y >= table_top) & (y < table_top + table_h) & (np.abs(x) < 0.47 * fov)
    skin = table & ((y < table_top + 2) | (y >= table_top + table_h - 2))
    img = np.where(table, -900.0, img)
    img = np.where(skin, 100.0, img)

    img = np.where(d_body < 0, hu_fat, img)
    img = np.where(d_body < -fat_t, hu_muscle, img)
    # a thin fat plane between the outer chest-wall muscles and the rib layer
    plane = d_body + fat_t + 0.4 * wall_t
    img = np.where((plane < 0) & (plane > -2.5 * k), hu_fat + 20, img)

    # --- thoracic cavity: mediastinal fat in the middle, diaphragm/liver where the lungs end
    img = np.where(d_cavity < 0, np.where(np.abs(x) < 0.4 * cav_half_w, hu_fat + 10, hu_muscle + 5), img)
    s.yb, s.back, s.d_body, s.fat, s.fat_t, s.wall_t, s.d_cavity = yb, back, d_body, fat, fat_t, wall_t, d_cavity
    s.r_vert, s.y_vert, s.y_canal = r_vert, y_vert, y_canal
    s.cav_front, s.cav_back, s.cav_half_w, s.cav_mid, s.cav_half_ap = cav_front, cav_back, cav_half_w, cav_mid, cav_half_ap
    return img


def _paint_bones(u, s: SimpleNamespace, img: np.ndarray) -> np.ndarray:
    """Sternum, vertebra and ribs."""
    x, y, z, k, half_w, half_ap, yb = s.x, s.y, s.z, s.k, s.half_w, s.half_ap, s.yb
    d_body, fat_t, wall_t, cav_front = s.d_body, s.fat_t, s.wall_t, s.cav_front
    r_vert, y_vert, y_canal = s.r_vert, s.y_vert, s.y_canal
    hu_cortical, hu_marrow = s.hu.cortical, s.hu.marrow
    # sternum
    ster = _ellipse_sd(x, y, 0.0, cav_front - 5 * k, 16 * k, 6 * k)
    img = np.where(ster < 0, hu_cortical, img)
    img = np.where(ster < -1.5 * k, hu_marrow, img)

    # vertebra: cortical shell, cancellous core, canal, laminae, spinous and transverse processes
    d_vert = np.sqrt(x**2 + (y - y_vert) ** 2) - r_vert
    lamina = _ellipse_sd(x, y, 0.0, y_canal + 2 * k, 16 * k, 12 * k)
    spinous = (np.abs(x) < 4 * k) & (y > y_canal) & (y < y_canal + 34 * k)
    transverse = ((np.abs(y - y_canal - 0.25 * np.abs(x)) < 4.5 * k)
                  & (np.abs(x) < 32 * k) & (np.abs(x) > 10 * k))
    img = np.where((lamina < 0) | spinous | transverse, 0.8 * hu_cortical, img)
    img = np.where((lamina < -3 * k) & ~spinous, hu_marrow, img)
    img = np.where(d_vert < 0, hu_cortical, img)
    img = np.where(d_vert < -2 * k, hu_marrow, img)
    img = np.where((x**2 + (y - y_canal) ** 2) < (8 * k) ** 2, 15.0, img)  # spinal canal

    # --- ribs: cross-sections along a band in the chest wall, drifting round the chest with z
    phi = np.arctan2(x, -(y - yb))  # 0 anterior, +-pi posterior, + patient left
    rib_band = d_body + fat_t + 0.72 * wall_t
    rib_pitch = np.deg2rad(u(19, 24))
    phase = np.where(x > 0, u(0, 1), u(0, 1))
    t = (np.abs(phi) - 0.2 * np.pi) / rib_pitch - z / (26 * k) + phase
    arc = (t - np.round(t)) * rib_pitch * (half_w + half_ap) / 2  # mm along the band
    rib_r = (arc / (7 * k)) ** 2 + (rib_band / (4 * k)) ** 2
    rib_zone = (np.abs(phi) > 0.16 * np.pi) & (np.abs(phi) < 0.88 * np.pi)
    cartilage = rib_zone & (np.abs(phi) < 0.3 * np.pi)
    img = np.where(rib_zone & (rib_r < 1), np.where(cartilage, 110.0, hu_cortical), img)
    img = np.where(rib_zone & ~cartilage & (rib_r < 0.4), hu_marrow, img)
    return img


def _paint_mediastinum(u, s: SimpleNamespace, img: np.ndarray) -> np.ndarray:
    """Heart, great vessels, esophagus, trachea and main bronchi; records them in s for the lungs."""
    x, y, z, k, full, cav_front, cav_half_w = s.x, s.y, s.z, s.k, s.full, s.cav_front, s.cav_half_w
    r_vert, y_vert = s.r_vert, s.y_vert
    hu_air, hu_fat, hu_muscle, hu_blood, hu_myocardium = s.hu.air, s.hu.fat, s.hu.muscle, s.hu.blood, s.hu.myocardium
    # heart (lower part of the volume) and great vessels (upper part)
    z_heart = u(-45, -25)
    heart_size = _smoothstep((z_heart - z) / 35.0)
    hx, hy = 0.2 * cav_half_w, cav_front + 48 * k
    d_heart = _ellipse_sd(x, y, hx, hy, np.maximum(56 * k * heart_size, 1e-3),
                          np.maximum(42 * k * heart_size, 1e-3), np.deg2rad(-35))
    d_heart = np.where(heart_size > 0.05, d_heart, 99.0)
    heart = d_heart < 0
    img = np.where(heart, hu_fat + 15, img)  # epicardial fat
    img = np.where(d_heart <= -4 * k, hu_myocardium, img)
    img = np.where(d_heart <= -12 * k, hu_blood, img)

    gv_size = _smoothstep((z - z_heart + 15) / 20.0)  # great vessels take over above the heart
    y_asc = cav_front + 36 * k
    d_asc = np.sqrt((x + 5 * k) ** 2 + (y - y_asc) ** 2) - 14 * k * gv_size
    d_pa = np.sqrt((x - 24 * k) ** 2 + (y - y_asc + 2 * k) ** 2) - 12 * k * gv_size * (z < 5)
    d_svc = np.sqrt((x + 28 * k) ** 2 + (y - y_asc - 6 * k) ** 2) - 9 * k * gv_size
    x_desc, y_desc = r_vert + 10 * k, y_vert - 0.7 * r_vert  # just clear of the vertebra
    z_arch = u(15, 30)
    arch = _smoothstep((z - z_arch + 6) / 6.0) * (z < z_arch + 14)
    d_arch = _ellipse_sd(x, y, (x_desc - 5 * k) / 2, (y_desc + y_asc) / 2,
                         np.hypot(x_desc + 5 * k, y_desc - y_asc) / 2 + 12 * k,
                         np.maximum(12 * k * arch, 1e-3), np.arctan2(y_desc - y_asc, x_desc + 5 * k))
    d_desc = np.sqrt((x - x_desc) ** 2 + (y - y_desc) ** 2) - 12 * k * (z < z_arch + 5)
    d_vessels = functools.reduce(np.minimum, [d_asc, d_pa, d_svc, np.where(arch > 0.05, d_arch, 99.0),
                                             d_desc])
    img = np.where(d_vessels < 0, hu_blood, img)

    # esophagus; trachea above the carina (z = 0), main bronchi from it to the hila below
    y_tr = y_vert - r_vert - 22 * k
    img = np.where((x + 4 * k) ** 2 + (y - y_vert + r_vert + 8 * k) ** 2 < (7 * k) ** 2, hu_muscle - 5, img)
    hilum_x, hilum_y, hilum_z = 0.42 * cav_half_w, y_vert - r_vert - 12 * k, u(-30, -20)
    along = np.clip(z / hilum_z, 0, 1)  # 0 at and above the carina, 1 at the hilum
    airway_d = np.full(full, 99.0, np.float32)
    for side in (-1.0, 1.0):
        bx = side * along * hilum_x * (0.8 if side < 0 else 1.0)  # right main bronchus is shorter
        by = y_tr + along * (hilum_y - y_tr)
        airway_d = np.minimum(airway_d, np.sqrt((x - bx) ** 2 + (y - by) ** 2) - np.where(z > 0, 9, 6) * k)
    airway_d = np.where(z > hilum_z, airway_d, 99.0)
    img = np.where(airway_d < 2 * k, hu_muscle, img)  # wall
    img = np.where(airway_d < 0, hu_air + 10, img)
    s.d_heart, s.d_vessels, s.airway_d = d_heart, d_vessels, airway_d
    s.hilum = (hilum_x, hilum_y, hilum_z)
    return img


def _paint_lungs(rng, s: SimpleNamespace, img: np.ndarray):
    """Lungs (cavity minus mediastinum), parenchyma, lesions, vessels and bronchi; returns (img, lung, lesion)."""
    u = rng.uniform
    x, y, z, k, px, pz, full, grid = s.x, s.y, s.z, s.k, s.px, s.pz, s.full, s.grid
    cav_front, cav_back, cav_half_w, cav_mid, cav_half_ap = s.cav_front, s.cav_back, s.cav_half_w, s.cav_mid, s.cav_half_ap
    d_cavity, d_heart, d_vessels, airway_d, r_vert, y_vert = s.d_cavity, s.d_heart, s.d_vessels, s.airway_d, s.r_vert, s.y_vert
    (hilum_x, hilum_y, hilum_z), hu = s.hilum, s.hu
    hu_lung_front, hu_lung_gradient, hu_ggo, hu_cons = hu.lung_front, hu.lung_gradient, hu.ggo, hu.cons
    hu_blood, hu_muscle, hu_air = hu.blood, hu.muscle, hu.air
    # --- lungs: cavity minus mediastinum, tapered towards apex and base, irregular outline
    d_med = functools.reduce(np.minimum, [
        _ellipse_sd(x, y, 0.05 * cav_half_w, cav_mid, 0.14 * cav_half_w, 1.3 * cav_half_ap),
        d_heart, d_vessels - 3 * k, airway_d - 3 * k,
        _ellipse_sd(x, y, 0.15 * r_vert, y_vert - 0.3 * r_vert, 1.9 * r_vert + 6 * k, 1.45 * r_vert),
    ])
    apex, base_r, base_l = u(70, 100), u(-185, -150), u(-200, -165)
    wobble = _smooth_noise(rng, full, (12 / px, 12 / px, 15 / pz)) * 4.0 * k
    lung = np.zeros(full, np.uint8)
    for label, side, base in ((1, 1.0, base_l), (2, -1.0, base_r)):  # label 1: patient left, +x
        taper = np.sqrt(_smoothstep((apex - z) / 60.0) * _smoothstep((z - base) / 45.0))
        env = _ellipse_sd(x, y, side * 0.55 * cav_half_w, cav_mid + 0.1 * cav_half_ap,
                          np.maximum(0.62 * cav_half_w * taper, 1e-3),
                          np.maximum(1.25 * cav_half_ap * taper, 1e-3))
        # the costal surface follows the rib cage smoothly; the mediastinal side is irregular
        d_lung = np.maximum(d_cavity + 2.0 * k, np.maximum(env, 3.0 * k - d_med) + wobble)
        lung[(d_lung < 0) & (side * x > 0) & (taper > 0.05)] = label
    in_lung = lung > 0

    # parenchyma: denser towards the back, fine texture
    depth = np.clip((y - cav_front) / (cav_back - cav_front), 0, 1)
    texture = _smooth_noise(rng, full, (3 / px, 3 / px, 3 / pz))
    lung_hu = hu_lung_front + hu_lung_gradient * depth + 15.0 * texture

    # --- lesions, then vessels and bronchi, which stay visible through ground glass
    lesion, a_ggo, a_cons = _draw_lesions(rng, grid, in_lung, depth, texture, k)
    lung_hu = lung_hu + a_ggo * (hu_ggo + 25.0 * texture - lung_hu)
    lung_hu = lung_hu + a_cons * (hu_cons + 15.0 * texture - lung_hu)
    vessels, wall, lumen = _draw_airways_and_vessels(
        rng, grid, lung, (hilum_x, hilum_y, hilum_z), ((1, base_l, apex), (2, base_r, apex)), k)
    lung_hu = lung_hu + vessels * (0.5 * hu_blood + 20 - lung_hu)
    lung_hu = lung_hu + wall * (hu_muscle - 20 - lung_hu)
    lung_hu = lung_hu + lumen * (hu_air + 20 - lung_hu)
    img = np.where(in_lung, lung_hu, img)
    return img, lung, lesion


def _draw_lesions(rng, grid: _Grid, in_lung, depth, texture, k):
    """Patchy lesions, mostly subpleural and posterior, over a limited z-range.

    Returns:
        lesion (X, Y, Z) uint8 mask (1 GGO, 2 consolidation) and the GGO and consolidation
        occupancies in [0, 1], which ramp up over +-10% of the mask threshold: hazy edges.
    """
    u, (nx, ny, nz) = rng.uniform, grid.shape
    x, y, z = grid.x, grid.y, grid.z
    lesion = np.zeros(grid.shape, np.uint8)
    a_ggo = a_cons = np.zeros((1, 1, 1), np.float32)
    if u() < LESION_FREE_PROB or not in_lung.any():
        return lesion, a_ggo, a_cons
    burden = MAX_BURDEN * u(0.1, 1.0) ** 2  # 0.4% to 40% of the lung, median ~12%
    span = max(u(0.4, 1.0), min(1.0, burden / 0.6))  # keep the lesion slab below ~60% involved
    n_span = max(1, int(round(span * nz)))
    first = int(rng.integers(0, nz - n_span + 1))
    window = np.zeros((1, 1, nz), bool)
    window[..., first:first + n_span] = True
    candidates = in_lung & window
    if not candidates.any():
        return lesion, a_ggo, a_cons

    # centres: random lung voxels, preferred where the costal pleura (lateral, front or back, not
    # the mediastinal side) is within ~10 mm, and in the dependent lung
    ci, cj, ck = np.nonzero(candidates)
    pick = rng.integers(0, len(ci), size=2000)
    ci, cj, ck = ci[pick], cj[pick], ck[pick]
    outward = np.where(ci > (nx - 1) / 2, 1, -1)  # away from the mediastinum
    reach = 10 / grid.px
    near = np.zeros(len(ci), bool)
    for di, dj in ((1, 0), (0.7, 0.7), (0.7, -0.7), (0, 1), (0, -1)):
        ii = np.clip(ci + np.rint(outward * di * reach).astype(int), 0, nx - 1)
        jj = np.clip(cj + int(round(dj * reach)), 0, ny - 1)
        near |= ~in_lung[ii, jj, ck]
    weight = (0.05 + near) * (0.3 + depth[0, cj, 0]) ** 2
    n_centres = 1 + int(rng.poisson(2 + 25 * burden))
    chosen = rng.choice(len(ci), size=n_centres, p=weight / weight.sum())

    # smooth blobs around the centres, broken up by noise, thresholded to the drawn burden
    env = np.zeros(grid.shape, np.float32)
    for i0, j0, k0 in zip(ci[chosen], cj[chosen], ck[chosen]):
        radius = u(10, 35) * k
        env += u(0.5, 1.0) * np.exp(-0.5 * ((x - x[i0, 0, 0]) ** 2 + (y - y[0, j0, 0]) ** 2
                                            + ((z - z[0, 0, k0]) / 0.8) ** 2) / radius**2)
    patchy = np.exp(0.7 * _smooth_noise(rng, grid.shape, (7 / grid.px, 7 / grid.px, 7 / grid.pz))
                    + 0.25 * texture)
    field = env * patchy * candidates
    target = burden * in_lung.sum()
    tau = max(float(np.quantile(field[candidates], max(0.0, 1 - target / candidates.sum()))), 1e-6)
    lesion[field >= tau] = 1
    a_ggo = np.clip((field / tau - 1) / 0.2 + 0.7, 0, 1)
    if lesion.any() and u() < 0.7:  # most patients have consolidation in GGO cores
        tau_c = float(np.quantile(field[lesion > 0], 1 - u(0.1, 0.5)))
        lesion[field >= tau_c] = 2
        a_cons = np.clip((field / tau_c - 1) / 0.2 + 0.7, 0, 1)
    return lesion, a_ggo, a_cons


def _draw_airways_and_vessels(rng, grid: _Grid, lung, hilum, lungs, k):
    """Pulmonary vessels and bronchi: a bifurcating tree from each hilum, drawn inside the lungs.

    Args:
        hilum: (x, y, z) mm of the left hilum; the right one is mirrored.
        lungs: (label, base z, apex z) per lung; label 1 is on +x.

    Returns:
        Occupancies in [0, 1] of vessels, bronchial walls and bronchial lumens.
    """
    u = rng.uniform
    in_lung = lung > 0
    segs = []
    for label, base, apex in lungs:
        side = 1.0 if label == 1 else -1.0
        li, lj, _ = np.nonzero(lung == label)
        if len(li) == 0:
            continue
        # trunks aim at random points of this lung, at any height between base and apex
        pick = rng.integers(0, len(li), size=N_TRUNKS)
        targets = np.stack([grid.x.ravel()[li[pick]], grid.y.ravel()[lj[pick]],
                            u(base + 20, apex - 20, N_TRUNKS)], axis=1)
        root = (side * hilum[0], hilum[1], hilum[2])
        segs.append(_branching_tree(rng, root, targets, depth=7))
    if not segs:
        empty = np.zeros((1, 1, 1), np.float32)
        return empty, empty, empty
    p0, p1, r0, r1, gen = (np.concatenate(parts) for parts in zip(*segs))
    vessels = _tube_occupancy(p0, p1, r0, r1, grid, in_lung)
    # bronchi run beside some of the larger arteries
    big = (gen <= 1) & (rng.random(len(gen)) < 0.4)
    side_vec = np.cross(p1[big] - p0[big], np.array([0.0, 0.0, 1.0]))
    side_vec /= np.linalg.norm(side_vec, axis=1, keepdims=True) + 1e-9
    b0 = p0[big] + side_vec * (1.8 * r0[big])[:, None]
    b1 = p1[big] + side_vec * (1.8 * r1[big])[:, None]
    rb0, rb1 = 0.7 * r0[big], 0.7 * r1[big]
    wall = _tube_occupancy(b0, b1, rb0 + 1.0 * k, rb1 + 1.0 * k, grid, in_lung)
    lumen = _tube_occupancy(b0, b1, rb0, rb1, grid, in_lung)
    return vessels, wall, lumen


def _scan(rng, img, psf_sigma, noise_sd) -> np.ndarray:
    """Scanner model: in-plane blur, correlated noise, circular field of view, 12-bit range -> int16."""
    nx, ny, _ = img.shape
    img = _gaussian_blur(img, (psf_sigma, psf_sigma, 0))
    noise = _gaussian_blur(rng.standard_normal(img.shape, dtype=np.float32), (0.6, 0.6, 0))
    img = img + noise * (noise_sd / noise.std())
    ci, cj = np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2
    in_fov = (ci[:, None] ** 2 + cj[None, :] ** 2) <= (min(nx, ny) / 2) ** 2
    img = np.where(in_fov[:, :, None], img, HU_MIN)
    return np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)


# ----------------------------------------------------------------------------- writing
def written_by_synthetic(folder: str | Path) -> bool:
    """Whether ``folder`` looks like an output of generate_dataset: nothing but the three SUBFOLDERS,
    holding nothing but phantom_*.nii.gz files, so that a rerun may replace it."""
    for entry in Path(folder).iterdir():
        if entry.name not in SUBFOLDERS or not entry.is_dir():
            return False
        if any(not (f.is_file() and f.name.startswith("phantom_") and f.name.endswith(".nii.gz"))
               for f in entry.iterdir()):
            return False
    return True


def generate_dataset(out_dir, patients: int, seed: int, shape: tuple | None = None,
                     progress: bool = False, overwrite: bool = False) -> list[str]:
    """Write `patients` phantoms as NIfTI files to out_dir/{images,lung_masks,lesion_masks}/.

    Patient i is drawn from np.random.default_rng([seed, i]), so it does not depend on how many
    patients are written. The folder is built aside and replaces out_dir when complete, so it holds
    exactly this dataset and an interrupted run leaves the previous one.

    Args:
        out_dir: output folder: absent, empty, or an earlier output (see written_by_synthetic);
            any other folder only with ``overwrite``.
        patients: number of patients, >= 1.
        seed: non-negative integer seed.
        shape: (X, Y, Z) voxels per volume; None for DEFAULT_SHAPE.
        progress: show a tqdm progress bar.
        overwrite: replace out_dir even if it holds other files.

    Returns:
        The file names written, e.g. ["phantom_000.nii.gz", ...], the same in all three folders.
    Raises:
        InputError for bad arguments or an output folder that may not or cannot be written.
    """
    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or patients < 1:
        raise InputError(f"--patients must be a positive integer, got {patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    shape = _check_shape(shape)
    out = Path(out_dir)
    check_replaceable_dir(out, written_by_synthetic, overwrite, "--out", "data.synthetic")
    final, tmp = partial_dir(out)
    digits = max(3, len(str(patients - 1)))
    names = [f"phantom_{i:0{digits}d}.nii.gz" for i in range(patients)]
    try:
        folders = [tmp / name for name in SUBFOLDERS]
        for folder in folders:
            folder.mkdir()
        for i in tqdm(range(patients), desc="phantoms", unit="patient", disable=None if progress else True):
            p = generate_patient(np.random.default_rng([seed, i]), shape)
            for folder, data in zip(folders, (p["image"], p["lung"], p["lesion"])):
                (folder / names[i]).write_bytes(nifti_gz_bytes(data, p["affine"]))
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options; the defaults write the demo dataset to data/synthetic/."""
    p = argparse.ArgumentParser(description="Write synthetic chest-CT phantoms with lung and lesion masks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (images/, lung_masks/, lesion_masks/), "
                   "replaced when complete if empty or written by data.synthetic")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if data.synthetic did not write it")
    p.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, help="number of phantom patients")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help="voxels per volume (X patient left, Y posterior, Z superior)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> list[str]:
    """Write the phantoms described by `args` and print where they went; returns the file names."""
    names = generate_dataset(args.out, args.patients, args.seed, tuple(args.shape), progress=True,
                             overwrite=args.overwrite)
    x, y, z = args.shape
    print(f"wrote {len(names)} phantoms ({x}x{y}x{z} voxels, seed {args.seed}) to "
          f"{Path(args.out)}/{{{','.join(SUBFOLDERS)}}}/")
    return names


if __name__ == "__main__":
    from utils.cli import run_cli
    run_cli(main, get_args_parser())
