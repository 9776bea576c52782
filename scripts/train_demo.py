#!/usr/bin/env python
"""Partial-label loss vs naive loss on the TotalSegmentator example CT (issue 7 demonstration).

Cuts the CT into its right and left side and makes them two pseudo datasets labelling disjoint
halves of the structures (structures crossing the midline are present but unlabelled on the
other side), trains a tiny random-init CDPDNet with each loss on the CPU, and prints both
Dice/HD95 tables on the full reference. See docs/training.md for a recorded run.

    python scripts/train_demo.py --threads 1 --parallel      # 900 steps per model, about 53 min
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "totalsegmentator",
                   help="folder with example_ct.nii.gz and example_seg_full.nii.gz")
    p.add_argument("--work", type=Path, help="output folder (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=900, help="optimiser steps per model (900: about "
                   "53 min on 2 CPU cores with --parallel --threads 1)")
    p.add_argument("--lr", type=float, default=3e-2, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="first train a model with every structure labelled for this many steps and "
                   "fine-tune both models from it (a stand-in for the official checkpoint)")
    p.add_argument("--finetune-lr", type=float, help="peak learning rate of fine-tuning (default lr/3)")
    p.add_argument("--spacing", type=float, default=5.0, help="training grid spacing in mm")
    p.add_argument("--tasks", default="0,1", help="task prompts of pseudo datasets A and B (default 0,1)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widths", help="CNN widths of the tiny model, 6 comma-separated ints "
                   "(default: demo.DEMO_WIDTHS; 'tiny' = CDPDNetConfig.tiny())")
    p.add_argument("--parallel", action="store_true", help="train both models at once (two processes)")
    p.add_argument("--half-a", help="structure keys of pseudo dataset A (the patient's right side), "
                   "comma-separated (default: demo.HALF_A)")
    p.add_argument("--half-b", help="structure keys of pseudo dataset B (the left side), comma-separated "
                   "(default: demo.HALF_B)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(REPO))
    from napari_cdpdnet.training.demo import DEMO_WIDTHS, HALF_A, HALF_B, format_tables, run_demo

    widths: tuple[int, ...] | None = DEMO_WIDTHS
    if args.widths == "tiny":
        widths = None
    elif args.widths:
        try:
            widths = tuple(int(v) for v in args.widths.split(","))
            from napari_cdpdnet.model import CDPDNetConfig

            CDPDNetConfig.tiny().replace(widths=widths)  # validates before any training
        except ValueError as exc:
            print(f"--widths {args.widths!r}: {exc}", file=sys.stderr)
            return 2

    halves = tuple(
        tuple(k.strip() for k in text.split(",") if k.strip()) if text else default
        for text, default in ((args.half_a, HALF_A), (args.half_b, HALF_B))
    )
    if set(halves[0]) & set(halves[1]):
        print(f"the halves must be disjoint: {sorted(set(halves[0]) & set(halves[1]))}", file=sys.stderr)
        return 2

    try:
        tasks = tuple(int(v) for v in args.tasks.split(","))
    except ValueError:
        tasks = ()
    if len(tasks) != 2 or not all(0 <= t <= 10 for t in tasks):
        print(f"--tasks {args.tasks!r}: give two task ids 0..10, e.g. 0,1", file=sys.stderr)
        return 2

    ct, ref = args.data / "example_ct.nii.gz", args.data / "example_seg_full.nii.gz"
    for f in (ct, ref):
        if not f.is_file():
            print(f"missing {f} (see shared/data/README.md)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result = run_demo(ct, ref, work, steps=args.steps, lr=args.lr, spacing=args.spacing,
                          seed=args.seed, tasks=tasks, threads=args.threads, progress=args.verbose,
                          parallel=args.parallel, halves=halves, widths=widths,
                          pretrain_steps=args.pretrain_steps, finetune_lr=args.finetune_lr)
    print(format_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
