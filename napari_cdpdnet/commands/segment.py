"""``cdpdnet segment``: segment one CT or many into label maps with label tables beside them.

Files are written only through :func:`napari_cdpdnet.export.export_segmentation`, all or nothing
per input; the export options (``--dicom-seg``, ``--stl``, ``--probabilities``) are made from
the format registry by :func:`add_export_options`, which ``segment-by-example`` shares.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from napari_cdpdnet.errors import CdpdnetError, InputError
from napari_cdpdnet.export.formats import FORMATS, optional_formats
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.inference.settings import DEFAULT_PRESET, PRESETS, preset_help
from napari_cdpdnet.vocabulary.catalog import TASKS

logger = logging.getLogger(__name__)

_LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment CT scans (files or DICOM folders) into label maps",
        description=(
            "Segment structures in CT scans with CDPDNet. Writes a label map on the scan's own "
            "grid (value = structure index 1..32, see 'cdpdnet structures') and a label table "
            "<name>.csv beside it, plus the files the export options ask for: all of them or, "
            "if anything fails, none. CDPDNet always computes the same 32 structures; the names "
            "you give select which are kept (and which task prompt runs), they are not "
            "free-form prompts."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet segment ct.nii.gz -s liver -s 'left kidney' -o liver_kidney.nii.gz\n"
            "  cdpdnet segment dicom_folder/ -s 'liver, spleen' -o out/ --dicom-seg --stl\n"
            "  cdpdnet segment a.nii.gz b.nii.gz c.nrrd -s pancreas -o results/ --preset fast\n"
        ),
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="CT file or DICOM folder")
    p.add_argument(
        "-s", "--structure", action="append", required=True, metavar="NAME",
        help="structure to segment (repeatable; also 'liver, spleen'); see 'cdpdnet structures'",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True,
        help="output label map file (one input) or folder (any number of inputs)",
    )
    p.add_argument("--format", default=".nii.gz", choices=_LABEL_SUFFIXES,
                   help="label map format when OUTPUT is a folder (default .nii.gz)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help=preset_help())
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="reduced precision where the hardware has a fast path: float16 on CUDA, bfloat16 on "
                        "CPUs with AMX/AVX-512-BF16 (faster, not bit-exact; default: the preset's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: ~1.15x faster per window on CPU after a first compile of "
                        "minutes (seconds once cached); results within float round-off")
    p.add_argument(
        "--box", type=float, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="only segment inside this box: two opposite corners in patient LPS mm (DICOM coordinates)",
    )
    p.add_argument("--checkpoint", type=Path, help="official CDPDNet checkpoint (cdpdnet.pth)")
    p.add_argument("--dino", type=Path, help="DINOv2-base weights (model.safetensors / pytorch_model.bin) or folder")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--series-uid", help="DICOM folder with several series: the SeriesInstanceUID to use")
    p.add_argument("--task", type=int, choices=range(len(TASKS)), metavar="ID",
                   help=f"force one task prompt (0..{len(TASKS) - 1}) instead of the automatic plan")
    add_export_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_export_options(p: argparse.ArgumentParser, *, probabilities: bool = True) -> None:
    """One ``--<format>`` switch per optional export format (see ``export.formats.FORMATS``)."""
    for fmt in optional_formats(probabilities=probabilities):
        p.add_argument(fmt.flag, dest=fmt.name, action="store_true", help=f"also write {fmt.help}")


def chosen_formats(args: argparse.Namespace) -> list[str]:
    """The export formats switched on in ``args``."""
    return [fmt.name for fmt in optional_formats() if getattr(args, fmt.name, False)]


def check_dicom_source(path: Path, geometry: Geometry, formats: list[str]) -> None:
    """Refuse, before segmenting, a format that needs a DICOM source for a CT read from a file."""
    needs = [FORMATS[name] for name in formats if FORMATS[name].needs_dicom]
    if needs and geometry.dicom is None:
        raise InputError(f"{path}: {needs[0].flag} needs a DICOM series as input")


def check_outputs(outputs: list[Path], keys: list[str], formats: list[str], overwrite: bool) -> None:
    """Refuse existing outputs before any compute (per-structure files: every requested key)."""
    from napari_cdpdnet.export import export_paths
    from napari_cdpdnet.fileutil import check_writable

    for out in outputs:
        for path in export_paths(out, keys, formats=formats):
            check_writable(path, overwrite=overwrite)


def _outputs_for(args: argparse.Namespace) -> list[Path]:
    """Label map path for every input; checks the output rules before any work."""
    from napari_cdpdnet.fileutil import full_suffix

    out: Path = args.output
    is_file = full_suffix(out) in _LABEL_SUFFIXES
    if is_file:
        if len(args.inputs) > 1:
            raise InputError(
                f"{len(args.inputs)} inputs but -o {out} is a single file: give a folder instead"
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: exists and is not a folder; give a folder or a label map file ({', '.join(_LABEL_SUFFIXES)})")
    names: dict[str, Path] = {}
    paths = []
    for inp in args.inputs:
        suffix = full_suffix(inp)
        stem = inp.name[: -len(suffix)] if suffix and not inp.is_dir() else inp.name
        if stem in names:
            raise InputError(f"inputs {names[stem]} and {inp} would both write {stem}{args.format}; rename one")
        names[stem] = inp
        paths.append(out / f"{stem}{args.format}")
    return paths


class _ProgressBar:
    """tqdm over windows; a no-op when disabled or not on a terminal-like stream."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self.bar = None

    def __call__(self, event) -> None:
        if not self.enabled or event.stage != "inference":
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.total, desc=self.label, unit="window", file=sys.stderr, leave=False)
        self.bar.total = event.total
        self.bar.n = event.done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.io.images import check_input_path

    # Everything that can be checked without compute is checked first.
    for inp in args.inputs:
        check_input_path(inp)
    outputs = _outputs_for(args)
    formats = chosen_formats(args)
    check_outputs(outputs, [], formats, args.overwrite)
    box = None if args.box is None else (tuple(args.box[:3]), tuple(args.box[3:]))
    settings = SegmentationSettings(
        preset=args.preset, device=args.device, threads=args.threads, autocast=args.autocast,
        compile=args.compile, box=box, return_probabilities=any(FORMATS[name].needs_probabilities for name in formats),
    )
    segmenter = Segmenter(checkpoint=args.checkpoint, dino=args.dino, allow_download=not args.offline)
    structures, resolutions, plan = segmenter.plan(args.structure, force_task=args.task)
    for r in resolutions:
        if r.method != "exact":
            print(f"'{r.text}' → {r.structure.name} ({r.method}, confidence {r.confidence:.2f})", file=sys.stderr)
    print(plan.describe(), file=sys.stderr)
    check_outputs(outputs, [s.key for s in structures], formats, args.overwrite)
    segmenter.weights()  # missing weights: one message now, not one per input

    failures: list[tuple[Path, CdpdnetError]] = []
    for inp, out in zip(args.inputs, outputs, strict=True):
        try:
            _segment_one(segmenter, inp, out, structures, settings, formats, args)
        except CdpdnetError as exc:
            if len(args.inputs) == 1 or exc.exit_code == 130:
                raise
            print(f"cdpdnet segment: {inp}: {exc}", file=sys.stderr)
            failures.append((inp, exc))
    if failures:
        print(f"{len(failures)} of {len(args.inputs)} inputs failed", file=sys.stderr)
        return failures[0][1].exit_code
    return 0


