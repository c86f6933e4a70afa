"""Command-line plumbing shared by the scripts: bad input is one clear line, not a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> None:
    """Parse arguments and run ``main``; errors the user can fix print as ``error: ...`` and exit 1.

    User-input errors are ValueError (data.transforms.InputError among them) and OSError.

    ``--debug`` (when the parser has it) shows the full traceback instead.
    """
    args = parser.parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, read-only file system, ...
        if getattr(args, "debug", False):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
