"""``cdpdnet segment``: segment one CT or a whole cohort into label maps with label tables beside them.

Files are written only through :func:`napari_cdpdnet.export.export_segmentation`, all or nothing
per input; the export options (``--dicom-seg``, ``--stl``, ``--probabilities``) are made from
the format registry by :func:`add_export_options`, which ``segment-by-example`` shares. Inputs
(folders, globs, manifests), resuming, torchrun ranks, shards and the run report live in
:mod:`napari_cdpdnet.cohort`; this module parses, checks the request and hands over.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from napari_cdpdnet.commands._clip import add_clip_options, clip_settings, print_understanding
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.export.formats import FORMATS, optional_formats
from napari_cdpdnet.inference.settings import DEFAULT_PRESET, PRESETS, preset_help
from napari_cdpdnet.vocabulary.catalog import TASKS

logger = logging.getLogger(__name__)

_LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment CT scans into label maps: files, DICOM folders, or a cohort (folder tree, glob, manifest; resumable, torchrun)",
        description=(
            "Segment structures in CT scans with CDPDNet. Writes a label map on the scan's own "
            "grid (value = structure index 1..32, see 'cdpdnet structures') and a label table "
            "<name>.csv beside it, plus the files the export options ask for: all of them or, "
            "if anything fails, none. CDPDNet always computes the same 32 structures; the names "
            "you give select which are kept (and which task prompt runs). Wording the lexicon "
            "does not know is matched to one of the 32 by CLIP (--clip); how each name was "
            "understood and the task prompt that runs are printed before any work."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet segment ct.nii.gz -s liver -s 'left kidney' -o liver_kidney.nii.gz\n"
            "  cdpdnet segment dicom_folder/ -s 'liver, spleen' -o out/ --dicom-seg --stl\n"
            "  cdpdnet segment a.nii.gz b.nii.gz c.nrrd -s pancreas -o results/ --preset fast\n"
            "  cdpdnet segment ct.nii.gz -s 'main artery of the abdomen' -o aorta.nii.gz --clip on\n"
            "  cdpdnet segment cohort/ -s liver -o results/ --skip-existing   # every CT below cohort/\n"
            "  cdpdnet segment cases.csv -o results/    # manifest: input[,output][,structures]\n"
            "  torchrun --nproc_per_node 4 -m napari_cdpdnet.cli segment cohort/ -s liver -o results/\n"
            "(see docs/cohort.md: several GPUs and nodes, Slurm arrays, resume, the run report)\n"
        ),
    )
    p.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT",
        help="CT file, DICOM folder, folder of cases (searched recursively), quoted glob, or "
             "manifest .csv/.tsv with columns input[,output][,structures][,series_uid]",
    )
    p.add_argument(
        "-s", "--structure", action="append", metavar="NAME",
        help="structure to segment (repeatable; also 'liver, spleen'); see 'cdpdnet structures'",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True,
        help="output label map file (one input) or folder (any number of inputs; mirrors folder inputs)",
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
                   help="torch.compile the model (opt-in): a first compile of minutes (seconds once cached), "
                        "results within float round-off; the per-window gain varies (docs/model.md)")
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
    add_clip_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume: skip cases whose outputs are complete, do the rest")
    p.add_argument("--shard", metavar="K/N",
                   help="do part K of N of the cohort (independent jobs; default from a Slurm job "
                        "array, SLURM_ARRAY_TASK_ID/COUNT)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="processes reading and preprocessing the next cases (default 2; 0: none)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="folder for run.json and run.csv (default: the output folder, when there "
                        "is more than one case)")
    p.set_defaults(func=run)


def add_export_options(p: argparse.ArgumentParser, *, probabilities: bool = True) -> None:
    """One ``--<format>`` switch per optional export format (see ``export.formats.FORMATS``)."""
    for fmt in optional_formats(probabilities=probabilities):
        p.add_argument(fmt.flag, dest=fmt.name, action="store_true", help=f"also write {fmt.help}")


def chosen_formats(args: argparse.Namespace) -> list[str]:
    """The export formats switched on in ``args``."""
    return [fmt.name for fmt in optional_formats() if getattr(args, fmt.name, False)]


def check_outputs(outputs: list[Path], keys: list[str], formats: list[str], overwrite: bool) -> None:
    """Refuse existing outputs before any compute (per-structure files: every requested key)."""
    from napari_cdpdnet.export import export_paths
    from napari_cdpdnet.fileutil import check_writable

    for out in outputs:
        for path in export_paths(out, keys, formats=formats):
            check_writable(path, overwrite=overwrite)


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
    from napari_cdpdnet.cohort.inputs import is_manifest, is_pattern
    from napari_cdpdnet.cohort.plan import CohortJob
    from napari_cdpdnet.cohort.runner import run_cohort
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.io.images import check_input_path

    # Everything that can be checked without compute is checked first.
    for inp in args.inputs:
        if is_manifest(str(inp)):
            if not inp.is_file():
                raise InputError(f"manifest {inp}: no such file")
        elif not is_pattern(str(inp)):
            check_input_path(inp)
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: must be 0 or more")
    if not args.structure and not any(is_manifest(str(inp)) for inp in args.inputs):
        raise InputError("name at least one structure with -s, e.g. -s liver (or give a manifest "
                         "with a 'structures' column)")
    formats = chosen_formats(args)
    box = None if args.box is None else (tuple(args.box[:3]), tuple(args.box[3:]))
    settings = SegmentationSettings(
        preset=args.preset, device=args.device, threads=args.threads, autocast=args.autocast,
        compile=args.compile, box=box, return_probabilities=any(FORMATS[name].needs_probabilities for name in formats),
    )
    segmenter = Segmenter(checkpoint=args.checkpoint, dino=args.dino, allow_download=not args.offline,
                          **clip_settings(args))
    if args.structure:
        structures, resolutions, plan = segmenter.plan(args.structure, force_task=args.task)
        print_understanding(resolutions, plan)
    job = CohortJob(
        inputs=tuple(str(i) for i in args.inputs), output=args.output,
        request=tuple(args.structure) if args.structure else None, settings=settings,
        formats=tuple(formats), label_suffix=args.format, series_uid=args.series_uid,
        force_task=args.task, skip_existing=args.skip_existing, overwrite=args.overwrite,
        shard=args.shard, workers=args.workers, report=args.report, progress=not args.no_progress,
        command=tuple(sys.argv), clip_scorer=segmenter.text_scorer,
        clip_thresholds=segmenter.clip_thresholds,
    )
    segmenter.weights()  # missing weights: one message now, not one per input
    outcome = run_cohort(segmenter, job, lambda name: _ProgressBar(not args.no_progress, name))
    return outcome.exit_code
