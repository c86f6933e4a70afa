"""Lungs from HU without training: a classical extraction for checkpoints that have no lung head.

Method (scipy.ndimage only, on (Z, H, W) slices in display orientation, see data.transforms.to_axial_slices):

1. Scans wider than 256 pixels are block-averaged in-plane to about 256 (a 512x512x300 scan costs a
   quarter), then lightly smoothed in-plane; air-like voxels are those below AIR_HU.
2. The body is the largest 3D component of the not-air voxels; air outside it (and air connected to a
   slice's border, slice by slice) is outside air. Removing the border-connected air per slice, not in 3D,
   keeps lungs whose airway reaches the mouth in a scan that includes the head. The table is a separate
   component, so the air inside it is outside the body too.
3. The airway (trachea and main bronchi): the trachea is the longest vertical tube of small, very dark
   (below AIRWAY_HU) air pieces near the body's midline in the upper chest; at that threshold it stands
   apart from a lung that touches it at AIR_HU. Its main bronchi are followed downwards while their pieces
   stay small, until they merge into a lung. Intrapulmonary bronchi, inside a lung's outline, stay lung (as
   expert masks keep them); so does the airway's wall.
4. The remaining air components of at least MIN_LUNG_SHARE of the largest are lung. Two of them are the
   two lungs; one that straddles the body's midline is two lungs touching, split at the fewest-voxel
   column (utils.volumes.split_lungs).
5. Per lung and slice: a small closing and hole filling (vessels and airway walls inside the lung become
   lung), then the predicted lesion voxels that lie inside the lung's convex hull on that slice (dense
   consolidation is not air, and would otherwise be cut out of the lung), then holes filled again.
6. Labels are upsampled back (nearest) and refined at full resolution: a boundary voxel stays lung only
   if it is air-like, then holes are filled again.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from utils.volumes import split_lungs

AIR_HU = -320.0  # lung parenchyma (-900..-500) and air below, soft tissue (> -100) above, with a margin
WORK_SIZE = 256  # in-plane size the labelling runs at: larger scans are block-averaged to about this
MIN_LUNG_SHARE = 0.1  # an air component smaller than this share of the largest is not a lung
AIRWAY_HU = -950.0  # the airway's lumen is air (-1000); lung parenchyma rarely this dark (0.35% on the real crop)
AIRWAY_WIDTH = 0.12  # the trachea is narrower than this share of the body's width (about 2 of 30 cm)
AIRWAY_MIN_WIDTH = 0.025  # ...and wider than this share (air bubbles in the oesophagus are smaller)
AIRWAY_TOP = 0.4  # the trachea is looked for in this upper share of the slices with air
AIRWAY_OFF_MIDLINE = 0.25  # the trachea's centre lies within this share of the body's width of its midline
MIDLINE_BAND = 0.1  # a lone component whose centre is this close to the body's midline is two lungs
CROPPED_BORDER = 0.1  # a slice whose border is more body than this is cropped inside the body
HULL_TOLERANCE = 1e-9  # px: a grid point on a hull edge is inside; off it, it is at least 1/edge length away
LEFT, RIGHT = 1, 2  # label values, as the phantoms' and Ma et al.'s lung masks

_SLICE_2D = np.zeros((3, 3, 3), bool)  # 8-connectivity within each slice, none across slices
_SLICE_2D[1] = True
_CROSS_2D = np.zeros((3, 3, 3), bool)  # 4-connectivity within each slice
_CROSS_2D[1] = ndimage.generate_binary_structure(2, 1)


def _label_2d(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components within each slice of a (Z, H, W) mask, in one call."""
    return ndimage.label(mask, structure=_SLICE_2D)


