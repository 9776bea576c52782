"""``cdpdnet view``: open napari with the CDPDNet docks and the given CTs (what start.sh runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="open napari with the CDPDNet docks and these CTs (files or DICOM folders)",
        description=(
            "Open napari with the segmentation and structure-table docks, and open each CT with "
            "the napari-cdpdnet reader (patient geometry kept). Needs a display and a Qt binding "
            "(pip install 'napari-cdpdnet[all]')."
        ),
    )
    p.add_argument("paths", nargs="*", type=Path, metavar="CT", help="CT file or DICOM folder")
    # For the journey tests: report what the window shows, save a screenshot, and quit.
    p.add_argument("--smoke-report", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from napari_cdpdnet.errors import InputError

    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        # Qt would abort the process without a Python error.
        raise InputError(
            "no display to open a window on (DISPLAY is not set): run this on a desktop session, "
            "or under a virtual display (xvfb-run -a cdpdnet view ...)"
        )
    try:
        import qtpy  # noqa: F401 - raises when no Qt binding is installed
    except ImportError as exc:
        raise InputError(
            f"the viewer cannot start here ({exc}); install the GUI extras with "
            "pip install 'napari-cdpdnet[all]', or use the other cdpdnet commands"
        ) from exc
    from napari_cdpdnet._gui.launch import launch

    return launch(args.paths, smoke_report=args.smoke_report)
