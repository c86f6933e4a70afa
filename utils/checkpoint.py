"""Self-describing checkpoints: saved atomically, loaded with ``weights_only=True`` only."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from data.transforms import InputError
from utils.helpers import atomic_write


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write leaves the previous file intact."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True``: tensors and plain data, never code.

    Raises InputError for a missing or unreadable file, or one that carries pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found (train one with `python train.py`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: refused, the checkpoint holds pickled objects beyond tensors and plain data, "
                         f"which could run code ({first[:160]})") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise InputError(f"{path}: not a checkpoint of this repository (no 'model'/'model_config'; "
                         f"found {sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    from models import build_model

    config = dict(ckpt["model_config"])
    name = config.pop("name")
    model = build_model(name, **config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit {name} {config}: {str(e).splitlines()[1:2]}") from None
    return model
