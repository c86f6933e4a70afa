"""data.dataset: slice-array dataset, image-mask pair folders, paired augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, save_nifti, tiny_case
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from data.dataset import (DeviceLoader, PairAugment, PairFolderDataset, SliceArrayDataset, dataset_bytes,
                          find_pair_dirs, pair_files)
from data.labels import task_target
from data.preprocess import preprocess
from data.split_data import make_splits
from data.transforms import InputError, read_image, read_mask

SEMISEG = SHARED_DATA / "covid-semiseg"
PREP = {"size": 32}


def save_png(path, array, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    img.save(path, **kw)
    return path


GREY_PALETTE = [v for i in range(256) for v in (i, i, i)]
LABEL_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0]  # VOC-style colours: dark red, dark green (not grey levels 1, 2)


def palette_image(labels: np.ndarray, palette=GREY_PALETTE) -> Image.Image:
    """A palette (mode P) image whose indices are ``labels``."""
    img = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
    img.putpalette(palette)
    return img


# ----------------------------------------------------------------------------- SliceArrayDataset
def test_tiny_processed_fixture_is_what_it_says(tiny_processed):
    meta = json.loads((tiny_processed / "meta.json").read_text())
    splits = json.loads((tiny_processed / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [2, 1, 1] and splits["by"] == "patient"
    assert len(meta["cases"]) == 4 and len(meta["slices"]) == 32
    for name, dtype in (("images", np.float32), ("lung_masks", np.uint8), ("lesion_masks", np.uint8)):
        a = np.load(tiny_processed / f"{name}.npy", mmap_mode="r")
        assert a.shape == (32, 64, 64) and a.dtype == dtype
    assert np.load(tiny_processed / "lung_masks.npy").any()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_selects_exactly_its_cases_rows(tiny_processed, split):
    meta = json.loads((tiny_processed / "meta.json").read_text())
    wanted = set(json.loads((tiny_processed / "splits.json").read_text())[split])
    ds = SliceArrayDataset(tiny_processed, split=split)
    expected = [i for i, s in enumerate(meta["slices"]) if s["case"] in wanted]
    assert ds.rows == expected and len(ds) == len(expected) == 8 * len(wanted)
    assert {ds.case_of(i) for i in range(len(ds))} == wanted
    images = np.load(tiny_processed / "images.npy")
    lesion = np.load(tiny_processed / "lesion_masks.npy") > 0  # the lesion task: every label > 0
    for i in (0, len(ds) - 1):
        image, mask = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 64, 64)
        assert mask.dtype == torch.int64 and mask.shape == (64, 64)
        assert 0 <= image.min() and image.max() <= 1
        np.testing.assert_array_equal(image[0].numpy(), images[expected[i]])
        np.testing.assert_array_equal(mask.numpy(), lesion[expected[i]])


def test_splits_cover_every_row_once(tiny_processed):
    rows = [r for split in ("train", "val", "test") for r in SliceArrayDataset(tiny_processed, split).rows]
    assert sorted(rows) == list(range(32))
    assert len(SliceArrayDataset(tiny_processed, split=None)) == 32


def test_tasks_build_their_targets(tiny_processed):
    # the arrays keep the original labels (lung 1 left / 2 right; lesion 1 GGO / 2 consolidation)
    lung = np.load(tiny_processed / "lung_masks.npy")
    lesion = np.load(tiny_processed / "lesion_masks.npy")
    assert set(np.unique(lung).tolist()) == set(np.unique(lesion).tolist()) == {0, 1, 2}
    lung, lesion = (lung > 0).astype(np.uint8), (lesion > 0).astype(np.uint8)
    sets = {task: SliceArrayDataset(tiny_processed, split=None, task=task)
            for task in ("lesion", "lung", "lung+lesion")}
    seen = set()
    for row in range(32):
        np.testing.assert_array_equal(sets["lung"][row][1].numpy(), lung[row])
        np.testing.assert_array_equal(sets["lesion"][row][1].numpy(), lesion[row])
        both = sets["lung+lesion"][row][1].numpy()
        np.testing.assert_array_equal(both == 2, lesion[row] == 1)
        np.testing.assert_array_equal(both == 1, (lung[row] == 1) & (lesion[row] == 0))
        seen |= set(np.unique(both).tolist())
    assert seen == {0, 1, 2}


def test_task_target_hand_checked():
    lesion = np.array([[0, 1, 1], [0, 0, 0]], np.uint8)
    lung = np.array([[1, 1, 0], [1, 0, 0]], np.uint8)
    assert task_target(lesion, lung, "lesion").tolist() == lesion.tolist()
    assert task_target(lesion, lung, "lung").tolist() == lung.tolist()
    # lesion wins, also where it pokes outside the lung mask
    assert task_target(lesion, lung, "lung+lesion").tolist() == [[1, 2, 2], [1, 0, 0]]
    with pytest.raises(ValueError, match="task"):
        task_target(lesion, lung, "lungs")


def test_arrays_are_memory_mapped(tiny_processed):
    ds = SliceArrayDataset(tiny_processed, split="train", task="lung+lesion")
    assert isinstance(ds.images, np.memmap)
    assert all(isinstance(m, np.memmap) for m in ds.masks.values()) and set(ds.masks) == {"lung", "lesion"}


def test_augmented_items_keep_types(tiny_processed):
    torch.manual_seed(0)
    ds = SliceArrayDataset(tiny_processed, split="train", task="lung+lesion", augment=PairAugment())
    image, mask = ds[3]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.shape == (64, 64) and mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1, 2}


@pytest.fixture
def lesion_only_processed(tmp_path, make_volume_dir):
    """A preprocessed folder without lung masks and without splits.json (16 rows of 2 cases)."""
    make_volume_dir(tmp_path / "src", n_cases=2, lung=False)
    preprocess(tmp_path / "src", tmp_path / "p", size=32, workers=1, progress=False)
    return tmp_path / "p"


def test_missing_splits_and_masks_name_the_fix(lesion_only_processed, tmp_path):
    root = lesion_only_processed
    with pytest.raises(InputError, match=r"splits.json.*python -m data.split_data"):
        SliceArrayDataset(root, split="train")
    assert len(SliceArrayDataset(root, split=None)) == 8
    with pytest.raises(InputError, match="lung_masks.npy"):
        SliceArrayDataset(root, split=None, task="lung")
    with pytest.raises(InputError, match="lung_masks.npy"):
        SliceArrayDataset(root, split=None, task="lung+lesion")
    (root / "splits.json").write_text(json.dumps({"by": "patient", "train": ["case_000"], "val": ["case_001"]}))
    with pytest.raises(InputError, match=r"no 'test' split.*'train', 'val'"):
        SliceArrayDataset(root, split="test")
    (root / "splits.json").write_text(json.dumps({"by": "patient", "train": ["case_000", "old_case"]}))
    with pytest.raises(InputError, match="old_case.*rerun data.split_data"):
        SliceArrayDataset(root, split="train")
    with pytest.raises(InputError, match="data.preprocess"):
        SliceArrayDataset(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="task"):
        SliceArrayDataset(root, split=None, task="lungs")


def test_slice_split_gives_row_indices(lesion_only_processed):
    cases = [s["case"] for s in json.loads((lesion_only_processed / "meta.json").read_text())["slices"]]
    splits = make_splits(cases, val=0.25, test=0.25, by="slice", seed=0)
    (lesion_only_processed / "splits.json").write_text(json.dumps(splits))
    for split in ("train", "val", "test"):
        assert SliceArrayDataset(lesion_only_processed, split=split).rows == splits[split]


@pytest.mark.parametrize("bad_row", [8, -1], ids=["past the end", "negative"])
def test_stale_slice_split_is_an_input_error(lesion_only_processed, bad_row):
    """Row indices from another preprocessing run must be refused up front, like unknown case ids are,
    not fail later as an IndexError in a DataLoader worker or (negative) silently pick another slice."""
    splits = {"by": "slice", "seed": 0, "train": [0, 1, bad_row], "val": [2], "test": [3]}
    (lesion_only_processed / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(InputError, match=r"splits.json.*rerun data.split_data"):
        SliceArrayDataset(lesion_only_processed, split="train")


# ----------------------------------------------------------------------------- pair folders
@pytest.mark.parametrize("images, masks, suffix", [
    ("train_images", "train_masks", ""),
    ("train_images", "train_masks", "_mask"),
    ("train/images", "train/masks", ""),
    ("Imgs", "GT", ""),
    ("TrainingSet/LungInfection-Train/Doctor-label/Imgs", "TrainingSet/LungInfection-Train/Doctor-label/GT", ""),
])
def test_pair_folder_layouts(tmp_path, make_pair_folder, images, masks, suffix):
    ext = ".jpg" if images.endswith("Imgs") else ".png"  # COVID-SemiSeg: Imgs/N.jpg + GT/N.png
    made = make_pair_folder(tmp_path / images, tmp_path / masks, n=3, size=(32, 32), mask_suffix=suffix,
                            image_ext=ext)
    assert find_pair_dirs(tmp_path) == (tmp_path / images, tmp_path / masks)
    pairs = pair_files(*find_pair_dirs(tmp_path))
    assert pairs == [(ip, mp) for ip, mp, _ in made]
    ds = PairFolderDataset(pairs, PREP)
    assert len(ds) == 3
    for i, (_, _, truth) in enumerate(made):
        image, mask = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
        assert 0 <= image.min() and image.max() <= 1
        assert mask.dtype == torch.int64 and mask.shape == (32, 32)
        np.testing.assert_array_equal(mask.numpy(), truth)  # same size: no resize, mask i of i + 1 rows
        assert ds.case_of(i) == str(i)


def test_find_pair_dirs_without_pairs(tmp_path):
    (tmp_path / "train_images").mkdir()
    assert find_pair_dirs(tmp_path) is None


# same grey content in every mode: after per-image min-max they must agree
_GRAY = (np.add.outer(np.arange(37) * 3, np.arange(50) * 2) % 251).astype(np.uint8)
_GRAY[0, 0], _GRAY[-1, -1] = 0, 250
IMAGE_MODES = {
    "L": lambda g: Image.fromarray(g),
    "I;16": lambda g: Image.fromarray(g.astype(np.uint16) * 257),
    "RGB": lambda g: Image.fromarray(np.stack([g] * 3, -1)),
    "RGBA": lambda g: Image.fromarray(np.dstack([g, g, g, np.random.default_rng(0).integers(0, 256, g.shape,
                                                                                              dtype=np.uint8)])),
    "P": palette_image,
}


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_image_modes_give_the_same_float_image(tmp_path, mode):
    img = IMAGE_MODES[mode](_GRAY)
    assert img.mode == mode
    ip = save_png(tmp_path / "img.png", img)
    mask = np.zeros(_GRAY.shape, np.uint8)
    mask[5:20, 10:30] = 1
    mp = save_png(tmp_path / "mask.png", mask * 255)
    assert Image.open(ip).mode == mode  # PNG keeps the mode
    ds = PairFolderDataset([(ip, mp)], PREP)
    image, m = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.1
    assert ds.load(0)[2] == (37, 50)
    np.testing.assert_allclose(read_image(ip) / read_image(ip).max(), _GRAY / 250, atol=1e-6)
    reference = PairFolderDataset([(save_png(tmp_path / "ref.png", _GRAY), mp)], PREP)[0][0]
    np.testing.assert_allclose(image.numpy(), reference.numpy(), atol=1e-5)
    assert set(m.unique().tolist()) == {0, 1}


_MASK = np.zeros((32, 32), np.uint8)
_MASK[4:12, 6:20] = 1
_MASK[20:28, 2:5] = 2
MASK_ENCODINGS = {
    "0/255": lambda m: Image.fromarray(((m > 0) * 255).astype(np.uint8)),
    "0/1": lambda m: Image.fromarray((m > 0).astype(np.uint8)),
    "labels 0/1/2": lambda m: Image.fromarray(m),
    "palette 0/1/2": lambda m: palette_image(m, LABEL_PALETTE),  # the indices are the labels, not the colours
    "16-bit 0/65535": lambda m: Image.fromarray(((m > 0) * 65535).astype(np.uint16)),
    "RGB 0/255": lambda m: Image.fromarray(np.stack([((m > 0) * 255).astype(np.uint8)] * 3, -1)),
}


@pytest.mark.parametrize("encoding", list(MASK_ENCODINGS))
def test_mask_encodings_become_binary(tmp_path, encoding):
    mp = save_png(tmp_path / "m.png", MASK_ENCODINGS[encoding](_MASK))
    np.testing.assert_array_equal(read_mask(mp), _MASK > 0)
    ip = save_png(tmp_path / "i.png", _GRAY[:32, :32])
    np.testing.assert_array_equal(PairFolderDataset([(ip, mp)], PREP)[0][1].numpy(), _MASK > 0)


def test_jpeg_mask_stays_binary_and_close(tmp_path):
    yy, xx = np.mgrid[:64, :64]
    truth = (((yy - 30) ** 2 + (xx - 24) ** 2) < 15 ** 2).astype(np.uint8)
    mp = save_png(tmp_path / "m.jpg", truth * 255, quality=60)
    raw = np.asarray(Image.open(mp))
    assert len(np.unique(raw)) > 2  # the file really has compression artefacts
    got = read_mask(mp)
    assert got.dtype == np.uint8 and set(np.unique(got).tolist()) == {0, 1}
    assert (got != truth).mean() < 0.01


def test_pair_errors_name_the_file(tmp_path, make_pair_folder):
    made = make_pair_folder(tmp_path / "a" / "train_images", tmp_path / "a" / "train_masks", n=2)
    # a mask whose size differs from its image
    ip, mp, _ = made[1]
    save_png(mp, np.zeros((10, 12), np.uint8))
    ds = PairFolderDataset(pair_files(tmp_path / "a" / "train_images", tmp_path / "a" / "train_masks"), PREP)
    ds[0]
    with pytest.raises(InputError, match=r"1\.png: mask is 12x10, image 1\.png is 40x24"):
        ds[1]
    # an image without its mask
    mp.unlink()
    with pytest.raises(InputError, match=r"train_images/1\.png: image without its mask"):
        pair_files(tmp_path / "a" / "train_images", tmp_path / "a" / "train_masks")
    # an empty folder (hidden files and non-images do not count)
    (tmp_path / "e" / "imgs").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    (tmp_path / "e" / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "e" / "imgs" / ".0.png").write_bytes(ip.read_bytes())
    with pytest.raises(InputError, match=r"imgs: no images"):
        pair_files(tmp_path / "e" / "imgs", tmp_path / "e" / "masks")
    with pytest.raises(InputError, match="not_there: folder not found"):
        pair_files(tmp_path / "not_there", tmp_path / "e" / "masks")
    with pytest.raises(InputError):
        PairFolderDataset([], PREP)
    # an unreadable image
    ip.write_bytes(b"not a png at all")
    save_png(mp, np.zeros((24, 40), np.uint8))
    with pytest.raises(InputError, match=r"1\.png: not a readable image"):
        ds[1]


@pytest.mark.skipif(not SEMISEG.is_dir(), reason=f"COVID-SemiSeg slices not found at {SEMISEG}")
def test_real_covid_semiseg_doctor_label():
    dirs = find_pair_dirs(SEMISEG / "TrainingSet" / "LungInfection-Train" / "Doctor-label")
    assert dirs == find_pair_dirs(SEMISEG)  # the nested layout is found from the dataset's root too
    ds = PairFolderDataset(pair_files(*dirs), {"size": 64})
    assert len(ds) == 50
    multi = SEMISEG / "TrainingSet" / "MultiClassInfection-Train" / "GT"
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (1, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert mask.shape == (64, 64) and set(mask.unique().tolist()) <= {0, 1} and mask.sum() > 0
    # the palette multi-class masks (0 bg, 1 GGO, 2 consolidation) binarise to the doctors' binary masks
    for _, mp in ds.pairs[:5]:
        np.testing.assert_array_equal(read_mask(multi / mp.name), read_mask(mp))


# ----------------------------------------------------------------------------- augmentation
def _variants(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flip/rot90 variants of a (H, W) tensor."""
    return [torch.rot90(x.flip(-1) if f else x, k, (-2, -1)) for f in (0, 1) for k in range(4)]


