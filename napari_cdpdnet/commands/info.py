"""``cdpdnet info``: versions and compute devices, for bug reports and setup checks."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata

from napari_cdpdnet import __version__


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions and available compute devices")
    p.set_defaults(func=run)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    print(f"napari-cdpdnet {__version__}")
    print(f"python         {platform.python_version()} ({platform.system()} {platform.machine()})")
    for dist in ("torch", "transformers", "monai", "SimpleITK", "napari", "highdicom"):
        print(f"{dist:<14} {_version(dist)}")
    import torch

    from napari_cdpdnet.inference.devices import describe_devices

    print(f"devices        {', '.join(describe_devices())}")
    print(f"cpu threads    {torch.get_num_threads()}")
    return 0
