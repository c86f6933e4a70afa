"""The base layer: the project's input error, atomic writes, and the rules for what an output may replace.

Imports nothing of the project, so every other module (data, models, utils, the scripts) can import it.

The overwrite rule (docs/RELIABILITY.md): a command replaces only what it wrote itself (recognised by a
marker it left) or what the user explicitly asked to overwrite (``--overwrite``); anything else is refused
with one line naming the path. No output path may equal or contain an input path, even with --overwrite.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path


class InputError(ValueError):
    """Bad user input: the message names the file and the problem, and is shown without a traceback."""


# ----------------------------------------------------------------------------- atomic writes
def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or a full disk leaves the previous ``path`` (or nothing) in place, never half a file.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def partial_dir(out: str | Path, flag: str = "--out") -> tuple[Path, Path]:
    """An empty hidden folder beside ``out`` to build an output in, then swap in with :func:`replace_dir`.

    Returns (``out`` resolved, the temporary folder). Raises InputError naming ``out`` when the folder
    cannot be created there (a path below a file, a read-only parent).
    """
    final = Path(out).resolve()  # a name to build beside, also for "." or a path ending in ".."
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder there ({e.strerror}); choose another {flag}") from None
    return final, tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished temporary folder into place at ``out``, so ``out`` is never seen half-written."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- what an output may replace
def check_disjoint(out: str | Path, inputs, flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs or a folder holding one of them.

    Raises InputError naming both paths. Symbolic links and ``..`` are resolved first.
    """
    o = Path(out).resolve()
    for given in inputs:
        i = Path(given).resolve()
        if o == i:
            raise InputError(f"{out}: {flag} is the input {given} itself; writing there would destroy it, "
                             f"choose another {flag}")
        if o in i.parents:
            raise InputError(f"{out}: {flag} holds the input {given}; replacing it would destroy the input, "
                             f"choose another {flag}")


def check_replaceable_dir(out: str | Path, written_by_us, overwrite: bool = False, flag: str = "--out",
                          what: str = "this command") -> None:
    """Refuse to replace ``out`` unless it is absent, an empty folder, a folder ``written_by_us(out)``
    recognises as this command's own output, or ``overwrite`` was asked for.

    An existing file is never replaced by a folder. Raises InputError naming the path.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise InputError(f"{out}: {flag} is an existing file, not a folder; choose another {flag}")
    if overwrite or not any(out.iterdir()) or written_by_us(out):
        return
    raise InputError(f"{out}: {flag} is a folder that {what} did not write (it holds other files); choose "
                     f"another {flag}, or pass --overwrite to replace it")


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, what: str = "another run"):
    """Hold ``folder/.lock`` for the block; a second process asking for the same folder gets InputError.

    The lock is an ``flock`` on an open file: the operating system releases it when the process ends, even
    on SIGKILL, so a crashed run never leaves the folder locked. The file itself stays (it is empty).
    """
    folder = Path(folder)
    path = folder / ".lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise InputError(f"{folder}: in use by {what}{f' (process {holder})' if holder else ''}; wait for it "
                             f"to finish or choose another output folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
    finally:
        f.close()
