"""Semi-supervised training (issue 17): unlabelled folders (data.dataset), their look (data.transforms,
data.look), the teacher and its losses (engine.semi), and train.py --unlabeled end to end: checkpoints,
validation never trained on, resume, the recipe script and torchrun."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import train
from base import InputError
from data.dataset import DeviceLoader, UnlabeledDataset, dataset_bytes, find_images
from data.look import LUNG_HU, SOFT_TISSUE_HU, _gray_modes, estimate_window
from data.synthetic import generate_dataset
from data.transforms import move_window, resize_images, to_axial_slices
from engine.semi import RAMP_SHARE, SemiSupervised, strong_view, unlabeled_loss
from engine.training import Hooks, validate
from tests.script_fixtures import REPO, export_pairs, processed, run_train, train_argv  # noqa: F401
from utils.checkpoint import load_checkpoint, safe_load

SIDE = 32  # --size of the training runs here
LOOK = (-1100.0, 250.0)  # the look window of the records built by hand below
LOOK_PREP = {"size": SIDE, "norm": "minmax", "window": None, "look": {"window": list(LOOK), "crop": "none"}}


def _gray(hu: np.ndarray, window) -> np.ndarray:
    """HU shown in ``window`` as 8-bit gray levels, as an exporter writes them."""
    low, high = window
    return np.round(255 * np.clip((hu - low) / (high - low), 0, 1)).astype(np.uint8)


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ----------------------------------------------------------------------------- 1: find_images
def test_find_images_searches_nested_folders_skips_masks_hidden_and_excluded_files(tmp_path):
    rng = np.random.default_rng(0)
    gray = lambda: rng.integers(0, 256, (20, 24)).astype(np.uint8)  # noqa: E731
    root = tmp_path / "unlabeled"
    wanted = [
        _save(root / "a" / "b" / "gray_1.png", Image.fromarray(gray())),
        _save(root / "a" / "rgb_2.jpg", Image.fromarray(np.stack([gray()] * 3, -1))),
        _save(root / "palette_3.png", Image.fromarray(gray()).convert("P")),
        _save(root / "alpha_4.png", Image.merge("LA", [Image.fromarray(gray()), Image.fromarray(gray())])),
        _save(root / "deep_5.png", Image.fromarray(rng.integers(0, 65536, (20, 24)).astype(np.uint16))),
    ]
    excluded = _save(root / "a" / "labelled_6.png", Image.fromarray(gray()))
    skipped = [_save(root / folder / "x_1.png", Image.fromarray(gray()))
               for folder in (".hidden", "GT", "masks", "case_masks", "a/lung_Masks")]
    skipped.append(_save(root / ".dot_1.png", Image.fromarray(gray())))
    (root / "notes.txt").write_text("not an image")

    assert [Image.open(p).mode for p in wanted] == ["L", "RGB", "P", "LA", "I;16"]
    found = find_images(root, exclude=[str(excluded)])
    assert set(found) == set(wanted) and found == sorted(found)

    data = UnlabeledDataset(root, LOOK_PREP, exclude=[excluded], log=lambda *a: None)
    assert len(data) == len(wanted)
    for i in range(len(data)):
        item = data[i]
        assert item.shape == (1, SIDE, SIDE) and item.dtype == torch.float32
        assert 0 <= float(item.min()) and float(item.max()) <= 1 and float(item.max() - item.min()) > 0.5


def test_a_16_bit_image_is_read_as_it_is_not_moved_from_a_window(tmp_path):
    from data.transforms import load_image_slice

    ramp = np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)  # a smooth 16-bit slice
    path = _save(tmp_path / "u" / "deep_1.png", Image.fromarray(ramp))
    data = UnlabeledDataset(tmp_path / "u", LOOK_PREP, log=lambda *a: None)
    assert data.shown_in == [None]  # no 8-bit look: read as the labelled pairs' 16-bit files are
    assert torch.allclose(data[0][0], load_image_slice(path, LOOK_PREP)[0])


def test_a_folder_with_no_image_left_is_refused_naming_it(tmp_path):
    root = tmp_path / "only_labelled"
    labelled = _save(root / "Imgs" / "1.png", Image.fromarray(np.zeros((8, 8), np.uint8)))
    _save(root / "GT" / "1.png", Image.fromarray(np.zeros((8, 8), np.uint8)))
    with pytest.raises(InputError, match=rf"{root}: no images .* other than the 1 labelled ones"):
        find_images(root, exclude=[labelled])
    with pytest.raises(InputError, match=f"{tmp_path / 'missing'}: folder not found"):
        find_images(tmp_path / "missing")


# ----------------------------------------------------------------------------- 2: move_window
def test_move_window_maps_gray_levels_by_hand():
    gray = np.array([0, 50, 150, 250, 255])
    # shown in 0..255 HU (gray == HU), moved to 100..200 HU: 150 HU is half way, the rest saturates
    assert move_window(gray, (0, 255), (100, 200)).tolist() == [0, 0, 127.5, 255, 255]
    # the same window: unchanged; the ends of a window land on 0 and 255
    assert move_window(gray, (-1000, 400), (-1000, 400)) == pytest.approx(gray)
    assert move_window(np.array([0, 255]), (-1000, 400), (-1000, 1800)).tolist() == [0, 127.5]
    assert move_window(np.zeros((2, 3)), (0, 1), (0, 2)).dtype == np.float32


def test_a_wide_window_export_moved_into_a_narrow_window_matches_the_narrow_export():
    hu = np.linspace(-1300, 900, 64 * 64).reshape(64, 64)
    wide, narrow = (-1400.0, 1000.0), (-1000.0, 200.0)
    moved = move_window(_gray(hu, wide), wide, narrow)
    direct = _gray(hu, narrow).astype(np.float32)
    inside = (hu > narrow[0]) & (hu < narrow[1])
    assert np.abs(moved - direct)[inside].max() <= 2
    assert (moved[hu < narrow[0] - 20] == 0).all() and (moved[hu > narrow[1] + 20] == 255).all()
    assert np.abs(_gray(hu, wide) - direct)[inside].max() > 20  # not moving at all would be far off


# ----------------------------------------------------------------------------- 3: the two modes
def test_a_wide_window_with_soft_tissue_higher_than_lung_below_gray_128_gives_its_window():
    # the old rule took the highest peak below gray 128 as the lung: here that is soft tissue
    rng = np.random.default_rng(1)
    hu = np.concatenate([rng.normal(LUNG_HU, 30, 4000), rng.normal(SOFT_TISSUE_HU, 20, 9000),
                         rng.uniform(-1000, 1500, 2000)])
    window = (-1400.0, 1600.0)
    hist = np.bincount(_gray(hu, window), minlength=256)
    dark, bright = _gray_modes(hist.astype(np.float64))
    lung_gray, soft_gray = 255 * (LUNG_HU + 1400) / 3000, 255 * (SOFT_TISSUE_HU + 1400) / 3000  # 46.8, 122.4
    assert bright < 128 and hist[int(soft_gray)] > hist[int(lung_gray)]  # the case of the fix
    assert abs(dark - lung_gray) <= 2 and abs(bright - soft_gray) <= 2
    low, high = estimate_window(hist)
    assert abs(low - window[0]) <= 60 and abs(high - window[1]) <= 100, (low, high)


# ----------------------------------------------------------------------------- 4: series in the look
@pytest.fixture(scope="module")
def phantom_hu(tmp_path_factory) -> np.ndarray:
    """HU slices (Z, 64, 64) of one data.synthetic phantom."""
    root = tmp_path_factory.mktemp("phantom")
    generate_dataset(root, patients=1, seed=3, shape=(64, 64, 6))
    image = sorted((root / "images").glob("*.nii.gz"))[0]
    img = nib.load(image)
    return to_axial_slices(np.asarray(img.dataobj, np.float32), img.affine)


def test_each_series_is_moved_into_the_look_of_the_labelled_slices(phantom_hu, tmp_path):
    """Labelled slices shown in LOOK, and two unlabelled series of the same slices shown in wider windows:
    every window is estimated alike (data.look), so each series, moved into the labelled slices' estimated
    window, reads as the labelled slices do."""
    labelled = _gray(phantom_hu, LOOK)
    look = estimate_window(np.bincount(labelled.ravel(), minlength=256))
    windows = {"wide": (-1400.0, 900.0), "soft": (-1200.0, 1400.0)}  # both hold LOOK's range unclipped
    root = tmp_path / "unlabeled"
    for name, window in windows.items():
        for z, hu in enumerate(phantom_hu):
            _save(root / f"{name}_{z}.png", Image.fromarray(_gray(hu, window)))
    prep = {"size": 64, "norm": "window", "window": list(look)}  # a record with no min-max after the move
    data = UnlabeledDataset(root, prep, log=lambda *a: None)
    n = len(phantom_hu)
    assert len(data) == 2 * n and [data.case_of(i) for i in (0, n)] == ["soft_0.png", "wide_0.png"]
    soft_window, wide_window = data.shown_in[0], data.shown_in[n]  # one per series, ordered as the truth
    assert data.shown_in == [soft_window] * n + [wide_window] * n
    assert wide_window[0] < soft_window[0] and wide_window[1] < soft_window[1]
    truth = resize_images(labelled / np.float32(255), 64)
    for z in range(n):
        soft, wide = data[z][0], data[n + z][0]
        assert float((soft - truth[z]).abs().mean()) < 0.02 and float((wide - truth[z]).abs().mean()) < 0.02
        unmoved = torch.from_numpy(_gray(phantom_hu[z], windows["wide"]) / np.float32(255))
        assert float((unmoved - truth[z]).abs().mean()) > 0.05  # the test can tell


def test_a_preprocessed_folder_is_read_whole_and_other_preprocessing_is_refused(processed, tmp_path):
    root = tmp_path / "volumes"
    root.mkdir()
    for name in ("images.npy", "meta.json"):  # no masks
        shutil.copy(processed / name, root / name)
    prep = json.loads((root / "meta.json").read_text())["preprocessing"]
    images = np.load(root / "images.npy")
    data = UnlabeledDataset(root, prep, log=lambda *a: None)
    assert len(data) == len(images) and data.files is None
    assert torch.equal(data[5], torch.from_numpy(images[5].astype(np.float32))[None])
    with pytest.raises(InputError, match=rf"{root}: preprocessed as .*'size': {prep['size']}.*'size': 32"):
        UnlabeledDataset(root, {**prep, "size": 32}, log=lambda *a: None)


# ----------------------------------------------------------------------------- 5: engine.semi
def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def test_mean_teacher_loss_is_zero_on_agreement_and_grows_with_disagreement():
    teacher = torch.full((2, 1, 4, 4), 0.5)
    assert float(unlabeled_loss(_logit(teacher), teacher, "mean-teacher", 0.95)) == pytest.approx(0, abs=1e-12)
    losses = [float(unlabeled_loss(_logit(torch.full_like(teacher, p)), teacher, "mean-teacher", 0.95))
              for p in (0.6, 0.8)]
    assert losses == pytest.approx([0.1 ** 2, 0.3 ** 2], rel=1e-4)
    probs = torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert float(unlabeled_loss(probs.log(), probs, "mean-teacher", 0.95)) == pytest.approx(0, abs=1e-12)
    # a uniform student: (0.7 - 1/3)^2 + (0.2 - 1/3)^2 + (0.1 - 1/3)^2
    expected = sum((p - 1 / 3) ** 2 for p in (0.7, 0.2, 0.1))
    assert float(unlabeled_loss(torch.zeros(2, 3, 4, 4), probs, "mean-teacher", 0.95)) == pytest.approx(expected)


def test_fixmatch_learns_only_from_pixels_the_teacher_is_sure_of():
    unsure = torch.full((2, 1, 4, 4), 0.6)
    assert float(unlabeled_loss(torch.zeros(2, 1, 4, 4), unsure, "fixmatch", 0.95)) == 0
    assert float(unlabeled_loss(torch.zeros(2, 1, 4, 4), unsure, "fixmatch", 0.55)) == pytest.approx(math.log(2))
    half = unsure.clone()
    half[:, :, :2] = 0.99  # sure of lesion on half the pixels
    half[0, :, :2] = 0.02  # ... and sure of background on a quarter of them
    assert float(unlabeled_loss(torch.zeros(2, 1, 4, 4), half, "fixmatch", 0.95)) == pytest.approx(math.log(2) / 2)
    student = torch.full((2, 1, 4, 4), 3.0)  # right where the teacher says lesion, wrong where it says background
    expected = (math.log1p(math.exp(-3)) + math.log1p(math.exp(3))) / 4
    assert float(unlabeled_loss(student, half, "fixmatch", 0.95)) == pytest.approx(expected)
    sure3, unsure3 = torch.tensor([0.97, 0.02, 0.01]), torch.tensor([0.5, 0.3, 0.2])
    probs = torch.stack([sure3, unsure3]).view(2, 3, 1, 1).expand(2, 3, 4, 4)
    assert float(unlabeled_loss(torch.zeros(2, 3, 4, 4), probs, "fixmatch", 0.95)) == pytest.approx(math.log(3) / 2)
    assert float(unlabeled_loss(torch.zeros(2, 3, 4, 4), probs, "fixmatch", 0.99)) == 0


def test_strong_view_moves_the_targets_with_the_pixels():
    """Slices alternate black and white, so whichever slice a pixel came from shows through the jitter
    (black <= 0.1 + noise, white >= 0.6 - noise); the second target channel names slice and position."""
    n, s = 4, 32
    images = torch.arange(n).remainder(2).float().view(n, 1, 1, 1).expand(n, 1, s, s).contiguous()
    where = torch.arange(n).view(n, 1, 1) * 10000 + torch.arange(s * s).view(1, s, s)
    targets = torch.stack([images[:, 0], where.float()], 1)
    boxes = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out, moved = strong_view(images, targets)
        assert out.shape == images.shape and moved.shape == targets.shape
        assert torch.equal(out > 0.35, moved[:, :1] > 0.5)  # target == f(image) everywhere
        pasted = moved[:, 1] != targets[:, 1]
        assert torch.equal(moved[:, 1][pasted], targets.roll(1, 0)[:, 1][pasted])  # the previous slice, same place
        for box in pasted:
            if box.any():  # a rectangle of 10..40% of the slice
                ys, xs = box.any(1).nonzero(), box.any(0).nonzero()
                h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
                assert int(box.sum()) == h * w and 0.08 <= h * w / s ** 2 <= 0.42
                boxes += 1
    assert boxes > 0


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2))


def test_the_teacher_follows_the_student_by_ema_and_copies_integer_buffers():
    student = _tiny_model()
    semi = SemiSupervised(student, "mean-teacher", 1.0, total_steps=100, ema_decay=0.99)
    before = {k: v.clone() for k, v in semi.teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student[1].num_batches_tracked.fill_(7)
    semi.update()  # step 1: decay min(0.99, 2 / 11)
    d = 2 / 11
    after, now = semi.teacher.state_dict(), student.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(after[name], d * before[name] + (1 - d) * now[name], atol=1e-6)
    assert int(after["1.num_batches_tracked"]) == 7 and semi.step == 1
    semi.step = 1000  # late: decay 0.99, (1 + 1001) / (10 + 1001) being higher
    old = after["0.weight"].clone()
    semi.update()
    assert torch.allclose(semi.teacher.state_dict()["0.weight"], 0.99 * old + 0.01 * now["0.weight"], atol=1e-6)
    assert not any(p.requires_grad for p in semi.teacher.parameters())


def test_ramp_goes_from_exp_minus_5_to_1_at_a_fifth_of_the_steps():
    semi = SemiSupervised(_tiny_model(), "fixmatch", 2.0, total_steps=100)
    expected = {0: math.exp(-5), 10: math.exp(-5 * 0.25), int(RAMP_SHARE * 100): 1.0, 50: 1.0, 100: 1.0}
    for step, value in expected.items():
        semi.step = step
        assert semi.ramp() == pytest.approx(value)


def test_semi_state_round_trips_and_bad_parameters_are_refused():
    semi = SemiSupervised(_tiny_model(), "mean-teacher", 1.0, total_steps=10)
    with torch.no_grad():
        for p in semi.student.parameters():
            p.mul_(3)
    for _ in range(3):
        semi.update()
    state = semi.state_dict()
    torch.manual_seed(5)
    other = SemiSupervised(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2)),
                           "mean-teacher", 1.0, total_steps=10)
    assert not torch.equal(other.teacher[0].weight, semi.teacher[0].weight)
    other.load_state_dict(state)
    assert other.step == 3
    assert all(torch.equal(a, b) for a, b in zip(other.teacher.state_dict().values(),
                                                  semi.teacher.state_dict().values()))
    for kwargs in ({"method": "pseudo"}, {"ema_decay": 1.0}, {"confidence": 0.3}, {"weight": -1.0}):
        with pytest.raises(ValueError):
            SemiSupervised(_tiny_model(), **{"method": "fixmatch", "weight": 1.0, "total_steps": 1, **kwargs})


# ----------------------------------------------------------------------------- 10: DeviceLoader, images only
class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1, 4, 6), float(i))


def test_device_loader_serves_image_only_batches_in_the_samplers_order():
    loader = DeviceLoader(_Images(), 2, [3, 1, 4, 0, 2], torch.device("cpu"), drop_last=True)
    batches = list(loader)
    assert len(loader) == 2 and all(isinstance(b, torch.Tensor) for b in batches)
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[3, 1], [4, 0]] and batches[0].shape == (2, 1, 4, 6)
    assert dataset_bytes(_Images()) == 5 * 4 * 24
    pairs = [(torch.zeros(1, 4, 6), torch.zeros(4, 6, dtype=torch.long))] * 5
    assert dataset_bytes(pairs) == 5 * (4 * 24 + 24)  # with masks: one byte per mask pixel more


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def semi_data(processed, tmp_path_factory) -> dict:
    """A pair folder (12 exported phantom slices, Imgs/ + GT/) and a folder of 16 other slices without
    masks, in a nested folder, as 8-bit PNGs named <case>_<z>.png."""
    root = tmp_path_factory.mktemp("semi")
    export_pairs(processed, None, root, "pairs/Imgs", "pairs/GT", n=12)
    images = np.load(processed / "images.npy")
    slices = json.loads((processed / "meta.json").read_text())["slices"]
    for row in range(0, len(images), 2):
        s = slices[row]
        _save(root / "unlabeled" / s["case"] / f"{s['case']}_{s['z']}.png",
              Image.fromarray((np.clip(images[row], 0, 1) * 255).round().astype(np.uint8)))
    return {"pairs": root / "pairs", "unlabeled": root / "unlabeled"}


def semi_argv(data: dict, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return train_argv(data["pairs"], out, "--size", str(SIDE), "--unlabeled", str(data["unlabeled"]),
                      "--unlabeled-batch-size", "2", "--seed", "0", "--deterministic", *extra, epochs=epochs)


class _Stop(Exception):
    pass


def _stop_at_epoch(n: int) -> Hooks:
    """Hooks whose validation stops the run when epoch ``n`` (1-based) would be scored."""
    calls = []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Stop()
        return validate(*args, **kwargs)
    return Hooks(validate=stop)


@pytest.fixture(scope="module")
def unbroken(semi_data, tmp_path_factory) -> Path:
    """A 2-epoch mean-teacher run (deterministic, CPU): its last.pth."""
    out = tmp_path_factory.mktemp("unbroken")
    run_train(semi_argv(semi_data, out, epochs=2))
    return out / "last.pth"


def test_a_mean_teacher_run_saves_teacher_student_and_its_record(unbroken, semi_data, tmp_path):
    import infer

    ckpt = load_checkpoint(unbroken)
    semi = ckpt["semi"]
    assert semi["method"] == "mean-teacher" and semi["batch_size"] == 2 and semi["ema_decay"] == 0.99
    assert semi["unlabeled"]["path"] == str(semi_data["unlabeled"].resolve()) and semi["unlabeled"]["count"] == 16
    n_train = ckpt["data"]["train"]
    steps_per_epoch = n_train // 4  # --batch-size 4, the last part batch dropped
    assert len(ckpt["history"]) == 2 and ckpt["semi_state"] == {"step": 2 * steps_per_epoch}, n_train
    assert set(ckpt["model"]) == set(ckpt["student"])
    differ = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.equal(v, ckpt["student"][k])]
    assert differ, "the teacher is a copy of the student"
    src = tmp_path / "in"
    for path in sorted((semi_data["pairs"] / "Imgs").iterdir())[:2]:
        _save(src / path.name, Image.open(path))
    written = infer.infer(str(unbroken), src, tmp_path / "pred", device="cpu", progress=False)
    assert len(written) == 2 and all(Path(p).is_file() for p in written)


def test_a_fixmatch_run_completes_and_records_its_method(semi_data, tmp_path):
    result = run_train(semi_argv(semi_data, tmp_path / "run", "--semi", "fixmatch", "--confidence", "0.6",
                                 "--ema-decay", "0"))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pth")
    assert ckpt["semi"]["method"] == "fixmatch" and ckpt["semi"]["confidence"] == 0.6
    assert ckpt["semi_state"]["step"] >= 1 and len(result["history"]) == 1
    assert math.isfinite(result["history"][0]["train_loss"])


# ----------------------------------------------------------------------------- 7: validation unseen
def test_unlabeled_folder_holding_the_labelled_pairs_never_reads_them(semi_data, tmp_path):
    outer = tmp_path / "everything"
    shutil.copytree(semi_data["pairs"], outer / "pairs")
    shutil.copytree(semi_data["unlabeled"], outer / "more")
    labelled = sorted((outer / "pairs").rglob("*.png"))
    seen = []
    real = train.UnlabeledDataset

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    train.UnlabeledDataset = spy
    try:
        run_train(train_argv(outer / "pairs", tmp_path / "run", "--size", str(SIDE), "--unlabeled", str(outer),
                             "--unlabeled-batch-size", "2"))
    finally:
        train.UnlabeledDataset = real
    files = {p.resolve() for p in seen[0].files}
    assert len(files) == 16 and not files & {p.resolve() for p in labelled}
    assert set(find_images(outer)) - set(seen[0].files)  # the labelled images were there to be found

    # masks in a folder that is not named like a mask folder are excluded too
    fake_pairs = [(outer / "more" / "phantom_000" / name, outer / "seg" / name) for name in ("a.png", "b.png")]
    for image, mask in fake_pairs:
        _save(mask, Image.open(next((outer / "more").rglob("*.png"))))
    labelled_set = SimpleNamespace(pairs=fake_pairs[:1])
    val_set = SimpleNamespace(pairs=fake_pairs[1:])
    args = train.get_args_parser().parse_args(["--data", str(outer / "pairs"), "--unlabeled", str(outer),
                                               "--batch-size", "2", "--no-progress", "--workers", "0"])
    dataset, loader, _ = train.make_unlabeled(args, labelled_set, val_set, LOOK_PREP, train.distributed.Context(),
                                              torch.device("cpu"), False, log=lambda *a: None)
    assert not {p.resolve() for p in dataset.files} & {m.resolve() for _, m in fake_pairs}
    assert len(next(iter(loader))) == 2


# ----------------------------------------------------------------------------- 8: resume
def test_a_resumed_semi_run_ends_with_the_same_teacher_and_student(unbroken, semi_data, tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(_Stop):
        train.main(train.get_args_parser().parse_args(semi_argv(semi_data, out, epochs=2)), _stop_at_epoch(2))
    assert load_checkpoint(out / "last.pth")["epoch"] == 0
    run_train(semi_argv(semi_data, out, "--resume", str(out / "last.pth"), epochs=2))
    a, b = load_checkpoint(unbroken), load_checkpoint(out / "last.pth")
    assert a["semi_state"] == b["semi_state"]
    for key in ("model", "student"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_resuming_a_semi_run_without_its_unlabelled_data_or_method_is_refused(unbroken, semi_data, tmp_path):
    last = str(unbroken)
    with pytest.raises(InputError, match=r"cannot resume from it, it was trained mean-teacher on 16 unlabelled "
                                         r"slices .*; asked for supervised"):
        run_train(train_argv(semi_data["pairs"], tmp_path / "a", "--size", str(SIDE), "--seed", "0",
                             "--resume", last, epochs=3))
    with pytest.raises(InputError, match=r"mean-teacher on 16 .*; asked for fixmatch on 16"):
        run_train(semi_argv(semi_data, tmp_path / "b", "--semi", "fixmatch", "--resume", last, epochs=3))


# ----------------------------------------------------------------------------- 9: the recipe
def _recipe(data: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "EPOCHS": "1", "PRETRAIN_EPOCHS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "scripts/covid_semiseg.sh", str(data["pairs"]), str(out), "--unlabeled",
                           str(data["unlabeled"]), "--size", str(SIDE), "--batch-size", "4", "--device", "cpu",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_recipe_script_pretrains_once_and_starts_every_fold_from_it(semi_data, tmp_path):
    out = tmp_path / "model"
    proc = _recipe(semi_data, out, "--width", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    encoder = out / "pretrained" / "encoder.pth"
    record = safe_load(encoder)["pretraining"]
    assert record["epochs"] == 1 and record["slices"] == 16 and record["model_config"]["width"] == 4
    assert proc.stdout.count("pretraining U-Net width 4 by restoration on 16 slices") == 1
    models = sorted(out.glob("fold*.pth"))
    assert [p.name for p in models] == [f"fold{i}.pth" for i in range(5)]
    for path in models:
        ckpt = load_checkpoint(path)
        assert ckpt["pretrained"]["sha256"] == _sha(encoder) and ckpt["args"]["backbone_weights"] == str(encoder)
        assert ckpt["args"]["unlabeled"] is None and "student" not in ckpt, "no in-training method on top"

    before = {p: p.read_bytes() for p in (encoder, out / "fold0.pth")}
    # a rerun (continued, so its finished folds are only scored): the finished pretraining is kept
    proc = _recipe(semi_data, out, "--width", "4", "--resume", str(out / "cv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"reusing {encoder}: 1 epochs of pretraining" in proc.stdout and "by restoration" not in proc.stdout
    assert encoder.read_bytes() == before[encoder]

    before[out / "fold0.pth"] = (out / "fold0.pth").read_bytes()
    proc = _recipe(semi_data, out, "--width", "8")  # another pretraining's settings: refused, nothing trained
    assert proc.returncode != 0
    assert f"{encoder} exists and was pretrained with --width 4, not 8" in proc.stderr
    assert f"remove {out / 'pretrained'} to pretrain anew" in proc.stderr
    assert all(path.read_bytes() == data for path, data in before.items())

    proc = _recipe(semi_data, tmp_path / "both", "--backbone-weights", str(encoder))
    assert proc.returncode == 2 and "give one" in proc.stderr and not (tmp_path / "both").exists()
    proc = _recipe(semi_data, tmp_path / "none", "--unlabeled")  # the folder forgotten: not a supervised run
    assert proc.returncode == 2 and "--unlabeled needs the folder" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_the_recipe_script_trains_semi_supervised_folds(semi_data, tmp_path):
    out = tmp_path / "model"
    proc = _recipe(semi_data, out, "--unlabeled-batch-size", "2", "--width", "4")  # train.py's in-training flag
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "pretrained").exists()
    models = sorted(out.glob("fold*.pth"))
    assert [p.name for p in models] == [f"fold{i}.pth" for i in range(5)]
    for path in models:
        ckpt = load_checkpoint(path)
        assert ckpt["semi"]["method"] == "mean-teacher" and ckpt["semi"]["unlabeled"]["count"] == 16
        assert "student" in ckpt


# ----------------------------------------------------------------------------- 11: torchrun
def test_two_processes_train_semi_supervised(semi_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    argv = train_argv(semi_data["pairs"], tmp_path / "two", "--size", str(SIDE), "--unlabeled",
                      str(semi_data["unlabeled"]), "--unlabeled-batch-size", "2", "--workers", "0", "--seed", "0",
                      batch_size=2)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Epoch 1/1") == 1 and "2 processes" in proc.stdout
    assert "semi-supervised (mean-teacher) with 16 unlabelled slices" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "two" / "last.pth")
    assert ckpt["semi"]["unlabeled"]["count"] == 16 and ckpt["semi_state"]["step"] >= 1 and "student" in ckpt


# ----------------------------------------------------------------------------- 12: a fixed teacher (--teacher)
def _sha(path: Path) -> str:
    """The file's sha256 as the semi record writes it (train.semi_record)."""
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fixed_teachers(semi_data, tmp_path_factory) -> dict:
    """Supervised 1-epoch runs on the pair folder (their last.pth): "a" and "b" (seeds 0 and 1) fit the
    self-training runs here; "ce" has 2 output channels (--loss ce_dice), "small" another --size."""
    root = tmp_path_factory.mktemp("teachers")
    runs = {"a": ("--seed", "0"), "b": ("--seed", "1"), "ce": ("--loss", "ce_dice"), "small": ("--size", "16")}
    for name, extra in runs.items():
        run_train(train_argv(semi_data["pairs"], root / name, "--size", str(SIDE), "--deterministic", *extra))
    return {name: root / name / "last.pth" for name in runs}


