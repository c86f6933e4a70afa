"""DICOM SEG output (engine.dicom_seg, infer.py --dicom-seg): a phantom series in an oblique, flipped, in-plane
transposed orientation with shuffled files; every SEG frame is checked against the NIfTI mask pixel by pixel
through each source image's own position and orientation, and against the phantom's lungs."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")

import infer  # noqa: E402
from base import InputError  # noqa: E402
from data.readers import read_case  # noqa: E402
from engine.dicom_seg import HU_LUNG_LABELS, check_source, seg_frames, write_dicom_seg  # noqa: E402
from tests.script_fixtures import processed, trained  # noqa: E402,F401
from tests.test_dicom import phantom, write_series  # noqa: E402,F401

FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1"


def oblique_series(phantom: dict, folder: Path, frame_of_reference: bool = True) -> tuple[dict, dict]:
    """The phantom reoriented (rows and columns swapped, two axes flipped) and tilted 8 degrees about x, as a
    DICOM series with shuffled file names; returns ({file name: slice index k of the written volume}, the
    reoriented {"image", "lung", "affine"})."""
    ornt = np.array([[1, -1], [0, 1], [2, -1]])  # voxel axis 0 -> 1 flipped, 1 -> 0, 2 flipped
    img = nib.Nifti1Image(phantom["image"], phantom["affine"]).as_reoriented(ornt)
    lung = np.asarray(nib.Nifti1Image(phantom["lung"], phantom["affine"]).as_reoriented(ornt).dataobj)
    a = np.deg2rad(8)
    tilt = np.array([[1, 0, 0, 0], [0, np.cos(a), -np.sin(a), 0], [0, np.sin(a), np.cos(a), 0], [0, 0, 0, 1]])
    moved = {"image": np.asarray(img.dataobj), "lung": lung, "affine": tilt @ img.affine}
    write_series(folder, moved["image"], moved["affine"])
    slices = {}
    to_voxel = np.linalg.inv(moved["affine"])
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        if frame_of_reference:
            ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
            ds.save_as(f)
        ras = np.array([-1, -1, 1]) * np.asarray(ds.ImagePositionPatient, dtype=float)
        slices[ds.SOPInstanceUID] = int(np.rint((to_voxel @ [*ras, 1])[2]))  # the writer's own k
    return slices, moved


def nifti_at_source_pixels(mask: nib.Nifti1Image, ds) -> np.ndarray:
    """The NIfTI mask's value at the centre of every pixel of source image ``ds``: (Rows, Columns)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[:ds.Rows, :ds.Columns]
    lps = (np.asarray(ds.ImagePositionPatient, dtype=float)[:, None, None] + iop[:3, None, None] * c * col_mm
           + iop[3:, None, None] * r * row_mm)
    ras = np.concatenate([lps * np.array([-1, -1, 1])[:, None, None], np.ones((1, *r.shape))])
    ijk = np.rint(np.tensordot(np.linalg.inv(mask.affine), ras, axes=1)[:3]).astype(int)
    return np.asarray(mask.dataobj)[ijk[0], ijk[1], ijk[2]]


