"""utils.cli.run_cli: the project's input errors are one line, a bug keeps its traceback."""
from __future__ import annotations

import argparse

import pytest

from base import InputError
from utils.cli import run_cli


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