@pytest.fixture(scope="module")
def fixed_teacher_unbroken(semi_data, fixed_teachers, tmp_path_factory) -> Path:
    """A 2-epoch mean-teacher self-training run from teacher "a" (deterministic, CPU): its last.pth."""
    out = tmp_path_factory.mktemp("fixed_unbroken")
    run_train(semi_argv(semi_data, out, "--teacher", str(fixed_teachers["a"]), epochs=2))
    return out / "last.pth"


@pytest.mark.parametrize("method", ["mean-teacher", "fixmatch"])
def test_a_fixed_teacher_run_saves_the_student_and_names_its_teacher(method, semi_data, fixed_teachers,
                                                                     fixed_teacher_unbroken, tmp_path):
    teacher_file = fixed_teachers["a"]
    before_bytes, before = teacher_file.read_bytes(), load_checkpoint(teacher_file)["model"]
    if method == "mean-teacher":
        last = fixed_teacher_unbroken
    else:
        scored = []

        def spy(model, *args, **kwargs):  # validation scores the student (trainable), not the frozen teacher
            scored.append(any(p.requires_grad for p in model.parameters()))
            return validate(model, *args, **kwargs)
        argv = semi_argv(semi_data, tmp_path / "run", "--semi", "fixmatch", "--confidence", "0.6",
                         "--teacher", str(teacher_file), epochs=2)
        train.main(train.get_args_parser().parse_args(argv), Hooks(validate=spy))
        assert scored == [True, True]
        last = tmp_path / "run" / "last.pth"
    assert teacher_file.read_bytes() == before_bytes
    assert _same_weights(load_checkpoint(teacher_file)["model"], before)
    ckpt = load_checkpoint(last)
    steps_per_epoch = ckpt["data"]["train"] // 4  # --batch-size 4, the last part batch dropped
    assert "student" not in ckpt and ckpt["semi_state"] == {"step": 2 * steps_per_epoch}
    assert ckpt["semi"]["method"] == method
    assert ckpt["semi"]["teacher"] == {"path": str(teacher_file.resolve()), "sha256": _sha(teacher_file)}
    assert ckpt["model"].keys() == before.keys()
    assert any(not torch.equal(ckpt["model"][k], before[k]) for k in before if before[k].is_floating_point())
    assert len(ckpt["history"]) == 2 and all(math.isfinite(r["train_loss"]) for r in ckpt["history"])


