"""One way in for every input volume: find the cases under a folder, then read each through one reader.

API (stable; preprocessing, prediction and evaluation all call it):

    find_cases(src) -> list[Case]
        Every volume under ``src`` in every known layout (FOLDER_LAYOUTS, MEDSEG_TR, or bare files), each
        image paired with its masks by file name. ``Case(name, layout, image, lung=None, lesion=None)``.
    read_case(image, lung=None, lesion=None, prep=None, voxels=True, series=None) -> Volume
        One image and its optional masks, with every check preprocessing has: a readable 3D file of bounded
        size with a usable affine, finite voxels, masks on the image's voxel grid (shape, orientation,
        affine) holding whole labels 0..255, and the 8-bit-not-HU warning when ``prep`` windows in HU.
        ``voxels=False`` checks the headers only (cheap: run it on every case before any work).
        ``image`` may be a DICOM series (a folder or a .zip, data.dicom; ``series`` picks one of several).
        Raises InputError naming the file and the problem.
    Volume
        image        float32 (Z, H, W) HU slices in display orientation (data.transforms.to_axial_slices),
                     None with voxels=False
        masks        {"lung" | "lesion": uint8 (Z, H, W) label slices, the original labels}
        label_values {"lung" | "lesion": sorted label values present in that mask}
        geometry     img (the nibabel image, 3D: pass it as ``like`` when writing a mask back), affine,
                     shape (3D voxel shape), file_shape (the file's own, (X, Y, Z) or (X, Y, Z, 1)),
                     spacing (mm), voxel_ml, n_slices
        source_headers  a DICOM series' pydicom headers (no pixels) in slice order, for outputs that refer
                     to the source images (a DICOM SEG); None for NIfTI
    Volume.to_file_order(slices) -> the file's own voxel order and shape (to write a predicted mask back).

A new input format is one reader function added to READERS: it takes the same arguments as read_case
and returns a Volume. DICOM series (read_dicom_case) are the one format that is a folder as well as a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from base import InputError
from data.dicom import is_dicom_input, read_dicom_series_headers
from data.transforms import (NIFTI_SUFFIXES, case_name, check_mask_header, from_axial_slices, load_nifti,
                             read_mask_volume, read_volume_data, to_axial_slices, voxel_spacing, warn_if_not_ct)
from utils.volumes import voxel_volume_ml

# Folder layouts: (image folder, lung-mask folder, lesion-mask folder); masks pair by file name.
FOLDER_LAYOUTS = {
    "default": ("images", "lung_masks", "lesion_masks"),
    "ma2020": ("COVID-19-CT-Seg_20cases", "Lung_Mask", "Infection_Mask"),
    "medseg_radiopaedia": ("rp_im", "rp_lung_msk", "rp_msk"),
}
MEDSEG_TR = ("tr_im.nii.gz", "tr_lungmasks_updated.nii.gz", "tr_mask.nii.gz")
MASK_KINDS = ("lung", "lesion")


@dataclass
class Case:
    name: str
    layout: str
    image: Path
    lung: Path | None = None
    lesion: Path | None = None


@dataclass
class Volume:
    """An image's slices, its masks' label slices and its geometry, as read_case returns them."""
    path: Path
    img: nib.spatialimages.SpatialImage
    file_shape: tuple[int, ...]
    image: np.ndarray | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    label_values: dict[str, list[int]] = field(default_factory=dict)
    source_headers: list | None = None  # DICOM input: pydicom Datasets, one per slice, in the file's Z order

    @property
    def affine(self) -> np.ndarray:
        return self.img.affine

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.img.shape)

    @property
    def spacing(self) -> list[float]:
        return voxel_spacing(self.img)

    @property
    def voxel_ml(self) -> float:
        return voxel_volume_ml(self.img.affine)

    @property
    def n_slices(self) -> int:
        # axial slices run along the voxel axis that io_orientation maps to world z (inferior-superior)
        z_axis = int(np.flatnonzero(nib.io_orientation(self.img.affine)[:, 0] == 2)[0])
        return int(self.img.shape[z_axis])

    def to_file_order(self, slices: np.ndarray) -> np.ndarray:
        """(Z, H, W) display slices -> the file's own voxel order and shape (inverse of the reading)."""
        return from_axial_slices(slices, self.img.affine).reshape(self.file_shape)


# ----------------------------------------------------------------------------- readers, one per format
def read_nifti_case(image: Path, lung: Path | None = None, lesion: Path | None = None, prep: dict | None = None,
                    voxels: bool = True) -> Volume:
    """read_case for NIfTI files (.nii, .nii.gz); see the module docstring."""
    img = load_nifti(image, "image")
    vol = Volume(Path(image), img, tuple(int(s) for s in nib.load(str(image)).shape))
    masks = {kind: path for kind, path in zip(MASK_KINDS, (lung, lesion)) if path is not None}
    if not voxels:
        for kind, path in masks.items():  # the header part of read_mask_volume: a bad mask fails before any work
            check_mask_header(load_nifti(path, f"{kind} mask"), img, path, f"{kind} mask")
        return vol
    data = read_volume_data(img, image, "image")
    if prep is not None:
        warn_if_not_ct(img, data, image, prep)
    vol.image = to_axial_slices(data, img.affine)
    for kind, path in masks.items():
        vol.masks[kind], vol.label_values[kind] = read_mask_volume(path, img, f"{kind} mask")
    return vol