def _touching_border(labels: np.ndarray) -> np.ndarray:
    """The labels of a (Z, H, W) slice-wise labelling that touch a slice's border (0 excluded)."""
    edge = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                           labels[:, :, -1].ravel()])
    return np.setdiff1d(np.unique(edge), [0])


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of each slice of a (Z, H, W) mask: the background not connected to a slice's border.

    One labelling of the background instead of scipy's iterated dilation: fast on a whole volume.
    """
    labels, n = _label_2d(~mask)
    hole = np.ones(n + 1, bool)  # a lookup table by label: np.isin sorts the whole volume, this indexes it
    hole[0] = False
    hole[_touching_border(labels)] = False
    return mask | hole[labels]


def _downsample(hu: np.ndarray, f: int) -> np.ndarray:
    """Block mean over f x f in-plane (the edge padded), float32."""
    hu = np.asarray(hu, np.float32)
    if f == 1:
        return hu
    return _blocks(hu, f).mean(axis=(2, 4))


def _blocks(a: np.ndarray, f: int) -> np.ndarray:
    """(Z, H, W) -> (Z, H/f, f, W/f, f) blocks, the edge padded when H or W is not a multiple of f."""
    z, h, w = a.shape
    ph, pw = -h % f, -w % f
    if ph or pw:  # np.pad copies even when it pads nothing: 0.3 GB for a 512x512x300 scan
        a = np.pad(a, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return a.reshape(z, (h + ph) // f, f, (w + pw) // f, f)


def _downsample_mask(mask: np.ndarray, f: int) -> np.ndarray:
    """A binary mask's f x f blocks that are at least half set: the block mean >= 0.5, counted in integers."""
    return _blocks(mask, f).sum(axis=(2, 4), dtype=np.uint16) * 2 >= f * f


def _upsample(labels: np.ndarray, f: int, shape: tuple) -> np.ndarray:
    if f == 1:
        return labels
    return labels.repeat(f, axis=1).repeat(f, axis=2)[:, :shape[1], :shape[2]]


def _body(air: np.ndarray) -> np.ndarray:
    """The patient: the largest 3D component of not-air voxels, its holes filled per slice."""
    labels, n = ndimage.label(~air)
    if n == 0:
        return np.zeros_like(air)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return fill_holes_2d(labels == int(np.argmax(sizes)))


