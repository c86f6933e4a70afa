"""DICOM series in: a folder (searched recursively) or a .zip of DICOM files -> one CT volume in HU.

    is_dicom_input(path) -> bool            a .zip, or a folder holding DICOM files
    list_series(files) -> (series, n_dicom)  CT image series of the files, grouped by SeriesInstanceUID
    read_dicom_series(path, series=None) -> nib.Nifti1Image
        the one axial CT series (or the series ``series`` names) as a float32 (X, Y, Z) HU image whose
        RAS affine is the series' own geometry; data.readers wraps it in a Volume.
    read_dicom_series_headers(path, series=None) -> (nib.Nifti1Image, headers)
        the same, with the series' pydicom headers (no pixels) in the image's slice order, for outputs that
        refer back to the source images (a DICOM SEG, engine.dicom_seg).

Headers (pydicom, pixels not read) choose the series, sort its slices along the slice normal and check
its geometry; SimpleITK's GDCM series reader then reads the pixels of the sorted files, as lungmask does.
GDCM applies RescaleSlope/Intercept and decodes the compressed transfer syntaxes of PACS exports (JPEG
lossless, JPEG 2000, RLE) that pydicom alone cannot without extra plug-ins, and ITK's origin/direction/
spacing is the geometry every DICOM-to-NIfTI converter of the field agrees on.
"""
from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from base import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AIR_HU = -1024.0
PADDING_HU = -2048.0  # at or below: outside the scan's field of view (scanners write -2048 or -3024), read as air
SPACING_TOLERANCE = 0.10  # slice gaps may differ from the median gap by 10% (more: a missing slice)
TILT_TOLERANCE = 1e-3  # |sin| of the angle between the slice normal and the line through the slice positions
LOCALIZER_SLICES = 2  # when several series remain, series of this many slices or fewer are scouts


@dataclass
class Series:
    """One CT image series: its UID, description and files with their headers (pydicom, no pixels)."""
    uid: str
    description: str
    headers: list  # pydicom Datasets, in file order
    files: list[Path]

    @property
    def normal(self) -> np.ndarray:
        iop = np.asarray(self.headers[0].ImageOrientationPatient, dtype=float)
        return np.cross(iop[:3], iop[3:])

    @property
    def is_axial(self) -> bool:
        return abs(self.normal[2]) > 0.9

    def line(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {len(self.files)} slices)"


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' marker at byte 128) or a file named *.dcm."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_input(path: str | Path) -> bool:
    """A .zip file (read as DICOM), or a folder with a DICOM file somewhere under it."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip"
    return path.is_dir() and any(p.is_file() and is_dicom_file(p) for p in path.rglob("*"))


def _is_ct_image(ds) -> bool:
    # non-image objects (SR, presentation states, RT structures) lack the image plane; localizers say so
    if not all(k in ds for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient",
                                 "PixelSpacing")):
        return False
    if "LOCALIZER" in [str(t).upper() for t in ds.get("ImageType", [])]:
        return False
    return ds.get("Modality") == "CT" or str(ds.get("SOPClassUID", "")) == CT_IMAGE_STORAGE


def list_series(files: list[Path]) -> tuple[list[Series], int]:
    """CT image series among ``files`` (grouped by SeriesInstanceUID), and how many files were DICOM."""
    import pydicom

    groups: dict[str, Series] = {}
    n_dicom = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises several types for non-DICOM or truncated files
            continue
        n_dicom += 1
        if _is_ct_image(ds):
            uid = str(ds.get("SeriesInstanceUID", ""))
            series = groups.setdefault(uid, Series(uid, str(ds.get("SeriesDescription", "")), [], []))
            series.headers.append(ds)
            series.files.append(path)
    return list(groups.values()), n_dicom


def choose_series(found: list[Series], source: Path, n_files: int, n_dicom: int, uid: str | None) -> Series:
    """The series ``uid`` names, else the one axial CT series; several -> InputError listing them."""
    if uid is not None:
        match = [s for s in found if s.uid == uid]
        if not match:
            listed = "; ".join(s.line() for s in found) or "none"
            raise InputError(f"{source}: no CT series {uid} (CT series there: {listed})")
        return match[0]
    if not found:
        raise InputError(f"{source}: no DICOM CT series found ({n_files} files read, {n_dicom} DICOM; "
                         f"localizers and non-image objects are skipped)")
    candidates = found
    if len(candidates) > 1:  # scouts: a series of one or two slices beside a real one
        candidates = [s for s in candidates if len(s.files) > LOCALIZER_SLICES] or candidates
    if len(candidates) > 1:
        candidates = [s for s in candidates if s.is_axial] or candidates
    if len(candidates) > 1:
        listed = "; ".join(s.line() for s in candidates)
        raise InputError(f"{source}: {len(candidates)} CT series, choose one with --series UID: {listed}")
    return candidates[0]


def sorted_slices(series: Series, source: Path) -> tuple[list[Path], np.ndarray]:
    """The series' files sorted along the slice normal, and their positions along it (mm).

    Refuses mixed sizes or orientations, several slices at one position, gantry tilt and irregular
    slice spacing (a missing slice), each in one line naming ``source``.
    """
    first = series.headers[0]
    iop0 = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in series.headers:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
                np.asarray(ds.PixelSpacing, dtype=float), np.asarray(first.PixelSpacing, dtype=float), atol=1e-4):
            raise InputError(f"{source}: series {series.uid} mixes slice sizes or pixel spacings")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop0, atol=1e-4):
            raise InputError(f"{source}: series {series.uid} mixes slice orientations")
    ipp = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in series.headers])
    pos = ipp @ series.normal
    order = np.argsort(pos, kind="stable")
    files, ipp, pos = [series.files[i] for i in order], ipp[order], pos[order]
    if len(pos) < 2:
        return files, pos
    gaps = np.diff(pos)
    if gaps.min() < 1e-3:
        raise InputError(f"{source}: series {series.uid} has several slices at one position "
                         f"({pos[int(np.argmin(gaps))]:.2f} mm); split it by acquisition first")
    direction = (ipp[-1] - ipp[0]) / np.linalg.norm(ipp[-1] - ipp[0])
    if np.linalg.norm(np.cross(direction, series.normal)) > TILT_TOLERANCE:
        raise InputError(f"{source}: series {series.uid} is tilted (gantry tilt: the slices are not stacked "
                         f"along their normal); resample it to an untilted volume first")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        at = int(np.argmax(np.abs(gaps - median)))
        raise InputError(f"{source}: series {series.uid} has irregular slice spacing ({gaps[at]:.2f} mm at "
                         f"{pos[at]:.2f} mm against {median:.2f} mm elsewhere: a missing slice?)")
    return files, pos


def _read_pixels(files: list[Path], padding_hu: float | None) -> nib.Nifti1Image:
    """SimpleITK reads the sorted files; padding becomes air; LPS geometry -> a RAS nibabel image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies RescaleSlope/Intercept: HU
    image = reader.Execute()
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK (k, j, i) array -> (i, j, k) voxels
    pad = data <= PADDING_HU
    if padding_hu is not None and padding_hu < AIR_HU:
        pad |= data == padding_hu
    data[pad] = AIR_HU
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    affine[:2] *= -1  # DICOM's LPS world -> NIfTI's RAS world
    return nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)


