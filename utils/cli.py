"""Command-line plumbing shared by the scripts: bad input is one clear line, not a traceback.

Exit codes: 0 done; 1 an error the user can fix (bad input, a full disk, training that diverged), shown as
one ``error: ...`` line; 130 interrupted (Ctrl-C). Anything else is a bug and keeps its traceback.

A Ctrl-C is also remembered: Python swallows the KeyboardInterrupt when the signal lands in a finalizer or a
weakref callback (torch._dynamo runs some during the first optimizer step), and the loops of train.py,
pretrain.py and infer.py call ``raise_if_interrupted`` at each step, so such a run still stops at the next one.
Within ``ctrl_c_held`` (train.py writing an epoch's checkpoints) a Ctrl-C is only remembered, and stops the run
once the block has finished.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Callable

from base import InputError


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> None:
    """Parse arguments and run ``main``; errors the user can fix print as ``error: ...`` and exit 1.

    User errors are the project's InputError (base), OSError (missing file, full disk, read-only
    folder) and FloatingPointError (train.py's diverged loss). Ctrl-C prints the interrupt's message
    (train.py says where it stopped and how to resume) and exits 130. Any other exception, a plain
    ValueError included, is a bug: it propagates with its traceback, so it is not mistaken for bad input.

    ``--debug`` (when the parser has it) shows the full traceback of user errors too.
    """
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with remembered_ctrl_c():
            main(args)
    except (InputError, FloatingPointError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, read-only file system, ...
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- Ctrl-C
_ctrl_c = threading.Event()  # set by the handler below; cleared when run_cli starts and ends


def _on_sigint(signum, frame) -> None:
    _ctrl_c.set()
    raise KeyboardInterrupt


def _unraisable(previous):
    def hook(unraisable) -> None:
        # the Ctrl-C that a finalizer swallowed is re-raised by raise_if_interrupted: nothing to report
        if not (_ctrl_c.is_set() and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            previous(unraisable)
    return hook


@contextlib.contextmanager
def remembered_ctrl_c():
    """Within the block, a Ctrl-C raises KeyboardInterrupt as usual and is also remembered for
    ``raise_if_interrupted``. A process whose SIGINT is ignored (started with ``nohup`` or ``&`` by a shell
    without job control) or handled by someone else keeps it so, and off the main thread nothing changes."""
    _ctrl_c.clear()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _ctrl_c.clear()


def _remember_only(signum, frame) -> None:
    _ctrl_c.set()


@contextlib.contextmanager
def ctrl_c_held():
    """Within the block a Ctrl-C is only remembered: the block (writing an epoch's checkpoints) finishes, and
    the next ``raise_if_interrupted`` stops the run. Where ``remembered_ctrl_c`` does not handle Ctrl-C
    (off the main thread, SIGINT ignored or handled by someone else) nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not _on_sigint:
        yield
        return
    signal.signal(signal.SIGINT, _remember_only)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived (in ``remembered_ctrl_c``) although none propagated:
    it landed where Python swallows exceptions. Cheap enough to call at every step."""
    if _ctrl_c.is_set():
        raise KeyboardInterrupt


def add_runtime_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every model script shares: where to run, in what precision, how talkative."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision: auto = bf16 on GPUs and on CPUs with native bf16, else fp32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p