def _asymmetric_mask():
    mask = torch.zeros(16, 16, dtype=torch.int64)
    mask[2:5, 3:12] = 1
    mask[5:13, 3:6] = 1
    mask[9, 13] = 1
    variants = _variants(mask)
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8  # every variant is distinct
    return mask, variants


def _which(m, variants):
    hits = [i for i, v in enumerate(variants) if torch.equal(m, v)]
    assert len(hits) == 1, "the mask is not a flip/rotation of the original"
    return hits[0]


def test_augment_keeps_image_and_mask_aligned():
    mask, variants = _asymmetric_mask()
    image = mask.float() * 0.8 + 0.1
    aug, seen = PairAugment(intensity=False), set()
    for seed in range(64):
        torch.manual_seed(seed)
        img2, m2 = aug(image, mask)
        assert m2.dtype == torch.int64 and img2.dtype == torch.float32
        torch.testing.assert_close(img2, m2.float() * 0.8 + 0.1)
        seen.add(_which(m2, variants))
    assert seen == set(range(8))


def test_augment_intensity_changes_image_only():
    mask, variants = _asymmetric_mask()
    image = mask.float() * 0.8 + 0.1
    aug, jittered = PairAugment(intensity=True), 0
    for seed in range(64):
        torch.manual_seed(seed)
        img2, m2 = aug(image, mask)
        v = _which(m2, variants)
        assert 0 <= img2.min() and img2.max() <= 1
        # the jitter is monotone: lesion pixels stay brighter than background, in the same places
        assert img2[m2 == 1].min() > img2[m2 == 0].max()
        jittered += not torch.allclose(img2, _variants(image)[v])
    assert 10 < jittered < 54  # applied to about half the samples


