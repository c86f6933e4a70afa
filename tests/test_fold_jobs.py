"""train.py --folds K --fold-jobs N: folds trained side by side, each in a process of its own."""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base import InputError
from engine.cross_validation import _Prefixed, train_in_parallel
from tests.script_fixtures import REPO, run_train, sigint_default, train_argv
from tests.test_safe_training import ENV, wait_for_line

FOLDS = 3


@pytest.fixture
def pairs(tmp_path, make_pair_folder) -> Path:
    make_pair_folder(tmp_path / "pairs" / "train_images", tmp_path / "pairs" / "train_masks", n=9, size=(32, 32))
    return tmp_path / "pairs"


def argv(pairs: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return train_argv(pairs, out, "--folds", str(FOLDS), "--size", "32", "--deterministic", "--seed", "0", *extra,
                      epochs=epochs)


def start(args: list[str], log: Path, threads: int = 2) -> subprocess.Popen:
    """train.py with stdout/stderr in LOG.out/LOG.err and ``threads`` CPU threads to share."""
    env = {**ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=out, stderr=err,
                                preexec_fn=sigint_default)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _fold_that_reports_its_threads(args: argparse.Namespace) -> dict:
    """A stand-in for train.py's train(): fold 0 ends at once, fold 1 waits for fold 0's thread."""
    seen = [torch.get_num_threads()]
    if args.fold == 1:
        end = time.monotonic() + 60
        while torch.get_num_threads() == seen[0] and time.monotonic() < end:
            time.sleep(0.01)
        seen.append(torch.get_num_threads())
    return {"fold": args.fold, "threads": seen}


def _fold_that_fails_or_waits(args: argparse.Namespace) -> dict:
    """Fold 1 fails on bad input; fold 0 trains until it is stopped, then says where, as train() does."""
    if args.fold == 1:
        time.sleep(0.5)
        raise InputError("fold1.pth: not found")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted at epoch 3/9") from None
    return {}


@pytest.mark.parametrize("threads, jobs", [(2, 2), (4, 3)])  # 3 jobs for 2 folds: 2 threads each, not 1
def test_the_threads_of_a_fold_that_ends_go_to_the_folds_still_running(capsys, threads, jobs):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = train_in_parallel(_fold_that_reports_its_threads,
                                 [argparse.Namespace(fold=i, debug=False) for i in range(2)], jobs=jobs)
    finally:
        torch.set_num_threads(before)
    half = threads // 2
    assert runs == [{"fold": 0, "threads": [half]}, {"fold": 1, "threads": [half, threads]}]
    assert f"fold 1: {threads} CPU threads now" in capsys.readouterr().out.splitlines()


def _fold_with_a_bug(args: argparse.Namespace) -> dict:
    raise ValueError(f"a bug in fold {args.fold}")


def test_a_bug_in_a_fold_keeps_its_traceback(capfd):  # the fold writes to the file descriptor
    with pytest.raises(RuntimeError, match="fold 0: ValueError: a bug in fold 0 \\(traceback above\\)"):
        train_in_parallel(_fold_with_a_bug, [argparse.Namespace(fold=0, debug=False)], jobs=2)
    err = capfd.readouterr().err
    assert "fold 0: Traceback (most recent call last):" in err and "fold 0: ValueError: a bug in fold 0" in err


def test_a_failing_fold_stops_the_others_each_saying_where(capsys):
    folds = [argparse.Namespace(fold=i, debug=False) for i in range(3)]
    with pytest.raises(InputError, match="fold1.pth: not found"):
        train_in_parallel(_fold_that_fails_or_waits, folds, jobs=2)
    assert capsys.readouterr().err.splitlines()[-2:] == ["fold 0: interrupted at epoch 3/9", "not started: fold 2"]


def test_ctrl_c_stops_every_running_fold_and_says_how_to_resume_them(pairs, tmp_path):
    proc = start(argv(pairs, tmp_path / "cv", "--fold-jobs", "2", epochs=1000), tmp_path / "run")
    for i in (0, 1):  # epoch 1 saved
        wait_for_line(proc, tmp_path / "run.out", f"fold {i}: Epoch 2/")
    proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C, which reaches train.py alone
    assert finish(proc, 120) == 130
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err
    lines = err.splitlines()
    assert lines[-2:] == ["not started: fold 2",
                          f"resume the cross-validation with the same command and --resume {tmp_path / 'cv'}"]
    assert not (tmp_path / "cv" / "fold2").exists()
    for i in (0, 1):
        last = tmp_path / "cv" / f"fold{i}" / "last.pth"
        [line] = [line for line in lines if line.startswith(f"fold {i}: interrupted at epoch")]
        epoch = torch.load(last, weights_only=True)["epoch"]  # the folds saved; the files load
        assert line.endswith(f"; {last} holds epoch {epoch + 1}"), line
    assert not (tmp_path / "cv" / "cv.json").exists()


def test_folds_stop_when_train_py_is_killed(pairs, tmp_path):
    proc = start(argv(pairs, tmp_path / "cv", "--fold-jobs", "2", epochs=1000), tmp_path / "run")
    for i in (0, 1):  # epoch 1 saved
        wait_for_line(proc, tmp_path / "run.out", f"fold {i}: Epoch 2/")
    folds = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.kill()
    proc.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
        except FileNotFoundError:
            return False

    end = time.monotonic() + 60
    while any(map(running, folds)) and time.monotonic() < end:
        time.sleep(0.05)
    left = [pid for pid in folds if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a fold trained on after train.py was killed"
    for i in (0, 1):
        torch.load(tmp_path / "cv" / f"fold{i}" / "last.pth", weights_only=True)  # saved whole
    assert "Traceback" not in (tmp_path / "run.err").read_text(), "a fold with no parent to tell ends quietly"


@pytest.mark.parametrize("extra, problem", [
    (("--folds", "3", "--fold-jobs", "0"), "--fold-jobs 0: needs a positive number"),
    (("--fold-jobs", "2"), "more than 1 only with --folds K"),
    (("--folds", "3", "--fold", "1", "--fold-jobs", "2"), "not with --fold"),
])
def test_fold_jobs_without_folds_to_share_is_refused(pairs, tmp_path, extra, problem):
    with pytest.raises(InputError, match=problem):
        run_train(train_argv(pairs, tmp_path / "out", "--size", "32", *extra))
    assert not (tmp_path / "out").exists()


def test_fold_jobs_under_torchrun_is_refused(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="under torchrun give --fold-jobs 1"):
        run_train(train_argv(pairs, tmp_path / "out", "--size", "32", "--folds", "3", "--fold-jobs", "2"))
    assert not (tmp_path / "out").exists()


def test_a_folds_output_reaches_the_terminal_in_whole_named_lines():
    stream = io.StringIO()
    out = _Prefixed(stream, "fold 3: ")
    out.write("Epoch 1")
    assert stream.getvalue() == ""  # half a line waits for its end
    out.write("/2\ntrain_loss: 1.0\nbest")
    assert stream.getvalue() == "fold 3: Epoch 1/2\nfold 3: train_loss: 1.0\n"
    out.flush()
    assert stream.getvalue().endswith("fold 3: best\n")
