"""utils.cli.run_cli: the project's input errors are one line, a bug keeps its traceback; a Ctrl-C is remembered."""
from __future__ import annotations

import argparse
import signal
import sys

import pytest

from base import InputError
from tests.script_fixtures import ctrl_c_in_a_finalizer, default_sigint  # noqa: F401
from utils.cli import raise_if_interrupted, remembered_ctrl_c, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--debug", action="store_true")
    return p


def _raising(exc: BaseException):
    def main(args):
        raise exc
    return main


def test_an_input_error_is_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(_raising(InputError("scan.nii.gz: bad affine")), _parser(), [])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: scan.nii.gz: bad affine"]


def test_an_internal_value_error_keeps_its_traceback_instead_of_looking_like_bad_input():
    with pytest.raises(ValueError, match="internal"):
        run_cli(_raising(ValueError("internal invariant broken")), _parser(), [])


def test_debug_shows_the_traceback_of_input_errors_too():
    with pytest.raises(InputError):
        run_cli(_raising(InputError("x")), _parser(), ["--debug"])


def test_ctrl_c_exits_130_with_its_message(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(_raising(KeyboardInterrupt("interrupted at epoch 2/3")), _parser(), [])
    assert info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted at epoch 2/3"


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check_and_forgotten_after_the_block(default_sigint):
    hook = sys.unraisablehook
    with remembered_ctrl_c():
        raise_if_interrupted()  # nothing yet
        ctrl_c_in_a_finalizer()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # forgotten: the next run starts clean
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is hook


def test_an_ignored_sigint_stays_ignored():
    """A run started with nohup (or & by a shell without job control) inherits SIGINT ignored: it keeps it so."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with remembered_ctrl_c():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