def test_augment_disabled_is_identity():
    mask, _ = _asymmetric_mask()
    image = torch.rand(16, 16)
    img2, m2 = PairAugment(flip=False, rot90=False, intensity=False)(image, mask)
    assert torch.equal(img2, image) and torch.equal(m2, mask)


# ----------------------------------------------------------------------------- data held on the device
@pytest.mark.parametrize("drop_last", [True, False])
def test_device_loader_serves_the_batches_a_dataloader_would(tiny_processed, drop_last):
    ds = SliceArrayDataset(tiny_processed, split="train", task="lung+lesion")
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)  # rank 1 of 2: its share
    loader = DeviceLoader(ds, 3, sampler, torch.device("cpu"), drop_last=drop_last, progress=False)
    reference = DataLoader(ds, 3, sampler=sampler, drop_last=drop_last)
    assert loader.masks.dtype == torch.uint8  # stored small, served as the int64 the losses take
    assert dataset_bytes(ds) == len(ds) * 5 * 64 * 64 == loader.images.nbytes + loader.masks.nbytes
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == len(reference)
        for (image, mask), (ref_image, ref_mask) in zip(batches, reference, strict=True):
            assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask) and mask.dtype == torch.int64
        orders.append(torch.cat([m.flatten() for _, m in batches]))
        assert set(torch.cat([m for _, m in batches]).unique().tolist()) <= {0, 1, 2}
    assert len(batches[-1][0]) == (3 if drop_last else (len(sampler) - 1) % 3 + 1)
    assert not torch.equal(orders[0], orders[1])  # set_epoch reshuffles, as for a DataLoader


