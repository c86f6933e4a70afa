"""train.py --folds K --resume OUT: an interrupted cross-validation continues where each fold stopped."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import train
from base import InputError
from engine.cross_validation import FoldsInterrupted
from engine.training import Hooks, validate
from tests.script_fixtures import run_train, train_argv
from tests.test_fold_jobs import FOLDS, argv, finish, start


@pytest.fixture
def pairs(tmp_path, make_pair_folder) -> Path:
    make_pair_folder(tmp_path / "pairs" / "train_images", tmp_path / "pairs" / "train_masks", n=9, size=(32, 32))
    return tmp_path / "pairs"


def interrupted_at_validation(n: int) -> Hooks:
    """Hooks whose n-th validation (1-based, over all folds) gets a Ctrl-C."""
    calls = []

    def validate_or_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    return Hooks(validate=validate_or_stop)


@pytest.fixture
def broken(pairs, tmp_path) -> Path:
    """A 3-fold cross-validation of 2 epochs a fold stopped by a Ctrl-C in fold 1's second epoch: fold 0 done,
    fold 1 holding epoch 1, fold 2 not started."""
    out = tmp_path / "broken"
    with pytest.raises(FoldsInterrupted) as stop:
        train.main(train.get_args_parser().parse_args(argv(pairs, out, epochs=2)), interrupted_at_validation(4))
    assert str(stop.value).splitlines() == [
        f"fold 1: interrupted at epoch 2/2 (validation); {out / 'fold1' / 'last.pth'} holds epoch 1",
        "not started: fold 2",
        f"resume the cross-validation with the same command and --resume {out}"]
    assert not (out / "fold2").exists() and not (out / "cv.json").exists()
    return out


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def one_thread():
    """This process on one thread, as each fold of --fold-jobs 2 on one (a thread count is part of the float
    summation order); make test's workers have one already, a plain pytest run has one per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_interrupted_cross_validation_resumes_to_the_folds_of_an_unbroken_one(one_thread, pairs, broken, tmp_path,
                                                                                 capsys):
    """The broken run resumed twice: in this process, folds in turn, and a copy of it by train.py with
    --fold-jobs 2. Both end as the unbroken run, bit for bit, so folds trained side by side, started or
    resumed, train as folds in turn do."""
    unbroken = tmp_path / "unbroken"
    run_train(argv(pairs, unbroken, epochs=2))
    copy = tmp_path / "copy"
    shutil.copytree(broken, copy)
    finished = (broken / "fold0" / "last.pth").read_bytes()
    capsys.readouterr()

    result = run_train(argv(pairs, broken, "--resume", str(broken), epochs=2))
    printed = capsys.readouterr().out
    assert f"{broken / 'fold0' / 'last.pth'} holds all 2 epochs: nothing left to train" in printed
    assert f"resumed from {broken / 'fold1' / 'last.pth'} at epoch 2/2" in printed
    assert printed.count("resumed from") == 1, "fold 2 had nothing to resume: it trains from the start"
    assert (broken / "fold0" / "last.pth").read_bytes() == finished, "a finished fold is only scored"
    cv = json.loads((broken / "cv.json").read_text())
    assert cv == json.loads((unbroken / "cv.json").read_text()) and cv == {k: result[k] for k in cv}

    proc = start(argv(pairs, copy, "--resume", str(copy), "--fold-jobs", "2", epochs=2), tmp_path / "run", threads=1)
    assert finish(proc) == 0, (tmp_path / "run.err").read_text()[-2000:]
    printed = (tmp_path / "run.out").read_text().splitlines()
    assert "fold 0: started (1 CPU thread, 2 folds at a time)" in printed
    assert f"fold 1: resumed from {copy / 'fold1' / 'last.pth'} at epoch 2/2" in printed
    for i, epochs in enumerate((0, 1, 2)):  # each fold's lines whole and named
        assert sum(line.startswith(f"fold {i}: train_loss:") for line in printed) == epochs, i
    assert printed.index("fold 2: started (1 CPU thread, 2 folds at a time)") > min(
        printed.index(f"fold {i}: done") for i in (0, 1)), "no more than 2 folds at a time"
    assert not any("threads now" in line for line in printed), "one thread has no share to pass on"
    assert json.loads((copy / "cv.json").read_text()) == cv

    for i in range(FOLDS):  # deterministic, one thread: bit for bit the unbroken run's folds
        for run in (broken, copy):
            assert same_weights(run / f"fold{i}" / "last.pth", unbroken / f"fold{i}" / "last.pth"), (run, i)


def test_resume_of_a_cross_validation_takes_its_folder_and_nothing_else(pairs, broken, tmp_path):
    last = broken / "fold1" / "last.pth"
    with pytest.raises(InputError, match=re.escape(f"--resume {last}: with --folds 3 (every fold) it takes the "
                                                   "cross-validation's folder") + ".*add --fold I"):
        run_train(argv(pairs, broken, "--resume", str(last), epochs=2))
    other = tmp_path / "other"
    with pytest.raises(InputError, match=re.escape(f"--resume {broken} continues the cross-validation in {broken}, "
                                                   f"but --out is {other}: give --out {broken} as well")):
        run_train(argv(pairs, other, "--resume", str(broken), epochs=2))
    assert not other.exists(), "a refused run writes nothing"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=re.escape(f"--resume {empty}: no fold there has a last.pth")):
        run_train(argv(pairs, empty, "--resume", str(empty), epochs=2))
    assert list(empty.iterdir()) == []
    with pytest.raises(InputError, match="cannot resume from it.*--folds"):  # the folds of another split
        run_train(train_argv(pairs, broken, "--folds", "2", "--size", "32", "--deterministic", "--resume",
                             str(broken), epochs=2))
