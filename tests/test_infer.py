"""End-to-end tests of infer.py: slices of any size and mode, folders, NIfTI volumes, bad input."""
from __future__ import annotations

import contextlib
import io
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import infer
from data.transforms import InputError
from data.transforms import load_image_slice, prepare_slices, resize_images, to_axial_slices
from tests.script_fixtures import phantoms, processed, run_script, slice_rows, trained  # noqa: F401
from models import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.cli import run_cli
from utils.helpers import amp_dtype
from engine.predict import Predictor, inference_model, predict

CPU = torch.device("cpu")


def run_infer(checkpoint, input, output=None, **kwargs):
    """infer.infer on the CPU, quietly; returns the written mask paths."""
    with contextlib.redirect_stdout(io.StringIO()):
        return infer.infer(checkpoint, input, output, device="cpu", progress=False, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained["out"] / "best_model.pth"


@pytest.fixture(scope="module")
def ct(processed) -> np.ndarray:
    """The test slice with the most lesion, as 8-bit grey values (64, 64)."""
    rows = slice_rows(processed, "test")
    lesion = np.load(processed / "lesion_masks.npy")
    row = max(rows, key=lambda r: int((lesion[r] > 0).sum()))
    return (np.load(processed / "images.npy")[row] * 255).round().astype(np.uint8)


def save_slice(ct: np.ndarray, path, mode: str, size: tuple[int, int]):
    """Write the CT slice resized to ``size`` (W, H) in PIL ``mode``; check the file really has that mode."""
    img = Image.fromarray(ct).resize(size, Image.BILINEAR)
    if mode == "I;16":  # 12-bit CT values in a 16-bit PNG
        img = Image.fromarray((np.asarray(img).astype(np.uint16) * 16 + 7))
    elif mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode != "L":
        img = img.convert(mode)
    img.save(path)
    with Image.open(path) as back:
        if path.suffix == ".png":  # JPEG stores L or RGB only
            assert back.mode == mode, back.mode
        assert back.size == size
    return path


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img)


# ----------------------------------------------------------------------------- one slice
@pytest.mark.parametrize("mode,size,suffix", [
    ("L", (64, 64), ".png"),
    ("LA", (100, 80), ".png"),  # 16-bit slices are refused by a window checkpoint (test_safe_infer)
    ("RGB", (130, 97), ".png"),
    ("RGBA", (50, 70), ".png"),
    ("P", (64, 48), ".png"),
    ("RGB", (90, 77), ".jpg"),
    ("L", (257, 31), ".jpg"),
])
def test_one_slice_of_any_size_and_mode_gives_a_mask_at_its_size(checkpoint, ct, tmp_path, mode, size, suffix):
    src = save_slice(ct, tmp_path / f"slice{suffix}", mode, size)
    target = tmp_path / "out" / "mask.png"
    assert run_infer(checkpoint, src, target) == [target]
    mask = read_png(target)
    assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    overlay = tmp_path / "out" / "mask_overlay.png"
    with Image.open(overlay) as img:
        assert img.mode == "RGB" and img.size == size


def test_one_slice_default_and_folder_outputs(checkpoint, ct, tmp_path, monkeypatch):
    src = save_slice(ct, tmp_path / "scan 7.png", "L", (64, 64))
    monkeypatch.chdir(tmp_path)
    run_infer(checkpoint, src)  # documented default: prediction_mask.png (+ _overlay.png) here
    assert (tmp_path / "prediction_mask.png").is_file() and (tmp_path / "prediction_mask_overlay.png").is_file()
    written = run_infer(checkpoint, src, tmp_path / "masks")  # an output without suffix is a folder
    assert written == [tmp_path / "masks" / "scan 7.png"]
    assert (tmp_path / "masks" / "scan 7_overlay.png").is_file()


def test_mask_equals_the_direct_prediction_on_the_training_preprocessing(checkpoint, ct, tmp_path):
    """Stored-output check: infer.py = load_image_slice (training's preprocessing) + predict + resize back."""
    src = save_slice(ct, tmp_path / "slice.png", "RGB", (100, 80))
    ckpt = load_checkpoint(checkpoint)
    model = inference_model(model_from_checkpoint(ckpt), CPU)
    x, shape = load_image_slice(src, ckpt["preprocessing"])
    assert x.shape == (64, 64) and shape == (80, 100)
    probs = predict(model, x[None, None], ckpt["task"], CPU, amp_dtype(CPU, "auto"))["lesion"].float()
    full = resize_images(probs, shape)[0]
    # a threshold at the median puts about half the pixels on each side, whatever the model learned
    threshold = float(full.median())
    expected = ((full > threshold).numpy() * 255).astype(np.uint8)
    assert 0 < (expected > 0).mean() < 1

    run_infer(checkpoint, src, tmp_path / "mask.png", threshold=threshold)
    np.testing.assert_array_equal(read_png(tmp_path / "mask.png"), expected)


