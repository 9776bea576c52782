"""``cdpdnet evaluate``: Dice and HD95 (mm) per structure between predictions and references."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and HD95 in mm per structure (CSV and plot)",
        description=(
            "Compare a predicted label map with a reference on the reference's grid: Dice "
            "(2|P∩G|/(|P|+|G|)) and HD95 of the surface distances in mm, per structure. Label "
            "numberings may differ: map them with --map PRED:REF (REF may list several values). "
            "Without --map, equal values are compared. Predictions are named by their CDPDNet "
            "structure unless --numbering other."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet evaluate --pred seg.nii.gz --ref gt.nii.gz -o scores.csv --plot scores.png\n"
            "  cdpdnet evaluate --pred seg.nii.gz --ref totalseg.nii.gz --map liver:5 --map 16:12,13,14 -o s.csv\n"
        ),
    )
    p.add_argument("--pred", type=Path, required=True, help="predicted label map")
    p.add_argument("--ref", type=Path, required=True, help="reference label map (same grid)")
    p.add_argument("--map", action="append", default=[], metavar="PRED:REF",
                   help="pred value (or structure key) : reference value(s), e.g. 6:5 or 16:12,13,14")
    p.add_argument("--numbering", choices=("cdpdnet", "other"), default="cdpdnet",
                   help="how prediction values are named in the table (default: CDPDNet structures)")
    p.add_argument("-o", "--output", type=Path, required=True, help="CSV file of scores")
    p.add_argument("--plot", type=Path, help="also write a bar plot (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from napari_cdpdnet.errors import InputError
    from napari_cdpdnet.extras import import_extra
    from napari_cdpdnet.fileutil import check_writable, full_suffix
    from napari_cdpdnet.training.evaluation import (
        evaluate_files,
        parse_pred_ref,
        plot_scores,
        write_scores_csv,
    )

    if full_suffix(args.output) != ".csv":
        raise InputError(f"-o {args.output}: scores are written as CSV; use a .csv name")
    check_writable(args.output, overwrite=args.overwrite)
    if args.plot is not None:
        if full_suffix(args.plot) != ".png":
            raise InputError(f"--plot {args.plot}: the plot is written as PNG; use a .png name")
        check_writable(args.plot, overwrite=args.overwrite)
        import_extra("matplotlib", "train", "plotting scores (cdpdnet evaluate --plot)")
    mapping = parse_pred_ref(args.map) if args.map else None
    rows = evaluate_files(args.pred, args.ref, mapping, numbering=args.numbering)
    if not rows:
        raise InputError(f"nothing to evaluate: {args.pred} and {args.ref} are both empty")
    write_scores_csv(args.output, rows, overwrite=args.overwrite)
    if args.plot is not None:
        plot_scores(args.plot, rows, title=f"{args.pred.name} vs {args.ref.name}", overwrite=args.overwrite)

    def f(v: float, p: int) -> str:
        return "—" if math.isnan(v) else f"{v:.{p}f}"

    print(f"{'structure':<28} {'Dice':>6} {'HD95 mm':>8}  note")
    for r in rows:
        print(f"{r.name:<28} {f(r.dice, 3):>6} {f(r.hd95_mm, 1):>8}  {r.note}")
    dices = [r.dice for r in rows if not math.isnan(r.dice)]
    if dices:
        print(f"{'mean':<28} {sum(dices) / len(dices):>6.3f}")
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0