def _constant(logit: float) -> torch.nn.Module:
    """A one-channel "model" whose logits are ``logit`` everywhere, whatever it is shown."""
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(logit)
    return conv


@pytest.mark.parametrize("method", ["mean-teacher", "fixmatch"])
def test_a_fixed_teacher_never_moves_and_its_maps_are_the_targets(method):
    student, teacher = _constant(1.0), _constant(20.0)
    weight = 5.0
    semi = SemiSupervised(student, method, weight, total_steps=10, ema_decay=0.5, confidence=0.95, teacher=teacher)
    assert semi.fixed and semi.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student.bias.add_(3.0)  # an EMA teacher would move towards this
    for _ in range(3):
        semi.update()
    assert semi.step == 3 and _same_weights(teacher.state_dict(), frozen)
    assert semi.state_dict() == {"step": 3}
    semi.load_state_dict({"step": 7})
    assert semi.step == 7 and _same_weights(teacher.state_dict(), frozen)
    with torch.no_grad():
        student.bias.fill_(1.0)

    semi.step = 10  # past the ramp-up: the full weight
    images, masks = torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    unlabeled = torch.rand(3, 1, 8, 8)
    no_sup = lambda outputs, m: outputs.sum() * 0  # noqa: E731  (only the unlabelled loss counts)
    s = torch.sigmoid(torch.tensor(1.0)).item()
    expected = {  # the student says sigmoid(1) everywhere; the teacher sure of lesion, or of background
        "mean-teacher": {20.0: (1 - s) ** 2, -20.0: s ** 2},
        "fixmatch": {20.0: math.log1p(math.exp(-1)), -20.0: math.log1p(math.exp(1))}}[method]
    for logit, value in expected.items():
        with torch.no_grad():
            teacher.bias.fill_(logit)
        loss = semi.loss(student, images, unlabeled, torch.device("cpu"), None, torch.contiguous_format,
                         no_sup, masks)
        assert float(loss.detach()) == pytest.approx(weight * value, rel=1e-5), logit
        loss.backward()
        assert student.bias.grad is not None and teacher.bias.grad is None
        student.zero_grad()
    # the student as its own teacher would have taught nothing (mean-teacher) or all-lesion (fixmatch)
    assert expected[20.0] != expected[-20.0]