def _segment_one(segmenter, inp: Path, out: Path, structures, settings, formats: list[str], args) -> None:
    from napari_cdpdnet.export import export_segmentation
    from napari_cdpdnet.io.images import read_ct

    t0 = time.perf_counter()
    ct = read_ct(inp, series_uid=args.series_uid)
    for w in ct.warnings:
        print(f"warning: {inp}: {w}", file=sys.stderr)
    check_dicom_source(inp, ct.geometry, formats)
    bar = _ProgressBar(not args.no_progress, inp.name)
    try:
        output = segmenter.segment(ct.array, ct.geometry, structures, settings, progress=bar, force_task=args.task)
    finally:
        bar.close()
    written = export_segmentation(
        output.labels, ct.geometry, ct.array, out, formats=formats, rows=output.table,
        probabilities=output.result.probabilities, overwrite=args.overwrite,
    )
    for note in output.notes:
        print(f"note: {inp}: {note}", file=sys.stderr)
    r = output.result
    print(
        f"{inp} → {out}: {', '.join(f'{row.name} {row.volume_ml:.1f} mL' for row in output.table)} "
        f"({r.windows} windows, {time.perf_counter() - t0:.1f} s on {r.device})"
    )
    for w in written[1:]:
        print(f"  also wrote {w}")
