"""Command-line plumbing shared by the scripts: bad input is one clear line, not a traceback.

Exit codes: 0 done; 1 an error the user can fix (bad input, a full disk, training that diverged), shown as
one ``error: ...`` line; 130 interrupted (Ctrl-C). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
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


def add_runtime_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every model script shares: where to run, in what precision, how talkative."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision: auto = bf16 on GPUs and on CPUs with native bf16, else fp32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p

