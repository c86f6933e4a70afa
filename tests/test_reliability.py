"""Crash safety and safe loading: real training processes killed at chosen points, Ctrl-C,
NaN losses, checkpoints carrying pickled code, and tampered or truncated checkpoints.

The counts quoted in docs/RELIABILITY.md come from the constants here (KILLS, TRUNCATION_POINTS).
Subprocesses run with one thread each: bitwise equality is claimed for a fixed thread count, and two
training processes on a 2-core machine would otherwise fight over the cores.
"""
from __future__ import annotations

import ast
import csv
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from data.transforms import InputError
from engine.training import Hooks, TrainingDiverged, build_loss
from tests.script_fixtures import (REPO, ctrl_c_in_a_finalizer, default_sigint, processed, run_train,  # noqa: F401
                                   sigint_default, train_argv, trained)
from models import model_from_checkpoint
from utils.checkpoint import load_checkpoint, safe_load, save_checkpoint
from utils.cli import run_cli

EPOCHS = 12  # enough that the chain of kills below never reaches the end by accident
# The kills, one per process, in order; each resumes from the last.pth the previous one left. A point is
# counted from its own process's start: (what, which file or step, the n-th time it happens)
#   renamed  - right after the n-th rename onto the file (that epoch's checkpoint in place, its history row not yet)
#   mid-write - after half the bytes of the n-th write of the file's temporary file
#   unrenamed - the n-th temporary file written and fsync'ed, just before its rename
#   step     - right after the n-th optimizer step (mid-epoch)
KILLS = (("renamed", "last.pth", 2), ("mid-write", "last.pth", 1), ("unrenamed", "last.pth", 1),
         ("step", "", 6), ("mid-write", "last.pth", 2))
# the epoch (0-based) last.pth holds after each kill: 4 steps an epoch, one checkpoint an epoch
EPOCH_AFTER_KILL = (1, 1, 1, 2, 3)
TRUNCATION_POINTS = 64  # prefixes of a real checkpoint that must all be refused
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# train.py that stops at a kill point: it touches READY and waits there, so the SIGKILL lands at that known
# point instead of after a sleep a loaded machine may outrun. ``python -c KILL_POINT READY WHAT NAME N ARGV``.
# Everything else (torch.save's bytes, fsync, the atomic rename, resume) is the real code.
KILL_POINT = r"""
import io, os, pathlib, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
ready, what, name, n, argv = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
seen = 0
def count(hit=True):
    global seen
    seen += hit
    return hit and seen == n
def stop():
    ready.touch()
    while True:
        time.sleep(0.01)
def is_temp(path):  # the hidden temporary file of NAME: .NAME.tmp-PID
    return os.path.basename(os.fspath(path)) == f".{name}.tmp-{os.getpid()}"
_save, _replace = torch.save, os.replace
def save(obj, f, *args, **kwargs):
    if what != "mid-write" or not isinstance(f, (str, os.PathLike)) or not count(is_temp(f)):
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    with open(f, "wb") as out:
        out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        out.flush()
    stop()
def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(os.fspath(dst)) == name
    if what == "unrenamed" and count(hit):
        stop()
    _replace(src, dst, *args, **kwargs)
    if what == "renamed" and count(hit):
        stop()
torch.save, os.replace = save, replace
if what == "step":
    register_optimizer_step_post_hook(lambda *args: count() and stop())
import train
from utils.cli import run_cli
run_cli(train.main, train.get_args_parser(), argv)
"""


def crash_argv(data, out, *extra: str) -> list[str]:
    """The run every crash test repeats: cosine schedule, augmentation on, deterministic, default --amp."""
    return train_argv(data, out, "--deterministic", "--seed", "0", "--lr", "3e-3", *extra, epochs=EPOCHS)


_launched: list[subprocess.Popen] = []


def launch(argv: list[str], log: Path, kill_point: tuple[Path, str, str, int] | None = None) -> subprocess.Popen:
    """Start train.py with stdout/stderr in LOG.out/LOG.err; with ``kill_point`` (ready file, what, name, n),
    train.py that stops at that point (see KILL_POINT)."""
    if kill_point is None:
        cmd = [sys.executable, "train.py", *argv]
    else:
        cmd = [sys.executable, "-c", KILL_POINT, *map(str, kill_point), *argv]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)
    _launched.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failing test must not leave its training process running."""
    yield
    while _launched:
        proc = _launched.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll every 10 ms until ``condition()``; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return bool(condition())
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting on {proc.args[:3]}")


def history_rows(out: Path) -> int:
    try:
        with open(out / "history.csv", newline="") as f:
            return len(list(csv.DictReader(f)))
    except FileNotFoundError:
        return 0


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise-equal weights, optimizer moments, schedule, RNG states and history (timings aside)."""
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"weights differ at {key}"
    for (i, sa), (j, sb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert i == j and sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimizer {key} of {i} differs"
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in ckpt["history"]] for ckpt in (a, b)]
    assert strip[0] == strip[1]


