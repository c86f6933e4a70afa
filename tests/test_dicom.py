"""DICOM series in (data.dicom through data.readers.read_case, and infer.py): series built with pydicom
from a small phantom of known geometry, shuffled, renamed, mixed with a localizer, a second series, an
oblique orientation, a compressed copy, a missing slice, a tilt; and the real DICOM slices."""
from __future__ import annotations

import contextlib
import io
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("SimpleITK")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid  # noqa: E402

import infer  # noqa: E402
from base import InputError  # noqa: E402
from data.readers import find_cases, read_case  # noqa: E402
from data.synthetic import generate_patient  # noqa: E402
from data.transforms import to_axial_slices  # noqa: E402
from tests.script_fixtures import processed, trained  # noqa: E402,F401

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"
INTERCEPT = -2048.0  # stored = HU + 2048, unsigned: the reader must apply the rescale


@pytest.fixture(scope="module")
def phantom() -> dict:
    return generate_patient(np.random.default_rng(3), shape=(64, 64, 12))


def _ds(values, *, fmt: int = 6) -> list[float]:
    return [round(float(v), fmt) for v in values]  # DS strings hold at most 16 characters


def write_series(folder: Path, image: np.ndarray, affine: np.ndarray, *, uid: str | None = None,
                 description: str = "CT chest", names=None, compress: bool = False, image_type="AXIAL") -> str:
    """Write an (X, Y, Z) HU volume with a RAS affine as one DICOM file per slice; returns the series UID.

    Files get the names ``names`` (default: shuffled numbers, no suffix) and InstanceNumbers in reverse,
    so only the positions tell the order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]  # RAS -> DICOM's LPS
    col_step, row_step = lps[:, 0], lps[:, 1]  # voxel i runs along a row (columns), j down the rows
    iop = np.concatenate([col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)])
    nz = image.shape[2]
    names = names or [f"IM{n:04d}" for n in np.random.default_rng(nz).permutation(nz) * 7 + 11]
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", image_type]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.3.4", uid, description
        ds.InstanceNumber = nz - k
        ds.ImagePositionPatient = _ds(lps @ [0, 0, k, 1])
        ds.ImageOrientationPatient = _ds(iop, fmt=8)
        ds.PixelSpacing = _ds([np.linalg.norm(row_step), np.linalg.norm(col_step)])
        ds.SliceThickness = _ds([np.linalg.norm(lps[:, 2])])[0]
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = INTERCEPT, 1.0
        ds.PixelData = (image[:, :, k].T.astype(np.float64) - INTERCEPT).astype(np.uint16).tobytes()
        if compress:
            ds.compress(RLELossless)
        ds.save_as(folder / names[k], enforce_file_format=True)
    return uid


def check_volume(vol, phantom: dict, affine: np.ndarray | None = None) -> None:
    """read_case's Volume holds the phantom's HU slices and its affine (within 1e-3)."""
    affine = phantom["affine"] if affine is None else affine
    assert vol.shape == phantom["image"].shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-3)
    np.testing.assert_array_equal(vol.image, to_axial_slices(phantom["image"].astype(np.float32), affine))


# ----------------------------------------------------------------------------- reading
def test_a_shuffled_renamed_series_with_a_localizer_and_clutter_reads_as_the_phantom(phantom, tmp_path):
    scan = tmp_path / "patient_7"
    write_series(scan / "a" / "b", phantom["image"], phantom["affine"])
    scout = np.full((64, 64, 1), -1000, np.int16)  # a coronal localizer of its own series
    coronal = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    write_series(scan / "scout", scout, coronal, image_type="LOCALIZER", names=["SCOUT"])
    (scan / "README.txt").write_text("not DICOM")
    sr = Dataset()  # a non-image object (a structured report): no pixels, no image plane
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = generate_uid()
    sr.Modality, sr.SeriesInstanceUID = "SR", generate_uid()
    sr.save_as(scan / "SR0001", enforce_file_format=True)
    check_volume(read_case(scan), phantom)
    (case,) = find_cases(scan)
    assert (case.name, case.image) == ("patient_7", scan)
    assert read_case(scan, voxels=False).image is None


def test_a_zip_reads_like_its_folder_and_is_named_by_its_stem(phantom, tmp_path):
    write_series(tmp_path / "s", phantom["image"], phantom["affine"])
    archive = tmp_path / "scan_2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (tmp_path / "s").iterdir():
            zf.write(f, f"series/{f.name}")
    check_volume(read_case(archive), phantom)
    assert [c.name for c in find_cases(archive)] == ["scan_2"]


def test_an_oblique_series_keeps_its_affine(phantom, tmp_path):
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = phantom["affine"].copy()
    affine[:3] = rz @ rx @ affine[:3]
    write_series(tmp_path / "oblique", phantom["image"], affine)
    check_volume(read_case(tmp_path / "oblique"), phantom, affine)


def test_a_compressed_series_reads(phantom, tmp_path):
    try:
        write_series(tmp_path / "rle", phantom["image"], phantom["affine"], compress=True)
    except Exception as e:  # pydicom's RLE encoder needs numpy and a pydicom >= 2.2
        pytest.skip(f"pydicom cannot encode RLE Lossless here: {e}")
    ds = pydicom.dcmread(next((tmp_path / "rle").iterdir()), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    check_volume(read_case(tmp_path / "rle"), phantom)


def test_two_series_are_listed_not_guessed_and_series_picks_one(phantom, tmp_path):
    first = write_series(tmp_path / "two" / "1", phantom["image"], phantom["affine"], description="lung kernel")
    second = write_series(tmp_path / "two" / "2", phantom["image"] + 10, phantom["affine"],
                          description="soft kernel")
    with pytest.raises(InputError) as err:
        read_case(tmp_path / "two")
    msg = str(err.value)
    assert "--series" in msg and first in msg and second in msg and "lung kernel" in msg and "12 slices" in msg
    check_volume(read_case(tmp_path / "two", series=first), phantom)
    assert read_case(tmp_path / "two", series=second).image.min() == phantom["image"].min() + 10
    with pytest.raises(InputError, match="no CT series 9.9"):
        read_case(tmp_path / "two", series="9.9")


def _refusal(folder: Path) -> str:
    with pytest.raises(InputError) as err:
        read_case(folder)
    msg = str(err.value)
    assert str(folder) in msg and "\n" not in msg
    return msg


def test_a_missing_slice_a_tilt_mixed_sizes_and_no_ct_are_refused_in_one_line(phantom, tmp_path):
    names = [f"{k:03d}.dcm" for k in range(12)]
    write_series(tmp_path / "gap", phantom["image"], phantom["affine"], names=names)
    (tmp_path / "gap" / "005.dcm").unlink()
    assert "irregular slice spacing" in _refusal(tmp_path / "gap")

    tilted = phantom["affine"].copy()
    tilted[1, 2] = 0.3 * tilted[2, 2]  # slices shift along y as z grows; their normal stays z: gantry tilt
    write_series(tmp_path / "tilt", phantom["image"], tilted)
    assert "tilt" in _refusal(tmp_path / "tilt")

    write_series(tmp_path / "mixed", phantom["image"], phantom["affine"], names=names)
    small = phantom["image"][:32]
    uid = pydicom.dcmread(tmp_path / "mixed" / "000.dcm").SeriesInstanceUID
    write_series(tmp_path / "mixed", small[:, :, :1], phantom["affine"], uid=uid, names=["000.dcm"])
    assert "mixes slice sizes" in _refusal(tmp_path / "mixed")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.dcm").write_bytes(b"not really")
    assert "no DICOM CT series found" in _refusal(tmp_path / "empty")


def test_series_is_refused_for_a_nifti_file(phantom, tmp_path):
    nib.save(nib.Nifti1Image(phantom["image"], phantom["affine"]), tmp_path / "scan.nii.gz")
    with pytest.raises(InputError, match="--series applies to DICOM"):
        read_case(tmp_path / "scan.nii.gz", series="1.2")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"no real CT data at {REAL_CT}")
def test_the_real_dicom_slices_read_in_hu(tmp_path):
    for f in sorted(REAL_CT.glob("chest_slice_*.dcm")):
        shutil.copy(f, tmp_path / f.name)
    vol = read_case(tmp_path)
    assert vol.shape == (512, 512, 2) and vol.spacing == pytest.approx([0.625, 0.625, 1.0])
    assert vol.image.min() > -2048 and (vol.image == -1024).mean() > 0.1  # -2048 outside the field of view: air
    assert (vol.image < -500).mean() > 0.2 and (vol.image > 0).mean() > 0.05  # air, lungs and tissue


# ----------------------------------------------------------------------------- infer.py
def test_infer_on_a_dicom_folder_writes_masks_in_the_series_geometry(trained, phantom, tmp_path):
    checkpoint = trained["out"] / "best_model.pth"
    write_series(tmp_path / "scan_a", phantom["image"], phantom["affine"])
    nib.save(nib.Nifti1Image(phantom["image"], phantom["affine"]), tmp_path / "scan_b.nii.gz")
    with contextlib.redirect_stdout(io.StringIO()):
        dicom_masks = infer.infer(checkpoint, tmp_path / "scan_a", tmp_path / "out", device="cpu", progress=False)
        nifti_masks = infer.infer(checkpoint, tmp_path / "scan_b.nii.gz", tmp_path / "out", device="cpu",
                                  progress=False)
    assert tmp_path / "out" / "scan_a_lesion.nii.gz" in dicom_masks
    for dicom_mask, nifti_mask in zip(dicom_masks, nifti_masks, strict=True):  # lesion (and lung) masks
        out, ref = nib.load(dicom_mask), nib.load(nifti_mask)
        assert out.shape == phantom["image"].shape
        np.testing.assert_allclose(out.affine, phantom["affine"], atol=1e-3)
        np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(ref.dataobj))  # same scan, same masks


def test_preprocess_reads_a_dicom_folder_as_one_case(phantom, tmp_path):
    from data.preprocess import preprocess

    write_series(tmp_path / "scan_c", phantom["image"], phantom["affine"])
    meta = preprocess(tmp_path / "scan_c", tmp_path / "processed", size=32, workers=1, progress=False)
    images = np.load(tmp_path / "processed" / "images.npy")
    assert images.shape == (12, 32, 32) and "scan_c" in str(meta)


def test_infer_lists_several_series_and_reads_the_one_series_names(trained, phantom, tmp_path):
    checkpoint = trained["out"] / "best_model.pth"
    first = write_series(tmp_path / "two" / "1", phantom["image"], phantom["affine"])
    write_series(tmp_path / "two" / "2", phantom["image"], phantom["affine"])
    with pytest.raises(InputError, match="--series"), contextlib.redirect_stdout(io.StringIO()):
        infer.infer(checkpoint, tmp_path / "two", tmp_path / "out", device="cpu", progress=False)
    args = infer.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "two"),
                                               "--output", str(tmp_path / "out"), "--series", first,
                                               "--device", "cpu"])
    with contextlib.redirect_stdout(io.StringIO()):
        masks = infer.main(args)
    assert tmp_path / "out" / "two_lesion.nii.gz" in masks
    assert all(nib.load(m).shape == phantom["image"].shape for m in masks)


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"no real CT data at {REAL_CT}")
def test_infer_runs_end_to_end_on_the_real_dicom_slices(trained, tmp_path):
    scan = tmp_path / "real_chest"
    scan.mkdir()
    for f in sorted(REAL_CT.glob("chest_slice_*.dcm")):
        shutil.copy(f, scan / f"renamed_{f.name[-5]}")  # no .dcm suffix: found by the DICM marker
    with contextlib.redirect_stdout(io.StringIO()):
        masks = infer.infer(trained["out"] / "best_model.pth", scan, tmp_path / "out", device="cpu", progress=False)
    assert tmp_path / "out" / "real_chest_lesion.nii.gz" in masks
    ref = read_case(scan, voxels=False)
    for mask in masks:
        img = nib.load(mask)
        assert img.shape == (512, 512, 2)
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
