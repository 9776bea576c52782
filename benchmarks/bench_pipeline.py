#!/usr/bin/env python
"""Benchmark of the segmentation engine: per-stage time, window count and peak RSS (not a test).

Each scenario runs in a fresh child process so that its peak resident memory (``ru_maxrss``) is its
own. Two kinds of scenario:

* ``real``: ``example_ct.nii.gz`` from the shared data, preset ``exact`` and ``fast``, with the
  predictor built by ``--predictor module:factory`` (``factory(device) -> predictor(x, task_id)``).
  ``--predictor full`` measures the full-size CDPDNet (random weights; time and memory do not
  depend on the weight values, the Dice between presets does); the default,
  ``cheap``, is a stand-in whose cost is ~nothing, so the numbers then show the engine's own
  overhead (pre/post-processing, blending, inverse) and its memory. The Dice between the
  ``fast`` and ``exact`` label maps per structure is printed: with the real model that is the
  accuracy price of ``fast``.
* ``large``: a synthetic 512×512×600 CT (0.7×0.7×1.0 mm, int16) through preprocessing, sliding
  window, post-processing and inverse with the cheap predictor, requesting all 32 structures (the
  worst case for the blending buffers) and one structure — the memory budget check (≤ ~12 GB).

Examples::

    python benchmarks/bench_pipeline.py                      # both scenarios, cheap predictor
    python benchmarks/bench_pipeline.py --scenario real --predictor full --threads 2
    python benchmarks/bench_pipeline.py --scenario large --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALL_CHANNELS = list(range(32))


def shared_dir() -> Path:
    env = os.environ.get("CDPDNET_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def cheap_factory(device):
    """A stand-in predictor costing almost nothing: every channel = 12·(x − 0.45), as a view."""
    def predictor(x, task_id):
        return (x * 12.0 - 5.4).expand(-1, 32, -1, -1, -1)

    return predictor


def full_factory(device):
    """The full-size CDPDNet with random weights (seed 0): the official weights cannot be had
    everywhere, and the cost of a window does not depend on the weight values."""
    from napari_cdpdnet.model import CDPDNetConfig, build_model

    return build_model(CDPDNetConfig(), seed=0).to(device).eval()


def load_factory(spec: str):
    if spec == "cheap":
        return cheap_factory
    if spec == "full":
        return full_factory
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--predictor {spec!r}: expected module:function or 'cheap'")
    return getattr(importlib.import_module(module), name)


def synthetic_large_ct():
    """512×512×600 int16 CT: an elliptic body (soft tissue, two lungs, a spine) in air."""
    import numpy as np

    from napari_cdpdnet.geometry import Geometry

    shape = (600, 512, 512)
    geometry = Geometry((0.7, 0.7, 1.0), (-179.0, -179.0, -300.0), tuple(np.eye(3).ravel()), shape)
    y, x = np.ogrid[:512, :512]
    body = ((x - 256) / 230.0) ** 2 + ((y - 256) / 170.0) ** 2 < 1
    lungs = (((x - 170) / 70.0) ** 2 + ((y - 230) / 90.0) ** 2 < 1) | (
        ((x - 342) / 70.0) ** 2 + ((y - 230) / 90.0) ** 2 < 1)
    spine = ((x - 256) / 25.0) ** 2 + ((y - 380) / 25.0) ** 2 < 1
    plane = np.full((512, 512), -1000, np.int16)
    plane[body] = 40
    plane[spine] = 700
    array = np.empty(shape, np.int16)
    for z in range(shape[0]):
        array[z] = plane
        if 350 <= z < 580:
            array[z][lungs] = -850
    return array, geometry


def child(args: argparse.Namespace) -> dict:
    """Run one scenario in this process and return its measurements."""
    import torch

    from napari_cdpdnet.inference.devices import resolve_device
    from napari_cdpdnet.inference.pipeline import segment_array
    from napari_cdpdnet.inference.segmenter import postprocess_rules
    from napari_cdpdnet.inference.settings import SegmentationSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.input == "large":
        array, geometry = synthetic_large_ct()
    else:
        import SimpleITK as sitk

        from napari_cdpdnet.geometry import Geometry

        image = sitk.ReadImage(args.input)
        array, geometry = sitk.GetArrayFromImage(image), Geometry.from_sitk(image)
    load_s = time.perf_counter() - t0
    settings = SegmentationSettings(preset=args.preset, device=args.device)
    predictor = load_factory(args.predictor)(resolve_device(args.device))
    baseline = rss_mb()
    result = segment_array(array, geometry, [(args.task, args.channels)], predictor, settings,
                           rules=postprocess_rules())
    if args.save:
        import numpy as np

        np.save(args.save, result.labels)
    return {
        "input": "synthetic 512×512×600" if args.input == "large" else Path(args.input).name,
        "shape": list(geometry.shape),
        "preset": args.preset,
        "predictor": args.predictor,
        "channels": len(args.channels),
        "load_s": load_s,
        "timings": result.timings,
        "windows": result.windows,
        "windows_total": result.windows_total,
        "found": len(result.structures),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": rss_mb(),
        "threads": torch.get_num_threads(),
        "device": result.device,
    }


def run_child(input_: str, preset: str, channels: list[int], args: argparse.Namespace,
              save: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", "--input", input_, "--preset", preset,
           "--predictor", args.predictor, "--device", args.device, "--task", str(args.task),
           "--channels", ",".join(map(str, channels)), "--save", save]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"scenario failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(row: dict) -> None:
    t = row["timings"]
    per_window = t["inference"] / max(row["windows"], 1)
    print(f"{row['input']:<24} {row['preset']:<6} ch={row['channels']:<3} "
          f"windows {row['windows']:>4}/{row['windows_total']:<4} "
          f"pre {t['preprocess']:6.1f}s  infer {t['inference']:7.1f}s ({per_window:5.2f}s/window)  "
          f"post {t['postprocess']:5.1f}s  inv {t['invert']:5.1f}s  total {t['total']:7.1f}s  "
          f"peak RSS {row['peak_rss_mb'] / 1024:5.2f} GB (before run {row['baseline_rss_mb'] / 1024:4.2f} GB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["real", "large", "all"], default="all")
    parser.add_argument("--predictor", default="cheap",
                        help="module:factory returning predictor(x, task_id); 'cheap' = stand-in, 'full' = full-size CDPDNet (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--task", type=int, default=0, help="task prompt id (0 = BTCV)")
    parser.add_argument("--channels", default="5", help="comma-separated channels for 'real' (5 = liver)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.channels = [int(c) for c in str(args.channels).split(",") if c != ""]

    if args.child:
        print(json.dumps(child(args)))
        return 0

    print(f"predictor: {args.predictor}  device: {args.device}  threads: {args.threads or 'torch default'}")
    if args.scenario in ("real", "all"):
        ct = shared_dir() / "data" / "totalsegmentator" / "example_ct.nii.gz"
        if not ct.exists():
            raise SystemExit(f"{ct} not found: set CDPDNET_SHARED_DIR")
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            labels = {}
            for preset in ("exact", "fast"):
                path = str(Path(tmp) / f"{preset}.npy")
                report(run_child(str(ct), preset, args.channels, args, save=path))
                labels[preset] = np.load(path)
        for s in sorted((set(np.unique(labels["exact"])) | set(np.unique(labels["fast"]))) - {0}):
            a, b = labels["exact"] == s, labels["fast"] == s
            dice = 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)
            print(f"  structure {s:>2}: Dice(fast, exact) = {dice:.4f}  "
                  f"({a.sum()} vs {b.sum()} voxels)")
    if args.scenario in ("large", "all"):
        saved = args.predictor
        args.predictor = "cheap"
        for channels in (ALL_CHANNELS, [5]):
            report(run_child("large", "exact", channels, args))
        args.predictor = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
