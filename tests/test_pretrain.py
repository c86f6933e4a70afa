"""Pretraining on slices without masks (pretrain.py, engine/pretraining.py; issue 17): the Models Genesis
corruptions, the restoration step, and pretrain.py end to end into train.py --backbone-weights (U-Net and
DeepLabV3)."""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain
import train
from base import InputError
from engine.pretraining import RestorationPairs, corrupt, paint, remap_intensity, shuffle_pixels
from models import DeepLabV3, UNet, load_backbone_weights
from utils.checkpoint import safe_load

SIDE = 32


def _images(n: int = 4, side: int = 64, seed: int = 0) -> torch.Tensor:
    """Slices with every pixel distinct from its neighbours (a ramp plus noise), in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, side)
    return (0.8 * (ramp[:, None] + ramp[None, :]) / 2 + 0.1 * torch.rand(n, 1, side, side, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------- the corruptions
def test_pixel_shuffling_moves_pixels_only_within_their_window():
    images = _images()
    shuffled = shuffle_pixels(images, torch.Generator().manual_seed(0), p=1.0)
    assert not torch.equal(shuffled, images)
    # every window side divides 16, so each 16x16 block keeps exactly its own gray levels
    blocks = lambda t: t.unfold(2, 16, 16).unfold(3, 16, 16).reshape(4, 16, 256)  # noqa: E731
    assert torch.equal(blocks(shuffled).sort(-1).values, blocks(images).sort(-1).values)
    assert torch.equal(shuffle_pixels(images, torch.Generator().manual_seed(0), p=0.0), images)


def test_intensity_curves_are_monotone_maps_into_the_unit_range():
    levels = torch.linspace(0, 1, 101).view(1, 1, 1, 101).repeat(16, 1, 1, 1)
    mapped = remap_intensity(levels, torch.Generator().manual_seed(1), p=1.0)[:, 0, 0]
    assert 0 <= mapped.min() and mapped.max() <= 1
    steps = mapped.diff(dim=1)
    rising, falling = (steps >= -1e-6).all(1), (steps <= 1e-6).all(1)
    assert bool((rising | falling).all()), "each slice's curve is monotone"
    assert bool(rising.any()) and bool(falling.any()), "some curves are reversed, some not"
    assert not torch.allclose(mapped, levels[:, 0, 0], atol=0.02), "the curves are not the identity"
    assert torch.equal(remap_intensity(levels, torch.Generator(), p=0.0), levels)


def test_in_painting_replaces_boxes_and_out_painting_keeps_only_boxes():
    images = torch.full((6, 1, 70, 70), 0.5)  # noise never equals 0.5 exactly
    inpainted = paint(images, torch.Generator().manual_seed(0), p=1.0, outpaint_share=0.0)
    kept = (inpainted == images).float().mean((1, 2, 3))
    assert bool(((kept > 0.3) & (kept < 1)).all()), f"in-painting replaces part of each slice: {kept}"
    outpainted = paint(images, torch.Generator().manual_seed(0), p=1.0, outpaint_share=1.0)
    kept = (outpainted == images).float().mean((1, 2, 3))
    assert bool(((kept >= (3 / 7) ** 2 * 0.9) & (kept < 0.8)).all()), f"out-painting keeps boxes only: {kept}"
    assert torch.equal(paint(images, torch.Generator(), p=0.0), images)


def test_corruption_is_in_range_and_reproducible_from_the_seed():
    images = _images()
    a = corrupt(images, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, corrupt(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, corrupt(images, torch.Generator().manual_seed(4)))


def test_restoration_pairs_depend_on_seed_epoch_and_index_only():
    slices = list(_images(3))
    pairs = RestorationPairs(slices, seed=1)
    first = [pairs[i] for i in range(3)]
    for i, (image, corrupted) in enumerate(first):
        flips = [slices[i], slices[i].flip(-1), slices[i].flip(-2), slices[i].flip(-1).flip(-2)]
        assert any(torch.equal(image, f) for f in flips), "the original is the slice, maybe flipped"
        assert image.shape == corrupted.shape == (1, 64, 64) and not torch.equal(image, corrupted)
    again = [pairs[i] for i in (2, 0, 1)]  # any order, as the loader's workers ask
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again, [first[2], first[0], first[1]]))
    pairs.epoch = 1
    assert not torch.equal(pairs[0][1], first[0][1]), "another epoch, other corruptions"
    assert not torch.equal(RestorationPairs(slices, seed=2)[0][1], first[0][1])


def test_the_restoration_step_learns():
    torch.manual_seed(0)
    model = DeepLabV3(in_channels=1, num_classes=1)
    images = _images(4, SIDE)
    corrupted = corrupt(images, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, restored = pretrain.restoration_step(model, images, corrupted, torch.device("cpu"), None,
                                                   torch.contiguous_format)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert restored.shape == images.shape
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- pretrain.py end to end
@pytest.fixture
def folders(tmp_path, make_pair_folder):
    """(labelled pair folder, unlabelled folder holding 6 slices of its own and, nested, the labelled images)."""
    labelled = tmp_path / "labelled"
    pairs = make_pair_folder(labelled / "train_images", labelled / "train_masks", n=4, size=(40, 40))
    unlabeled = tmp_path / "unlabeled"
    rng = np.random.default_rng(0)
    for i in range(6):
        path = unlabeled / "series" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48)).astype(np.uint8)).save(path)
    (unlabeled / "labelled_copy").mkdir()
    for image, _, _ in pairs:  # links to the labelled images: never read as unlabelled
        (unlabeled / "labelled_copy" / image.name).symlink_to(image)
    return labelled, unlabeled


def _pretrain(labelled, unlabeled, out, *extra):
    argv = ["--data", str(labelled), "--unlabeled", str(unlabeled), "--out", str(out), "--size", str(SIDE),
            "--epochs", "2", "--batch-size", "2", "--device", "cpu", "--no-progress", *extra]
    return pretrain.main(pretrain.get_args_parser().parse_args(argv))


def test_pretrain_writes_an_encoder_that_train_py_starts_from(folders, tmp_path, capsys):
    labelled, unlabeled = folders
    out = tmp_path / "encoder"
    history = _pretrain(labelled, unlabeled, out, "--model", "deeplabv3")
    assert [row["epoch"] for row in history] == [1, 2]
    ckpt = safe_load(out / "encoder.pth")
    state, record = ckpt["model"], ckpt["pretraining"]
    assert state and all(key.startswith("backbone.") for key in state)
    assert record["epochs"] == 2 and record["slices"] == 6, "the labelled images in the folder are left out"
    assert record["preprocessing"]["size"] == SIDE
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["restoration_mse"]) for r in rows] == pytest.approx([h["restoration_mse"] for h in history])
    figure = np.asarray(Image.open(out / "restorations.png"))
    assert figure.shape == (3 * SIDE, 4 * SIDE) and figure.dtype == np.uint8

    fresh = DeepLabV3(in_channels=1, num_classes=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing left over
        missing, unexpected = load_backbone_weights(fresh, ckpt)
    assert missing == [] and unexpected == []
    assert torch.equal(fresh.backbone.conv1.weight, state["backbone.conv1.weight"])

    run = tmp_path / "run"
    argv = ["--data", str(labelled), "--out", str(run), "--model", "deeplabv3", "--size", str(SIDE), "--epochs", "1",
            "--batch-size", "2", "--device", "cpu", "--no-progress", "--backbone-weights", str(out / "encoder.pth")]
    result = train.main(train.get_args_parser().parse_args(argv))
    assert len(result["history"]) == 1
    assert safe_load(run / "last.pth")["args"]["backbone_weights"] == str(out / "encoder.pth")


def test_reuse_keeps_only_a_finished_pretraining_of_the_same_data_and_settings(folders, tmp_path, capsys):
    labelled, unlabeled = folders
    out = tmp_path / "pretrained"
    history = _pretrain(labelled, unlabeled, out, "--width", "4")
    encoder = out / "encoder.pth"
    kept = encoder.read_bytes()
    assert _pretrain(labelled, unlabeled, out, "--width", "4", "--reuse") == history
    assert "reusing" in capsys.readouterr().out and encoder.read_bytes() == kept

    with pytest.raises(InputError, match=r"exists and was pretrained with --epochs 2, not 3; give --overwrite"):
        _pretrain(labelled, unlabeled, out, "--width", "4", "--epochs", "3", "--reuse")
    (unlabeled / "series" / "5.png").rename(tmp_path / "moved.png")
    with pytest.raises(InputError, match=r"was pretrained on other unlabelled slices \(6, not 5\)"):
        _pretrain(labelled, unlabeled, out, "--width", "4", "--reuse")
    (tmp_path / "moved.png").rename(unlabeled / "series" / "5.png")
    ckpt = safe_load(encoder)
    ckpt["pretraining"]["epochs"] = 1  # as a run stopped after its first epoch leaves it
    torch.save(ckpt, encoder)
    with pytest.raises(InputError, match=r"holds 1 of its 2 epochs \(a run stopped early\)"):
        _pretrain(labelled, unlabeled, out, "--width", "4", "--reuse")
    again = _pretrain(labelled, unlabeled, out, "--width", "4", "--reuse", "--overwrite")
    assert "pretraining U-Net width 4 by restoration" in capsys.readouterr().out, "pretrained anew"
    assert [row["restoration_mse"] for row in again] == [row["restoration_mse"] for row in history]
    assert safe_load(encoder)["pretraining"]["epochs"] == 2


def _weights(state: dict) -> dict:
    """The learned tensors of a state dict (no batch-norm statistics, which a training step moves at any lr)."""
    return {k: v for k, v in state.items() if v.is_floating_point() and "running" not in k}


def test_pretrained_unet_starts_train_py_with_all_but_its_output_convolution(folders, tmp_path, capsys):
    labelled, unlabeled = folders
    out = tmp_path / "pretrained"
    _pretrain(labelled, unlabeled, out, "--model", "unet", "--width", "4")
    assert "train.py --model unet --width 4 --backbone-weights" in capsys.readouterr().out
    ckpt = safe_load(out / "encoder.pth")
    assert set(ckpt["model"]) == {k for k in UNet(width=4).state_dict() if not k.startswith("head.")}
    assert ckpt["pretraining"]["model_config"] == {"name": "unet", "in_channels": 1, "num_classes": 1, "width": 4}

    def run(name, *extra):  # at learning rate 0 a run keeps the weights it starts from
        argv = ["--data", str(labelled), "--out", str(tmp_path / name), "--size", str(SIDE), "--epochs", "1",
                "--batch-size", "2", "--device", "cpu", "--no-progress", "--lr", "0", "--sched", "none",
                "--no-augment", *extra]
        train.main(train.get_args_parser().parse_args(argv))
        return _weights(safe_load(tmp_path / name / "last.pth")["model"])

    started = run("tuned", "--width", "4", "--backbone-weights", str(out / "encoder.pth"))
    assert f"starting from the pretrained weights of {out / 'encoder.pth'}" in capsys.readouterr().out
    record = safe_load(tmp_path / "tuned" / "last.pth")["pretrained"]
    assert record["path"] == str((out / "encoder.pth").resolve()) and len(record["sha256"]) == 16
    fresh = run("fresh", "--width", "4")
    assert safe_load(tmp_path / "fresh" / "last.pth")["pretrained"] is None
    pretrained = _weights(ckpt["model"])
    assert all(torch.equal(started[k], v) for k, v in pretrained.items())
    assert not any(torch.equal(fresh[k], v) for k, v in pretrained.items() if v.numel() > 1)
    assert torch.equal(started["head.weight"], fresh["head.weight"]), "the output convolution starts fresh"

    with pytest.raises(InputError, match=f"{out / 'encoder.pth'}: .*in the file.*--width"):
        run("wider", "--width", "8", "--backbone-weights", str(out / "encoder.pth"))
    _pretrain(labelled, unlabeled, tmp_path / "deeplab", "--model", "deeplabv3", "--epochs", "1")
    with pytest.raises(InputError, match="holds no U-Net encoder"):
        run("crossed", "--width", "4", "--backbone-weights", str(tmp_path / "deeplab" / "encoder.pth"))
    with pytest.raises(InputError, match="holds no ResNet-50 weights"):
        run("crossed2", "--model", "deeplabv3", "--backbone-weights", str(out / "encoder.pth"))
    assert not any((tmp_path / name).exists() for name in ("wider", "crossed", "crossed2")), "refused runs write nothing"


def test_pretrain_refuses_to_replace_an_encoder_unless_asked(folders, tmp_path):
    labelled, unlabeled = folders
    out = tmp_path / "encoder"
    out.mkdir()
    (out / "encoder.pth").write_bytes(b"someone else's")
    with pytest.raises(InputError, match="encoder.pth exists"):
        _pretrain(labelled, unlabeled, out)
    assert (out / "encoder.pth").read_bytes() == b"someone else's"
    _pretrain(labelled, unlabeled, out, "--overwrite", "--epochs", "1")
    assert safe_load(out / "encoder.pth")["pretraining"]["epochs"] == 1


@pytest.mark.parametrize("problem", ["no unlabeled", "unlabeled is data", "missing folder", "too few"])
def test_pretrain_bad_input_is_one_clear_error(folders, tmp_path, problem):
    labelled, unlabeled = folders
    argv = {"no unlabeled": ["--unlabeled", ""], "unlabeled is data": ["--unlabeled", str(labelled)],
            "missing folder": ["--unlabeled", str(tmp_path / "nowhere")],
            "too few": ["--batch-size", "7"]}[problem]
    message = {"no unlabeled": "--unlabeled DIR is needed", "unlabeled is data": "is --data itself",
               "missing folder": "nowhere: folder not found", "too few": "6 slices, fewer than one batch of 7"}[problem]
    with pytest.raises(InputError, match=message):
        _pretrain(labelled, unlabeled, tmp_path / "out", *argv)
    assert not (tmp_path / "out" / "encoder.pth").exists()