def test_device_loader_says_when_the_data_does_not_fit(tiny_processed, monkeypatch):
    ds = SliceArrayDataset(tiny_processed, split="train")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(torch, "empty", out_of_memory)
    with pytest.raises(InputError, match=rf"{len(ds)} slices \(0.0 GiB\) do not fit on cpu: .*--no-data-on-device"):
        DeviceLoader(ds, 4, range(len(ds)), torch.device("cpu"), progress=False)


# ----------------------------------------------------------------------------- the label map
def _phantom_folder(root, **kwargs):
    """Two tiny cases (lesion: GGO = 1, consolidation = 2) preprocessed at their own size, all rows one split."""
    for i in range(2):
        case = tiny_case(i, (32, 32, 3))
        for sub, key in (("images", "image"), ("lung_masks", "lung"), ("lesion_masks", "lesion")):
            save_nifti(root / "src" / sub / f"c{i}.nii.gz", case[key])
    preprocess(root / "src", root / "out", size=32, workers=1, progress=False, **kwargs)
    return root / "out"


def _targets(folder, task="lesion"):
    ds = SliceArrayDataset(folder, None, task)
    return ds, np.stack([ds[i][1].numpy() for i in range(len(ds))])


def test_label_map_travels_from_preprocessing_to_the_targets(tmp_path):
    out = _phantom_folder(tmp_path / "all")
    lesion = np.load(out / "lesion_masks.npy")
    assert set(np.unique(lesion).tolist()) == {0, 1, 2}  # GGO and consolidation kept apart
    ds, targets = _targets(out)
    np.testing.assert_array_equal(targets, lesion > 0)  # the lesion task: binary, as before
    assert targets.dtype == np.int64 and ds.channels == 1
    assert ds.labels == {"lesion": {"ground-glass opacity": 1, "consolidation": 2}}
    ds, both = _targets(out, "lung+lesion")
    assert ds.labels == {"lung": {"left lung": 1, "right lung": 2},
                         "lesion": {"ground-glass opacity": 1, "consolidation": 2}}
    np.testing.assert_array_equal(both, np.where(lesion > 0, 2, np.load(out / "lung_masks.npy") > 0))

    ggo = _phantom_folder(tmp_path / "ggo", lesion_labels=[1])
    np.testing.assert_array_equal(np.load(ggo / "lesion_masks.npy"), lesion)  # the selection is a view
    ds, targets = _targets(ggo)
    np.testing.assert_array_equal(targets, lesion == 1)
    assert ds.labels == {"lesion": {"ground-glass opacity": 1}}


def test_a_folder_preprocessed_before_the_label_map_still_loads(tmp_path):
    out = _phantom_folder(tmp_path)
    _, want = _targets(out, "lung+lesion")
    # the old format: binary masks, no "labels" or "lesion_labels" in meta.json
    for kind in ("lung", "lesion"):
        np.save(out / f"{kind}_masks.npy", (np.load(out / f"{kind}_masks.npy") > 0).astype(np.uint8))
    meta = json.loads((out / "meta.json").read_text())
    del meta["labels"], meta["lesion_labels"]
    (out / "meta.json").write_text(json.dumps(meta))
    ds, got = _targets(out, "lung+lesion")
    np.testing.assert_array_equal(got, want)
    assert ds.labels == {"lung": {"lung": 1}, "lesion": {"lesion": 1}}


def test_pair_folders_say_their_labels_and_channels(tmp_path):
    ds = PairFolderDataset([(tmp_path / "a.png", tmp_path / "a_mask.png")], PREP)
    assert ds.labels == {"lesion": {"lesion": 1}} and ds.channels == 1
