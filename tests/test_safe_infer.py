"""infer.py never destroys its input or a file it did not write, reads image files the way the checkpoint was
trained, and runs folders as a batch that keeps finished cases, reports bad ones and resumes (issue 13)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import engine.batch
import infer
from data.transforms import InputError, image_files_note, load_image_slice, normalize, resize_images
from engine.predict import Predictor
from tests.script_fixtures import (ctrl_c_in_a_finalizer, default_sigint, phantoms, processed,  # noqa: F401
                                   run_script, slice_rows, trained)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import remembered_ctrl_c


def run_infer(checkpoint, input, output=None, **kwargs):
    """infer.infer on the CPU in fp32, quietly; returns (written mask paths, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        written = infer.infer(checkpoint, input, output, device="cpu", amp="off", progress=False, **kwargs)
    return written, buf.getvalue()


def one_line_error(proc, *names: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained["out"] / "best_model.pth"


@pytest.fixture(scope="module")
def slices(processed) -> list[np.ndarray]:
    """Three test slices as 8-bit images (64, 64), as data.export_png writes them."""
    rows = slice_rows(processed, "test")[:3]
    return [(np.load(processed / "images.npy")[r] * 255).round().astype(np.uint8) for r in rows]


def slice_folder(path, slices) -> list:
    path.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(slices):
        Image.fromarray(s).save(path / f"s{i}.png")
    return sorted(path.glob("*.png"))


def rows_of(report) -> dict[str, dict]:
    with open(report, newline="") as f:
        return {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------- case 3: never write over the input
def test_infer_refuses_an_output_that_is_the_input_image(checkpoint, slices, tmp_path):
    (src,) = slice_folder(tmp_path / "in", slices[:1])
    before = src.read_bytes()
    proc = run_script("infer.py", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(src),
                      "--device", "cpu")
    one_line_error(proc, str(src), "input")
    assert src.read_bytes() == before
    with pytest.raises(InputError, match="input"):  # its folder (mask in/s0.png), and not even with --overwrite
        run_infer(checkpoint, src, src.parent, overwrite=True)
    assert src.read_bytes() == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["s0.png"]


def test_infer_refuses_an_output_folder_that_is_or_holds_the_input_folder(checkpoint, slices, tmp_path):
    folder = tmp_path / "scans" / "ct"
    slice_folder(folder, slices)
    before = snapshot(tmp_path)
    proc = run_script("infer.py", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(folder),
                      "--device", "cpu")
    one_line_error(proc, str(folder))
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError, match="holds the input"):
        run_infer(checkpoint, folder, tmp_path / "scans")
    with pytest.raises(InputError, match="--save-probs"):  # probability maps are outputs too
        run_infer(checkpoint, folder, tmp_path / "masks", save_probs=folder)
    assert snapshot(tmp_path) == before


def test_infer_refuses_to_replace_a_file_it_did_not_write(checkpoint, slices, tmp_path):
    """An existing file where a mask would go is replaced only with --overwrite (single slice and folder)."""
    (src,) = slice_folder(tmp_path / "in", slices[:1])
    mine = tmp_path / "mine.png"
    Image.fromarray(slices[1]).save(mine)  # e.g. another CT slice the user keeps there
    before = mine.read_bytes()
    proc = run_script("infer.py", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(mine),
                      "--device", "cpu")
    one_line_error(proc, str(mine), "--overwrite")
    assert mine.read_bytes() == before
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(mine, out / "s0.png")
    with pytest.raises(InputError, match="did not write"):
        run_infer(checkpoint, src.parent, out)
    assert (out / "s0.png").read_bytes() == before and not (out / "overlays").exists()
    run_infer(checkpoint, src, mine, overwrite=True)
    assert set(np.unique(np.asarray(Image.open(mine)))) <= {0, 255}


def test_infer_may_replace_its_own_single_mask_as_make_demo_twice_does(checkpoint, slices, tmp_path):
    (src,) = slice_folder(tmp_path / "in", slices[:1])
    for _ in range(2):
        assert run_infer(checkpoint, src, tmp_path / "prediction_mask.png")[0] == [tmp_path / "prediction_mask.png"]
    assert (tmp_path / "prediction_mask.png").is_file() and (tmp_path / "prediction_mask_overlay.png").is_file()


# ----------------------------------------------------------------------------- case 11: image files and the HU window
def _clipped_phantom(phantoms, root):
    """phantom_000 with its HU kept within -850..150 (a field of view inside the body): windowed, its slices
    span about 0.1..0.8, not 0..1, so min-max and the window disagree."""
    for sub in ("images", "lung_masks", "lesion_masks"):
        img = nib.load(phantoms / sub / "phantom_000.nii.gz")
        data = np.asarray(img.dataobj)
        if sub == "images":
            data = np.clip(data, -850, 150).astype(np.int16)
        (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, img.affine), root / sub / "phantom_000.nii.gz")
    return root


def test_exported_png_gives_the_mask_of_the_preprocessed_slice(checkpoint, phantoms, tmp_path):
    """The demo's path: preprocess -> data.export_png -> infer.py on the PNG predicts what the model predicts on
    the preprocessed array itself, for a checkpoint trained in an HU window."""
    from data.export_png import export_pngs
    from data.preprocess import preprocess

    data = tmp_path / "processed"
    preprocess(_clipped_phantom(phantoms, tmp_path / "volumes"), data, size=64, workers=1, progress=False)
    pngs = export_pngs(data, None, tmp_path / "examples", n=2)
    meta, images = json.loads((data / "meta.json").read_text()), np.load(data / "images.npy")
    predictor = Predictor(checkpoint, "cpu", "off")
    assert predictor.prep["norm"] == "window" and image_files_note(predictor.prep)
    for png in pngs:
        row = next(i for i, s in enumerate(meta["slices"]) if f"{s['case']}_z{s['z']:03d}.png" == png.name)
        assert images[row].max() < 0.9  # the slice is not full range: min-max would stretch it
        direct = predictor.probs(torch.from_numpy(images[row][None]))["lesion"][0].numpy()
        threshold = float(np.median(direct))  # about half the pixels each side, whatever the model learned
        (mask_path,), out = run_infer(checkpoint, png, tmp_path / f"{png.stem}_mask.png", threshold=threshold)
        mask = np.asarray(Image.open(mask_path)) > 0
        expected = direct > threshold
        assert 0.2 < expected.mean() < 0.8
        # 8-bit export rounds the input by at most 1/510: only pixels at the threshold itself may flip
        assert (mask != expected).mean() <= 0.02, (mask != expected).mean()
        assert out.count("HU window") == 1  # and the run says once how it read the image


def test_window_checkpoint_refuses_a_16_bit_image_in_one_line(checkpoint, slices, tmp_path):
    src = tmp_path / "ct16.png"
    Image.fromarray(slices[0].astype(np.uint16) * 16).save(src)
    assert Image.open(src).mode.startswith("I")
    proc = run_script("infer.py", "--checkpoint", str(checkpoint), "--input", str(src),
                      "--output", str(tmp_path / "mask.png"), "--device", "cpu")
    one_line_error(proc, "ct16.png", "NIfTI")
    assert not (tmp_path / "mask.png").exists()


def test_minmax_checkpoint_reads_image_files_min_max_as_before(checkpoint, slices, tmp_path):
    prep = {**load_checkpoint(checkpoint)["preprocessing"], "norm": "minmax", "window": None}
    assert image_files_note(prep) is None
    src = tmp_path / "ct16.png"
    Image.fromarray(slices[0].astype(np.uint16) * 16 + 300).save(src)
    x, shape = load_image_slice(src, prep)
    raw = np.asarray(Image.open(src)).astype(np.float32)
    np.testing.assert_allclose(x.numpy(), resize_images(normalize(raw[None], "minmax"), prep["size"])[0].numpy())


# ----------------------------------------------------------------------------- case 15: folders are batches
def test_a_bad_image_in_a_folder_is_reported_and_the_others_are_kept(checkpoint, slices, tmp_path):
    folder = tmp_path / "slices"
    paths = slice_folder(folder, slices)
    good = paths[0].read_bytes()
    paths[1].write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "masks"
    args = ["--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out), "--device", "cpu",
            "--no-progress"]
    proc = run_script("infer.py", *args)
    one_line_error(proc, "s1.png", "1 of 3")
    assert sorted(p.name for p in out.glob("*.png")) == ["s0.png", "s2.png"]
    rows = rows_of(out / "report.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"s0.png": "done", "s1.png": "failed", "s2.png": "done"}
    assert "s1.png" in rows["s1.png"]["error"]
    manifest = json.loads((out / "infer_manifest.json").read_text())
    assert manifest["complete"] is False
    done = {p: (out / p).stat().st_mtime_ns for p in ("s0.png", "s2.png")}

    paths[1].write_bytes(good)  # the user fixes the file; the rerun does only that one
    written, stdout = run_infer(checkpoint, folder, out)
    assert len(written) == 3 and "skipping 2" in stdout
    assert {p: (out / p).stat().st_mtime_ns for p in done} == done
    assert (out / "s1.png").is_file()
    assert {r["status"] for r in rows_of(out / "report.csv").values()} == {"done"}
    assert json.loads((out / "infer_manifest.json").read_text())["complete"] is True


def test_an_interrupted_folder_run_keeps_finished_masks_and_the_rerun_completes(checkpoint, slices, tmp_path,
                                                                                monkeypatch):
    folder, out = tmp_path / "slices", tmp_path / "masks"
    slice_folder(folder, slices)
    real, calls = engine.batch.mask_to_png, []

    def interrupted_after_the_first(*a, **k):  # Ctrl-C while the second mask is being written
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine.batch, "mask_to_png", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt, match="1 of 3 cases are done"):
        run_infer(checkpoint, folder, out)
    manifest = json.loads((out / "infer_manifest.json").read_text())
    assert manifest["complete"] is False
    assert [k for k, c in manifest["cases"].items() if c["status"] == "done"] == ["s0.png"]
    first = (out / "s0.png").stat().st_mtime_ns

    monkeypatch.setattr(engine.batch, "mask_to_png", real)
    written, stdout = run_infer(checkpoint, folder, out)
    assert [p.name for p in written] == ["s0.png", "s1.png", "s2.png"] and "skipping 1" in stdout
    assert (out / "s0.png").stat().st_mtime_ns == first
    assert json.loads((out / "infer_manifest.json").read_text())["complete"] is True
    # other settings (here the threshold) make every done case stale: redone, not skipped
    _, stdout = run_infer(checkpoint, folder, out, threshold=0.3)
    assert "skipping" not in stdout and (out / "s0.png").stat().st_mtime_ns != first


def test_a_ctrl_c_swallowed_while_writing_a_mask_stops_before_the_next_case(checkpoint, slices, tmp_path,
                                                                           monkeypatch, default_sigint):
    folder, out = tmp_path / "slices", tmp_path / "masks"
    slice_folder(folder, slices)
    real, calls = engine.batch.mask_to_png, []

    def swallowed_in_the_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            ctrl_c_in_a_finalizer()
        return real(*a, **k)

    monkeypatch.setattr(engine.batch, "mask_to_png", swallowed_in_the_first)
    with pytest.raises(KeyboardInterrupt, match="1 of 3 cases are done"), remembered_ctrl_c():
        run_infer(checkpoint, folder, out)
    assert len(calls) == 1 and (out / "s0.png").is_file() and not (out / "s1.png").exists()


def test_a_bad_volume_in_a_folder_is_reported_and_the_others_are_kept(checkpoint, phantoms, tmp_path):
    folder, out = tmp_path / "scans", tmp_path / "out"
    folder.mkdir()
    for i in (0, 1):
        shutil.copy(phantoms / "images" / f"phantom_00{i}.nii.gz", folder / f"a{i}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    args = ["--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out), "--device", "cpu"]
    proc = run_script("infer.py", *args)
    one_line_error(proc, "broken.nii.gz", "1 of 3")
    assert sorted(p.name for p in out.glob("*_lesion.nii.gz")) == ["a0_lesion.nii.gz", "a1_lesion.nii.gz"]
    rows = rows_of(out / "report.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"a0.nii.gz": "done", "a1.nii.gz": "done",
                                                         "broken.nii.gz": "failed"}
    assert rows["a0.nii.gz"]["lesion_ml"] != "" and "broken.nii.gz" in rows["broken.nii.gz"]["error"]
    stamp = (out / "a0_lesion.nii.gz").stat().st_mtime_ns
    (folder / "broken.nii.gz").unlink()
    written, stdout = run_infer(checkpoint, folder, out)
    assert len(written) == 4 and "skipping 2" in stdout  # lesion and (HU) lung masks of the 2 done cases
    assert json.loads((out / "infer_manifest.json").read_text())["complete"] is True
    assert (out / "a0_lesion.nii.gz").stat().st_mtime_ns == stamp
