"""``cdpdnet weights download|verify|info``: get the weights once, carry them to offline sites."""

from __future__ import annotations

import argparse
import os
import sys

from napari_cdpdnet import weights as w
from napari_cdpdnet.errors import WeightsError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="download, verify and locate the model weights (third-party files)",
        description=(
            "CDPDNet needs third-party weights: the CDPDNet checkpoint, DINOv2-base and, for "
            "free-text matching only, CLIP ViT-B/32. Each has its own terms; see `cdpdnet weights "
            "info`. Offline sites: download on a connected machine, copy the folder, and set "
            f"{w.ENV_WEIGHTS_DIR}."
        ),
    )
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")

    d = wsub.add_parser("download", help="download into the cache or a portable folder")
    d.add_argument("--to", metavar="DIR", help="target folder (default: the cache)")
    d.add_argument("--without-clip", action="store_true", help="skip the optional weights (CLIP)")
    d.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=[s.name for s in w.REGISTRY],
        help="download only this component (repeatable)",
    )
    d.add_argument(
        "--overwrite", action="store_true", help="replace a damaged file found in the way"
    )
    d.set_defaults(func=run_download)

    v = wsub.add_parser("verify", help="check the checksums of a weights folder")
    v.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help=f"folder (default: ${w.ENV_WEIGHTS_DIR} and the cache)",
    )
    v.add_argument(
        "--record", action="store_true", help="record checksums for intact files that have none"
    )
    v.set_defaults(func=run_verify)

    i = wsub.add_parser("info", help="where each file is looked for and found, and its terms")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _progress_bar():
    """A tqdm bar per file on stderr (None when stderr is not a terminal: huggingface_hub's own)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(done: int, total: int | None, label: str) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=True)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return progress


def run_download(args: argparse.Namespace) -> int:
    names = args.only or [s.name for s in w.REGISTRY]
    if args.without_clip:
        names = [n for n in names if not w.spec(n).optional]
    target = args.to or str(w.weights_cache_dir())
    print(f"Weights folder: {target}")
    for name in names:
        s = w.spec(name)
        print(f"  {s.title} ({s.repo_id}): {s.terms}")
    results = w.download_all(args.to, _progress_bar(), components=names, overwrite=args.overwrite)
    for c in results:
        print(f"{c.status:<10} {c.path}  {c.message}")
    if args.to:
        print(
            f"\nCopy {target} to the offline machine and set {w.ENV_WEIGHTS_DIR}={target} there "
            "(or the path you copied it to). `cdpdnet weights verify` checks the copy."
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    if args.dir:
        folders = [args.dir]
    else:
        folders = [str(f) for _, f in w.search_folders() if f.is_dir()]
        if not folders:
            raise WeightsError(
                f"no weights folder to verify: {w.weights_cache_dir()} does not exist and "
                f"{w.ENV_WEIGHTS_DIR} is not set; run `cdpdnet weights download` first"
            )
    ok = True
    for folder in folders:
        print(f"{folder}:")
        if args.record:
            checks = w.record_checksums(folder)
            report = w.verify(folder)
            for c in checks:
                print(f"  {c.status:<10} {c.component}/{c.filename}: {c.message}")
        else:
            report = w.verify(folder)
            for line in report.lines():
                print(f"  {line}")
        ok = ok and report.ok
    if not ok:
        print(
            "Problems found: damaged files must be replaced (`cdpdnet weights download` re-fetches "
            "files it recorded), missing ones downloaded or copied in.",
            file=sys.stderr,
        )
        return WeightsError.exit_code
    return 0


def run_info(args: argparse.Namespace) -> int:
    env = w.env_weights_dir()
    print("Weights are looked for in this order:")
    print("  1. an explicit path (--checkpoint / --dino / --clip-weights)")
    print(f"  2. ${w.ENV_WEIGHTS_DIR}: {env if env else '(not set)'}")
    print(f"  3. the cache: {w.weights_cache_dir()}  (${w.ENV_CACHE_DIR} moves it)")
    print("  4. the Hugging Face cache")
    why = w.downloads_disabled()
    print(f"  5. download into the cache: {why or 'allowed'}")
    for s in w.REGISTRY:
        print(f"\n{s.title}  [{s.name}]  {s.page}  (revision {s.revision}, {s.approx_size})")
        print(f"  needed for: {s.needed_for}")
        print(f"  terms: {s.terms}")
        for wf in s.files:
            found = w.locate(s, wf, quick=True)
            where = f"{found[1].path}  [{found[0]}; {found[1].message}]" if found else "not found"
            print(f"  {wf.filename:<28} {where}")
    print(
        "\nStructural checks only here (fast); `cdpdnet weights verify` reads every byte. "
        f"Environment: {w.ENV_OFFLINE}/HF_HUB_OFFLINE=1 disable downloads; HF_ENDPOINT selects a hub mirror."
    )
    if os.environ.get("HF_TOKEN"):
        print("HF_TOKEN is set and will be used for downloads.")
    return 0