def _outside_air(air: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Air outside the patient, slice by slice.

    A slice that shows the whole body (the body touches less than CROPPED_BORDER of its border): the air
    connected to the border, or outside the body. A slice cropped inside the body (lungs may touch its
    border): the border-connected air outside the convex hull of the body's tissue, which wraps the lungs.
    """
    edge = np.concatenate([body[:, 0], body[:, -1], body[:, :, 0], body[:, :, -1]], axis=1)
    cropped = edge.mean(axis=1) >= CROPPED_BORDER
    labels, _ = _label_2d(air)
    outside = np.isin(labels, _touching_border(labels))
    for z in np.flatnonzero(cropped & outside.any(axis=(1, 2))):
        pts = np.argwhere(outside[z])
        outside[z][tuple(pts[_inside_hull(body[z] & ~air[z], pts)].T)] = False
    return outside | (~body & ~cropped[:, None, None])


def _airway(candidates: np.ndarray, lumen: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The trachea and main bronchi: a vertical tube of dark air near the midline, followed to the lungs.

    A piece (4-connected within a slice) is small when its area is under (AIRWAY_WIDTH x body width)^2 and
    it does not touch the slice's border. The trachea is found in ``lumen``, the air darker than AIRWAY_HU,
    where it stands apart from a lung that touches it at AIR_HU (the right paratracheal wall is a few
    millimetres thick): small lumen pieces that overlap from slice to slice form tubes, and the trachea is
    the one that spans the most slices (then the largest), reaches the upper AIRWAY_TOP of the slices with
    air, runs within AIRWAY_OFF_MIDLINE of the midline and is wider than AIRWAY_MIN_WIDTH on average (air
    bubbles in the oesophagus are smaller). The airway is then the air piece around it where that piece is
    small, or its partial-volume rim (two pixels) where the piece is a lung. Downwards it follows the small
    air pieces that overlap the slice above (the main bronchi, paler than AIRWAY_HU in thick slices) until
    they merge into a lung; upwards, where the trachea may touch a lung apex, the air within one pixel of
    its top outline.
    """
    airway = np.zeros_like(candidates)
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    if len(cols) == 0 or not candidates.any():
        return airway
    width = cols[-1] - cols[0] + 1
    max_area = (AIRWAY_WIDTH * width) ** 2
    z_air = np.flatnonzero(candidates.any(axis=(1, 2)))
    low = z_air[0] + (1 - AIRWAY_TOP) * (z_air[-1] - z_air[0])  # the trachea is in the upper chest
    trachea = _trachea(lumen & candidates, (cols[0] + cols[-1]) / 2, width, max_area, low)
    if trachea is None:
        return airway
    pieces, n = ndimage.label(candidates, structure=_CROSS_2D)
    small = np.bincount(pieces.ravel()) < max_area
    small[0] = False
    around = np.zeros(n + 1, bool)
    around[np.unique(pieces[trachea])] = True
    airway = (around & small)[pieces]
    zs = np.flatnonzero(trachea.any(axis=(1, 2)))
    rim = slice(zs[0], zs[-1] + 1)  # the lumen's partial-volume rim: two pixels around it, on its slices
    airway[rim] |= candidates[rim] & ndimage.binary_dilation(trachea[rim], _SLICE_2D, iterations=2)
    for z in range(zs[0] - 1, -1, -1):  # down the main bronchi, until they merge into the lungs
        above = np.unique(pieces[z][airway[z + 1]])
        follow = np.zeros(n + 1, bool)
        follow[above[small[above]]] = True
        airway[z] = follow[pieces[z]]
        if not airway[z].any():
            break
    footprint = ndimage.binary_dilation(airway[zs[-1]], _CROSS_2D[1])
    for z in range(zs[-1] + 1, len(candidates)):  # up, where it may touch the lung apices: within its footprint
        airway[z] = candidates[z] & footprint
        if not airway[z].any():
            break
    return airway


def _trachea(lumen: np.ndarray, centre: float, width: int, max_area: float, low: float) -> np.ndarray | None:
    """The trachea's lumen (method: _airway): a tube that reaches slice ``low``; None when none qualifies."""
    labels, _ = ndimage.label(lumen, structure=_CROSS_2D)
    small = np.bincount(labels.ravel()) < max_area
    small[0] = False
    small[_touching_border(labels)] = False
    tubes, m = ndimage.label(small[labels], structure=ndimage.generate_binary_structure(3, 1))
    if m == 0:
        return None
    boxes = ndimage.find_objects(tubes)
    top = np.array([box[0].stop - 1 for box in boxes])
    length = top + 1 - np.array([box[0].start for box in boxes])
    where = np.nonzero(tubes)  # the tubes are sparse: their voxels' coordinates cost less than whole-volume passes
    ids = tubes[where]
    volume = np.bincount(ids, minlength=m + 1)[1:]
    column = np.bincount(ids, weights=where[2], minlength=m + 1)[1:] / volume
    ok = [i for i in np.flatnonzero((top >= low) & (np.abs(column - centre) < AIRWAY_OFF_MIDLINE * width))
          if _grown_area(tubes, boxes[i], i + 1) >= length[i] * (AIRWAY_MIN_WIDTH * width) ** 2]
    if not ok:
        return None
    return tubes == max(ok, key=lambda i: (length[i], volume[i])) + 1


def _grown_area(labels: np.ndarray, box: tuple, i: int) -> int:
    """Voxels of component i grown by a pixel in-plane (with the lumen's partial-volume rim)."""
    box = (box[0],) + tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box[1:])
    return int(ndimage.binary_dilation(labels[box] == i, _SLICE_2D).sum())


