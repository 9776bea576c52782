"""``cdpdnet segment``: segment one CT or many into label maps with label tables beside them."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from napari_cdpdnet.errors import CdpdnetError, InputError
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
            "<name>.csv beside it. CDPDNet always computes the same 32 structures; the names "
            "you give select which are kept (and which task prompt runs), they are not "
            "free-form prompts."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet segment ct.nii.gz -s liver -s 'left kidney' -o liver_kidney.nii.gz\n"
            "  cdpdnet segment dicom_folder/ -s 'liver, spleen' -o out/ --dicom-seg\n"
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
    p.add_argument("--autocast", action="store_true", help="float16 autocast on CUDA (faster, not bit-exact)")
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
    p.add_argument("--dicom-seg", action="store_true", help="also write a DICOM-SEG (DICOM inputs only)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write one probability map per structure (<name>_<key>_prob.nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


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
    from napari_cdpdnet.fileutil import check_writable
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.io.images import check_input_path

    # Everything that can be checked without compute is checked first.
    for inp in args.inputs:
        check_input_path(inp)
    outputs = _outputs_for(args)
    for out in outputs:
        check_writable(out, overwrite=args.overwrite)
    roi = None if args.box is None else (tuple(args.box[:3]), tuple(args.box[3:]))
    settings = SegmentationSettings(
        preset=args.preset, device=args.device, threads=args.threads, autocast=args.autocast,
        roi=roi, return_probabilities=args.probabilities,
    )
    segmenter = Segmenter(checkpoint=args.checkpoint, dino=args.dino, allow_download=not args.offline)
    structures, resolutions, plan = segmenter.plan(args.structure, force_task=args.task)
    for r in resolutions:
        if r.method != "exact":
            print(f"'{r.text}' → {r.structure.name} ({r.method}, confidence {r.confidence:.2f})", file=sys.stderr)
    print(plan.describe(), file=sys.stderr)
    segmenter.weights()  # missing weights: one message now, not one per input

    failures: list[tuple[Path, CdpdnetError]] = []
    for inp, out in zip(args.inputs, outputs, strict=True):
        try:
            _segment_one(segmenter, inp, out, structures, settings, args)
        except CdpdnetError as exc:
            if len(args.inputs) == 1 or exc.exit_code == 130:
                raise
            print(f"cdpdnet segment: {inp}: {exc}", file=sys.stderr)
            failures.append((inp, exc))
    if failures:
        print(f"{len(failures)} of {len(args.inputs)} inputs failed", file=sys.stderr)
        return failures[0][1].exit_code
    return 0


def _segment_one(segmenter, inp: Path, out: Path, structures, settings, args) -> None:
    from napari_cdpdnet.export.labeltable import label_table_path, write_label_table
    from napari_cdpdnet.io.images import read_ct, write_label_map

    t0 = time.perf_counter()
    ct = read_ct(inp, series_uid=args.series_uid)
    for w in ct.warnings:
        print(f"warning: {inp}: {w}", file=sys.stderr)
    if args.dicom_seg and ct.geometry.dicom is None:
        raise InputError(f"{inp}: --dicom-seg needs a DICOM series as input")
    bar = _ProgressBar(not args.no_progress, inp.name)
    try:
        output = segmenter.segment(ct.array, ct.geometry, structures, settings, progress=bar, force_task=args.task)
    finally:
        bar.close()
    names = {s.index: s.name for s in structures}
    written = [write_label_map(out, output.labels, ct.geometry, overwrite=args.overwrite, label_names=names)]
    written.append(write_label_table(label_table_path(out), output.table, overwrite=args.overwrite))
    if args.dicom_seg:
        from napari_cdpdnet.export.dicomseg import segment_specs, write_dicom_seg

        seg_path = label_table_path(out).with_suffix(".seg.dcm")
        written.append(
            write_dicom_seg(seg_path, output.labels, ct.geometry, segment_specs(s.index for s in structures),
                            overwrite=args.overwrite)
        )
    if args.probabilities and output.result.probabilities:
        from napari_cdpdnet.io.images import write_image

        stem = label_table_path(out).with_suffix("").name
        for s in structures:
            prob = output.result.probabilities.get(s.index)
            if prob is not None:
                written.append(write_image(out.with_name(f"{stem}_{s.key}_prob.nii.gz"), prob, ct.geometry,
                                           overwrite=args.overwrite))
    for note in output.notes:
        print(f"note: {inp}: {note}", file=sys.stderr)
    r = output.result
    print(
        f"{inp} → {out}: {', '.join(f'{row.name} {row.volume_ml:.1f} mL' for row in output.table)} "
        f"({r.windows} windows, {time.perf_counter() - t0:.1f} s on {r.device})"
    )
    for w in written[1:]:
        print(f"  also wrote {w}")