def read_dicom_case(image: Path, lung: Path | None = None, lesion: Path | None = None, prep: dict | None = None,
                    voxels: bool = True, series: str | None = None) -> Volume:
    """read_case for a DICOM series: a folder (searched recursively) or a .zip; masks are NIfTI on its grid.

    The series is read as a float32 HU image in memory (voxels=False reads it too: the geometry comes from
    SimpleITK's reading), so masks are written back in the series' exact geometry.
    """
    img, headers = read_dicom_series_headers(image, series)
    vol = Volume(Path(image), img, tuple(int(s) for s in img.shape), source_headers=headers)
    data = read_volume_data(img, image, "image")
    if prep is not None:
        warn_if_not_ct(img, data, image, prep)
    if voxels:
        vol.image = to_axial_slices(data, img.affine)
    for kind, path in zip(MASK_KINDS, (lung, lesion)):
        if path is not None and voxels:
            vol.masks[kind], vol.label_values[kind] = read_mask_volume(path, img, f"{kind} mask")
        elif path is not None:
            check_mask_header(load_nifti(path, f"{kind} mask"), img, path, f"{kind} mask")
    return vol


DICOM_SUFFIXES = (".zip",)  # a zip of DICOM files; a folder of them is recognised by its content
READERS: dict[tuple[str, ...], Callable[..., Volume]] = {NIFTI_SUFFIXES: read_nifti_case,
                                                         DICOM_SUFFIXES: read_dicom_case}


def reader_for(path: str | Path) -> Callable[..., Volume] | None:
    """The reader of a file by its name's suffix (a folder of DICOM files: the DICOM reader), or None."""
    if Path(path).is_dir():
        return read_dicom_case if is_dicom_input(path) else None
    name = str(path).lower()
    return next((read for suffixes, read in READERS.items() if name.endswith(suffixes)), None)


def read_case(image: str | Path, lung: str | Path | None = None, lesion: str | Path | None = None,
              prep: dict | None = None, voxels: bool = True, series: str | None = None) -> Volume:
    """Read an image volume and its optional lung and lesion masks through the reader of its format.

    Args:
        image, lung, lesion: file paths (image may be a DICOM folder or .zip); masks must lie on the
            image's voxel grid.
        prep: the preprocessing record (data.transforms.make_preprocessing); given, an HU-windowed
            preprocessing warns about 8-bit (not HU) data.
        voxels: False checks the headers only and returns a Volume without image or masks.
        series: the SeriesInstanceUID to read from a DICOM input holding several series.
    Shape:
        image float32 (Z, H, W), masks uint8 (Z, H, W) in display orientation (Z inferior to superior).
    Returns:
        a Volume (see the module docstring). Raises InputError naming the file and the problem.
    """
    read = reader_for(image)
    if read is None:
        suffixes = [s for group in READERS for s in group]
        raise InputError(f"{image}: not a volume format this project reads (expected one of {suffixes}, "
                         f"or a folder of DICOM files)")
    paths = [Path(p) if p is not None else None for p in (image, lung, lesion)]
    if series is None:
        return read(*paths, prep=prep, voxels=voxels)
    if read is not read_dicom_case:
        raise InputError(f"{image}: --series applies to DICOM input (a folder or a .zip of DICOM files) only")
    return read(*paths, prep=prep, voxels=voxels, series=series)


# ----------------------------------------------------------------------------- finding cases
def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and reader_for(p) is not None)


def _mask_for(image: Path, folder: Path, kind: str) -> Path:
    for cand in (folder / image.name, folder / (case_name(image) + ".nii.gz"), folder / (case_name(image) + ".nii")):
        if cand.is_file():
            return cand
    raise InputError(f"{image}: image without its {kind} mask (expected {folder / image.name})")


def _check_cases(src: Path, cases: list[Case]) -> None:
    names = [c.name for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{src}: several volumes share the case name(s) {dup[:5]}")
    for kind in MASK_KINDS:
        has = {getattr(c, kind) is not None for c in cases}
        if len(has) > 1:
            missing = [c.image for c in cases if getattr(c, kind) is None][:3]
            raise InputError(f"{src}: some volumes have {kind} masks and some do not, e.g. {missing[0]}")


def find_cases(src: str | Path) -> list[Case]:
    """List the volumes under ``src`` in every known layout, each image paired with its masks.

    Raises InputError when nothing is found, an image lacks its mask, or two cases share a name.
    """
    src = Path(src)
    if src.is_file():
        return [Case(case_name(src), "images_only", src)]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or folder")
    cases: list[Case] = []
    for layout, (img_dir, lung_dir, lesion_dir) in FOLDER_LAYOUTS.items():
        if not (src / img_dir).is_dir():
            continue
        for image in _volume_files(src / img_dir):
            lung = _mask_for(image, src / lung_dir, "lung") if (src / lung_dir).is_dir() else None
            lesion = _mask_for(image, src / lesion_dir, "lesion") if (src / lesion_dir).is_dir() else None
            cases.append(Case(case_name(image), layout, image, lung, lesion))
    tr_img, tr_lung, tr_lesion = (src / f for f in MEDSEG_TR)
    if tr_img.is_file():
        if not tr_lesion.is_file():
            raise InputError(f"{tr_img}: image without its lesion mask (expected {tr_lesion})")
        cases.append(Case("tr_im", "medseg_tr", tr_img, tr_lung if tr_lung.is_file() else None, tr_lesion))
    if not cases:  # volume files directly in src: images without masks
        cases = [Case(case_name(p), "images_only", p) for p in _volume_files(src) if p.name not in MEDSEG_TR]
    if not cases and is_dicom_input(src):  # a folder of DICOM files is one scan, named after the folder
        cases = [Case(src.name, "images_only", src)]
    if not cases:
        raise InputError(f"{src}: no NIfTI volumes or DICOM files found (expected images/*.nii.gz, another known "
                         f"layout, .nii/.nii.gz/.zip files, or a folder of DICOM files; run "
                         f"`python -m data.synthetic --out {src}` for phantoms)")
    _check_cases(src, cases)
    return cases