def _split_left_right(lungs: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Label 3D lung components: 1 left, 2 right (the patient's right has the low columns)."""
    labels, n = ndimage.label(lungs)
    out = np.zeros(lungs.shape, np.uint8)
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes)
    keep = [i + 1 for i in order if sizes[i] >= MIN_LUNG_SHARE * sizes[order[0]]][:2]
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    centre, width = (cols[0] + cols[-1]) / 2, cols[-1] - cols[0] + 1
    col_of = {i: ndimage.center_of_mass(labels == i)[2] for i in keep}
    if len(keep) == 1 and abs(col_of[keep[0]] - centre) < MIDLINE_BAND * width:  # two lungs touching
        right, left = split_lungs(labels == keep[0])
        out[left], out[right] = LEFT, RIGHT
        return out
    for i in keep:
        if len(keep) == 2:
            side = RIGHT if col_of[i] == min(col_of.values()) else LEFT
        else:
            side = RIGHT if col_of[i] < centre else LEFT
        out[labels == i] = side
    return out


def _inside_hull(region: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which (N, 2) points lie in the convex hull of a 2D region's pixels."""
    coords = np.argwhere(region)
    try:
        hull = ConvexHull(coords)
    except (QhullError, ValueError):  # too few or collinear pixels: no area to lie in
        return np.zeros(len(points), bool)
    # inside every edge's half-plane (unit normals: the value is a distance in pixels). Points on an edge
    # count as inside, as Delaunay.find_simplex counts them, which costs 100x more (0.2 s a slice).
    return (points @ hull.equations[:, :2].T + hull.equations[:, 2] <= HULL_TOLERANCE).all(axis=1)


def _dilate(mask: np.ndarray, size: tuple) -> np.ndarray:
    """Binary dilation by a box of ``size``: a separable max filter, several times faster than binary_dilation."""
    return ndimage.maximum_filter(mask, size, mode="constant", cval=False)


def _complete(labels: np.ndarray, lesion: np.ndarray | None, close_px: int) -> np.ndarray:
    """Per lung and slice: closing, hole filling, lesions inside its convex hull; returns the label map."""
    out = np.zeros_like(labels)
    square = (1, 2 * close_px + 1, 2 * close_px + 1)
    for side in (LEFT, RIGHT):
        lung = labels == side
        if not lung.any():
            continue
        # a closing by a square: max then min filters (separable), as scipy's binary_closing (outside not lung)
        closed = ndimage.minimum_filter(_dilate(lung, square), square, mode="constant", cval=False)
        lung = fill_holes_2d(closed | lung)
        if lesion is not None:
            for z in np.flatnonzero(lesion.any(axis=(1, 2)) & lung.any(axis=(1, 2))):
                pts = np.argwhere(lesion[z] & ~lung[z])
                if len(pts):
                    inside = pts[_inside_hull(lung[z], pts)]
                    lung[z][tuple(inside.T)] = True
            # the partial-volume rim of a consolidation against the chest wall lies just outside the hull
            lung = fill_holes_2d(lung | (lesion & _dilate(lung, (1, 3, 3))))
        out[lung & (out == 0)] = side
    return out


def extract_lungs(hu: np.ndarray, spacing=None, lesion: np.ndarray | None = None) -> np.ndarray:
    """Left and right lungs of a chest CT from its HU values, without a model (method: module docstring).

    Args:
        hu: (Z, H, W) slices in HU, display orientation (z inferior -> superior, the patient's right on
            the image's left).
        spacing: (z, row, column) voxel size in mm; unused by the method, which works in fractions of the
            body's width so that it does not depend on the scan's pixel size. Kept for callers' symmetry.
        lesion: optional binary lesion mask (Z, H, W); lesion voxels inside a lung's outline become lung.
    Returns:
        uint8 (Z, H, W) label map: 0 outside, 1 the patient's left lung, 2 the right lung.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"extract_lungs takes (Z, H, W) slices, got shape {hu.shape}")
    shape = hu.shape
    f = max(1, min(shape[1:]) // WORK_SIZE)
    small = ndimage.uniform_filter(_downsample(hu, f), size=(1, 3, 3))
    air = small < AIR_HU
    body = _body(air)
    candidates = air & ~_outside_air(air, body)
    airway = _airway(candidates, small < AIRWAY_HU, body)
    labels = _split_left_right(candidates & ~airway, body)
    if lesion is not None:
        lesion = np.asarray(lesion) > 0
        lesion_small = _downsample_mask(lesion, f) if f > 1 else lesion
    else:
        lesion_small = None
    labels = _complete(labels, lesion_small, close_px=2)
    return _refine(labels, hu, f, airway, lesion)


def _refine(labels: np.ndarray, hu: np.ndarray, f: int, airway: np.ndarray, lesion: np.ndarray | None) -> np.ndarray:
    """Upsample the labels; at full resolution, voxels on a lung's edge stay lung only where air-like.

    Each lung is refined inside its bounding box (slices with it, and its rows and columns with a margin of
    two coarse pixels, wider than the f-pixel growth): every step is per slice and reaches at most f pixels,
    and the margin's ring is not lung, so hole filling sees the same holes as on the whole slice. The same
    voxels as refining the whole volume, at a fraction of the cost (a lung covers about a quarter of it).
    """
    if f == 1:
        return labels.astype(np.uint8)
    out = np.zeros(hu.shape, np.uint8)
    for side in (LEFT, RIGHT):
        box = _box(labels == side, f, hu.shape)
        if box is None:
            continue
        z, (y0, y1), (x0, x1) = box
        lung = _upsample(labels[z, y0 // f:-(-y1 // f), x0 // f:-(-x1 // f)] == side, f, (0, y1 - y0, x1 - x0))
        air = _upsample(airway[z, y0 // f:-(-y1 // f), x0 // f:-(-x1 // f)], f, (0, y1 - y0, x1 - x0))
        # the 3x3 mean needs one more pixel around the box, where the box does not end at the scan's edge
        ya, xa = max(0, y0 - 1), max(0, x0 - 1)
        smooth = ndimage.uniform_filter(np.asarray(hu[z, ya:y1 + 1, xa:x1 + 1], np.float32), size=(1, 3, 3))
        smooth = smooth[:, y0 - ya:y0 - ya + y1 - y0, x0 - xa:x0 - xa + x1 - x0]
        # f iterations of a 3x3 dilation (erosion, outside counted as not lung) = one (2f+1)^2 max (min) filter
        grown = _dilate(lung, (1, 2 * f + 1, 2 * f + 1))
        core = ndimage.minimum_filter(lung, size=(1, 2 * f + 1, 2 * f + 1), mode="constant", cval=False)
        edge_ok = (smooth < AIR_HU) & ~air
        if lesion is not None:
            edge_ok |= lesion[z, y0:y1, x0:x1] & lung
        free = out[z, y0:y1, x0:x1] == 0
        lung = core | (grown & edge_ok & free)
        out[z, y0:y1, x0:x1][fill_holes_2d(lung) & free] = side
    return out


def _box(lung: np.ndarray, f: int, shape: tuple) -> tuple[slice, tuple[int, int], tuple[int, int]] | None:
    """The full-resolution box to refine a coarse lung mask in: its slices, and rows and columns (multiples
    of f, a margin of two coarse pixels, within ``shape``); None without lung."""
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if len(zs) == 0:
        return None
    rows, cols = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    y0, y1 = max(0, rows[0] - 2) * f, min(shape[1], (rows[-1] + 3) * f)
    x0, x1 = max(0, cols[0] - 2) * f, min(shape[2], (cols[-1] + 3) * f)
    return slice(zs[0], zs[-1] + 1), (y0, y1), (x0, x1)
