"""Tasks and label maps: the one place structure names, their label values and the tasks are defined.

A label map says which values of a mask are which class, per structure (mask kind):

    {"lung": {"left lung": 1, "right lung": 2}, "lesion": {"ground-glass opacity": 1, "consolidation": 2}}

data.preprocess writes it to meta.json from the layout's documented names (LABEL_NAMES) and keeps the
masks' original labels; a dataset turns them into a task's binary or class-index targets at load time
(:func:`structure_mask`, :func:`task_target`) and exposes the map as ``.labels``, which training copies into
the checkpoint. A new class is a new entry in LABEL_NAMES (and, to train on it, a task in TASK_OUTPUTS).

The types tasks ("lesion-types", "lung+lesion-types") tell the lesion types of LESION_TYPES apart
(ground-glass opacity, consolidation): their targets come from the lesion labels (:func:`type_values`,
:func:`type_mask`), other lesion labels become background or IGNORE_INDEX, and "lesion" (the union) stays
one of their outputs.
"""
from __future__ import annotations

import numpy as np
import torch

# Documented label meanings per layout (data.readers.FOLDER_LAYOUTS); every lesion value > 0 counts as
# lesion unless preprocessing was given --lesion-labels.
LESION_LABEL_NAMES = {
    "default": {"1": "ground-glass opacity", "2": "consolidation"},
    "ma2020": {"1": "infection"},
    "medseg_radiopaedia": {"1": "ground-glass opacity", "2": "consolidation", "3": "pleural effusion"},
    "medseg_tr": {"1": "ground-glass opacity", "2": "consolidation", "3": "pleural effusion"},
    "images_only": {},
}
LUNG_LABEL_NAMES = {"default": {"1": "left lung", "2": "right lung"}, "ma2020": {"1": "left lung", "2": "right lung"}}
_LESION, _LUNG = "lesion", "lung"  # the mask kinds (structures with a mask file of their own)
LABEL_NAMES = {_LESION: LESION_LABEL_NAMES, _LUNG: LUNG_LABEL_NAMES}
PAIR_LABELS = {_LESION: {_LESION: 1}}  # image-mask pair folders: binary lesion masks

# The lesion types a types task tells apart, and their label values on disk: those of the default layout,
# which COVID-SemiSeg's multi-class masks and data.synthetic share (1 ground-glass opacity, 2 consolidation).
LESION_TYPES = {name: int(value) for value, name in LESION_LABEL_NAMES["default"].items()}
PAIR_TYPE_LABELS = {_LESION: dict(LESION_TYPES)}  # image-mask pair folders with label masks
# Target value of pixels a types task neither learns nor scores (e.g. MedSeg's label 3, pleural effusion,
# with other_labels="ignore"): the ``ignore_index`` the softmax losses and the metrics must skip. Masks
# are stored as uint8 (data.dataset.DeviceLoader), so it is the largest uint8.
IGNORE_INDEX = 255
OTHER_LABELS = ("background", "ignore")  # what a types task makes of lesion labels that are no type

_TYPES = tuple(LESION_TYPES)
# What each task predicts, in output order; the target's class indices that make each structure
# (lung+lesion: 0 background, 1 lung, 2 lesion; the lung is classes 1 and 2, since lesions lie inside it).
# The types tasks give each lesion type a class after background (and lung), and keep "lesion", the union
# of the types, as an output, so a types checkpoint still answers "any lesion".
TASK_OUTPUTS = {"lesion": (_LESION,), "lung": (_LUNG,), "lung+lesion": (_LUNG, _LESION),
                "lesion-types": (_LESION, *_TYPES), "lung+lesion-types": (_LUNG, _LESION, *_TYPES)}
TASK_CLASS_INDICES = {
    "lesion": {_LESION: (1,)}, "lung": {_LUNG: (1,)}, "lung+lesion": {_LUNG: (1, 2), _LESION: (2,)},
    "lesion-types": {_LESION: tuple(range(1, 1 + len(_TYPES))), **{t: (1 + i,) for i, t in enumerate(_TYPES)}},
    "lung+lesion-types": {_LUNG: tuple(range(1, 2 + len(_TYPES))), _LESION: tuple(range(2, 2 + len(_TYPES))),
                          **{t: (2 + i,) for i, t in enumerate(_TYPES)}},
}
TASKS = tuple(TASK_OUTPUTS)
# classes including background
TASK_CLASSES = {task: 1 + max(max(c) for c in classes.values()) for task, classes in TASK_CLASS_INDICES.items()}
TYPE_TASKS = ("lesion-types", "lung+lesion-types")  # tasks whose targets come from the lesion labels


def lesion_classes(task: str) -> tuple[int, ...] | None:
    """The target's class indices that make the lesion (in a types task, the union of the types), or None
    when the task has no lesion."""
    return TASK_CLASS_INDICES[task].get(_LESION)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def label_map(layouts: list[str], present: dict[str, set[int]]) -> dict[str, dict[str, int]]:
    """The label map of a set of volumes: documented names of ``layouts``, plus every value ``present``.

    Args:
        layouts: the layouts the volumes came in.
        present: {structure: label values found in its masks} for the structures the volumes have.
    Returns:
        {structure: {name: value}} ordered by value; a value two layouts name differently gets both names
        ("a / b"), an undocumented one "label V".
    """
    labels = {}
    for kind, values in present.items():
        names: dict[int, list[str]] = {}
        for layout in layouts:
            for value, name in LABEL_NAMES[kind].get(layout, {}).items():
                names.setdefault(int(value), [])
                if name not in names[int(value)]:
                    names[int(value)].append(name)
        for value in values:
            if value > 0 and value not in names:
                names[value] = [f"label {value}"]
        labels[kind] = {" / ".join(names[v]): v for v in sorted(names)}
    return labels