def test_infer_dicom_seg_frames_are_the_nifti_masks_on_each_source_image(trained, phantom, tmp_path):
    slices, moved = oblique_series(phantom, tmp_path / "scan")
    args = infer.get_args_parser().parse_args(["--checkpoint", str(trained["out"] / "best_model.pth"), "--input",
                                               str(tmp_path / "scan"), "--output", str(tmp_path / "out"),
                                               "--device", "cpu", "--lungs", "hu", "--dicom-seg"])
    with contextlib.redirect_stdout(io.StringIO()):
        infer.main(args)
    out = tmp_path / "out"
    seg = hd.seg.segread(out / "scan_seg.dcm")
    segments = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    assert {"left lung", "right lung"} <= set(segments)
    headers = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in (tmp_path / "scan").iterdir())}
    uids = sorted(headers)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=list(segments.values()),
                                               assert_missing_frames_are_empty=True)  # (n, Rows, Columns, S)
    lung, lesion = (nib.load(out / f"scan_{kind}.nii.gz") for kind in ("lung", "lesion"))
    for n, uid in enumerate(uids):
        at_lung, at_lesion = nifti_at_source_pixels(lung, headers[uid]), nifti_at_source_pixels(lesion, headers[uid])
        for s, name in enumerate(segments):
            expected = at_lesion > 0 if name not in HU_LUNG_LABELS else at_lung == HU_LUNG_LABELS[name]
            np.testing.assert_array_equal(pixels[n, :, :, s], expected, err_msg=f"{name} on {uid}")
    # and the lungs land on the phantom's lungs: frame (r, c) of the file of slice k is voxel (c, r, k)
    # (predicted lesion inside a lung's outline is lung by design, utils/lungs.py step 5, and the tiny model
    # predicts lesion almost anywhere: the lungs' placement is judged on their air-like part)
    truth = np.stack([moved["lung"][:, :, slices[uid]].T for uid in uids])
    lesion = pixels[..., [s for s, name in enumerate(segments) if name not in HU_LUNG_LABELS]].any(-1)
    for name, value in HU_LUNG_LABELS.items():
        found, true = pixels[..., list(segments).index(name)].astype(bool), truth == value
        air = found & ~lesion
        assert (found & true).sum() > 0.8 * true.sum() and (air & true).sum() > 0.9 * air.sum(), name
    report = (out / "scan_report.json").read_text()
    assert "dicom_seg_segments" in report
    assert "scan_seg.dcm" in (out / "infer_manifest.json").read_text()


def test_dicom_seg_on_nifti_input_is_refused_before_any_output(trained, phantom, tmp_path):
    nib.save(nib.Nifti1Image(phantom["image"], phantom["affine"]), tmp_path / "scan.nii.gz")
    with pytest.raises(InputError, match="--dicom-seg needs DICOM input.*scan.nii.gz is NIfTI"), \
            contextlib.redirect_stdout(io.StringIO()):
        infer.infer(trained["out"] / "best_model.pth", tmp_path / "scan.nii.gz", tmp_path / "out", device="cpu",
                    progress=False, dicom_seg=True)
    assert not (tmp_path / "out").exists()


def test_empty_segments_are_left_out_and_an_all_empty_seg_is_still_written(phantom, tmp_path):
    oblique_series(phantom, tmp_path / "scan")
    volume = read_case(tmp_path / "scan")
    empty = np.zeros(volume.image.shape, np.uint8)
    lung = empty.copy()
    lung[3:5, 20:30, 10:20] = HU_LUNG_LABELS["right lung"]
    labels = {"lung": HU_LUNG_LABELS, "lesion": {"lesion": 1}}
    result = write_dicom_seg({"lung": lung, "lesion": empty}, labels, volume, tmp_path / "a.dcm", "x.pth")
    assert result["dicom_seg_segments"] == ["right lung"] and "left lung, lesion" in result["dicom_seg_note"]
    assert "PatientID" not in volume.source_headers[0]  # filled in on copies for highdicom, not in the Volume
    seg = hd.seg.segread(tmp_path / "a.dcm")
    assert int(seg.NumberOfFrames) == 2  # empty frames omitted: the two slices with a voxel
    frames = seg_frames(lung, volume)
    assert frames.shape == (len(volume.source_headers), 64, 64) and (frames == 2).sum() == (lung == 2).sum()
    result = write_dicom_seg({"lung": empty, "lesion": empty}, labels, volume, tmp_path / "b.dcm", "x.pth")
    assert "every segment is empty" in result["dicom_seg_note"]
    assert not hd.seg.segread(tmp_path / "b.dcm").pixel_array.any()


def test_a_series_without_frame_of_reference_is_refused(phantom, tmp_path):
    oblique_series(phantom, tmp_path / "scan", frame_of_reference=False)
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        check_source(read_case(tmp_path / "scan"))
