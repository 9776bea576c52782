"""``cdpdnet segment-by-example``: mark a box, click or scribble; get the structure it points at.

Writes through :func:`napari_cdpdnet.export.export_segmentation` like ``cdpdnet segment``, with
the same export options except ``--probabilities`` (the final run keeps no probability maps; the
ranking's maps cover only a crop around the ROI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_cdpdnet.commands._clip import add_clip_options, clip_settings, print_understanding
from napari_cdpdnet.commands.segment import add_export_options
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.inference.settings import DEFAULT_PRESET, PRESETS, preset_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment-by-example",
        help="segment the structure a box, click or scribble points at (no name needed)",
        description=(
            "Find which of the 32 CDPDNet structures a region of interest marks and segment it, "
            "keeping only the connected components the ROI touches. Without --mapper the "
            "structure whose probability dominates inside the ROI wins (needs only the official "
            "checkpoint); with a mapper trained by 'cdpdnet train-roi-prompts' the learned ROI "
            "prompt decides. Prints the method and the top 3 with confidences. With -s, you say "
            "what the ROI marks instead ('the big organ under the right ribs'): the name is "
            "resolved like 'cdpdnet segment -s' (lexicon, then CLIP) and that structure is kept "
            "where the ROI touches it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "coordinates are patient LPS millimetres (DICOM), or voxel indices x y z with --voxel.\n"
            "examples:\n"
            "  cdpdnet segment-by-example ct.nii.gz --click 60 -150 250 -o kidney.nii.gz\n"
            "  cdpdnet segment-by-example ct.nii.gz --voxel --box 30 40 60 50 60 80 -o out.nii.gz\n"
            "  cdpdnet segment-by-example ct.nii.gz --scribble marks.nii.gz -o out.nii.gz\n"
            "  cdpdnet segment-by-example ct.nii.gz --click 60 -150 250 -s 'bean shaped organ on the left' -o k.nii.gz\n"
        ),
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="CT file or DICOM folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--box", type=float, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                       help="two opposite corners of a box")
    where.add_argument("--click", type=float, nargs=3, metavar=("X", "Y", "Z"), help="one point")
    where.add_argument("--scribble", type=Path, metavar="MASK",
                       help="label map on the CT's grid whose non-zero voxels are the scribble")
    p.add_argument("--voxel", action="store_true",
                   help="--box/--click are voxel indices (x y z) instead of LPS mm")
    p.add_argument("-o", "--output", type=Path, required=True, help="output label map file")
    p.add_argument("-s", "--structure", metavar="NAME",
                   help="what the ROI marks, in words (one structure): segment it instead of the "
                        "ranking's best")
    p.add_argument("--mapper", type=Path, help="learned ROI prompt mapper (cdpdnet train-roi-prompts)")
    p.add_argument("--context", type=float, default=None, metavar="MM",
                   help="context around the ROI for the ranking run (default 72 mm)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help=preset_help())
    p.add_argument("--checkpoint", type=Path, help="official CDPDNet checkpoint (cdpdnet.pth)")
    p.add_argument("--dino", type=Path, help="DINOv2-base weights file or folder")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--series-uid", help="DICOM folder with several series: the SeriesInstanceUID to use")
    add_export_options(p, probabilities=False)
    add_clip_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _roi(args: argparse.Namespace, ct) -> object:
    from napari_cdpdnet.example.marks import ROI
    from napari_cdpdnet.io.images import read_label_map

    g = ct.geometry
    if args.scribble is not None:
        if not args.scribble.exists():
            raise InputError(f"--scribble {args.scribble}: no such file")
        marks, mg = read_label_map(args.scribble)
        if not mg.same_grid(g):
            raise InputError(f"--scribble {args.scribble}: not on the CT's voxel grid")
        return ROI.from_mask(marks).check(g.shape)
    if args.box is not None:
        a, b = args.box[:3], args.box[3:]
        if args.voxel:
            return ROI.box(a[::-1], b[::-1]).check(g.shape)
        return ROI.box_mm(a, b, g).check(g.shape)
    if args.voxel:
        return ROI.click(args.click[::-1]).check(g.shape)
    return ROI.click_mm(args.click, g).check(g.shape)


def run(args: argparse.Namespace) -> int:
    from napari_cdpdnet.commands.segment import (
        _ProgressBar,
        check_outputs,
        chosen_formats,
    )
    from napari_cdpdnet.example.run import DEFAULT_CONTEXT_MM, segment_by_example
    from napari_cdpdnet.export import export_segmentation
    from napari_cdpdnet.export.formats import check_dicom_source
    from napari_cdpdnet.export.labeltable import build_label_table
    from napari_cdpdnet.fileutil import full_suffix
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.io.images import LABEL_MAP_SUFFIXES, read_ct

    if not args.input.exists():
        raise InputError(f"{args.input}: no such file or folder")
    if full_suffix(args.output) not in LABEL_MAP_SUFFIXES:
        raise InputError(f"-o {args.output}: give a label map file ({', '.join(LABEL_MAP_SUFFIXES)})")
    formats = chosen_formats(args)
    check_outputs([args.output], [], formats, args.overwrite)  # per-structure files: once it is known
    segmenter = Segmenter(checkpoint=args.checkpoint, dino=args.dino, allow_download=not args.offline,
                          **clip_settings(args))
    named = None
    if args.structure is not None:  # the words are checked before the CT is even read
        named_structures, resolutions, plan = segmenter.plan(args.structure)
        if len(named_structures) != 1:
            raise InputError(f"-s {args.structure!r} names {len(named_structures)} structures "
                             f"({', '.join(s.name for s in named_structures)}): name the one the ROI marks")
        print_understanding(resolutions, plan)
        named = named_structures[0]
    mapper = None
    if args.mapper is not None:
        from napari_cdpdnet.example.mapper import RoiMapper

        mapper = RoiMapper.load(args.mapper)
    ct = read_ct(args.input, series_uid=args.series_uid)
    for w in ct.warnings:
        print(f"warning: {args.input}: {w}", file=sys.stderr)
    check_dicom_source(args.input, ct.geometry, formats)
    roi = _roi(args, ct)
    print(f"ROI: {roi.describe()}", file=sys.stderr)
    settings = SegmentationSettings(preset=args.preset, device=args.device, threads=args.threads)
    bar = _ProgressBar(not args.no_progress, args.input.name)
    try:
        res = segment_by_example(
            segmenter, ct.array, ct.geometry, roi, settings,
            context_mm=DEFAULT_CONTEXT_MM if args.context is None else args.context,
            mapper=mapper, choose=named, progress=bar)
    finally:
        bar.close()
    print(f"ROI prompt: {res.prompt}")
    print(f"method: {res.ranking.method}")
    for rank, c in enumerate(res.ranking.top(3), start=1):
        print(f"  {rank}. {c.structure.name} ({c.structure.key}): confidence {c.confidence:.3f}")
    if named is not None:
        agree = "agrees" if res.ranking.best.structure == named else f"ranked {res.ranking.best.structure.name} first"
        print(f"segmented {named.name} as named (-s); the ROI ranking {agree}")
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    s = res.structure
    labels = res.mask.astype("uint8") * s.index
    table = build_label_table(labels, ct.geometry, ct.array, values=[s.index])
    written = export_segmentation(labels, ct.geometry, ct.array, args.output, formats=formats, rows=table,
                                  overwrite=args.overwrite)
    print(f"{args.input} → {args.output}: {s.name} {table[0].volume_ml:.1f} mL "
          f"({res.seconds:.1f} s); also wrote {', '.join(str(w) for w in written[1:])}")
    return 0