def _padding_hu(ds) -> float | None:
    if "PixelPaddingValue" not in ds:
        return None
    return float(ds.PixelPaddingValue) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _read_folder(folder: Path, source: Path, uid: str | None) -> tuple[nib.Nifti1Image, list]:
    all_files = [p for p in folder.rglob("*") if p.is_file()]
    found, n_dicom = list_series(sorted(all_files))
    series = choose_series(found, source, len(all_files), n_dicom, uid)
    files, _ = sorted_slices(series, source)
    header_of = dict(zip(series.files, series.headers))
    try:
        return _read_pixels(files, _padding_hu(series.headers[0])), [header_of[f] for f in files]
    except RuntimeError as e:  # SimpleITK reports an unreadable file or transfer syntax this way
        raise InputError(f"{source}: SimpleITK cannot read series {series.uid}: {str(e).strip().splitlines()[-1]}")


def read_dicom_series(path: str | Path, series: str | None = None) -> nib.Nifti1Image:
    """The image of :func:`read_dicom_series_headers` (see there)."""
    return read_dicom_series_headers(path, series)[0]


def read_dicom_series_headers(path: str | Path, series: str | None = None) -> tuple[nib.Nifti1Image, list]:
    """Read one CT series from a DICOM folder (searched recursively) or a .zip of DICOM files.

    Args:
        path: the folder or zip.
        series: a SeriesInstanceUID; None takes the one axial CT series (several: InputError listing them).
    Returns:
        a float32 (X, Y, Z) HU nibabel image in memory, X along the rows' direction, Z along the slice
        normal, with the series' RAS affine; padding (PixelPaddingValue, <= -2048) is air (-1024); and
        the series' pydicom headers (read without pixels), one per slice in the image's Z order.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, path, series)
    try:
        with tempfile.TemporaryDirectory(prefix="dicom-") as tmp, zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)  # zipfile keeps members inside tmp (it drops absolute paths and "..")
            return _read_folder(Path(tmp), path, series)
    except zipfile.BadZipFile as e:
        raise InputError(f"{path}: not a readable zip file ({e})") from None
