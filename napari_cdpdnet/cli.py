"""The ``cdpdnet`` command line.

Thin on purpose: each subcommand lives in ``napari_cdpdnet.commands.<name>`` with a
``register(subparsers)`` function that adds its parser and sets ``func``. The core raises
:class:`~napari_cdpdnet.errors.CdpdnetError` for anything the user can fix; here it becomes a
one-line message on stderr and the error's exit code (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from napari_cdpdnet import __version__
from napari_cdpdnet.errors import CdpdnetError, OutputExistsError

__all__ = ["main", "build_parser", "EXIT_CODES"]

#: Subcommand modules, in the order ``cdpdnet --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "segment", "segment_by_example", "report", "structures", "weights", "train", "evaluate",
    "train_roi_prompts", "info", "view",
)

#: What a script can rely on.
EXIT_CODES = {
    0: "success",
    1: "error (see message)",
    2: "bad input: file, folder or argument",
    3: "output exists (use --overwrite)",
    4: "weights missing, corrupted or not matching",
    5: "unknown structure requested",
    70: "internal error (a bug: please report it with --debug output)",
    130: "cancelled",
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    epilog = "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="cdpdnet",
        description="CT segmentation with CDPDNet (headless; the napari plugin uses the same core).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"napari-cdpdnet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"napari_cdpdnet.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdpdnet`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub prints through its own handler: propagating would print each line twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CdpdnetError as exc:
        if args.debug:
            raise
        message = str(exc)
        if isinstance(exc, OutputExistsError) and hasattr(args, "overwrite") and "--overwrite" not in message:
            message += " (--overwrite replaces it)"
        print(f"cdpdnet {args.command}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cdpdnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
        if args.debug:
            raise
        print(
            f"cdpdnet {args.command}: internal error: {type(exc).__name__}: {exc}\n"
            "This is a bug; rerun with --debug and report the output.",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
