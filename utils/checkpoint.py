"""Self-describing checkpoints: saved atomically, loaded with ``weights_only=True`` only.

A checkpoint written by train.py is a dict of tensors and plain Python data (str, int, float, bool, None,
lists, tuples, dicts); nothing in it needs code to unpickle, so every load here refuses anything else.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from base import InputError, atomic_write, temp_path


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over ``path``.

    A crash (even SIGKILL) at any moment leaves either the previous file or the new one at ``path``,
    never half of one; the temporary file of an interrupted write is hidden (``.NAME.tmp-PID``). A failed
    write (a full disk) raises OSError naming ``path``, and the previous file stays as it was.
    """
    with atomic_write(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            # torch's own file writer reports a failed write (ENOSPC, EIO) as a RuntimeError without the errno
            raise _write_failed(path, e) from e
        # without this the rename can reach the disk before the data does, and a power cut would leave an
        # empty file; one fsync per epoch costs milliseconds
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failed(path: Path, error: RuntimeError) -> OSError:
    """The OSError a failed torch.save stands for: no space left when the disk is (nearly) full."""
    reason = " ".join(str(error).split())[:160]
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    kept = "the previous file is unchanged" if Path(path).exists() else "nothing was written"
    if free is not None and free < (64 << 20):
        return OSError(errno.ENOSPC, f"No space left on device ({free >> 20} MiB free) while saving the checkpoint; "
                                     f"{kept}; free some space and resume (torch: {reason})", str(path))
    return OSError(errno.EIO, f"could not write the checkpoint; {kept} (torch: {reason})", str(path))


def safe_load(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with every failure as one InputError.

    Only tensors and plain data are unpickled: a file carrying pickled objects (which could run code) is
    refused before any of its code runs.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))
        hint = (f"pass {path / 'best_model.pth'}" if "best_model.pth" in inside
                else f"pass one of the .pth files in it ({', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})"
                if inside else "it holds no .pth file")
        raise InputError(f"{path}: is a folder, not a {what} file; {hint}")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found" + (" (train one with `python train.py`)"
                                                         if what == "checkpoint" else ""))
    other = _other_format(path)
    if other:
        raise InputError(f"{path}: not a PyTorch {what} ({other}); pass a .pth file written by train.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused to unpickle something; whether it is an object that needs code to rebuild (the
        # dangerous case) is asked of torch's static scan of the pickle, not read from the error's wording
        refused = _unsafe_globals(path)
        text = str(e)
        if not refused:  # the scan misses globals built at unpickling time; the error text may still name one
            refused = re.findall(r"GLOBAL (\S+)", text)[:1]
        if refused:
            raise InputError(f"{path}: refused, the {what} holds pickled objects beyond tensors and plain data, "
                             f"which could run code ({', '.join(refused[:3])}); nothing of it was run") from None
        detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error:" in line),
                      text.strip().splitlines()[-1] if text.strip() else type(e).__name__)
        detail = detail.replace("WeightsUnpickler error:", "").strip() or type(e).__name__
        raise InputError(f"{path}: not a readable PyTorch {what}, truncated or corrupt ({detail[:160]})") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise InputError(f"{path}: not a readable PyTorch {what}, truncated or corrupt "
                         f"({type(e).__name__}: {str(e).strip()[:160]})") from None


# the first bytes of a torch.save file: a zip archive (since torch 1.6) or, before that, a pickle
_TORCH_HEADS = (b"PK\x03\x04", b"\x80")
_KNOWN_HEADS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x1f\x8b": "gzip data (a .nii.gz?)",
                b"DICM": "DICOM", b"\x93NUMPY": "a NumPy .npy array", b"{": "JSON text"}


def _other_format(path: Path) -> str | None:
    """What a file is when its first bytes cannot begin a torch.save file; None when they can (or it is
    empty: a truncated checkpoint)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not head or any(h.startswith(head[:len(h)]) for h in _TORCH_HEADS):
        return None
    if head[128:132] == b"DICM":
        return "it is DICOM"
    kind = next((name for magic, name in _KNOWN_HEADS.items() if head.startswith(magic)), None)
    return f"it is {kind}" if kind else f"it starts with the bytes {head[:8]!r}"


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a checkpoint's pickle names that weights_only does not allow ([] if unreadable)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a damaged file: the caller reports it as damaged
        return []


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint of this repository on the CPU with ``weights_only=True``: tensors and plain data.

    Raises InputError for a missing, truncated or unreadable file, one that carries pickled objects, or
    one that is not a checkpoint written by train.py.
    """
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise InputError(f"{path}: not a checkpoint of this repository (no 'model'/'model_config'; "
                         f"found {sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    config = ckpt["model_config"]
    if not isinstance(config, dict) or not isinstance(config.get("name"), str) or not isinstance(ckpt["model"], dict):
        raise InputError(f"{path}: damaged checkpoint: model_config is {config!r}, expected a dict with a model 'name'")
    return ckpt


# ----------------------------------------------------------------------------- RNG states
def rng_states(generator: torch.Generator | None = None) -> dict:
    """Every random number generator training draws from, as tensors and plain data (weights_only-safe).

    torch CPU and CUDA states, Python's ``random``, NumPy's legacy global state, and ``generator`` (the
    DataLoader's) when given. NumPy's key array is stored as a list of ints: arrays need pickled code.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def restore_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    """Put back what :func:`rng_states` saved (CUDA states for as many devices as both runs have)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if states.get("cuda") and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    if generator is not None and states.get("generator") is not None:
        generator.set_state(states["generator"])


# ----------------------------------------------------------------------------- leftovers of killed runs
def remove_stale_temp_files(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files a killed process left beside ``names`` in ``folder``.

    Only files of processes that are no longer running are removed (a live writer's file is its own).
    Returns the paths removed.
    """
    folder, removed = Path(folder), []
    for name in names:
        prefix = temp_path(folder / name).name.rsplit("-", 1)[0] + "-"  # ".last.pth.tmp-"
        for tmp in folder.glob(f"{prefix}*"):
            pid = tmp.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
