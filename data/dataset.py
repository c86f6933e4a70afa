"""Datasets over preprocessed slice arrays and over folders of PNG/JPG image-mask pairs.

Every item is ``(image, mask)``: image float32 (1, S, S) in [0, 1]; mask int64 (S, S) of class indices
(lesion/lung task: {0, 1}; lung+lesion task: 0 background, 1 lung, 2 lesion; the types tasks: see
data.labels.TASK_CLASS_INDICES, with data.labels.IGNORE_INDEX where a label is to be ignored).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from data.augment import intensity_jitter, jitter_params
from data.look import series_of, series_windows
from data.labels import (OTHER_LABELS, PAIR_LABELS, PAIR_TYPE_LABELS, TYPE_TASKS, check_task, select_labels,
                         structure_mask, task_masks, task_target, type_mask, type_values)
from data.transforms import (IMAGE_SUFFIXES, InputError, load_image_slice, read_label_mask, read_mask, resize_masks,
                             target_window)

MASK_SUFFIXES = ("_mask", "-mask", "_seg", "_label")
CACHE_BYTES = 1 << 30  # decoded pairs a PairFolderDataset keeps in memory (per process)


class PairAugment:
    """Random paired augmentation of (image (H, W), mask (H, W)) tensors; geometry is shared exactly.

    Horizontal flip and a random multiple of 90 degrees (as the seed code does), plus an optional mild
    intensity jitter (contrast, brightness, gamma) on the image only. Draws from torch's global RNG, which
    DataLoader seeds per worker, so a seeded run is reproducible. ``data.augment.BatchAugment`` does the
    same to a whole batch on its device.
    """

    def __init__(self, flip: bool = True, rot90: bool = True, intensity: bool = True):
        self.flip, self.rot90, self.intensity = flip, rot90, intensity

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.rand(5)
        if self.flip and r[0] < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.rot90:
            k = int(r[1] * 4)
            if k:
                image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        if self.intensity and r[2] < 0.5:
            contrast, brightness, gamma = jitter_params(r[3], r[4], torch.rand(1))
            image = intensity_jitter(image, contrast, brightness, gamma)
        return image.contiguous(), mask.contiguous()


class SliceArrayDataset(Dataset):
    """Slices of a folder written by ``data.preprocess``, restricted to one split of ``splits.json``.

    The arrays are memory-mapped: nothing is read until an item is asked for, and a set larger than RAM
    works. Rows come from ``splits.json`` (case ids when split by patient, row indices when by slice).

    Args:
        root: folder with images.npy, lesion_masks.npy / lung_masks.npy, meta.json, splits.json.
        split: "train", "val", "test" or None for every row.
        task: "lesion", "lung", "lung+lesion", "lesion-types" or "lung+lesion-types" (data.labels.TASKS).
        augment: a callable (image, mask) -> (image, mask), e.g. PairAugment(), or None.
        other_labels: types tasks: what a lesion label that is no type (MedSeg's 3, pleural effusion)
            becomes, "background" or "ignore" (data.labels.IGNORE_INDEX).

    The mask arrays hold the original labels; the binary tasks' targets are their binary view
    (data.labels): every lesion label > 0, or those preprocessing's --lesion-labels kept; the types tasks'
    targets keep ground-glass opacity and consolidation apart. ``.labels`` is the label map of the
    structures the task predicts (for a types task, of its types only), ``.channels`` the input channels
    (both go into the checkpoint).
    """

    def __init__(self, root: str | Path, split: str | None = "train", task: str = "lesion", augment=None,
                 other_labels: str = "background"):
        root = Path(root)
        if not (root / "images.npy").is_file() or not (root / "meta.json").is_file():
            raise InputError(f"{root}: not a preprocessed folder (no images.npy/meta.json); run "
                             f"`python -m data.preprocess --src VOLUMES --out {root}` first")
        check_task(task)
        if other_labels not in OTHER_LABELS:
            raise ValueError(f"other_labels must be one of {OTHER_LABELS}, got {other_labels!r}")
        self.root, self.task, self.augment, self.other_labels = root, task, augment, other_labels
        self.meta = json.loads((root / "meta.json").read_text())
        self.preprocessing = self.meta["preprocessing"]
        self.images = np.load(root / "images.npy", mmap_mode="r")
        self.masks = {}
        for kind in task_masks(task):
            path = root / f"{kind}_masks.npy"
            if not path.is_file():
                raise InputError(f"{root}: task {task!r} needs {kind}_masks.npy, which this folder lacks "
                                 f"(its volumes had no {kind} masks)")
            self.masks[kind] = np.load(path, mmap_mode="r")
        slices = self.meta["slices"]
        if len(slices) != len(self.images):
            raise InputError(f"{root}/meta.json lists {len(slices)} slices, images.npy has {len(self.images)}")
        self.cases = [s["case"] for s in slices]
        self.rows = self._split_rows(split)
        if not self.rows:
            raise InputError(f"{root}: split {split!r} is empty; rerun data.split_data with other fractions")
        self.channels = 1
        self.labels, self.keep = self._label_view()
        self.types = self._type_view() if task in TYPE_TASKS else None

    def _type_view(self) -> dict[int, int]:
        """{lesion label value: type index} of a types task; its label map restricted to the types."""
        if "labels" not in self.meta:
            raise InputError(f"{self.root}: its lesion masks are binary (preprocessed before the labels were kept), "
                             f"so task {self.task!r} has no lesion types in them; preprocess the volumes again")
        try:
            types = type_values(self.labels["lesion"])
        except ValueError as e:
            raise InputError(f"{self.root}/meta.json: task {self.task!r} needs lesion types, but {e}") from None
        self.labels["lesion"] = {n: v for n, v in self.labels["lesion"].items() if v in types}
        return types

    def _label_view(self) -> tuple[dict, dict]:
        """The task's label map and, per structure, the label values its targets keep (None: every > 0).

        A folder written before preprocessing kept the labels (no "labels" in meta.json) holds binary
        masks already; its map is {structure: {structure: 1}}.
        """
        if "labels" not in self.meta:
            return {k: {k: 1} for k in self.masks}, {k: None for k in self.masks}
        chosen = self.meta.get("lesion_labels")
        labels = select_labels({k: self.meta["labels"][k] for k in self.masks}, chosen)
        return labels, {k: chosen if k == "lesion" else None for k in self.masks}

    def _split_rows(self, split: str | None) -> list[int]:
        if split is None:
            return list(range(len(self.images)))
        path = self.root / "splits.json"
        if not path.is_file():
            raise InputError(f"{path} not found; run `python -m data.split_data --data {self.root}` first")
        splits = json.loads(path.read_text())
        if split not in splits:
            raise InputError(f"{path} has no {split!r} split (it has {[k for k in splits if k != 'by']})")
        if splits.get("by", "patient") == "slice":
            rows = sorted(int(r) for r in splits[split])
            bad = [r for r in rows if not 0 <= r < len(self.images)]
            if bad:
                raise InputError(f"{path}: rows {bad[:3]} are outside 0..{len(self.images) - 1} of "
                                 f"{self.root}/images.npy; rerun data.split_data")
            return rows
        wanted = set(splits[split])
        unknown = wanted - set(self.cases)
        if unknown:
            raise InputError(f"{path}: cases {sorted(unknown)[:3]} are not in {self.root}/meta.json; rerun data.split_data")
        return [i for i, c in enumerate(self.cases) if c in wanted]

    def __len__(self) -> int:
        return len(self.rows)

    def case_of(self, index: int) -> str:
        return self.cases[self.rows[index]]

    def mask(self, kind: str, row: int) -> np.ndarray:
        """The ``kind`` mask of array row ``row`` as the task's targets see it: binary (uint8 {0, 1}), or
        for a types task's lesion its type view (data.labels.type_mask)."""
        if kind == "lesion" and self.types is not None:
            return type_mask(np.asarray(self.masks[kind][row]), self.types, self.other_labels)
        return structure_mask(np.asarray(self.masks[kind][row]), self.keep[kind])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[index]
        image = torch.from_numpy(np.array(self.images[row], dtype=np.float32))
        target = task_target(*(self.mask(k, row) if k in self.masks else None for k in ("lesion", "lung")),
                             self.task)
        mask = torch.from_numpy(target.astype(np.int64))
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return image[None], mask


# ----------------------------------------------------------------------------- image-mask pair folders
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def pair_files(image_dir: str | Path, mask_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair each image with the mask of the same stem (optionally ending in ``_mask``), any extension.

    Raises InputError for an empty folder or an image without its mask.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise InputError(f"{d}: folder not found")
    masks = {}
    for m in _images_in(mask_dir):
        stem = m.stem
        for suffix in MASK_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        masks[stem] = m
    images = _images_in(image_dir)
    if not images:
        raise InputError(f"{image_dir}: no images ({'/'.join(IMAGE_SUFFIXES)}) found")
    pairs = []
    for img in images:
        if img.stem not in masks:
            raise InputError(f"{img}: image without its mask (expected {mask_dir / img.stem}.png "
                             f"or {img.stem}_mask.png)")
        pairs.append((img, masks[img.stem]))
    return pairs


SEMISEG_IMAGES = Path("TrainingSet", "LungInfection-Train", "Doctor-label")  # COVID-SemiSeg, as published
SEMISEG_TYPES = Path("TrainingSet", "MultiClassInfection-Train", "GT")  # its multi-class masks (0/1/2 palette)


def find_pair_dirs(root: str | Path, part: str = "train", task: str = "lesion") -> tuple[Path, Path] | None:
    """The (images, masks) folders of one part of a pair folder, or None when it has no such part.

    Layouts: ``{part}_images/`` + ``{part}_masks/`` (the seed code's), ``{part}/images`` + ``{part}/masks``;
    and, holding one part only (``part`` is ignored), ``images/`` + ``masks/`` (what data.export_png writes)
    and COVID-SemiSeg's ``Imgs/`` + ``GT/`` (directly under root, or under
    ``TrainingSet/LungInfection-Train/Doctor-label/``). For a types task (data.labels.TYPE_TASKS),
    COVID-SemiSeg's masks are its multi-class ones, ``TrainingSet/MultiClassInfection-Train/GT/N.png``
    (paired with ``Doctor-label/Imgs/N.jpg``), when root (or its ``TrainingSet``'s parent) holds them.
    """
    root = Path(root)
    for img, msk in ((f"{part}_images", f"{part}_masks"), (f"{part}/images", f"{part}/masks")):
        if (root / img).is_dir() and (root / msk).is_dir():
            return root / img, root / msk
    if task in TYPE_TASKS:
        for base in (root, root.parent):  # the dataset's root, or its TrainingSet folder
            if (base / SEMISEG_IMAGES / "Imgs").is_dir() and (base / SEMISEG_TYPES).is_dir():
                return base / SEMISEG_IMAGES / "Imgs", base / SEMISEG_TYPES
    for base, img, msk in ((root, "images", "masks"), (root, "Imgs", "GT"), (root / SEMISEG_IMAGES, "Imgs", "GT")):
        if (base / img).is_dir() and (base / msk).is_dir():
            return base / img, base / msk
    return None


class PairFolderDataset(Dataset):
    """Image-mask pairs from files: any size and mode in, (1, S, S) float32 / (S, S) int64 class indices out.

    Images go through the same ``load_image_slice`` as inference. For the lesion task masks are binarised
    by ``read_mask`` (0/255, 0/1 and palette label masks alike); for the lesion-types task they are read
    with their labels by ``read_label_mask`` (palette or 0..MASK_LABEL_MAX label maps: 1 ground-glass
    opacity, 2 consolidation, data.labels.PAIR_TYPE_LABELS), and a binary 0/255 mask, which has no types,
    is refused. Masks are resized with nearest neighbour.

    Args:
        pairs: list of (image path, mask path), e.g. from :func:`pair_files`.
        preprocessing: dict with at least ``size`` (see data.transforms.make_preprocessing).
        augment: a callable (image, mask) -> (image, mask), or None.
        task: "lesion" or "lesion-types" (pair folders have no lung masks).
        other_labels: lesion-types: what a label that is no type becomes, "background" or "ignore".
    """

    def __init__(self, pairs: list[tuple[Path, Path]], preprocessing: dict, augment=None, task: str = "lesion",
                 other_labels: str = "background"):
        if not pairs:
            raise InputError("no image-mask pairs given")
        check_task(task)
        if task_masks(task) != ("lesion",):
            raise InputError(f"task {task!r} needs lung masks, which image-mask pair folders do not have; "
                             f"train it on volumes preprocessed with their lung masks")
        if other_labels not in OTHER_LABELS:
            raise ValueError(f"other_labels must be one of {OTHER_LABELS}, got {other_labels!r}")
        self.pairs, self.preprocessing, self.augment = list(pairs), preprocessing, augment
        self.task, self.channels, self.other_labels = task, 1, other_labels
        self.types = type_values(PAIR_TYPE_LABELS["lesion"]) if task in TYPE_TASKS else None
        self.labels = PAIR_TYPE_LABELS if self.types else PAIR_LABELS
        self._cache: dict[int, tuple] = {}  # index -> what load() returned (see load)
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def case_of(self, index: int) -> str:
        return Path(self.pairs[index][0]).stem

    def read_target(self, mask_path: Path) -> np.ndarray:
        """The task's (H, W) uint8 target of one mask file."""
        if self.types is None:
            return read_mask(mask_path)
        labels, is_label_map = read_label_mask(mask_path)
        if not is_label_map:
            raise InputError(f"{mask_path}: a binary (0/255) mask has no lesion types, which task {self.task!r} "
                             f"needs; give label masks (0 background, "
                             f"{', '.join(f'{v} {n}' for n, v in PAIR_TYPE_LABELS['lesion'].items())}), e.g. "
                             f"COVID-SemiSeg's {SEMISEG_TYPES.parent.name}/{SEMISEG_TYPES.name}")
        return type_mask(labels, self.types, self.other_labels)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The un-augmented (image (S, S), mask (S, S) uint8, original (H, W)) of one pair.

        Kept in memory after the first read while the pairs held stay under CACHE_BYTES: decoding a
        COVID-SemiSeg JPEG and its mask took 2.8 ms, 5% of its training epoch, every epoch again. Not in
        a DataLoader worker, which is restarted every epoch (its cache would be refilled and dropped).
        """
        if index in self._cache:
            return self._cache[index]
        loaded = self._read(index)
        size = loaded[0].numel() * loaded[0].element_size() + loaded[1].numel() * loaded[1].element_size()
        if get_worker_info() is None and self._cached_bytes + size <= CACHE_BYTES:
            self._cache[index] = loaded
            self._cached_bytes += size
        return loaded

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        img_path, mask_path = self.pairs[index]
        image, shape = load_image_slice(img_path, self.preprocessing)
        mask = self.read_target(mask_path)
        if mask.shape != shape:
            raise InputError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                             f"image {Path(img_path).name} is {shape[1]}x{shape[0]}")
        return image, resize_masks(mask[None], self.preprocessing["size"])[0], shape

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask, _ = self.load(index)
        mask = mask.long()
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return image[None], mask


# ----------------------------------------------------------------------------- slices without masks
# folders whose files are masks, not images, when an unlabelled folder is searched recursively
MASK_FOLDERS = ("gt", "masks", "mask", "labels", "lesion_masks", "lung_masks", "edge", "prior")


def find_images(root: str | Path, exclude=()) -> list[Path]:
    """Every image file under ``root`` (recursively, hidden files and mask folders skipped), sorted, minus
    the files in ``exclude`` (compared resolved). Raises InputError when none is left."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found")
    skip = {Path(p).resolve() for p in exclude}
    found = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)
             and not any(part.lower() in MASK_FOLDERS or part.lower().endswith("_masks")
                         for part in p.relative_to(root).parts[:-1])]
    kept = [p for p in found if p.resolve() not in skip]
    if not kept:
        raise InputError(f"{root}: no images ({'/'.join(IMAGE_SUFFIXES)}) found"
                         + (f" other than the {len(found)} labelled ones" if found else "")
                         + (" (folders named like mask folders are skipped: " + ", ".join(MASK_FOLDERS) + ")"))
    return kept