def assert_outputs_loadable(out: Path) -> None:
    """What a crash may leave: complete checkpoints under their names, hidden temporary files beside them."""
    for pth in out.glob("*.pth"):
        assert not pth.name.startswith("."), pth
        ckpt = torch.load(pth, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        load_checkpoint(pth)
    for tmp in out.glob(".*.tmp-*"):  # hidden, and never named like a checkpoint
        assert tmp.name.startswith(".") and not tmp.name.endswith(".pth"), tmp
    if (out / "history.csv").exists():
        history_rows(out)  # parses


@pytest.fixture(scope="module")
def reference(processed, tmp_path_factory) -> dict:
    """The final last.pth of an uninterrupted run with the crash tests' arguments."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(crash_argv(processed, out), out / "run")
    assert proc.wait(timeout=300) == 0, (out / "run.err").read_text()
    return torch.load(out / "last.pth", weights_only=True)


# ----------------------------------------------------------------------------- SIGKILL, resume
def test_killed_runs_resume_to_the_same_weights_as_an_uninterrupted_run(processed, reference, tmp_path):
    out = tmp_path / "out"
    for i, ((what, name, n), epoch) in enumerate(zip(KILLS, EPOCH_AFTER_KILL)):
        argv = crash_argv(processed, out, *(["--resume", str(out / "last.pth")] if (out / "last.pth").exists() else []))
        ready, log = tmp_path / f"ready{i}", tmp_path / f"run{i}"
        proc = launch(argv, log, (ready, what, name, n))
        assert wait_for(ready.exists, proc), f"kill {i} ({what} {name} {n}): the run ended before that point\n" \
                                             f"{log.with_suffix('.err').read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        left = sorted(p.name for p in out.glob(f".*.tmp-{proc.pid}"))
        # a write cut short leaves its hidden temporary file (the next run deletes it); no other point does
        assert left == ([f".{name}.tmp-{proc.pid}"] if what in ("mid-write", "unrenamed") else []), (i, left)
        assert_outputs_loadable(out)
        assert load_checkpoint(out / "last.pth")["epoch"] == epoch, f"kill {i} ({what} {name} {n})"

    proc = launch(crash_argv(processed, out, "--resume", str(out / "last.pth")), tmp_path / "final")
    assert proc.wait(timeout=300) == 0, (tmp_path / "final.err").read_text()
    assert not list(out.glob(".*.tmp-*")), "stale temporary files of killed runs were not cleaned up"
    assert_same_training_state(torch.load(out / "last.pth", weights_only=True), reference)


def test_truncated_checkpoints_are_refused_never_half_loaded(trained, tmp_path):
    data = (trained["out"] / "last.pth").read_bytes()
    cuts = sorted({0, 1, len(data) - 1, *random.Random(0).sample(range(2, len(data) - 1), TRUNCATION_POINTS - 3)})
    assert len(cuts) == TRUNCATION_POINTS
    path = tmp_path / "cut.pth"
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"cut\.pth: not a readable PyTorch checkpoint, truncated"):
            load_checkpoint(path)


def test_a_failed_write_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    """A full disk mid-write: the old file stays byte for byte, no temporary file is left behind."""
    path = tmp_path / "last.pth"
    path.write_bytes((trained["out"] / "last.pth").read_bytes())
    before = path.read_bytes()

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_full_disk_during_training_is_one_line(processed, tmp_path, monkeypatch, capsys):
    def full_disk(obj, f):
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), train_argv(processed, tmp_path, epochs=1))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not list(tmp_path.glob("*.pth")) and [p.name for p in tmp_path.glob(".*")] == [".lock"]  # the run's lock


# ----------------------------------------------------------------------------- Ctrl-C
# train.py whose second validation announces itself (touches the file named first) and then waits: SIGINT
# lands at that known point, in Python code, instead of after a sleep that a loaded machine may outrun
AT_SECOND_VALIDATION = r"""
import pathlib, sys, time
import train
from engine.training import Hooks, validate as _validate
from utils.cli import run_cli
ready, argv = pathlib.Path(sys.argv[1]), sys.argv[2:]
calls = []
def validate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        ready.touch()
        while True:
            time.sleep(0.01)
    return _validate(*args, **kwargs)
run_cli(lambda args: train.main(args, Hooks(validate=validate)), train.get_args_parser(), argv)
"""


def test_sigint_stops_cleanly_and_says_how_to_resume(processed, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    cmd = [sys.executable, "-c", AT_SECOND_VALIDATION, str(ready), *crash_argv(processed, out, "--epochs", "3")]
    with open(tmp_path / "run.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=sigint_default)
    _launched.append(proc)
    assert wait_for(ready.exists, proc), (tmp_path / "run.err").read_text()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "run.err").read_text()
    err = (tmp_path / "run.err").read_text()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == [f"interrupted at epoch 2/3 (validation); {out / 'last.pth'} holds epoch 1: "
                     f"resume with --resume {out / 'last.pth'}"], err
    assert load_checkpoint(out / "last.pth")["epoch"] == 0  # 0-based: epoch 1 finished, epoch 2 was dropped


def wrapped_loss(wrap, **hooks) -> Hooks:
    """Hooks whose criterion is the run's own wrapped by ``wrap`` (a fault injected at a known step)."""
    def loss(*args, **kwargs):
        criterion, channels = build_loss(*args, **kwargs)
        return wrap(criterion), channels
    return Hooks(loss=loss, **hooks)


def run_hooked(argv: list[str], hooks: Hooks) -> None:
    """train.py's command line, as run_cli runs it, with ``hooks`` injected."""
    run_cli(lambda args: train.main(args, hooks), train.get_args_parser(), argv)


class _Interrupt:
    """A criterion wrapper that raises KeyboardInterrupt at training step ``at`` (1-based, over all epochs)."""

    def __init__(self, criterion, at: int):
        self.criterion, self.at, self.calls = criterion, at, 0

    def __call__(self, outputs, target):
        if torch.is_grad_enabled():  # training steps only; validation runs under no_grad
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return self.criterion(outputs, target)


@pytest.mark.parametrize("at,expected", [(2, r"interrupted at epoch 1/2, step 2/4; no epoch had finished, nothing "
                                                r"was saved"),
                                         (6, r"interrupted at epoch 2/2, step 2/4; .*last\.pth holds epoch 1: "
                                             r"resume with --resume .*last\.pth")])
def test_ctrl_c_message_names_the_step_and_what_is_saved(processed, tmp_path, capsys, at, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_hooked(train_argv(processed, tmp_path, "--no-augment", epochs=2),
                   wrapped_loss(lambda criterion: _Interrupt(criterion, at)))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(expected, err[0]), err
    assert (tmp_path / "last.pth").exists() == (at > 4)


class _CtrlCInFinalizer(_Interrupt):
    """A criterion wrapper whose training step ``at`` gets a Ctrl-C that a finalizer swallows, instead of one
    raised in the loop."""

    def __call__(self, outputs, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                ctrl_c_in_a_finalizer()
        return self.criterion(outputs, target)


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_at_the_next_step(processed, tmp_path, capsys, default_sigint):
    wrappers = []
    with pytest.raises(SystemExit) as exit_info:
        run_hooked(train_argv(processed, tmp_path, "--no-augment", epochs=2),
                   wrapped_loss(lambda criterion: wrappers.append(_CtrlCInFinalizer(criterion, 6)) or wrappers[-1]))
    assert exit_info.value.code == 130
    assert wrappers[-1].calls == 6  # no training step after the one the Ctrl-C arrived in
    err = capsys.readouterr().err.strip().splitlines()
    # step 2 of epoch 2 went on to its update, the run stopped before step 3, and the message names the step
    # the Ctrl-C arrived in (the epoch is dropped either way); nothing else is printed, no "Exception ignored"
    assert len(err) == 1 and re.fullmatch(r"interrupted at epoch 2/2, step 2/4; .*last\.pth holds epoch 1: "
                                          r"resume with --resume .*last\.pth", err[0]), err
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_cli put it back


def test_ctrl_c_while_an_epoch_is_saved_lets_its_files_be_written(processed, tmp_path, capsys, monkeypatch,
                                                                  default_sigint):
    """A real SIGINT while epoch 1's best_model.pth is being written: the save finishes, then the run stops.
    Before, the write was cut short and the message said that nothing was saved, beside a best_model.pth."""
    import engine.training
    writes = []

    def save_interrupted(ckpt, path):
        writes.append(Path(path).name)
        if len(writes) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        save_checkpoint(ckpt, path)

    monkeypatch.setattr(engine.training, "save_checkpoint", save_interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), train_argv(processed, tmp_path, "--no-augment", epochs=3))
    assert exit_info.value.code == 130
    assert writes == ["best_model.pth", "last.pth"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted at epoch 1/3 (saving); {tmp_path / 'last.pth'} holds epoch 1: resume with "
                   f"--resume {tmp_path / 'last.pth'}"], err
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == load_checkpoint(tmp_path / "best_model.pth")["epoch"] == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_cli put it back


# ----------------------------------------------------------------------------- NaN / inf
class _Poison:
    """A criterion wrapper whose training loss becomes ``value`` from training step ``at`` on."""

    def __init__(self, criterion, at: int, value: float):
        self.criterion, self.at, self.value, self.calls = criterion, at, value, 0

    def __call__(self, outputs, target):
        loss = self.criterion(outputs, target)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.at:
                return loss * self.value
        return loss


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(processed, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:  # at=7: epoch 2, step 3
        run_hooked(train_argv(processed, tmp_path, "--no-augment", epochs=3),
                   wrapped_loss(lambda criterion: _Poison(criterion, at=7, value=value)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"training loss became {value} at epoch 2/3, step 3/4" in err[0]
    assert "last.pth still holds epoch 1" in err[0] and "--lr" in err[0] and "--amp off" in err[0]
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert ckpt["epoch"] == 0 and len(ckpt["history"]) == 1 and history_rows(tmp_path) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    model_from_checkpoint(ckpt)


def test_nonfinite_weights_after_the_last_step_are_never_saved(processed, tmp_path):
    """The loss of the epoch's last step was finite, but that step's update broke the weights."""
    class BrokenAdam(torch.optim.Adam):
        steps = 0

        def step(self, closure=None):
            result = super().step(closure)
            BrokenAdam.steps += 1
            if BrokenAdam.steps == 8:  # the last step of epoch 2
                next(p for g in self.param_groups for p in g["params"]).data.fill_(math.inf)
            return result

    hooks = Hooks(optimizer=lambda name, params, lr, weight_decay: BrokenAdam(params, lr=lr, weight_decay=weight_decay))
    with pytest.raises(TrainingDiverged, match=r"weights stopped being finite in epoch 2/3.*holds epoch 1"):
        train.main(train.get_args_parser().parse_args(train_argv(processed, tmp_path, "--no-augment", epochs=3)), hooks)
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0


def test_without_per_step_checks_the_epoch_end_check_still_stops_before_saving(processed, tmp_path):
    """The GPU path: non-finite losses are counted on the device and read once, at the end of the epoch."""
    hooks = wrapped_loss(lambda criterion: _Poison(criterion, at=7, value=math.nan), check_each_step=lambda device: False)
    with pytest.raises(TrainingDiverged, match=r"not finite in 2 of 4 steps of epoch 2/3.*holds epoch 1"):
        train.main(train.get_args_parser().parse_args(train_argv(processed, tmp_path, "--no-augment", epochs=3)), hooks)
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0


# ----------------------------------------------------------------------------- tracebacks: bugs only
def test_user_errors_are_one_line_but_bugs_keep_their_traceback(processed, tmp_path, capsys):
    argv = train_argv(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(SystemExit):
        run_cli(train.main, train.get_args_parser(), argv)
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(InputError, match="no training data"):  # --debug: the traceback of a user error too
        run_cli(train.main, train.get_args_parser(), [*argv, "--debug"])

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in validate")

    with pytest.raises(ZeroDivisionError, match="a bug"):  # propagates: python prints the traceback
        run_hooked(train_argv(processed, tmp_path / "out", epochs=1), Hooks(validate=bug))


# ----------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this runs ``exec``: it writes MARKER. Stands in for any malicious pickled object."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.fixture
def booby_trapped(trained, tmp_path) -> tuple[Path, Path]:
    """(a real checkpoint with a pickled payload in its args, the marker file the payload would write)."""
    marker = tmp_path / "code-ran.txt"
    ckpt = load_checkpoint(trained["out"] / "last.pth")
    ckpt["args"]["note"] = _Payload(marker)
    path = tmp_path / "trapped.pth"
    torch.save(ckpt, path)
    return path, marker


def test_the_payload_is_live(booby_trapped):
    """The test file really would run code when loaded unsafely (so the refusals below mean something)."""
    path, marker = booby_trapped
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_checkpoint_with_pickled_code_is_refused_before_it_runs(booby_trapped):
    path, marker = booby_trapped
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "trapped.pth: refused" in message and "exec" in message, message
    with pytest.raises(InputError, match="refused"):
        safe_load(path, "backbone weights file")
    assert not marker.exists()


@pytest.mark.parametrize("script", ["train.py", "infer.py", "evaluate.py"])
def test_each_script_refuses_pickled_code_in_one_line(booby_trapped, processed, tmp_path, script):
    path, marker = booby_trapped
    if script == "train.py":
        args = crash_argv(processed, tmp_path / "out", "--resume", str(path), "--width", "8")
    elif script == "infer.py":
        Image.new("L", (64, 64), 90).save(tmp_path / "slice.png")
        args = ["--checkpoint", str(path), "--input", str(tmp_path / "slice.png"), "--output",
                str(tmp_path / "mask.png"), "--device", "cpu"]
    else:
        args = ["--checkpoint", str(path), "--data", str(processed), "--out", str(tmp_path / "eval"), "--device", "cpu",
                "--no-progress"]
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: refused"), proc.stderr
    assert not marker.exists()


def test_backbone_weights_with_pickled_code_are_refused(booby_trapped, processed, tmp_path, capsys):
    path, marker = booby_trapped
    argv = train_argv(processed, tmp_path, "--model", "deeplabv3", "--backbone-weights", str(path))
    with pytest.raises(SystemExit):
        run_cli(train.main, train.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone weights file holds pickled objects" in err[0], err
    assert not marker.exists()


def _loads(tree: ast.AST):
    """(call node, module) for every torch.load / np.load / pickle.load(s) call in a parsed file."""
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module, name = func.value.id, func.attr
            if (module, name) in {("torch", "load"), ("np", "load"), ("numpy", "load"), ("pickle", "load"),
                                  ("pickle", "loads")}:
                yield node, module


def test_every_load_in_the_code_refuses_pickled_code():
    """torch.load always with weights_only=True, np.load never with allow_pickle=True, no pickle.load at all."""
    sources = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    torch_loads = 0
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "numpy"):
                assert not {a.name for a in node.names} & {"load", "loads"}, f"{path}: imports a bare load"
        for call, module in _loads(tree):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            if module == "torch":
                torch_loads += 1
                flag = keywords.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: no weights_only=True"
            elif module == "pickle":
                raise AssertionError(f"{where}: pickle.load runs code from the file")
            else:
                flag = keywords.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and not flag.value), f"{where}: allow_pickle"
    assert torch_loads >= 2  # utils/checkpoint.py and models/deeplabv3.py at least


# ----------------------------------------------------------------------------- mismatches
def test_tampered_weights_say_what_the_checkpoint_holds(trained):
    ckpt = load_checkpoint(trained["out"] / "last.pth")
    first = next(iter(ckpt["model"]))
    shape = tuple(ckpt["model"][first].shape)

    wrong = {**ckpt, "model": {**ckpt["model"], first: torch.zeros(3, *shape[1:])}}
    with pytest.raises(InputError, match=rf"holds weights that do not fit the unet .*'width': 8.*{first} is "
                                         rf"\(3, {shape[1]}, .*in the checkpoint, \({shape[0]}, .* in the model"):
        model_from_checkpoint(wrong, "ck.pth")
    missing = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != first}}
    with pytest.raises(InputError, match=rf"1 weight\(s\) missing from the checkpoint \({first}\)"):
        model_from_checkpoint(missing)
    extra = {**ckpt, "model": {**ckpt["model"], "head.extra": torch.zeros(1)}}
    with pytest.raises(InputError, match=r"no place for \(head\.extra\)"):
        model_from_checkpoint(extra)
    unknown = {**ckpt, "model_config": {**ckpt["model_config"], "depth": 9}}
    with pytest.raises(InputError, match=r"describes a model this code cannot build .*depth"):
        model_from_checkpoint(unknown)


def test_resume_from_a_weights_only_file_says_what_is_missing(trained, processed, tmp_path):
    ckpt = load_checkpoint(trained["out"] / "last.pth")
    for key in ("optimizer", "scheduler"):
        del ckpt[key]
    torch.save(ckpt, tmp_path / "slim.pth")
    with pytest.raises(InputError, match=r"slim\.pth: cannot resume from it, it lacks \['optimizer', 'scheduler'\]"):
        run_train(train_argv(processed, tmp_path / "out", "--sched", "none", "--resume", str(tmp_path / "slim.pth"),
                             width=8))


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import numpy as np

    from utils.checkpoint import restore_rng_states, rng_states

    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": rng_states(gen)}, tmp_path / "rng.pth")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    gen.manual_seed(9)
    restore_rng_states(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"], gen)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen))) \
        == expected

