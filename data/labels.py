"""Tasks and label maps: the one place structure names, their label values and the tasks are defined.

A label map says which values of a mask are which class, per structure (mask kind):

    {"lung": {"left lung": 1, "right lung": 2}, "lesion": {"ground-glass opacity": 1, "consolidation": 2}}

data.preprocess writes it to meta.json from the layout's documented names (LABEL_NAMES) and keeps the
masks' original labels; a dataset turns them into a task's binary or class-index targets at load time
(:func:`structure_mask`, :func:`task_target`) and exposes the map as ``.labels``, which training copies into
the checkpoint. A new class is a new entry in LABEL_NAMES (and, to train on it, a task in TASK_OUTPUTS).
"""
from __future__ import annotations

import numpy as np
import torch

# What each task predicts, in output order; the target's class indices that make each structure
# (lung+lesion: 0 background, 1 lung, 2 lesion; the lung is classes 1 and 2, since lesions lie inside it).
TASK_OUTPUTS = {"lesion": ("lesion",), "lung": ("lung",), "lung+lesion": ("lung", "lesion")}
TASK_CLASS_INDICES = {"lesion": {"lesion": (1,)}, "lung": {"lung": (1,)}, "lung+lesion": {"lung": (1, 2), "lesion": (2,)}}
TASKS = tuple(TASK_OUTPUTS)
TASK_CLASSES = {"lesion": 2, "lung": 2, "lung+lesion": 3}  # classes including background

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
LABEL_NAMES = {"lesion": LESION_LABEL_NAMES, "lung": LUNG_LABEL_NAMES}
PAIR_LABELS = {"lesion": {"lesion": 1}}  # image-mask pair folders: binary lesion masks


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


def task_target(lesion: np.ndarray | None, lung: np.ndarray | None, task: str) -> np.ndarray:
    """Build the class-index target of a task from binary lesion / lung masks (uint8 {0,1})."""
    if task == "lesion":
        return lesion
    if task == "lung":
        return lung
    if task == "lung+lesion":
        # lesion wins where a lesion mask pokes outside the lung mask
        return np.where(lesion > 0, 2, lung).astype(np.uint8)
    check_task(task)
    raise AssertionError(task)


def class_targets(target: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    """Binary ground truth of each structure a task predicts, from its class-index target.

    Shape: (N, H, W) integer -> {name: (N, H, W) bool}, in TASK_OUTPUTS order.
    """
    check_task(task)
    return {name: torch.isin(target, torch.tensor(TASK_CLASS_INDICES[task][name], device=target.device))
            for name in TASK_OUTPUTS[task]}
