"""Whole-CT measurements from masks in display orientation: volumes in mL and infection percentages.

Masks here are (Z, H, W) stacks from data.transforms.to_axial_slices: the patient's right is on the
image's left (low column index), so left and right lungs are told apart by columns.
"""
from __future__ import annotations

import numpy as np

# The mediastinum is looked for in the middle part of the lungs' left-right extent only.
MIDLINE_SEARCH = (0.3, 0.7)
ZONES = ("lower", "middle", "upper")  # thirds of each lung's own height, in display z order (inferior first)
HIGH_OPACITY_HU = -200  # lesion voxels at or above this are "high opacity" (consolidation-like density)


def split_lungs(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a binary lung mask (Z, H, W) into (right lung, left lung) at the mediastinum.

    The midline is the column, within the central 30-70% of the lungs' extent, where the fewest lung
    voxels lie (the gap between the two lungs); columns left of it in the image are the patient's right.
    Label maps with 1 = left and 2 = right (as the phantoms' and Ma et al.'s ground truth) are split by
    label instead.
    """
    lung = np.asarray(lung)
    if lung.max(initial=0) >= 2:
        return lung == 2, lung == 1
    lung = lung > 0
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    if len(cols) == 0:
        return lung, lung
    lo, hi = cols[0], cols[-1]
    a, b = lo + int(MIDLINE_SEARCH[0] * (hi - lo)), lo + int(MIDLINE_SEARCH[1] * (hi - lo)) + 1
    profile = lung[:, :, a:b].sum(axis=(0, 1))
    mid = a + int(np.argmin(profile))
    right = lung.copy()
    right[:, :, mid:] = False
    return right, lung & ~right


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def _slice_counts(mask: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Voxels of a binary ``mask`` (inside ``within`` when given) in each slice; (Z,) int64.

    Slice by slice: a 512x512x300 volume's full-size temporaries (and bool.sum, which widens to int64)
    cost seconds; count_nonzero on one slice at a time costs milliseconds.
    """
    if within is None:
        return np.array([np.count_nonzero(m) for m in mask], dtype=np.int64)
    return np.array([np.count_nonzero(m & w) for m, w in zip(mask, within)], dtype=np.int64)


def _count(mask: np.ndarray, within: np.ndarray | None = None) -> int:
    """Voxels of a binary ``mask`` (inside ``within`` when given): :func:`_slice_counts` summed."""
    return int(_slice_counts(mask, within).sum())


def _zones(present: np.ndarray) -> np.ndarray:
    """:func:`zone_of_slices` from which slices hold the lung ((Z,) bool)."""
    zones = np.full(len(present), -1)
    z = np.flatnonzero(present)
    if len(z):
        n = z[-1] - z[0] + 1
        zones[z[0]:z[-1] + 1] = np.minimum(2, 3 * np.arange(n) // n)
    return zones


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: |det| of the affine's 3x3 part (mm3) / 1000.

    The product of the voxel spacings (pixdims) is only right for orthogonal axes; on a sheared affine it
    overstates the volume (a parallelepiped is smaller than the box of its edge lengths).
    """
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def zone_of_slices(lung: np.ndarray) -> np.ndarray:
    """Zone of each slice of one lung: 0 lower, 1 middle, 2 upper third of the lung's own height.

    Slice i of the n slices from the lung's lowest to its highest (display z grows inferior -> superior)
    is in zone min(2, 3 * i // n); slices outside the lung get -1.

    Shape: (Z, H, W) binary mask -> (Z,) int.
    """
    return _zones(np.asarray(lung).any(axis=(1, 2)))


def severity_report(lesion: np.ndarray, right: np.ndarray, left: np.ndarray, voxel_ml: float,
                    hu: np.ndarray | None = None) -> dict:
    """Severity per lung and zone, as the field reports it (percentage of opacity and of high opacity).

    Args:
        lesion, right, left: binary (Z, H, W) masks in display orientation.
        voxel_ml: volume of one voxel in mL.
        hu: the scan's (Z, H, W) HU slices, for the high-opacity percentage; None leaves it out.
    Returns:
        flat dict: for side in left/right and zone in upper/middle/lower, lesion_ml_<side>_<zone>,
        lung_ml_<side>_<zone> and infection_percent_<side>_<zone> (lesion inside that part of the lung /
        its volume; None for an empty part); with ``hu``, high_opacity_percent(_left/_right): lesion voxels
        at or above HIGH_OPACITY_HU inside the lung(s) / lung volume.
    """
    out = {}
    for side, lung in (("left", left), ("right", right)):
        # a zone is a run of whole slices: its counts are sums of per-slice counts
        lung_z, hit_z = _slice_counts(lung), _slice_counts(lesion, lung)
        zones = _zones(lung_z > 0)
        for zone, name in enumerate(ZONES):
            n, hit = int(lung_z[zones == zone].sum()), int(hit_z[zones == zone].sum())
            out.update({f"lesion_ml_{side}_{name}": hit * voxel_ml, f"lung_ml_{side}_{name}": n * voxel_ml,
                        f"infection_percent_{side}_{name}": _percent(hit, n)})
    if hu is not None:
        hu = np.asarray(hu)
        for key, lung in (("high_opacity_percent", right | left), ("high_opacity_percent_left", left),
                          ("high_opacity_percent_right", right)):
            # HU read at the lesion voxels inside the lung only: a scan read in display orientation is a
            # transposed view, whose whole slices are slow to read (1 s at 512x512x300)
            dense = sum(np.count_nonzero(h[np.asarray(m & s, dtype=bool)] >= HIGH_OPACITY_HU)
                        for m, s, h in zip(lesion, lung, hu))
            out[key] = _percent(int(dense), _count(lung))
    return out


def type_report(labels: np.ndarray, types: dict[str, int], voxel_ml: float,
                sides: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Volume of each lesion type, and its share of each lung.

    Args:
        labels: (Z, H, W) label map of lesion types (0 none).
        types: {name prefix: label value}, e.g. {"ggo": 1, "consolidation": 2}.
        voxel_ml: volume of one voxel in mL.
        sides: (right, left) binary lung masks (:func:`split_lungs`), or None without a lung mask.
    Returns:
        flat dict: per type <prefix>_ml, and <prefix>_percent, <prefix>_percent_left, <prefix>_percent_right
        (its voxels inside the lung(s) / lung volume; None without a lung mask or for an empty lung).
    """
    out = {}
    for prefix, value in types.items():
        mask = np.asarray(labels) == value
        out[f"{prefix}_ml"] = float(_count(mask)) * voxel_ml
        if sides is None:
            out.update({f"{prefix}_percent": None, f"{prefix}_percent_left": None, f"{prefix}_percent_right": None})
            continue
        right, left = sides
        whole = right | left
        out[f"{prefix}_percent"] = _percent(_count(mask, whole), _count(whole))
        out[f"{prefix}_percent_left"] = _percent(_count(mask, left), _count(left))
        out[f"{prefix}_percent_right"] = _percent(_count(mask, right), _count(right))
    return out


def volume_report(lesion: np.ndarray | None, lung: np.ndarray | None, voxel_ml: float,
                  hu: np.ndarray | None = None, types: dict[str, int] | None = None) -> dict:
    """Lesion and lung volumes and infection percentages of one CT, per lung and per zone.

    Args:
        lesion: binary lesion mask (Z, H, W), or None without a lesion model.
        lung: binary lung mask or 1-left/2-right label map (Z, H, W), or None without a lung model.
        voxel_ml: volume of one voxel in mL, from :func:`voxel_volume_ml` of the scan's affine.
        hu: optional (Z, H, W) HU slices of the scan, for the high-opacity percentages.
        types: {name prefix: label value} when ``lesion`` is a label map of lesion types (any value > 0 is
            lesion): adds :func:`type_report`'s figures.
    Returns:
        dict with voxel_ml, lesion_ml, lung_ml, lung_left_ml, lung_right_ml, infection_percent (lesion inside
        the lungs / lung volume), infection_percent_left / _right, lesion_ml_outside_lungs (the part of
        lesion_ml that no percentage counts), slices_with_lesion, n_slices; lung figures are None without a
        lung mask. With both masks also the per-zone and high-opacity figures of
        :func:`severity_report`.
    """
    voxel_ml = float(voxel_ml)
    labels = lesion
    report = {"voxel_ml": voxel_ml, "n_slices": int((lesion if lesion is not None else lung).shape[0]),
              "slices_with_lesion": None, "lesion_ml": None}
    if lesion is not None:
        lesion = np.asarray(lesion) > 0
        per_slice = _slice_counts(lesion)
        report.update(slices_with_lesion=int(np.count_nonzero(per_slice)),
                      lesion_ml=float(per_slice.sum()) * voxel_ml)
    if lung is None or lesion is None:
        report.update(lung_ml=None, lung_left_ml=None, lung_right_ml=None, infection_percent=None,
                      infection_percent_left=None, infection_percent_right=None, lesion_ml_outside_lungs=None)
        if lung is not None:
            report["lung_ml"] = float(_count(np.asarray(lung) > 0)) * voxel_ml
        if types and labels is not None:
            report.update(type_report(labels, types, voxel_ml))
        return report
    right, left = split_lungs(lung)
    whole = right | left
    n = {k: _count(m) for k, m in (("lung", whole), ("left", left), ("right", right))}
    hit = {k: _count(lesion, m) for k, m in (("lung", whole), ("left", left), ("right", right))}
    report.update(lung_ml=n["lung"] * voxel_ml, lung_left_ml=n["left"] * voxel_ml, lung_right_ml=n["right"] * voxel_ml,
                  infection_percent=_percent(hit["lung"], n["lung"]),
                  infection_percent_left=_percent(hit["left"], n["left"]),
                  infection_percent_right=_percent(hit["right"], n["right"]),
                  lesion_ml_outside_lungs=(int(per_slice.sum()) - hit["lung"]) * voxel_ml)
    report.update(severity_report(lesion, right, left, voxel_ml, hu))
    if types:
        report.update(type_report(labels, types, voxel_ml, (right, left)))
    return report


def dice_3d(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary volumes; nan when both are empty (undefined, reported as such)."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    den = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / den if den else float("nan")