# ----------------------------------------------------------------------------- a folder of slices
def test_folder_of_slices_gives_masks_named_like_the_inputs(checkpoint, ct, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    sizes = {"18.jpg": ("RGB", (80, 60)), "7.png": ("L", (64, 64)), "a16.png": ("P", (50, 40))}
    for name, (mode, size) in sizes.items():
        save_slice(ct, folder / name, mode, size)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    written = run_infer(checkpoint, folder, out)
    assert sorted(p.name for p in written) == ["18.png", "7.png", "a16.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["18.png", "7.png", "a16.png"]
    for name, (_, size) in sizes.items():
        stem = name.rsplit(".", 1)[0]
        mask = read_png(out / f"{stem}.png")
        assert mask.shape == (size[1], size[0]) and set(np.unique(mask)) <= {0, 255}
        with Image.open(out / "overlays" / f"{stem}.png") as ov:
            assert ov.mode == "RGB" and ov.size == size


def test_slices_sharing_a_name_are_refused_before_anything_is_written(checkpoint, ct, tmp_path):
    # 18.jpg and 18.png would both become masks/18.png: refuse instead of letting one overwrite the other
    folder = tmp_path / "slices"
    folder.mkdir()
    save_slice(ct, folder / "18.jpg", "RGB", (80, 60))
    save_slice(ct, folder / "18.png", "L", (64, 64))
    with pytest.raises(InputError, match=r"18\.jpg, 18\.png"):
        run_infer(checkpoint, folder, tmp_path / "masks")
    assert not (tmp_path / "masks" / "18.png").exists()


# ----------------------------------------------------------------------------- NIfTI volumes
def test_nifti_volume_gives_a_mask_with_its_shape_and_affine(checkpoint, phantoms, processed, tmp_path):
    case = json.loads((processed / "splits.json").read_text())["test"][0]
    src = phantoms / "images" / f"{case}.nii.gz"
    written = run_infer(checkpoint, src, tmp_path / "out")
    # a lesion-only checkpoint: the lungs come from the scan's HU (utils/lungs.py)
    assert sorted(written) == [tmp_path / "out" / f"{case}_{name}.nii.gz" for name in ("lesion", "lung")]
    ref, mask = nib.load(src), nib.load(written[0])
    assert nib.load(written[1]).shape == ref.shape
    assert mask.shape == ref.shape
    np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(ref.affine)
    assert mask.get_data_dtype() == np.uint8
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}


def test_nifti_volume_with_a_trailing_singleton_axis_keeps_its_shape(checkpoint, phantoms, tmp_path):
    # (X, Y, Z, 1) files are accepted as volumes; the mask must still have "exactly the input's shape"
    ref = nib.load(phantoms / "images" / "phantom_000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj)[..., None], ref.affine), tmp_path / "scan.nii.gz")
    paths = run_infer(checkpoint, tmp_path / "scan.nii.gz", tmp_path / "out")
    assert len(paths) == 2 and all(nib.load(path).shape == (*ref.shape, 1) for path in paths)


def test_nifti_masks_follow_the_voxel_order_of_the_file(checkpoint, phantoms, processed, tmp_path):
    """The same anatomy stored transposed or flipped gives the same mask, transposed or flipped alike."""
    case = json.loads((processed / "splits.json").read_text())["test"][0]
    ref = nib.load(phantoms / "images" / f"{case}.nii.gz")
    data = np.asarray(ref.dataobj)[:, 8:56, :]  # non-square in-plane: 64 x 48 x 8
    affine = ref.affine.copy()
    affine[:3, 3] += affine[:3, 1] * 8
    volumes = {"plain": (data, affine)}
    perm = (2, 0, 1)  # voxel axes stored as (z, x, y)
    volumes["transposed"] = (data.transpose(perm), affine[:, [*perm, 3]])
    flipped = affine.copy()
    flipped[:3, 1] *= -1
    flipped[:3, 3] += affine[:3, 1] * (data.shape[1] - 1)
    volumes["flipped"] = (data[:, ::-1, :].copy(), flipped)
    # a threshold at the median probability makes the masks about half foreground, whatever was learned
    predictor = Predictor(checkpoint, "cpu", "off")
    probs = predictor.probs(prepare_slices(to_axial_slices(data.astype(np.float32), affine), predictor.prep))
    threshold = float(probs["lesion"].median())
    masks = {}
    for name, (arr, aff) in volumes.items():
        img = nib.Nifti1Image(arr, aff)
        nib.save(img, tmp_path / f"{name}.nii.gz")
        path = tmp_path / "out" / f"{name}_lesion.nii.gz"
        assert path in run_infer(checkpoint, tmp_path / f"{name}.nii.gz", tmp_path / "out", amp="off",
                                 threshold=threshold)
        out = nib.load(path)
        assert out.shape == arr.shape and np.allclose(out.affine, aff, atol=1e-5), name
        masks[name] = np.asarray(out.dataobj)
    assert masks["plain"].any() and not masks["plain"].all()
    np.testing.assert_array_equal(masks["transposed"], masks["plain"].transpose(perm))
    np.testing.assert_array_equal(masks["flipped"], masks["plain"][:, ::-1, :])


def test_save_probs_writes_a_volumes_probability_map_in_its_voxel_order(checkpoint, phantoms, tmp_path):
    """--save-probs on a volume: PROB/<case>_lesion.nii.gz, the probabilities the mask was thresholded from,
    8-bit, in the file's own (here transposed) voxel order and affine; never in the masks' own folder."""
    ref = nib.load(phantoms / "images" / "phantom_000.nii.gz")
    perm = (2, 0, 1)  # voxel axes stored as (z, x, y)
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj).transpose(perm), ref.affine[:, [*perm, 3]]), tmp_path / "s.nii.gz")
    with pytest.raises(InputError, match="--save-probs"):  # named like the masks: it would overwrite them
        run_infer(checkpoint, tmp_path / "s.nii.gz", tmp_path / "out", save_probs=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "prob").mkdir()
    (tmp_path / "prob" / "s_lesion.nii.gz").write_bytes(b"not ours")
    with pytest.raises(InputError, match="did not write it"):
        run_infer(checkpoint, tmp_path / "s.nii.gz", tmp_path / "out", save_probs=tmp_path / "prob")
    (tmp_path / "prob" / "s_lesion.nii.gz").unlink()

    predictor = Predictor(checkpoint, "cpu", "off")
    volume, _, probs = predictor.volume_probs(tmp_path / "s.nii.gz")
    threshold = float(probs["lesion"].median())  # about half lesion, whatever was learned
    run_infer(checkpoint, tmp_path / "s.nii.gz", tmp_path / "out", amp="off", threshold=threshold,
              save_probs=tmp_path / "prob")
    img, mask = nib.load(tmp_path / "prob" / "s_lesion.nii.gz"), nib.load(tmp_path / "out" / "s_lesion.nii.gz")
    assert img.shape == mask.shape and np.allclose(img.affine, mask.affine)
    assert img.get_data_dtype() == np.uint8  # 8 bits, shown as 0..1 by the header's slope
    prob = img.get_fdata()
    assert prob.min() >= 0 and prob.max() <= 1 + 1e-6
    np.testing.assert_allclose(prob, volume.to_file_order(probs["lesion"].numpy()), atol=0.5 / 255 + 1e-6)
    clear = np.abs(prob - threshold) > 1 / 255  # the mask is these maps thresholded, up to the 8-bit rounding
    mask = np.asarray(mask.dataobj)
    assert 0 < mask.sum() < mask.size and clear.mean() > 0.9
    np.testing.assert_array_equal(mask[clear], (prob > threshold)[clear])
    manifest = json.loads((tmp_path / "out" / "infer_manifest.json").read_text())
    assert str(tmp_path / "prob" / "s_lesion.nii.gz") in manifest["cases"]["s.nii.gz"]["outputs"]
    before = (tmp_path / "prob" / "s_lesion.nii.gz").stat().st_mtime_ns
    assert "skipping 1 volume" in printed(checkpoint, tmp_path / "s.nii.gz", tmp_path / "out", amp="off",
                                          threshold=threshold, save_probs=tmp_path / "prob")
    assert (tmp_path / "prob" / "s_lesion.nii.gz").stat().st_mtime_ns == before


