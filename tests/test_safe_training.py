"""Training never loses a run's outputs and never continues or reports something false (issue 13).

A second run into a folder in use is refused; --resume refuses a change of data, preprocessing, task, model
or loss; best_model.pth breaks ties by validation loss; a full disk is one line; the augmentation stream
of each epoch is the same whether a run was resumed or not, with DataLoader workers too; the recipe
script replaces only the fold models it wrote; checkpoints that are folders, images or pickled code are
refused in one line.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from data.dataset import PairAugment
from data.transforms import InputError
from engine.training import Hooks, is_better
from tests.script_fixtures import REPO, SIZE, processed, run_script, run_train, train_argv  # noqa: F401
from tests.test_recipe import run_recipe
from tests.test_reliability import sigint_default
from utils import checkpoint
from base import exclusive_lock
from utils.checkpoint import load_checkpoint, safe_load, save_checkpoint
from utils.cli import run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    """Poll LOG until it holds TEXT (a state of the run, not a guess at its timing)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and text in log.read_text():
            return
        assert proc.poll() is None, f"the run ended first: {log.with_suffix('.err').read_text()[-2000:]}"
        time.sleep(0.01)
    raise AssertionError(f"{log} never showed {text!r}")


@pytest.fixture
def pairs(tmp_path, make_pair_folder) -> Path:
    """A folder of 8 image-mask pairs (train_images/ + train_masks/): train.py holds out a seeded part."""
    make_pair_folder(tmp_path / "pairs" / "train_images", tmp_path / "pairs" / "train_masks", n=8, size=(32, 32))
    return tmp_path / "pairs"


def scripted_validation(rows: list[tuple[float, float]]) -> Hooks:
    """Hooks whose validation returns (score, loss) of ROWS in turn: which epoch wins is then known."""
    it = iter(rows)

    def validate(*args, **kwargs):
        score, loss = next(it)
        return {"loss": loss, "dice": score, "iou": score, "score": score}

    return Hooks(validate=validate)


def run_hooked(argv: list[str], hooks: Hooks) -> dict:
    return train.main(train.get_args_parser().parse_args(argv), hooks)


