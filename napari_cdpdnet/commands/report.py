"""``cdpdnet report``: assemble a cohort run's report (run.json, run.csv) from its per-rank logs.

Rank 0 does this at the end of every ``cdpdnet segment`` run; this command does it on demand:
while a run is going (progress so far), after a run was killed, or once every job of a
``--shard`` / Slurm array split has finished (each job's rank 0 only sees what is there when it
ends).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="assemble run.json and run.csv of a cohort run (all ranks, shards and resumed runs)",
        description=(
            "Merge the per-rank logs of every 'cdpdnet segment' run into FOLDER (the -o folder, "
            "or --report) into FOLDER/run.json and FOLDER/run.csv: one row per case, the latest "
            "attempt of each, cases never reached listed as pending."
        ),
    )
    p.add_argument("folder", type=Path, metavar="FOLDER", help="the -o (or --report) folder of the run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_cdpdnet.cohort.report import write_report

    summary = write_report(args.folder)
    print(f"{summary.line()}")
    print(f"wrote {summary.json_path} and {summary.csv_path}")
    return 0