def labelled_files(*datasets) -> list:
    """The files of labelled datasets, never to be read as unlabelled: pair folders' images and masks,
    preprocessed sets' source volumes."""
    return ([f for d in datasets for pair in getattr(d, "pairs", []) for f in pair]
            + [c["image"] for d in datasets for c in getattr(d, "meta", {}).get("cases", {}).values()])


class UnlabeledDataset(Dataset):
    """Slices without masks, for semi-supervised training (train.py --unlabeled).

    Either every image file under a folder (searched recursively by :func:`find_images`; any size and
    mode), or every slice of a folder written by data.preprocess (its volumes need no masks). Items are
    images only, float32 (1, S, S) in [0, 1], prepared as the labelled set's ``preprocessing`` record says
    (the same ``load_image_slice``), so a batch of them and a labelled batch are the same kind of input.

    Image files are first moved into the labelled slices' look: each series' HU window is estimated
    (data.look.series_windows; COVID-SemiSeg's unlabelled volumes were exported in windows from
    -1010..2180 to -1290..70 HU, its labelled slices in -1090..260) and its gray levels moved into the
    record's window (data.transforms.move_window). A record without an HU window (min-max volumes) has no
    look to move into: the files are read as they are. A preprocessed folder must have been made with the
    labelled set's preprocessing.

    Args:
        root: the folder.
        preprocessing: the labelled set's record.
        exclude: files never to use (the labelled pairs' images and masks, or the labelled volumes: a
            preprocessed folder's slices of those volumes are left out), so validation stays unseen.
        log: gets one line saying what was found and how it was shown.
    """

    def __init__(self, root: str | Path, preprocessing: dict, exclude=(), log=print):
        self.root, self.preprocessing, self.channels = Path(root), preprocessing, 1
        if (self.root / "images.npy").is_file():
            meta_path = self.root / "meta.json"
            if not meta_path.is_file():
                raise InputError(f"{self.root}: images.npy without meta.json; preprocess it with data.preprocess")
            meta = json.loads(meta_path.read_text())
            keys = ("size", "norm", "window")
            theirs, ours = ({k: r.get(k) for k in keys} for r in (meta["preprocessing"], preprocessing))
            if theirs != ours:
                raise InputError(f"{self.root}: preprocessed as {theirs}, the labelled data as {ours}; preprocess the "
                                 f"unlabelled volumes with the same --size/--norm/--window")
            self.images = np.load(self.root / "images.npy", mmap_mode="r")
            self.files, self.shown_in = None, None
            skip = {Path(p).resolve() for p in exclude}
            dropped = {name for name, case in meta["cases"].items() if Path(case["image"]).resolve() in skip}
            self.rows = [i for i, s in enumerate(meta["slices"]) if s["case"] not in dropped]
            if not self.rows:
                raise InputError(f"{self.root}: every volume in it is labelled data of this run")
            self.names = [f"{meta['slices'][i]['case']}:{meta['slices'][i]['z']}" for i in self.rows]
            log(f"unlabeled: {len(self.rows)} preprocessed slices of {len(meta['cases']) - len(dropped)} volumes in "
                f"{self.root}" + (f" ({len(dropped)} volumes left out: labelled data of this run)" if dropped else ""))
            return
        self.files = find_images(self.root, exclude)
        self.names = [str(p.relative_to(self.root)) for p in self.files]
        windows, how = series_windows(self.files)
        target = target_window(preprocessing)
        self.shown_in = [windows[series_of(p)] if target else None for p in self.files]
        log(f"unlabeled: {how}; " + (f"each series moved into the labelled look, {target[0]:g}..{target[1]:g} HU"
                                      if target else "read as they are (the labelled data has no HU window)"))

    def __len__(self) -> int:
        return len(self.names)

    def case_of(self, index: int) -> str:
        return self.names[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.files is None:
            return torch.from_numpy(np.array(self.images[self.rows[index]], dtype=np.float32))[None]
        image, _ = load_image_slice(self.files[index], self.preprocessing, self.shown_in[index])
        return image[None]


# ----------------------------------------------------------------------------- data held on the device
class DeviceLoader:
    """A whole dataset, un-augmented, held as two tensors on the training device and served in batches.

    On a GPU this replaces the DataLoader: no worker processes, no host-to-device copy per step, so the
    GPU never waits on the CPU for data; pair it with :class:`data.augment.BatchAugment` for augmentation.
    The items are read once, at construction (with ``workers`` loader processes and a progress bar).

    Batches follow ``sampler``'s order (call its ``set_epoch`` as usual), so under torchrun each rank gets
    its DistributedSampler share, and every batch holds the items a DataLoader with the same sampler and
    batch size would put in it.

    Args:
        dataset: items (image (C, S, S) float, mask (S, S) integer < 256), e.g. SliceArrayDataset without augment;
            or images alone (UnlabeledDataset), served as image batches.
        batch_size: items per batch.
        sampler: an iterable of dataset indices (DistributedSampler, a range, ...).
        device: where the tensors live.
        drop_last: drop the last batch when it is short.
    Memory: ``len(dataset) * (4 * C + 1) * S * S`` bytes on ``device`` (masks are stored as uint8).
    """

    def __init__(self, dataset, batch_size: int, sampler, device: torch.device, drop_last: bool = False,
                 workers: int = 0, progress: bool = True):
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        # a generator of its own: reading the data must not draw from the global RNG (model init, augmentation)
        loader = DataLoader(dataset, batch_size=64, num_workers=workers, generator=torch.Generator())
        first = dataset[0]
        image, mask = first if isinstance(first, (tuple, list)) else (first, None)  # images only: unlabelled
        try:  # allocated whole up front: the set is on the device once, never twice
            self.images = torch.empty((len(dataset), *image.shape), dtype=image.dtype, device=device)
            self.masks = (None if mask is None else
                          torch.empty((len(dataset), *mask.shape), dtype=torch.uint8, device=device))
        except torch.OutOfMemoryError:
            raise InputError(f"{len(dataset)} slices ({dataset_bytes(dataset) / 2**30:.1f} GiB) do not fit on "
                             f"{device}: train with --no-data-on-device") from None
        start = 0
        for batch in tqdm(loader, desc=f"loading {len(dataset)} slices onto {device}", leave=False,
                          disable=None if progress else True):
            image = batch[0] if self.masks is not None else batch
            self.images[start:start + len(image)] = image
            if self.masks is not None:
                self.masks[start:start + len(image)] = batch[1]
            start += len(image)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield self.images[rows] if self.masks is None else (self.images[rows], self.masks[rows].long())


def dataset_bytes(dataset) -> int:
    """What :class:`DeviceLoader` would hold for ``dataset``: images as float32, masks as uint8."""
    first = dataset[0]
    if not isinstance(first, (tuple, list)):  # images only
        return len(dataset) * 4 * first.numel()
    return len(dataset) * (4 * first[0].numel() + first[0][0].numel())