# ----------------------------------------------------------------------------- 4: one run per folder
def test_a_second_run_into_an_out_folder_in_use_is_refused_and_the_first_run_is_intact(processed, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "first.out"
    with open(log, "w") as f_out, open(log.with_suffix(".err"), "w") as f_err:
        first = subprocess.Popen([sys.executable, "train.py", *train_argv(processed, out, "--seed", "0", epochs=500)],
                                 cwd=REPO, env=ENV, stdout=f_out, stderr=f_err, preexec_fn=sigint_default)
    try:
        wait_for_line(first, log, "Epoch 1/500")  # the lock is taken before the first epoch
        second = subprocess.run([sys.executable, "train.py", *train_argv(processed, out, "--seed", "7", epochs=1)],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {out}: in use by another train.py run"), lines
        assert first.poll() is None  # still training
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    last = load_checkpoint(out / "last.pth")
    assert last["args"]["seed"] == 0 and last["args"]["epochs"] == 500  # the first run's, never the second's
    assert [r["epoch"] for r in last["history"]] == list(range(1, len(last["history"]) + 1))


def test_cross_validation_locks_its_top_out_folder(pairs, tmp_path):
    out = tmp_path / "cv"
    out.mkdir()
    with exclusive_lock(out, "a test"):
        with pytest.raises(InputError, match=f"{out}: in use by another train.py run"):
            run_train(train_argv(pairs, out, "--folds", "2", "--size", "32"))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no fold was started


# ----------------------------------------------------------------------------- 8: resume refuses changes
def test_resume_refuses_a_change_of_data_and_leaves_the_run_untouched(processed, tmp_path):
    out = tmp_path / "run"
    run_train(train_argv(processed, out, epochs=1))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = tmp_path / "other"
    shutil.copytree(processed, other)
    splits = other / "splits.json"
    import json
    parts = json.loads(splits.read_text())
    parts["val"].append(parts["train"].pop())  # one patient moves from training to validation
    splits.write_text(json.dumps(parts))
    with pytest.raises(InputError) as info:
        run_train(train_argv(other, out, "--resume", str(out / "last.pth"), epochs=2))
    message = str(info.value)
    assert "\n" not in message and "last.pth: cannot resume" in message and "train /" in message, message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_refuses_the_same_counts_of_other_cases(pairs, tmp_path):
    out = tmp_path / "run"
    run_train(train_argv(pairs, out, "--size", "32", "--seed", "0", epochs=1))
    # another seed holds out as many pairs, but other ones: another validation set
    with pytest.raises(InputError, match="cannot resume from it, it was trained on other cases"):
        run_train(train_argv(pairs, out, "--size", "32", "--seed", "3", "--resume", str(out / "last.pth"), epochs=2))


def test_resume_refuses_other_preprocessing(pairs, tmp_path):
    out = tmp_path / "run"
    run_train(train_argv(pairs, out, "--size", "32", epochs=1))
    with pytest.raises(InputError, match=r"other preprocessing \(size 32 there, 48 now"):
        run_train(train_argv(pairs, out, "--size", "48", "--resume", str(out / "last.pth"), epochs=2))


@pytest.mark.parametrize("flags", [["--loss", "dice"], ["--no-batch-dice"]])
def test_resume_refuses_another_loss(pairs, tmp_path, flags):
    out = tmp_path / "run"
    run_train(train_argv(pairs, out, "--size", "32", epochs=1))
    with pytest.raises(InputError, match="cannot resume from it, it was trained with loss bce_dice"):
        run_train(train_argv(pairs, out, "--size", "32", *flags, "--resume", str(out / "last.pth"), epochs=2))


def test_resume_accepts_the_same_data_moved_elsewhere(pairs, tmp_path):
    out = tmp_path / "run"
    run_train(train_argv(pairs, out, "--size", "32", epochs=1))
    moved = tmp_path / "moved"
    shutil.move(str(pairs), str(moved))
    result = run_train(train_argv(moved, out, "--size", "32", "--resume", str(out / "last.pth"), epochs=2))
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_final_message_names_only_the_best_model_that_exists(pairs, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    hooks = scripted_validation([(0.5, 1.0), (0.1, 0.9)])  # epoch 1 is the best
    run_hooked(train_argv(pairs, first, "--size", "32", epochs=1), hooks)
    capsys.readouterr()
    run_hooked(train_argv(pairs, second, "--size", "32", "--resume", str(first / "last.pth"), epochs=2), hooks)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert not (second / "best_model.pth").exists()
    assert f"epoch 1's best_model.pth is {first / 'best_model.pth'}" in last_line, last_line
    assert f"best_model.pth, last.pth" not in last_line, last_line


# ----------------------------------------------------------------------------- best_model.pth: ties
@pytest.mark.parametrize("score, loss, expected", [(0.5, 9.0, True), (0.2, 0.1, False), (0.3, 0.4, True),
                                                   (0.3, 0.5, False), (0.3, 0.6, False)])
def test_a_tied_validation_score_is_broken_by_the_lower_loss(score, loss, expected):
    assert is_better(score, loss, best_score=0.3, best_loss=0.5) is expected


def test_best_model_follows_a_falling_loss_when_dice_stays_zero(pairs, tmp_path):
    out = tmp_path / "run"
    run_hooked(train_argv(pairs, out, "--size", "32", epochs=3), scripted_validation([(0.0, 1.0), (0.0, 0.8), (0.0, 0.9)]))
    best = load_checkpoint(out / "best_model.pth")
    assert best["epoch"] == 1 and best["best_loss"] == 0.8  # epoch 2: same Dice, lowest loss


def test_resume_from_a_checkpoint_without_best_loss_keeps_the_best_epoch(pairs, tmp_path):
    out = tmp_path / "run"
    hooks = scripted_validation([(0.5, 1.0), (0.2, 0.1), (0.5, 1.2)])
    run_hooked(train_argv(pairs, out, "--size", "32", epochs=2), hooks)
    old = load_checkpoint(out / "last.pth")
    del old["best_loss"]  # as written before the tie-break existed
    torch.save(old, out / "last.pth")
    run_hooked(train_argv(pairs, out, "--size", "32", "--resume", str(out / "last.pth"), epochs=3), hooks)
    assert load_checkpoint(out / "best_model.pth")["epoch"] == 0  # a tie with a higher loss than epoch 1's


# ----------------------------------------------------------------------------- 14: full disk
def _failing_save(written: bytes):
    def save(obj, f, *args, **kwargs):  # what torch's own writer raises on ENOSPC, after half a file
        Path(f).write_bytes(written)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    return save


def test_full_disk_while_saving_a_checkpoint_keeps_the_old_one_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    torch.save({"model": {"w": torch.arange(4.0)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(b"PK\x03\x04 half"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(OSError) as info:
        save_checkpoint({"model": {}}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "previous file is unchanged" in info.value.strerror and "\n" not in info.value.strerror
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_full_disk_during_training_is_one_line_naming_the_checkpoint(processed, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", _failing_save(b"PK"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), train_argv(processed, tmp_path, epochs=1))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'best_model.pth'}: No space left"), err
    assert not list(tmp_path.glob("*.pth"))


# ----------------------------------------------------------------------------- augmentation per epoch
@pytest.fixture
def augment_log(tmp_path, monkeypatch) -> Path:
    """Every PairAugment output's checksum, appended to a file (the DataLoader's forked workers inherit this)."""
    log = tmp_path / "draws.txt"
    original = PairAugment.__call__

    def logged(self, image, mask):
        image, mask = original(self, image, mask)
        with open(log, "a") as f:
            f.write(f"{float(image.double().sum())!r} {int(mask.sum())}\n")
        return image, mask

    monkeypatch.setattr(PairAugment, "__call__", logged)
    return log


def test_workers_draw_a_new_augmentation_stream_each_epoch_that_resume_reproduces(processed, tmp_path, augment_log):
    flags = ["--workers", "1", "--sched", "none", "--seed", "5"]
    straight = run_train(train_argv(processed, tmp_path / "straight", *flags, epochs=2))
    lines = augment_log.read_text().splitlines()
    augment_log.unlink()
    run_train(train_argv(processed, tmp_path / "resumed", *flags, epochs=1))
    resumed = run_train(train_argv(processed, tmp_path / "resumed", *flags, "--resume",
                                   str(tmp_path / "resumed" / "last.pth"), epochs=2))
    n = len(lines) // 2
    assert n == 16 and lines[:n] != lines[n:]  # 16 training slices per epoch, epoch 2 draws anew
    # another run with the same seed draws the same in epoch 1, and after resuming, in epoch 2
    assert augment_log.read_text().splitlines() == lines
    assert resumed["history"][1]["train_loss"] == straight["history"][1]["train_loss"]


# ----------------------------------------------------------------------------- 9: the recipe's fold models
def test_recipe_refuses_an_out_dir_holding_models_it_did_not_write(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    mine = out / "fold3.pth"
    mine.write_bytes(b"someone's model")
    proc = run_recipe(str(tmp_path / "no-data"), str(out))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {mine}: not written by this script"), lines
    assert mine.read_bytes() == b"someone's model" and sorted(out.iterdir()) == [mine]


# ----------------------------------------------------------------------------- checkpoints that are not
def test_a_checkpoint_folder_is_named_as_a_folder_with_its_models(tmp_path):
    (tmp_path / "best_model.pth").write_bytes(b"")
    with pytest.raises(InputError, match=f"{tmp_path}: is a folder, not a checkpoint file; pass "
                                         f"{tmp_path / 'best_model.pth'}"):
        load_checkpoint(tmp_path)


def test_an_image_renamed_pth_is_not_a_pytorch_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    Image.new("L", (8, 8)).save(path, format="PNG")
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint (it is a PNG image)"), message
    assert "\n" not in message and "issue" not in message


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_pickled_code_is_refused_whatever_torch_calls_it(tmp_path, monkeypatch):
    marker, path = tmp_path / "code-ran.txt", tmp_path / "trapped.pth"
    torch.save({"model": {}, "note": _Payload(marker)}, path)
    load = torch.load

    def reworded(*args, **kwargs):  # a torch release that words its refusal differently
        try:
            return load(*args, **kwargs)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("this object is not allowed here") from None

    monkeypatch.setattr(torch, "load", reworded)
    with pytest.raises(InputError, match=r"trapped\.pth: refused, .*could run code \(builtins\.exec\)"):
        safe_load(path)
    assert not marker.exists()
