#!/usr/bin/env python
"""Benchmark of the segmentation engine: per-stage time, window count and peak RSS (not a test).

Each scenario runs in a fresh child process so that its peak resident memory (``ru_maxrss``) is its
own. Two kinds of scenario:

* ``real``: ``example_ct.nii.gz`` from the shared data with the predictor built by
  ``--predictor module:factory`` (``factory(device) -> predictor(x, task_id)``). ``--predictor
  full`` measures the full-size CDPDNet (random weights, seed 0: time and memory do not depend
  on the weight values); the default, ``cheap``, is a stand-in whose cost is ~nothing, so the
  numbers then show the engine's own overhead (pre/post-processing, blending, inverse).
  It runs, in this order:

  1. ``exact`` **before** (MONAI's window order, every model speed-up off: the computation as it
     was before issue 18) and **after** (window order ``slices``, all exact speed-ups on),
     alternating for ``--rounds`` rounds (a shared machine's load then hits both alike); printed:
     the factor per round, peak RSS of each, and whether the two label maps are identical (else
     the voxels that differ and the largest |blended logit| among them: differences where the
     logit is within float32 rounding of 0 are the window order's last-bit rounding);
  2. ``after + compile`` twice (``--compile``; full model only): the first child fills inductor's
     on-disk cache (cold compile), the second starts with it warm; the compile warm-up is timed
     apart from the segmentation, whose factor over ``after`` is the extra of compiling;
  3. ``fast`` (``--fast``): its time and, against ``after``, per structure the fraction of
     voxels whose label changed, and the max |difference| of the blended logits where both
     ran windows.
* ``large``: a synthetic 512×512×600 CT (0.7×0.7×1.0 mm, int16) through preprocessing, sliding
  window, post-processing and inverse with the cheap predictor, requesting all 32 structures (the
  worst case for the blending buffers) and one structure — the memory budget check (≤ ~12 GB).

Examples::

    python benchmarks/bench_pipeline.py                      # both scenarios, cheap predictor
    python benchmarks/bench_pipeline.py --scenario real --predictor full --threads 2 --compile --fast
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


def full_before_factory(device):
    """:func:`full_factory` with every exact speed-up off (the model as before issue 18)."""
    from napari_cdpdnet.model.speedups import Speedups

    model = full_factory(device)
    model.speedups = Speedups.none()
    return model


def load_factory(spec: str):
    if spec == "cheap":
        return cheap_factory
    if spec == "full":
        return full_factory
    if spec == "full-before":
        return full_before_factory
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


def compile_warmup(predictor, device) -> float:
    """Compile the model for the window shapes a scan needs (whole window, cached batch, padded
    batch): three windows of one column; returns the seconds it took."""
    import torch

    t0 = time.perf_counter()
    vol = torch.rand(1, 1, 96 + 51, 96, 96, generator=torch.Generator().manual_seed(0))
    task = torch.zeros(1, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for a in (0, 48, 51):
            predictor(vol[:, :, a:a + 96].contiguous().to(device), task)
    predictor.clear_caches()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> dict:
    """Run one scenario in this process and return its measurements."""
    import torch

    import napari_cdpdnet.inference.pipeline as pipeline
    from napari_cdpdnet.inference.devices import resolve_device
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
    settings = SegmentationSettings(preset=args.preset, device=args.device, window_order=args.order,
                                    compile=args.compile)
    device = resolve_device(args.device)
    predictor = load_factory(args.predictor)(device)
    compile_s = None
    if args.compile:
        predictor.set_compile(True)
        compile_s = compile_warmup(predictor, device)
    blended = {}
    if args.save_logits:  # keep the blended logits of the (single) pass for the comparisons
        real_sliding_window = pipeline.sliding_window

        def keeping(*a, **kw):
            out = real_sliding_window(*a, **kw)
            blended["logits"], blended["region"] = out.logits.numpy().copy(), out.region
            return out

        pipeline.sliding_window = keeping
    baseline = rss_mb()
    result = pipeline.segment_array(array, geometry, [(args.task, args.channels)], predictor, settings,
                                    rules=postprocess_rules())
    if args.save:
        import numpy as np

        np.save(args.save, result.labels)
        if blended:
            r = blended["region"]
            np.savez(args.save_logits, logits=blended["logits"],
                     region=np.array([[x.start, x.stop] for x in r]), channels=np.array(args.channels))
    return {
        "input": "synthetic 512×512×600" if args.input == "large" else Path(args.input).name,
        "shape": list(geometry.shape),
        "preset": args.preset,
        "label": args.label or args.preset,
        "predictor": args.predictor,
        "order": args.order,
        "compiled": bool(getattr(predictor, "compiled", False)),
        "compile_s": compile_s,
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
              save: str = "", *, predictor: str | None = None, order: str = "slices",
              compile: bool = False, label: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", "--input", input_, "--preset", preset,
           "--predictor", predictor or args.predictor, "--device", args.device, "--task", str(args.task),
           "--channels", ",".join(map(str, channels)), "--save", save, "--order", order,
           "--label", label]
    if save:
        cmd += ["--save-logits", save.replace(".npy", "_logits.npz")]
    if compile:
        cmd.append("--compile")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"scenario failed:\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    report(row)
    return row


def report(row: dict) -> None:
    t = row["timings"]
    per_window = t["inference"] / max(row["windows"], 1)
    extra = f" (+ compile warm-up {row['compile_s']:.1f}s)" if row.get("compile_s") is not None else ""
    print(f"{row['input']:<24} {row.get('label', row['preset']):<16} ch={row['channels']:<3} "
          f"windows {row['windows']:>4}/{row['windows_total']:<4} "
          f"pre {t['preprocess']:6.1f}s  infer {t['inference']:7.1f}s ({per_window:5.2f}s/window)  "
          f"post {t['postprocess']:5.1f}s  inv {t['invert']:5.1f}s  total {t['total']:7.1f}s  "
          f"peak RSS {row['peak_rss_mb'] / 1024:5.2f} GB (before run {row['baseline_rss_mb'] / 1024:4.2f} GB)"
          f"{extra}", flush=True)


def _load_logits(path: str):
    import numpy as np

    z = np.load(path)
    return z["logits"], tuple(slice(int(a), int(b)) for a, b in z["region"])


def compare_logits(a_path: str, b_path: str) -> tuple[float, int, float]:
    """Blended logits of two runs on the model grid, where both ran windows: (max |diff|,
    voxels whose sign differs, the largest |logit| of ``a`` among those)."""
    import numpy as np

    a, ra = _load_logits(a_path)
    b, rb = _load_logits(b_path)
    inter = [slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(ra, rb, strict=True)]
    pa = a[(slice(None), *[slice(i.start - r.start, i.stop - r.start) for i, r in zip(inter, ra, strict=True)])]
    pb = b[(slice(None), *[slice(i.start - r.start, i.stop - r.start) for i, r in zip(inter, rb, strict=True)])]
    both = np.isfinite(pa) & np.isfinite(pb)
    diff = float(np.abs(pa - pb)[both].max()) if both.any() else 0.0
    flipped = both & ((pa > 0) != (pb > 0))
    return diff, int(flipped.sum()), float(np.abs(pa[flipped]).max()) if flipped.any() else 0.0


def label_table(a, b, name_a: str, name_b: str) -> None:
    """Per structure: voxels in each label map, the fraction that changed, Dice."""
    import numpy as np

    print(f"    {'structure':>9} {name_a + ' voxels':>14} {name_b + ' voxels':>14} {'changed':>9} "
          f"{'changed/' + name_a:>16} {'Dice':>7}")
    for s in sorted((set(np.unique(a)) | set(np.unique(b))) - {0}):
        x, y = a == s, b == s
        changed = int((x ^ y).sum())
        dice = 2.0 * (x & y).sum() / max(x.sum() + y.sum(), 1)
        print(f"    {s:>9} {int(x.sum()):>14} {int(y.sum()):>14} {changed:>9} "
              f"{changed / max(int(x.sum()), 1):>16.4f} {dice:>7.4f}")
    print(f"    all voxels: {int((a != b).sum())} of {a.size} differ ({(a != b).mean():.2e})")


def real_scenario(args: argparse.Namespace) -> None:
    import statistics
    import tempfile

    import numpy as np

    ct = shared_dir() / "data" / "totalsegmentator" / "example_ct.nii.gz"
    if not ct.exists():
        raise SystemExit(f"{ct} not found: set CDPDNET_SHARED_DIR")
    before_predictor = "full-before" if args.predictor == "full" else args.predictor
    with tempfile.TemporaryDirectory() as tmp:
        def path(name: str) -> str:
            return str(Path(tmp) / f"{name}.npy")

        rows: dict[str, list[dict]] = {"before": [], "after": []}
        print(f"exact, before (MONAI order, speed-ups off) vs after (order 'slices', speed-ups on), "
              f"{args.rounds} round(s), alternating:")
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for which in order:
                rows[which].append(run_child(
                    str(ct), "exact", args.channels, args, save=path(f"{which}{r}"),
                    predictor=before_predictor if which == "before" else args.predictor,
                    order="monai" if which == "before" else "slices", label=f"exact {which}"))
        factors = [b["timings"]["inference"] / a["timings"]["inference"]
                   for b, a in zip(rows["before"], rows["after"], strict=True)]
        totals = [b["timings"]["total"] / a["timings"]["total"]
                  for b, a in zip(rows["before"], rows["after"], strict=True)]
        print(f"  factor after/before: inference {', '.join(f'{f:.2f}' for f in factors)} "
              f"(median {statistics.median(factors):.2f}); whole run {', '.join(f'{f:.2f}' for f in totals)}")
        peak_b = max(r["peak_rss_mb"] for r in rows["before"])
        peak_a = max(r["peak_rss_mb"] for r in rows["after"])
        print(f"  peak RSS: before {peak_b / 1024:.2f} GB, after {peak_a / 1024:.2f} GB "
              f"(after − before {(peak_a - peak_b) / 1024:+.2f} GB)")
        lb, la = np.load(path("before0")), np.load(path("after0"))
        if np.array_equal(lb, la):
            print("  label maps before and after: identical")
        else:
            print(f"  label maps before and after: {int((lb != la).sum())} voxels differ")
        d, flips, near = compare_logits(path("before0").replace(".npy", "_logits.npz"),
                                        path("after0").replace(".npy", "_logits.npz"))
        print(f"  blended logits after vs before: max |diff| {d:.3g}; {flips} model-grid voxels change "
              f"sign (largest |logit| among them {near:.3g})")

        if args.compile and args.predictor == "full":
            print("after + compile (first child: cold inductor cache unless already warm; second: warm):")
            comp = [run_child(str(ct), "exact", args.channels, args, save=path(f"compile{i}"),
                              compile=True, label=f"exact compile {i + 1}") for i in range(2)]
            warm = comp[-1]
            ref = statistics.median(r["timings"]["inference"] for r in rows["after"])
            print(f"  compile warm-up: {comp[0]['compile_s']:.1f} s then {warm['compile_s']:.1f} s; "
                  f"extra factor of compile over 'after' (inference): {ref / warm['timings']['inference']:.2f}"
                  f"{'' if warm['compiled'] else ' -- compile FAILED, ran eagerly'}")
            d, flips, near = compare_logits(path("after0").replace(".npy", "_logits.npz"),
                                            path("compile1").replace(".npy", "_logits.npz"))
            n = int((np.load(path("compile1")) != la).sum())
            print(f"  compiled vs after: max |logit diff| {d:.3g}, {flips} voxels change sign; "
                  f"label maps {'identical' if n == 0 else f'differ in {n} voxels'}")

        if args.fast:
            print("fast (overlap 0.25, air windows skipped, reduced precision where the CPU has it) vs exact after:")
            fast = run_child(str(ct), "fast", args.channels, args, save=path("fast"), label="fast")
            ref = statistics.median(r["timings"]["total"] for r in rows["after"])
            before = statistics.median(r["timings"]["total"] for r in rows["before"])
            print(f"  time: fast {fast['timings']['total']:.1f} s, exact after {ref:.1f} s "
                  f"({ref / fast['timings']['total']:.2f}x), exact before {before:.1f} s "
                  f"({before / fast['timings']['total']:.2f}x); windows {fast['windows']} vs {rows['after'][0]['windows']}")
            d, flips, _ = compare_logits(path("after0").replace(".npy", "_logits.npz"),
                                         path("fast").replace(".npy", "_logits.npz"))
            print(f"  blended logits fast vs exact: max |diff| {d:.3g}, {flips} model-grid voxels change sign")
            label_table(la, np.load(path("fast")), "exact", "fast")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["real", "large", "all"], default="all")
    parser.add_argument("--predictor", default="cheap",
                        help="module:factory returning predictor(x, task_id); 'cheap' = stand-in, "
                             "'full' = full-size CDPDNet (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--task", type=int, default=0, help="task prompt id (0 = BTCV)")
    parser.add_argument("--channels", default="5", help="comma-separated channels for 'real' (5 = liver)")
    parser.add_argument("--rounds", type=int, default=1, help="'real': before/after rounds (default 1)")
    parser.add_argument("--compile", action="store_true", help="'real', full model: also time torch.compile")
    parser.add_argument("--fast", action="store_true", help="'real': also run the fast preset and compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--order", default="slices", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    parser.add_argument("--save-logits", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.channels = [int(c) for c in str(args.channels).split(",") if c != ""]

    if args.child:
        print(json.dumps(child(args)))
        return 0

    print(f"predictor: {args.predictor}  device: {args.device}  threads: {args.threads or 'torch default'}  "
          f"channels: {args.channels}  started {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()}")
    if args.scenario in ("real", "all"):
        real_scenario(args)
    if args.scenario in ("large", "all"):
        saved = args.predictor
        args.predictor = "cheap"
        for channels in (ALL_CHANNELS, [5]):
            run_child("large", "exact", channels, args)
        args.predictor = saved
    print(f"finished {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
