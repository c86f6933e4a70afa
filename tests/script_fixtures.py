"""Shared tiny data and a trained checkpoint for the end-to-end tests of train.py, evaluate.py and infer.py.

Import the fixtures into a test module (``from tests.script_fixtures import processed, trained``). Each
module then holds its own copy of the fixture definition, so the expensive results are cached here, once
per test session, whichever module asks first.

The data: 4 synthetic phantoms of 64x64x8 voxels (seed 1), preprocessed at 64x64 and split by patient
into 2 train / 1 val / 1 test patients (16 / 8 / 8 slices). Everything takes a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 8)  # (X, Y, Z) voxels per phantom
SIZE = 64  # preprocessed slice side
PHANTOM_SEED, SPLIT_SEED = 1, 0  # seeds known to put lesion in the train, val and test split alike

_cache: dict[str, object] = {}


def _once(key: str, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


class _Finalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs (and raises) before this returns


def ctrl_c_in_a_finalizer() -> None:
    """A Ctrl-C that lands in a finalizer, where Python prints "Exception ignored" and goes on (as one landing
    in torch._dynamo's weakref callbacks did). Needs the ``default_sigint`` fixture under pytest-xdist."""
    _Finalizer()  # collected at once


def sigint_default() -> None:
    """In a child process before exec: SIGINT to its default. A test suite started in the background by a
    shell without job control (`cmd &` in a script, `nohup`) inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler: a SIGINT a test sends would be dropped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def default_sigint():
    """SIGINT as a Python started from a terminal has it (a test worker may have it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def train_argv(data, out, *extra: str, epochs: int = 1, width: int = 4, batch_size: int = 4) -> list[str]:
    """A train.py command line for a tiny CPU run; ``extra`` flags come last (argparse: last one wins)."""
    return ["--data", str(data), "--out", str(out), "--width", str(width), "--size", str(SIZE),
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--device", "cpu", "--no-progress",
            *extra]


def run_train(argv: list[str]) -> dict:
    import train
    return train.main(train.get_args_parser().parse_args(argv))


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def slice_rows(data: Path, split: str) -> list[int]:
    """The rows of images.npy that belong to a split (splits.json is by patient)."""
    meta = json.loads((data / "meta.json").read_text())
    cases = set(json.loads((data / "splits.json").read_text())[split])
    return [i for i, s in enumerate(meta["slices"]) if s["case"] in cases]


def export_pairs(data: Path, split: str | None, dest: Path, images: str, masks: str, n: int = 100) -> list[Path]:
    """Export slices of a preprocessed folder as 8-bit PNG pairs into DEST/IMAGES and DEST/MASKS."""
    from data.export_png import export_pngs

    tmp = dest / f".export-{images.replace('/', '_')}"
    written = export_pngs(data, split, tmp, n)
    for src, name in (("images", images), ("masks", masks)):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / src), str(dest / name))
    shutil.rmtree(tmp)
    return [dest / images / p.name for p in written]


# ----------------------------------------------------------------------------- fixtures
def _build_data(root: Path) -> tuple[Path, Path]:
    """Phantoms (PHANTOM_SEED) and their preprocessed folder split by patient (SPLIT_SEED), with lesion pixels
    in every split: a quarter of the phantoms are lesion-free by design, and these seeds are known to give
    each split some lesion. A change to data.synthetic or data.split_data that breaks this fails here, loudly.
    """
    from data.preprocess import preprocess
    from data.split_data import split_preprocessed
    from data.synthetic import generate_dataset

    src, out = root / "phantoms", root / "processed"
    generate_dataset(src, patients=4, seed=PHANTOM_SEED, shape=SHAPE)
    preprocess(src, out, size=SIZE, workers=1, progress=False)
    splits = split_preprocessed(out, val=0.25, test=0.25, seed=SPLIT_SEED)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [2, 1, 1], splits
    lesion = np.load(out / "lesion_masks.npy", mmap_mode="r")
    empty = [split for split in ("train", "val", "test") if not lesion[slice_rows(out, split)].any()]
    assert not empty, (f"phantom seed {PHANTOM_SEED} with split seed {SPLIT_SEED} leaves no lesion in {empty} "
                       f"({splits}): data.synthetic or data.split_data changed what these seeds draw; choose seeds "
                       f"that put lesion in every split (PHANTOM_SEED, SPLIT_SEED in tests/script_fixtures.py)")
    return src, out


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Folder of 4 NIfTI phantoms: images/, lung_masks/, lesion_masks/ (phantom_000 ... phantom_003)."""
    return _once("data", lambda: _build_data(tmp_path_factory.mktemp("data")))[0]


@pytest.fixture(scope="session")
def processed(tmp_path_factory) -> Path:
    """A preprocessed folder (images.npy, lung/lesion masks, meta.json) with splits.json by patient:
    2 train / 1 val / 1 test patients (16 / 8 / 8 slices), each split with some lesion. Read-only."""
    return _once("data", lambda: _build_data(tmp_path_factory.mktemp("data")))[1]


@pytest.fixture(scope="session")
def trained(processed, tmp_path_factory) -> dict:
    """A U-Net (width 8) trained for 6 epochs at a high constant learning rate, without augmentation.

    Returns {"out": folder with best_model.pth / last.pth / history.csv / curves.png,
             "result": what train.main returned, "stdout": what it printed}.
    """
    def build():
        out = tmp_path_factory.mktemp("trained")
        argv = train_argv(processed, out, "--lr", "1e-2", "--sched", "none", "--no-augment", "--seed", "0",
                          epochs=6, width=8)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = run_train(argv)
        return {"out": out, "result": result, "stdout": buf.getvalue()}
    return _once("trained", build)