def printed(*args, **kwargs) -> str:
    """What infer.infer printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        infer.infer(*args, device="cpu", progress=False, **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------- bad input
def test_missing_checkpoint_is_one_clear_line(ct, tmp_path):
    src = save_slice(ct, tmp_path / "slice.png", "L", (64, 64))
    proc = run_script("infer.py", "--checkpoint", str(tmp_path / "missing.pth"), "--input", str(src),
                      "--output", str(tmp_path / "mask.png"), "--device", "cpu")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.pth" in lines[0] and "not found" in lines[0], proc.stderr
    assert not (tmp_path / "mask.png").exists()


def test_corrupt_image_is_one_clear_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG this is not really an image" * 8)
    proc = run_script("infer.py", "--checkpoint", str(checkpoint), "--input", str(bad),
                      "--output", str(tmp_path / "mask.png"), "--device", "cpu")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.png" in lines[0] and "not a readable image" in lines[0], proc.stderr
    assert not (tmp_path / "mask.png").exists()


def test_truncated_image_in_a_folder_names_the_file(checkpoint, ct, tmp_path, capsys):
    folder = tmp_path / "slices"
    folder.mkdir()
    save_slice(ct, folder / "1.png", "L", (64, 64))
    data = save_slice(ct, folder / "2.png", "L", (64, 64)).read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer.main, infer.get_args_parser(), ["--checkpoint", str(checkpoint), "--input", str(folder),
                                                      "--output", str(tmp_path / "out"), "--device", "cpu",
                                                      "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.png" in err[0], err


# ----------------------------------------------------------------------------- ensembles and probability maps
def _perturbed_copy(checkpoint, path, scale=0.05):
    from utils.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    gen = torch.Generator().manual_seed(1)
    ckpt["model"] = {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, path)
    return path


def test_several_checkpoints_average_their_probabilities(checkpoint, ct, tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    save_slice(ct, folder / "18.jpg", "L", (70, 50))
    other = _perturbed_copy(checkpoint, tmp_path / "other.pth")
    maps = {}
    for name, ckpts in (("a", [checkpoint]), ("b", [other]), ("ab", [checkpoint, other])):
        written = run_infer(ckpts, folder, tmp_path / name, amp="off", save_probs=tmp_path / f"p_{name}")
        assert written == [tmp_path / name / "18.png"]
        maps[name] = read_png(tmp_path / f"p_{name}" / "18.png").astype(float)
        assert maps[name].shape == (50, 70)  # probability maps at the input's size, named like the mask
    assert not np.array_equal(maps["a"], maps["b"])  # the perturbed model predicts differently
    # the ensemble's 8-bit map is the mean of the two (each rounded to 1/255 once)
    assert np.abs(maps["ab"] - (maps["a"] + maps["b"]) / 2).max() <= 1.0


def test_checkpoints_that_disagree_are_not_averaged(checkpoint, tmp_path, processed):
    from utils.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt["preprocessing"] = {**ckpt["preprocessing"], "size": 128}
    save_checkpoint(ckpt, tmp_path / "bigger.pth")
    with pytest.raises(InputError, match="only checkpoints that agree can be averaged"):
        Predictor([checkpoint, tmp_path / "bigger.pth"], "cpu")


# ----------------------------------------------------------------------------- flip test-time augmentation
def test_flip_tta_is_the_mean_of_the_four_flipped_predictions(checkpoint, processed):
    model = inference_model(model_from_checkpoint(load_checkpoint(checkpoint)), CPU)
    images = torch.from_numpy(np.load(processed / "images.npy")[:2])[:, None]
    plain = predict(model, images, "lesion", CPU)["lesion"]
    by_hand = sum(predict(model, images.flip(d), "lesion", CPU)["lesion"].flip(d) if d else plain
                  for d in [(), (-1,), (-2,), (-2, -1)]) / 4
    tta = predict(model, images, "lesion", CPU, tta=True)["lesion"]
    assert torch.allclose(tta, by_hand, atol=1e-6)
    assert not torch.allclose(tta, plain, atol=1e-4)  # the model is not exactly flip-symmetric


def test_tta_default_comes_from_the_checkpoint_and_the_flag_overrides_it(checkpoint, ct, tmp_path):
    from utils.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    assert ckpt["inference"] == {"tta": False}
    save_checkpoint({**ckpt, "inference": {"tta": True}}, tmp_path / "tta.pth")
    assert Predictor(tmp_path / "tta.pth", "cpu").tta is True
    assert Predictor(tmp_path / "tta.pth", "cpu", tta=False).tta is False
    assert Predictor(checkpoint, "cpu").tta is False
    save_slice(ct, tmp_path / "18.png", "L", (64, 64))
    maps = {}
    for name, ckpts, tta in (("ckpt", tmp_path / "tta.pth", None), ("flag", checkpoint, True), ("off", checkpoint, None)):
        run_infer(ckpts, tmp_path / "18.png", tmp_path / f"{name}.png", amp="off", tta=tta,
                  save_probs=tmp_path / f"p_{name}")
        maps[name] = read_png(tmp_path / f"p_{name}" / f"{name}.png")
    assert np.array_equal(maps["ckpt"], maps["flag"]) and not np.array_equal(maps["ckpt"], maps["off"])
