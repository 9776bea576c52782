"""The CLIP options every command that reads typed structure names shares, and the lines it prints.

``--clip auto|on|off`` chooses the mode (see :mod:`napari_cdpdnet.inference.clip_choice`);
``--clip-weights FILE`` names a local open_clip ViT-B/32 file. They are two options rather than
one ``--clip MODE|PATH`` because a value that is either a word or a path is ambiguous (a file
named ``on``) and hides typos (``--clip of`` would be read as a missing file), and because the
other weights options name files the same way (``--checkpoint FILE``, ``--dino FILE``,
``train-roi-prompts --clip-weights``). ``--clip-weights`` alone implies ``--clip on``: a file the
user names must work. ``--clip-threshold`` and ``--clip-margin`` set when CLIP is trusted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.inference.clip_choice import CLIP_MODES
from napari_cdpdnet.vocabulary.clip_stage import (
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_MARGIN,
    ClipThresholds,
)

__all__ = ["add_clip_options", "clip_settings", "print_understanding"]


def add_clip_options(p: argparse.ArgumentParser, *, bare_flag_means_on: bool = False) -> None:
    """``--clip``, ``--clip-weights``, ``--clip-threshold`` and ``--clip-margin`` on ``p``."""
    g = p.add_argument_group(
        "matching typed names with CLIP",
        "Names, synonyms, abbreviations, typos and other languages are matched by the\n"
        "lexicon; CLIP ViT-B/32 ranks the 32 fixed structures for wording the lexicon\n"
        "does not know (it never adds a structure).",
    )
    g.add_argument(
        "--clip",
        choices=CLIP_MODES,
        default=None,
        nargs="?" if bare_flag_means_on else None,
        const="on" if bare_flag_means_on else None,
        help="auto (default): use CLIP when its weights are here or downloadable and the [clip] "
        "extra is installed, else stay lexical with a note; on: CLIP must work (missing weights: "
        "exit 4); off: lexicon only",
    )
    g.add_argument(
        "--clip-weights", type=Path, metavar="FILE",
        help="open_clip ViT-B/32 weights file or folder (implies --clip on; default: the weights "
        "folder or cache, see 'cdpdnet weights info')",
    )
    g.add_argument(
        "--clip-threshold", type=float, default=DEFAULT_MIN_COSINE, metavar="COS",
        help=f"least cosine of CLIP's best structure to accept it (default {DEFAULT_MIN_COSINE}; "
        "see docs/resolver.md)",
    )
    g.add_argument(
        "--clip-margin", type=float, default=DEFAULT_MIN_MARGIN, metavar="COS",
        help=f"least cosine margin over the runner-up (default {DEFAULT_MIN_MARGIN})",
    )


def clip_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``Segmenter`` keyword arguments from the options (mode, weights file, thresholds).

    Raises:
        InputError: ``--clip off`` together with ``--clip-weights``.
    """
    mode = args.clip or ("on" if args.clip_weights is not None else "auto")
    if mode == "off" and args.clip_weights is not None:
        raise InputError("--clip off and --clip-weights contradict each other: drop one")
    return {
        "clip": mode,
        "clip_weights": args.clip_weights,
        "clip_thresholds": ClipThresholds(args.clip_threshold, args.clip_margin),
    }


def print_understanding(
    resolutions: Sequence[Any], plan: Any, file: IO[str] | None = None
) -> None:
    """How the request was understood: each phrase's source, CLIP's cosine and margin, the
    alternatives, and the TTPG task prompt each pass runs (stderr by default)."""
    from napari_cdpdnet.vocabulary.explain import understanding_lines

    out = file or sys.stderr
    for line in understanding_lines(resolutions, plan):
        print(line, file=out)
