"""DICOM SEG output: a volume's predicted masks as one DICOM Segmentation object over its source series.

    seg_frames(mask, volume) -> (n_source, Rows, Columns) bool      a display-order mask in each source
        image's own pixel grid, in the order of volume.source_headers
    write_dicom_seg(masks, labels, volume, path, version) -> dict   OUT/<case>_seg.dcm (highdicom, BINARY)

The SEG references every source image by its SOPInstanceUID, one frame per source image and segment (empty
frames omitted), so 3D Slicer and OHIF show it over the scan. The frame of each source image is found from
the geometry: its ImagePositionPatient and ImageOrientationPatient are mapped through the NIfTI affine that
the masks are written with, so a mask voxel and the SEG pixel at one place in the patient are the same.
BINARY is the segmentation type 3D Slicer (QuantitativeReporting) and OHIF read most widely.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from base import InputError, atomic_write
from data.dicom import is_dicom_input
from data.labels import LESION_TYPES, LUNG_LABEL_NAMES
from data.readers import Volume
from data.transforms import to_axial_slices

PROJECT = "covid19-lesion-segmentation"  # the algorithm's name in the SEG (its version: the checkpoint files)
MANUFACTURER = "infer.py"
GRID_TOLERANCE = 1e-2  # voxels: DS strings round positions to 16 characters
# Segment codes (SNOMED CT, DICOM) by segment name, then by structure; anything else is a generic lesion. A new
# class gets its code here, by its data.labels name. Ground-glass opacity has no SNOMED CT finding code of its
# own; DICOM's (CID 6102, thoracic CT findings) is used. Consolidation is SNOMED CT's morphologic abnormality.
_SCT = "SCT"
_GGO, _CONSOLIDATION = LESION_TYPES  # the lesion types of a types checkpoint (data.labels), in label order
ANATOMY = ("91723000", _SCT, "Anatomical Structure")
ABNORMAL = ("49755003", _SCT, "Morphologically Abnormal Structure")
SEGMENT_CODES = {
    "lung": (ANATOMY, ("39607008", _SCT, "Lung")),
    "left lung": (ANATOMY, ("44029006", _SCT, "Left lung")),
    "right lung": (ANATOMY, ("3341006", _SCT, "Right lung")),
    "lesion": (ABNORMAL, ("52988006", _SCT, "Lesion")),
    _GGO: (ABNORMAL, ("112120", "DCM", "Ground glass opacity")),
    _CONSOLIDATION: (ABNORMAL, ("9656002", _SCT, "Consolidation")),
}
GENERIC_CODE = SEGMENT_CODES["lesion"]
# utils.lungs labels lungs from HU 1 = left, 2 = right, as the default layout's (and Ma et al.'s) lung masks
HU_LUNG_LABELS = {name: int(value) for value, name in LUNG_LABEL_NAMES["default"].items()}
# The patient and study attributes highdicom copies from the source: type 2 (may be empty), but some
# exports (and anonymisers) drop them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName")


def _source_axes(headers: list, affine: np.ndarray, shape: tuple[int, ...]) -> tuple[list[int], list[int], np.ndarray]:
    """The voxel axes (and their signs) along a source image's rows and columns, and each image's slice index.

    Returns (axes, signs, ks): axes = [slice axis, row axis (down the rows), column axis (along a row)],
    signs = +1/-1 per in-plane axis, ks = the slice index of each header. InputError when a source image
    does not lie on the volume's voxel grid.
    """
    to_voxel = np.linalg.inv(affine)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    first = headers[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # PixelSpacing: between rows, between columns
    steps = [to_voxel[:3, :3] @ (lps_to_ras * iop[3:] * row_mm), to_voxel[:3, :3] @ (lps_to_ras * iop[:3] * col_mm)]
    in_plane = [int(np.argmax(np.abs(s))) for s in steps]
    signs = [int(np.sign(s[a])) for s, a in zip(steps, in_plane)]
    for step, axis, sign in zip(steps, in_plane, signs):
        if not np.allclose(step, sign * np.eye(3)[axis], atol=GRID_TOLERANCE) or in_plane[0] == in_plane[1]:
            raise InputError(f"source images' rows and columns do not run along the volume's voxel axes ({step})")
    slice_axis = 3 - sum(in_plane)
    ijk = np.array([to_voxel @ [*(lps_to_ras * np.asarray(h.ImagePositionPatient, dtype=float)), 1.0]
                    for h in headers])[:, :3]
    starts = [0 if sign > 0 else shape[axis] - 1 for axis, sign in zip(in_plane, signs)]
    ks = np.rint(ijk[:, slice_axis]).astype(int)
    if (not np.allclose(ijk[:, in_plane], starts, atol=GRID_TOLERANCE)
            or not np.allclose(ijk[:, slice_axis], ks, atol=GRID_TOLERANCE)
            or ks.min() < 0 or ks.max() >= shape[slice_axis]):
        raise InputError("source images do not lie on the volume's voxel grid (their positions do not match)")
    return [slice_axis, *in_plane], signs, ks


def display_affine(volume: Volume) -> np.ndarray:
    """The affine of the volume's (Z, H, W) display slices: display index (z, h, w, 1) -> RAS mm.

    Found by passing index probes (broadcast views, no memory) through data.transforms.to_axial_slices, the
    very function that made the slices, so it holds for any file orientation.
    """
    shape = volume.shape[:3]
    probes = [to_axial_slices(np.broadcast_to(np.arange(n).reshape([n if a == axis else 1 for a in range(3)]), shape),
                              volume.affine) for axis, n in enumerate(shape)]
    size = probes[0].shape
    at = [(0, 0, 0)] + [tuple(int(a == d and size[d] > 1) for a in range(3)) for d in range(3)]
    ijk = np.array([[p[c] for p in probes] for c in at], dtype=float)  # file voxel of each probed display voxel
    steps = ijk[1:] - ijk[0]  # one row per display axis; zero for an axis of length 1
    for d in np.flatnonzero(~steps.any(axis=1)):  # a single slice: its axis is the file axis left over
        steps[d] = np.eye(3)[3 - int(sum(np.argmax(np.abs(r)) for r in steps if r.any()))]
    to_file = np.eye(4)
    to_file[:3, :3], to_file[:3, 3] = steps.T, ijk[0]
    return volume.affine @ to_file


def seg_frames(mask: np.ndarray, volume: Volume) -> np.ndarray:
    """A (Z, H, W) display-order mask in the pixel grid of each source image of ``volume``.

    Shape: (Z, H, W) -> (len(volume.source_headers), Rows, Columns), frame n on source_headers[n]'s pixels.
    """
    headers = volume.source_headers
    axes, signs, ks = _source_axes(headers, display_affine(volume), mask.shape)
    stack = np.transpose(mask, axes)[:, ::signs[0], ::signs[1]]  # views: (slice, row, column)
    frames = stack[ks]  # the one copy
    assert frames.shape[1:] == (headers[0].Rows, headers[0].Columns), (frames.shape, headers[0].Rows)
    return frames


def check_dicom_input(path: Path) -> None:
    """Refuse a path that is not a DICOM series (a folder or .zip of DICOM files): a SEG needs source images."""
    if not is_dicom_input(path):
        raise InputError(f"--dicom-seg needs DICOM input (a folder or .zip of DICOM files): {path} is NIfTI")


def check_source(volume: Volume) -> None:
    """Refuse, before any output, a Volume whose source images a DICOM SEG cannot reference."""
    if not volume.source_headers:
        raise InputError(f"--dicom-seg needs DICOM input (a folder or .zip of DICOM files): {volume.path} is not")
    if "FrameOfReferenceUID" not in volume.source_headers[0]:
        raise InputError(f"{volume.path}: the series has no FrameOfReferenceUID, which a DICOM SEG must share "
                         f"with its source images; run without --dicom-seg")
    if volume.image is not None:  # every source image on the volume's grid
        _source_axes(volume.source_headers, display_affine(volume), volume.image.shape)


def mask_labels(masks: dict[str, np.ndarray], lung_source: str,
                types: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """{structure: {segment name: label value}} of the masks infer.py writes.

    A predicted mask is binary, one segment named after its structure (data.labels.TASK_OUTPUTS); a lung mask
    from HU (utils.lungs) holds left and right lungs with the values of the default layout's lung labels.
    ``types``: {lesion type name: label value} when the lesion mask is a label map of lesion types (a types
    checkpoint), one segment per type.
    """
    labels = {name: {name: 1} for name in masks}
    if types and "lesion" in masks:
        labels["lesion"] = dict(types)
    if "lung" in masks and lung_source == "hu":
        labels["lung"] = HU_LUNG_LABELS
    return labels


def _code(value: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    return Code(*value)


def _complete(headers: list) -> list:
    """Copies of the source headers with the empty type 2 attributes highdicom needs (the files are untouched)."""
    if all(k in headers[0] for k in _TYPE2):
        return headers
    out = []
    for ds in headers:
        ds = copy.deepcopy(ds)  # headers only (no pixels): cheap; a shallow copy would share the elements
        for key in _TYPE2:
            if key not in ds:
                setattr(ds, key, "")
        out.append(ds)
    return out


def write_dicom_seg(masks: dict[str, np.ndarray], labels: dict[str, dict[str, int]], volume: Volume, path: Path,
                    version: str) -> dict:
    """Write ``masks`` as a BINARY DICOM SEG referencing ``volume``'s source series, atomically.

    Args:
        masks: {structure: uint8 (Z, H, W) label mask in display orientation}, as written to NIfTI.
        labels: {structure: {segment name: label value}}; one segment per name whose value the mask holds.
        volume: the Volume read from a DICOM series (its source_headers and affine).
        path: the .dcm file to write.
        version: the algorithm's version (the checkpoint file names).
    Returns:
        {"dicom_seg_segments": [names written], "dicom_seg_note": why segments were left out, or None}.
        A segment with no voxel is left out (a segment without frames is legal, but viewers differ on it);
        when every one is empty, the SEG holds the first one with no pixel set, so a case has its SEG.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_source(volume)
    algorithm = hd.AlgorithmIdentificationSequence(PROJECT, codes.DCM.ArtificialIntelligence, version[:64])
    present = [(kind, name, value) for kind, mask in masks.items() for name, value in labels[kind].items()
               if mask.max() >= value and (mask == value).any()]
    empty = [name for kind in masks for name in labels[kind] if name not in {n for _, n, _ in present}]
    note = f"empty, not in the DICOM SEG: {', '.join(empty)}" if empty else None
    if not present:  # keep a SEG per case; its only segment has no pixel set (highdicom then keeps every frame)
        kind = next(iter(masks))
        present = [(kind, empty[0], -1)]
        note = f"every segment is empty; the DICOM SEG holds {empty[0]} with no pixel set"
    headers = volume.source_headers
    pixels = np.empty((len(headers), headers[0].Rows, headers[0].Columns, len(present)), dtype=bool)
    pixels[..., 0] = False  # stays so only when every segment is empty
    for kind in {k for k, _, value in present if value > 0}:  # one reordering per mask, in place per segment
        frames = seg_frames(masks[kind], volume)
        for n in [n for n, (k, _, _) in enumerate(present) if k == kind]:
            np.equal(frames, present[n][2], out=pixels[..., n])
    descriptions = [(name, kind) for kind, name, _ in present]
    seg_descriptions = []
    for number, (name, kind) in enumerate(descriptions, start=1):
        category, kind_code = SEGMENT_CODES.get(name, SEGMENT_CODES.get(kind, GENERIC_CODE))
        seg_descriptions.append(hd.seg.SegmentDescription(
            number, name, _code(category), _code(kind_code), hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm))
    seg = hd.seg.Segmentation(
        _complete(headers), pixels, hd.seg.SegmentationTypeValues.BINARY,
        seg_descriptions, hd.UID(), 300, hd.UID(), 1, MANUFACTURER, PROJECT, version[:64], "none",
        series_description=f"{PROJECT} segmentation"[:64], omit_empty_frames=True)
    with atomic_write(path) as tmp:
        seg.save_as(tmp)
    return {"dicom_seg_segments": [n for n, _ in descriptions], "dicom_seg_note": note}
