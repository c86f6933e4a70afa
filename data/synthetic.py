"""Reproducible synthetic chest-CT phantoms with lung and lesion masks.

    python -m data.synthetic --out data/synthetic --patients 12 --seed 0 [--shape 256 256 32]

Each phantom is an axial chest CT volume at mid-chest level in Hounsfield units (body with fat,
muscle, ribs, sternum, spine, heart and great vessels; two lungs with a branching vessel tree and
bronchi) with a lung mask (0 background, 1 left lung, 2 right lung) and a lesion mask (0 background,
1 ground-glass opacity, 2 consolidation). One NIfTI per patient is written to each of
OUT/images/ (int16 HU), OUT/lung_masks/ and OUT/lesion_masks/ (uint8), under the same file name.

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
import gzip
import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

DEFAULT_OUT = "data/synthetic"  # where `python -m data.synthetic` writes; data/preprocess.py reads it
DEFAULT_PATIENTS = 12
DEFAULT_SHAPE = (256, 256, 32)  # ~2 M voxels a patient: the default set takes a few seconds
SUBFOLDERS = ("images", "lung_masks", "lesion_masks")

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit range most scanners store
LESION_FREE_PROB = 0.25  # share of patients without any lesion
MAX_BURDEN = 0.40  # largest lesion fraction of the lung volume


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
            acc += wk * np.take(padded, np.arange(k, k + n), axis=axis)
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

    Filtered in Fourier space on a grid coarser by up to sigma/2 per axis, then interpolated:
    the field is smooth at that scale anyway and the FFT of the full grid would cost ~10x more.
    """
    factors = tuple(max(1, int(s / 2)) for s in sigma)
    coarse = tuple(int(np.ceil(n / f)) + 2 for n, f in zip(shape, factors))
    white = rng.standard_normal(coarse)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in coarse[:-1]], np.fft.rfftfreq(coarse[-1]),
                        indexing="ij", sparse=True)
    gain = np.ones(())
    for fr, s, f in zip(freqs, sigma, factors):
        gain = gain * np.exp(-2 * (np.pi * fr * s / f) ** 2)
    field = np.fft.irfftn(np.fft.rfftn(white) * gain, s=coarse)
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

    Returns:
        (p0, p1, r0, r1, generation) arrays with one row per segment, in millimetres.
    """
    rows = []
    root = np.asarray(root, float)
    stack = []
    for target in targets:
        d = target - root
        dist = np.linalg.norm(d) + 1e-9
        stack.append((root, d / dist, 0.3 * dist, rng.uniform(3.5, 5.0), 0))
    while stack:
        p, d, seg_len, r, gen = stack.pop()
        q = p + d * seg_len
        rows.append((*p, *q, r, r * 0.9, gen))
        if gen == depth:
            continue
        perp = np.cross(d, rng.standard_normal(3))
        perp /= np.linalg.norm(perp) + 1e-12
        for sign in (-1.0, 1.0):
            ang = np.deg2rad(rng.uniform(15, 40))
            child = np.cos(ang) * d + sign * np.sin(ang) * perp
            stack.append((q, child / np.linalg.norm(child), seg_len * rng.uniform(0.72, 0.88),
                          r * rng.uniform(0.74, 0.82), gen + 1))
    t = np.array(rows)
    return t[:, 0:3], t[:, 3:6], t[:, 6], t[:, 7], t[:, 8].astype(int)


def _tube_occupancy(p0, p1, r0, r1, grid, keep):
    """Partial-volume occupancy in [0, 1] of tubes p0->p1 (radius r0->r1, mm) on the voxel grid.

    Each tube is sampled as spheres every half voxel, each sphere splatted into its bounding box:
    the cost grows with the vessel length, not with the volume.
    """
    px, pz, shape, to_index = grid["px"], grid["pz"], grid["shape"], grid["to_index"]
    occ = np.zeros(int(np.prod(shape)), np.float32)
    if len(p0) == 0:
        return occ.reshape(shape)
    seg_len = np.linalg.norm(p1 - p0, axis=1)
    counts = np.maximum(2, np.ceil(seg_len / (0.5 * px)).astype(int) + 1)
    seg = np.repeat(np.arange(len(p0)), counts)
    frac = np.concatenate([np.linspace(0, 1, c) for c in counts])
    pts = p0[seg] + (p1 - p0)[seg] * frac[:, None]
    rad = r0[seg] + (r1 - r0)[seg] * frac
    idx = to_index(pts)  # fractional voxel indices (N, 3)
    near = np.rint(idx).astype(int)
    inside = np.all((near >= 0) & (near < np.array(shape)), axis=1)
    inside[inside] = keep[tuple(near[inside].T)]  # only spheres centred in the lung are drawn
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
        raise ValueError(f"shape must be three integers (X, Y, Z), got {shape!r}")
    if shape[0] < 32 or shape[1] < 32 or shape[2] < 1:
        raise ValueError(f"shape {shape} is too small: need X, Y >= 32 and Z >= 1")
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
    nx, ny, nz = _check_shape(shape)
    u = rng.uniform

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

    # --- tissue values in HU, per patient
    hu_air = -1000.0
    hu_fat = u(-120, -95)
    hu_muscle = u(35, 55)
    contrast = u() < 0.3  # a minority of chest CTs are contrast-enhanced
    hu_blood = u(150, 300) if contrast else u(35, 50)
    hu_myocardium = u(80, 120) if contrast else hu_muscle
    hu_cortical, hu_marrow = u(700, 1100), u(180, 320)
    # the real chest CT in ../shared/data/real-ct measures about -770 HU in front and -620 at
    # the back of the lung: the dependent lung is denser (gravity, patient supine)
    hu_lung_front = u(-830, -770)
    hu_lung_gradient = u(100, 170)
    hu_ggo, hu_cons = u(-600, -420), u(-40, 40)
    noise_sd = u(12, 22)
    psf_sigma = u(0.6, 1.0)  # in voxels

    # --- body outline: a boxy ellipse with a flat back, on the table
    yb = -u(0.03, 0.08) * fov / 2
    back = yb + 0.92 * half_ap
    d_body = np.maximum(_ellipse_sd(x, y, 0.0, yb, half_w, half_ap, power=2.4), y - back)
    fat = u(6, 28) * k
    fat_t = fat * (0.7 + 0.6 * (x / half_w) ** 2)  # thicker on the flanks
    # muscle + ribs; the back muscles beside the spine are much thicker
    near_spine = np.exp(-((x / (55 * k)) ** 2)) * _smoothstep((y - yb) / half_ap)
    wall_t = (14 + 8 * _smoothstep((y - yb) / half_ap) + 40 * near_spine) * k
    d_cavity = d_body + fat_t + wall_t

    # thoracic cavity along the midline (for placing organs)
    cav_front = yb - half_ap + 0.7 * fat + 14 * k
    cav_back = back - 0.7 * fat - 62 * k
    cav_half_w = half_w - 1.3 * fat - 14 * k
    cav_mid = (cav_front + cav_back) / 2
    cav_half_ap = (cav_back - cav_front) / 2

    img = np.full(full, hu_air, np.float32)

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

    # --- ribs: cross-sections along a band in the chest wall, drifting round the chest with z
    phi = np.arctan2(x, -(y - yb))  # 0 anterior, +-pi posterior, + patient left
    rib_band = d_body + fat_t + 0.72 * wall_t
    rib_pitch = np.deg2rad(u(19, 24))
    phase = np.where(x > 0, u(0, 1), u(0, 1))
    t = (np.abs(phi) - 0.2 * np.pi) / rib_pitch - z / (26 * k) + phase
    arc = (t - np.round(t)) * rib_pitch * (half_w + half_ap) / 2  # mm along the band
    rib_r = (arc / (7 * k)) ** 2 + (rib_band / (4.5 * k)) ** 2
    rib_zone = (np.abs(phi) > 0.16 * np.pi) & (np.abs(phi) < 0.88 * np.pi)
    cartilage = rib_zone & (np.abs(phi) < 0.3 * np.pi)
    img = np.where(rib_zone & (rib_r < 1), np.where(cartilage, 110.0, hu_cortical), img)
    img = np.where(rib_zone & ~cartilage & (rib_r < 0.4), hu_marrow, img)

    # --- thoracic cavity: mediastinal fat in the middle, diaphragm/liver where the lungs end
    img = np.where(d_cavity < 0, np.where(np.abs(x) < 0.4 * cav_half_w, hu_fat + 10, hu_muscle + 5), img)

    # sternum
    ster = _ellipse_sd(x, y, 0.0, cav_front - 5 * k, 16 * k, 6 * k)
    img = np.where(ster < 0, hu_cortical, img)
    img = np.where(ster < -1.5 * k, hu_marrow, img)

    # spine: vertebral body protruding into the back of the cavity
    r_vert = 17 * k
    y_vert = cav_back - 0.1 * r_vert
    y_canal = y_vert + r_vert + 9 * k

    # heart (lower part of the volume) and great vessels (upper part)
    z_heart = u(-45, -25)
    heart_size = _smoothstep((z_heart - z) / 35.0)
    hx, hy = 0.2 * cav_half_w, cav_mid - 0.22 * cav_half_ap
    d_heart = _ellipse_sd(x, y, hx, hy, np.maximum(56 * k * heart_size, 1e-3),
                          np.maximum(42 * k * heart_size, 1e-3), np.deg2rad(-35))
    d_heart = np.where(heart_size > 0.05, d_heart, 99.0)
    heart = d_heart < 0
    img = np.where(heart, hu_fat + 15, img)  # epicardial fat
    img = np.where(d_heart <= -4 * k, hu_myocardium, img)
    img = np.where(d_heart <= -12 * k, hu_blood, img)

    gv_size = _smoothstep((z - z_heart + 15) / 20.0)  # great vessels take over above the heart
    y_asc = cav_mid - 0.4 * cav_half_ap
    d_asc = np.sqrt((x + 5 * k) ** 2 + (y - y_asc) ** 2) - 14 * k * gv_size
    d_pa = np.sqrt((x - 24 * k) ** 2 + (y - y_asc + 2 * k) ** 2) - 12 * k * gv_size * (z < 5)
    d_svc = np.sqrt((x + 28 * k) ** 2 + (y - y_asc - 6 * k) ** 2) - 9 * k * gv_size
    x_desc, y_desc = r_vert + 6 * k, y_vert - 0.7 * r_vert
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
    hilum_x, hilum_y, hilum_z = 0.42 * cav_half_w, cav_mid + 0.05 * cav_half_ap, u(-30, -20)
    along = np.clip(z / hilum_z, 0, 1)  # 0 at and above the carina, 1 at the hilum
    airway_d = np.full(full, 99.0, np.float32)
    for side in (-1.0, 1.0):
        bx = side * along * hilum_x * (0.8 if side < 0 else 1.0)  # right main bronchus is shorter
        by = y_tr + along * (hilum_y - y_tr)
        airway_d = np.minimum(airway_d, np.sqrt((x - bx) ** 2 + (y - by) ** 2) - np.where(z > 0, 9, 6) * k)
    airway_d = np.where(z > hilum_z, airway_d, 99.0)
    img = np.where(airway_d < 2 * k, hu_muscle, img)  # wall
    img = np.where(airway_d < 0, hu_air + 10, img)

    # vertebra: cortical shell, cancellous core, canal, laminae, spinous and transverse processes
    d_vert = np.sqrt(x**2 + (y - y_vert) ** 2) - r_vert
    lamina = _ellipse_sd(x, y, 0.0, y_canal + 2 * k, 16 * k, 12 * k)
    spinous = (np.abs(x) < 4 * k) & (y > y_canal) & (y < y_canal + 34 * k)
    transverse = (np.abs(y - y_canal - 0.25 * np.abs(x)) < 4.5 * k) & (np.abs(x) < 32 * k) & (np.abs(x) > 10 * k)
    img = np.where((lamina < 0) | spinous | transverse, 0.8 * hu_cortical, img)
    img = np.where((lamina < -3 * k) & ~spinous, hu_marrow, img)
    img = np.where(d_vert < 0, hu_cortical, img)
    img = np.where(d_vert < -2 * k, hu_marrow, img)
    img = np.where((x**2 + (y - y_canal) ** 2) < (8 * k) ** 2, 15.0, img)  # spinal canal

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
        d_lung = functools.reduce(np.maximum, [d_cavity + 2.0 * k, env, 3.0 * k - d_med]) + wobble
        lung[(d_lung < 0) & (side * x > 0) & (taper > 0.05)] = label
    in_lung = lung > 0

    # parenchyma: denser towards the back, fine texture
    depth = np.clip((y - cav_front) / (cav_back - cav_front), 0, 1)
    texture = _smooth_noise(rng, full, (2.5 / px, 2.5 / px, 2.5 / pz))
    lung_hu = hu_lung_front + hu_lung_gradient * depth + 15.0 * texture

    # --- lesions: patchy, mostly subpleural and posterior, over a limited z-range
    lesion = np.zeros(full, np.uint8)
    if u() >= LESION_FREE_PROB and in_lung.any():
        burden = float(np.exp(u(np.log(0.005), np.log(MAX_BURDEN))))
        span = max(u(0.3, 0.9), min(1.0, burden / 0.6))  # keep the lesion slab below ~60% involved
        n_span = max(1, int(round(span * nz)))
        first = int(rng.integers(0, nz - n_span + 1))
        window = np.zeros((1, 1, nz), bool)
        window[..., first:first + n_span] = True
        candidates = in_lung & window
        if candidates.any():
            subpleural = _gaussian_blur(in_lung.astype(np.float32), (8 / px, 8 / px, 0)) < 0.85
            weight = (candidates & subpleural) * (0.3 + depth) ** 2
            if weight.sum() == 0:
                weight = candidates.astype(np.float32)
            n_centres = 1 + int(rng.poisson(2 + 25 * burden))
            centres = rng.choice(weight.size, size=n_centres, p=(weight / weight.sum()).ravel())
            ci, cj, ck = np.unravel_index(centres, full)
            env = np.zeros(full, np.float32)
            for i0, j0, k0 in zip(ci, cj, ck):
                radius = u(10, 35) * k
                env += u(0.5, 1.0) * np.exp(-0.5 * ((x - x[i0, 0, 0]) ** 2 + (y - y[0, j0, 0]) ** 2
                                                    + ((z - z[0, 0, k0]) / 0.8) ** 2) / radius**2)
            patchy = np.exp(0.7 * _smooth_noise(rng, full, (7 / px, 7 / px, 7 / pz)) + 0.25 * texture)
            field = env * patchy * candidates
            target = burden * in_lung.sum()
            tau = float(np.quantile(field[candidates], max(0.0, 1 - target / candidates.sum())))
            tau = max(tau, 1e-6)
            lesion[field >= tau] = 1
            # hazy edges: the HU ramps over +-10% of the threshold around the mask boundary
            a_ggo = np.clip((field / tau - 1) / 0.2 + 0.5, 0, 1)
            lung_hu = lung_hu + a_ggo * (hu_ggo + 25.0 * texture - lung_hu)
            if lesion.any() and u() < 0.7:  # most patients have consolidation in GGO cores
                tau_c = float(np.quantile(field[lesion > 0], 1 - u(0.1, 0.5)))
                lesion[field >= tau_c] = 2
                a_cons = np.clip((field / tau_c - 1) / 0.2 + 0.5, 0, 1)
                lung_hu = lung_hu + a_cons * (hu_cons + 15.0 * texture - lung_hu)

    # --- pulmonary vessels and bronchi: a bifurcating tree from each hilum, drawn inside the lungs
    def to_index(p):
        return np.stack([p[:, 0] / px + (nx - 1) / 2, p[:, 1] / px + (ny - 1) / 2,
                         (p[:, 2] - z_mid) / pz + (nz - 1) / 2], axis=1)

    grid = {"px": px, "pz": pz, "shape": full, "to_index": to_index}
    segs = []
    for label, side, base in ((1, 1.0, base_l), (2, -1.0, base_r)):
        li, lj, _ = np.nonzero(lung == label)
        if len(li) == 0:
            continue
        pick = rng.integers(0, len(li), size=12)
        targets = np.stack([x.ravel()[li[pick]], y.ravel()[lj[pick]], u(base + 20, apex - 20, 12)], axis=1)
        segs.append(_branching_tree(rng, (side * hilum_x, hilum_y, hilum_z), targets, depth=6))
    if segs:
        p0, p1, r0, r1, gen = (np.concatenate(parts) for parts in zip(*segs))
        vessels = _tube_occupancy(p0, p1, r0, r1, grid, in_lung)
        # bronchi run beside the larger arteries: wall, then lumen
        big = gen <= 1
        side_vec = np.cross(p1[big] - p0[big], np.array([0.0, 0.0, 1.0]))
        side_vec /= np.linalg.norm(side_vec, axis=1, keepdims=True) + 1e-9
        b0, b1 = p0[big] + side_vec * (1.8 * r0[big])[:, None], p1[big] + side_vec * (1.8 * r1[big])[:, None]
        rb0, rb1 = 0.7 * r0[big], 0.7 * r1[big]
        wall = _tube_occupancy(b0, b1, rb0 + 1.0 * k, rb1 + 1.0 * k, grid, in_lung)
        lumen = _tube_occupancy(b0, b1, rb0, rb1, grid, in_lung)
        lung_hu = lung_hu + vessels * (0.5 * hu_blood + 20 - lung_hu)
        lung_hu = lung_hu + wall * (hu_muscle - 20 - lung_hu)
        lung_hu = lung_hu + lumen * (hu_air + 20 - lung_hu)
    img = np.where(in_lung, lung_hu, img)

    # --- scanner: blur, correlated noise, circular field of view, 12-bit range
    img = _gaussian_blur(img, (psf_sigma, psf_sigma, 0))
    noise = _gaussian_blur(rng.standard_normal(full, dtype=np.float32), (0.6, 0.6, 0))
    img = img + noise * (noise_sd / noise.std())
    ci, cj = np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2
    in_fov = (ci[:, None] ** 2 + cj[None, :] ** 2) <= (min(nx, ny) / 2) ** 2
    img = np.where(in_fov[:, :, None], img, HU_MIN)
    image = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)

    lesion[~in_lung] = 0
    affine = np.diag([-sx, -sx, sz, 1.0])
    # DICOM-like placement: world origin near the image centre; table height and couch position vary
    affine[:3, 3] = [(nx - 1) / 2 * sx, (ny - 1) / 2 * sx + u(-20, 20), u(-350, -100)]
    return {"image": image, "lung": lung, "lesion": lesion, "affine": affine,
            "spacing": (float(sx), float(sx), float(sz))}


# ----------------------------------------------------------------------------- writing
def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Serialize to .nii.gz bytes with a fixed gzip header (mtime 0, no name): same data, same bytes."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # 1 = scanner coordinates
    img.set_sform(affine, code=1)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def generate_dataset(out_dir, patients: int, seed: int, shape: tuple | None = None,
                     progress: bool = False) -> list[str]:
    """Write `patients` phantoms as NIfTI files to out_dir/{images,lung_masks,lesion_masks}/.

    Patient i is drawn from np.random.default_rng([seed, i]), so it does not depend on how many
    patients are written. Phantom files from an earlier run beyond index `patients` are removed,
    so the folders hold exactly this dataset.

    Args:
        out_dir: output folder (created if missing).
        patients: number of patients, >= 1.
        seed: non-negative integer seed.
        shape: (X, Y, Z) voxels per volume; None for DEFAULT_SHAPE.
        progress: show a tqdm progress bar.

    Returns:
        The file names written, e.g. ["phantom_000.nii.gz", ...], the same in all three folders.
    """
    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or patients < 1:
        raise ValueError(f"patients must be a positive integer, got {patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shape = _check_shape(shape)
    out = Path(out_dir)
    folders = [out / name for name in SUBFOLDERS]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(patients - 1)))
    names = [f"phantom_{i:0{digits}d}.nii.gz" for i in range(patients)]

    for i in tqdm(range(patients), desc="phantoms", unit="patient", disable=not progress):
        p = generate_patient(np.random.default_rng([seed, i]), shape)
        for folder, data in zip(folders, (p["image"], p["lung"], p["lesion"])):
            _write_atomic(folder / names[i], _nifti_gz_bytes(data, p["affine"]))

    keep = set(names)
    for folder in folders:
        for stale in folder.glob("phantom_*.nii.gz"):
            if stale.name not in keep:
                stale.unlink()
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write synthetic chest-CT phantoms with lung and lesion masks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (images/, lung_masks/, lesion_masks/)")
    p.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, help="number of phantom patients")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help="voxels per volume (X patient left, Y posterior, Z superior)")
    return p


def main(args: argparse.Namespace) -> list[str]:
    names = generate_dataset(args.out, args.patients, args.seed, tuple(args.shape), progress=True)
    x, y, z = args.shape
    print(f"wrote {len(names)} phantoms ({x}x{y}x{z} voxels, seed {args.seed}) to "
          f"{Path(args.out)}/{{{','.join(SUBFOLDERS)}}}/")
    return names


if __name__ == "__main__":
    main(get_args_parser().parse_args())