def test_a_teacher_that_does_not_fit_the_run_is_refused_naming_its_file(semi_data, fixed_teachers, tmp_path):
    from data.labels import TASKS

    def refused(teacher, pattern, *extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        with pytest.raises(InputError, match=pattern):
            run_train(semi_argv(semi_data, out, "--teacher", str(teacher), *extra))
        assert not out.exists()  # refused before anything was written

    other_task = tmp_path / "other_task.pth"
    ckpt = load_checkpoint(fixed_teachers["a"])
    task = ckpt["task"]
    torch.save({**ckpt, "task": next(t for t in TASKS if t != task)}, other_task)
    refused(other_task, rf"{other_task}: a teacher for task '(?!{task}').* this run trains '{task}'")
    refused(fixed_teachers["ce"], rf"{fixed_teachers['ce']}: a teacher for task '{task}' with 2 output channel\(s\); "
                                  rf"this run trains '{task}' with 1")
    refused(fixed_teachers["small"], rf"{fixed_teachers['small']}: the teacher saw its slices as .*'size': 16.*"
                                     rf"this run as .*'size': {SIDE}")
    missing = tmp_path / "nowhere" / "last.pth"
    refused(missing, rf"{missing}: teacher checkpoint not found")
    refused(tmp_path / "fold{fold}" / "last.pth", r"'\{fold\}' names each fold's file; this run is no fold")
    out = tmp_path / "supervised"
    with pytest.raises(InputError, match=r"--teacher is for self-training: give --unlabeled DIR too"):
        run_train(train_argv(semi_data["pairs"], out, "--size", str(SIDE), "--teacher", str(fixed_teachers["a"])))
    assert not out.exists()


def test_each_fold_learns_from_its_own_fold_teacher(semi_data, tmp_path):
    teachers, students = tmp_path / "teachers", tmp_path / "students"
    run_train(train_argv(semi_data["pairs"], teachers, "--size", str(SIDE), "--folds", "2", "--seed", "0"))
    run_train(semi_argv(semi_data, students, "--folds", "2",
                        "--teacher", str(teachers / "fold{fold}" / "last.pth")))
    for i in range(2):
        teacher = teachers / f"fold{i}" / "last.pth"
        record = load_checkpoint(students / f"fold{i}" / "last.pth")["semi"]["teacher"]
        assert record == {"path": str(teacher.resolve()), "sha256": _sha(teacher)}
    assert _sha(teachers / "fold0" / "last.pth") != _sha(teachers / "fold1" / "last.pth")


def test_a_resumed_fixed_teacher_run_matches_the_unbroken_one(semi_data, fixed_teachers, fixed_teacher_unbroken,
                                                              tmp_path):
    teacher = tmp_path / "teacher.pth"  # the same bytes as the unbroken run's teacher, in a file replaced below
    shutil.copy(fixed_teachers["a"], teacher)
    out = tmp_path / "broken"
    argv = semi_argv(semi_data, out, "--teacher", str(teacher), epochs=2)
    with pytest.raises(_Stop):
        train.main(train.get_args_parser().parse_args(argv), _stop_at_epoch(2))
    assert load_checkpoint(out / "last.pth")["epoch"] == 0
    run_train(argv + ["--resume", str(out / "last.pth")])
    a, b = load_checkpoint(fixed_teacher_unbroken), load_checkpoint(out / "last.pth")
    assert a["semi_state"] == b["semi_state"] and "student" not in b
    assert _same_weights(a["model"], b["model"])

    shutil.copy(fixed_teachers["b"], teacher)  # another teacher under the same name
    last = str(out / "last.pth")
    with pytest.raises(InputError, match=rf"cannot resume from it, it was trained .*teacher {teacher} sha256 "
                                         rf"{b['semi']['teacher']['sha256']}\); asked for .*teacher {teacher} "
                                         rf"sha256 {_sha(fixed_teachers['b'])}\)"):
        run_train(semi_argv(semi_data, tmp_path / "again", "--teacher", str(teacher), "--resume", last, epochs=3))
    with pytest.raises(InputError, match=rf"cannot resume from it, .*teacher {teacher} sha256 .*; asked for "
                                         r"mean-teacher on 16 [^;]*\) \(pass"):
        run_train(semi_argv(semi_data, tmp_path / "ema", "--resume", last, epochs=3))  # without --teacher


def test_a_semi_checkpoint_from_before_the_teacher_record_still_resumes(unbroken, semi_data, tmp_path):
    ckpt = load_checkpoint(unbroken)
    ckpt["semi"].pop("teacher", None)  # as written before --teacher existed
    old = tmp_path / "old" / "last.pth"
    old.parent.mkdir()
    torch.save(ckpt, old)
    result = run_train(semi_argv(semi_data, tmp_path / "old", "--resume", str(old), epochs=3))
    assert len(result["history"]) == 3