def select_labels(labels: dict[str, dict[str, int]], values: list[int] | None) -> dict[str, dict[str, int]]:
    """A label map restricted to the lesion ``values`` a task keeps (all of them when None)."""
    if not values:
        return labels
    return {kind: {n: v for n, v in m.items() if kind != "lesion" or v in values} for kind, m in labels.items()}


def structure_mask(labels: np.ndarray, values: list[int] | None = None) -> np.ndarray:
    """The binary view of a label mask: ``label > 0``, or ``label in values`` when values are given.

    Shape: any -> same, uint8 {0, 1}.
    """
    keep = np.isin(labels, values) if values else labels > 0
    return keep.astype(np.uint8)


def task_masks(task: str) -> tuple[str, ...]:
    """The mask kinds (keys of LABEL_NAMES: lung, lesion) a task's targets are made of, in output order."""
    check_task(task)
    return tuple(k for k in TASK_OUTPUTS[task] if k in LABEL_NAMES)


# Short names of structures in file names and column names (infer.py's PROB/ggo/<stem>.png, report.csv's
# ggo_ml), as radiology reports abbreviate them; the others are their own name, slugged.
SHORT_NAMES = {LESION_LABEL_NAMES["default"]["1"]: "ggo"}


def structure_slug(name: str) -> str:
    """A structure's name as it may appear in a file or column name: its SHORT_NAMES entry
    ("ground-glass opacity" -> "ggo"), else the name with spaces and slashes as dashes ("left lung" -> "left-lung")."""
    return SHORT_NAMES.get(name) or name.replace(" / ", "-").replace("/", "-").replace(" ", "-")


def type_values(lesion_labels: dict[str, int]) -> dict[int, int]:
    """Which lesion label value is which type of a types task, from a lesion label map.

    Args:
        lesion_labels: {name: value} of the lesion masks (a dataset's ``labels["lesion"]``).
    Returns:
        {label value: type index} with type index 1.. in LESION_TYPES order.
    Raises:
        ValueError naming the missing types when the map does not name every type exactly (a binary
        "infection" mask, or layouts that name one value differently: "ground-glass opacity / infection").
    """
    missing = [name for name in LESION_TYPES if name not in lesion_labels]
    if missing:
        raise ValueError(f"its lesion labels {lesion_labels} do not name {' and '.join(map(repr, missing))}; "
                         f"a types task needs masks labelled {LESION_TYPES}")
    return {int(lesion_labels[name]): i + 1 for i, name in enumerate(LESION_TYPES)}


def type_mask(labels: np.ndarray, values: dict[int, int], other: str = "background") -> np.ndarray:
    """The lesion-type view of a lesion label mask: 0 none, 1.. the type (see :func:`type_values`).

    Args:
        labels: original lesion labels.
        values: {label value: type index}.
        other: what becomes of a label > 0 that is no type (MedSeg's 3, pleural effusion): "background"
            (0) or "ignore" (IGNORE_INDEX, skipped by the loss).
    Shape: any -> same, uint8.
    """
    if other not in OTHER_LABELS:
        raise ValueError(f"other labels must be one of {OTHER_LABELS}, got {other!r}")
    out = np.where(labels > 0, IGNORE_INDEX if other == "ignore" else 0, 0).astype(np.uint8)
    for value, index in values.items():
        out[labels == value] = index
    return out


def task_target(lesion: np.ndarray | None, lung: np.ndarray | None, task: str) -> np.ndarray:
    """Build the class-index target of a task from lesion / lung masks.

    Args:
        lesion: binary (uint8 {0, 1}) for the binary tasks; the :func:`type_mask` view (0, types 1..,
            IGNORE_INDEX) for the types tasks.
        lung: binary (uint8 {0, 1}), or None when the task has no lung.
    Returns:
        uint8 class indices (TASK_CLASS_INDICES), IGNORE_INDEX where the lesion mask has it.
    """
    if task in ("lesion", "lesion-types"):
        return lesion
    if task == "lung":
        return lung
    if task == "lung+lesion":
        # lesion wins where a lesion mask pokes outside the lung mask
        return np.where(lesion > 0, 2, lung).astype(np.uint8)
    if task == "lung+lesion-types":
        shifted = np.where(lesion == IGNORE_INDEX, IGNORE_INDEX, lesion + 1)  # type k is class k + 1, after lung
        return np.where(lesion > 0, shifted, lung).astype(np.uint8)
    check_task(task)
    raise AssertionError(task)


def class_targets(target: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Binary ground truth of each structure a task predicts, from its class-index target.

    Shape: (N, H, W) integer -> {name: (N, H, W) bool}, in TASK_OUTPUTS order.
    """
    check_task(task)
    return {name: torch.isin(target, torch.tensor(TASK_CLASS_INDICES[task][name], device=target.device))
            for name in TASK_OUTPUTS[task]}
