#!/usr/bin/env python
"""Benchmark of the segmentation engine: per-stage time, window count and peak RSS (not a test).

Each scenario runs in a fresh child process so that its peak resident memory (``ru_maxrss``) is its
own. Two kinds of scenario:

* ``real``: ``example_ct.nii.gz`` from the shared data, one structure (``--channels``, default
  liver). ``before`` (preset ``exact``, MONAI's window order, every model speed-up off, freed
  memory unmapped by glibc: the computation as it was before issue 18) and ``after`` (``exact``,
  window order ``slices``, all model speed-ups, freed memory reused, no compile) **alternate** ``--rounds`` times (default 2), each in a fresh child
  process: on a machine shared with others, neighbouring runs see similar load, and each child's
  peak RSS is its own. Printed per run: stage times, the time inside model calls, peak RSS and the
  load averages at its start and end; then the factors (sum over rounds and per round), whether
  the label maps are identical (else how many voxels differ), the blended logits' max |diff| and
  how many model-grid voxels change sign (with the largest |logit| among them: float32 rounding of
  the blend flips only logits within rounding of 0). ``--fast``: the ``fast`` preset once (after round 1), its
  time and, per structure, the fraction of voxels whose label changed against ``exact`` after.
  ``--compile``: one child compiles (cold if inductor's on-disk cache was empty), then one child
  runs ``after`` compiled with the cache warm.

  ``--predictor full`` is the full-size CDPDNet (random weights, seed 0: time and memory do not
  depend on the weight values); ``tiny`` a tiny one (checks the benchmark: a few minutes per run); ``cheap``
  (default) a stand-in costing ~nothing: the engine's own overhead (pre/post-processing,
  blending, inverse) and memory; or ``module:factory``.
* ``large``: a synthetic 512×512×600 CT (0.7×0.7×1.0 mm, int16) through preprocessing, sliding
  window, post-processing and inverse with the cheap predictor, requesting all 32 structures (the
  worst case for the blending buffers) and one structure — the memory budget check (≤ ~12 GB).

Examples::

    python benchmarks/bench_pipeline.py                      # both scenarios, cheap predictor
    python benchmarks/bench_pipeline.py --scenario real --predictor full --threads 2 --fast
    python benchmarks/bench_pipeline.py --scenario real --predictor tiny --rounds 1 --fast --compile
    python benchmarks/bench_pipeline.py --scenario large --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
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


def tiny_factory(device):
    """A tiny CDPDNet (random weights): exercises the benchmark itself in a minute."""
    from napari_cdpdnet.model import CDPDNetConfig, build_model

    return build_model(CDPDNetConfig.tiny(), seed=0).to(device).eval()


def full_before_factory(device):
    """:func:`full_factory` with every exact speed-up off (the model as before issue 18)."""
    from napari_cdpdnet.model.speedups import Speedups

    model = full_factory(device)
    model.speedups = Speedups.none()
    return model


def tiny_before_factory(device):
    """:func:`tiny_factory` with every exact speed-up off."""
    from napari_cdpdnet.model.speedups import Speedups

    model = tiny_factory(device)
    model.speedups = Speedups.none()
    return model


def load_factory(spec: str):
    if spec == "cheap":
        return cheap_factory
    if spec == "full":
        return full_factory
    if spec == "full-before":
        return full_before_factory
    if spec == "tiny":
        return tiny_factory
    if spec == "tiny-before":
        return tiny_before_factory
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
        if args.prime_only:
            return {"compile_s": compile_s, "compiled": bool(predictor.compiled)}
    model_s = [0.0]
    if hasattr(predictor, "register_forward_hook"):  # time the model calls alone (window compute)
        started = [0.0]

        def pre_hook(*_):
            started[0] = time.perf_counter()

        def post_hook(*_):
            model_s[0] += time.perf_counter() - started[0]

        predictor.register_forward_pre_hook(pre_hook)
        predictor.register_forward_hook(post_hook)
    load_start = os.getloadavg()
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
        "autocast": settings.effective_autocast,
        "model_s": model_s[0],
        "load": [load_start, os.getloadavg()],
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
              compile: bool = False, label: str = "", prime_only: bool = False,
              reuse_memory: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", "--input", input_, "--preset", preset,
           "--predictor", predictor or args.predictor, "--device", args.device, "--task", str(args.task),
           "--channels", ",".join(map(str, channels)), "--save", save, "--order", order,
           "--label", label]
    if save:
        cmd += ["--save-logits", save.replace(".npy", "_logits.npz")]
    if compile:
        cmd.append("--compile")
    if prime_only:
        cmd.append("--prime-only")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if not reuse_memory:  # the engine before issue 18 let glibc unmap freed tensors
        env["CDPDNET_REUSE_FREED_MEMORY"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"scenario failed:\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not prime_only:
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
    if row.get("model_s"):
        (a1, a5, _), (b1, b5, _) = row["load"]
        print(f"{'':<24} {'':<16} model calls {row['model_s']:7.1f}s ({row['model_s'] / max(row['windows'], 1):5.2f}"
              f"s/window)  load average (1, 5 min) at start {a1:.2f}, {a5:.2f}; at end {b1:.2f}, {b5:.2f}",
              flush=True)


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


def compare_runs(path, a: str, b: str, name_a: str, name_b: str, *, table: bool = False) -> str:
    """One line: label maps of runs ``a`` and ``b`` identical or how many voxels differ, and their
    blended logits' max |diff| with the model-grid voxels whose sign flips (``table``: per structure)."""
    import numpy as np

    la, lb = np.load(path(f"{a}.npy")), np.load(path(f"{b}.npy"))
    n = int((la != lb).sum())
    d, flips, near = compare_logits(path(f"{a}_logits.npz"), path(f"{b}_logits.npz"))
    line = (f"  {name_b} vs {name_a}: label maps "
            f"{'identical' if n == 0 else f'differ in {n} of {la.size} voxels ({n / la.size:.2e})'}; "
            f"blended logits max |diff| {d:.3g}, {flips} model-grid voxels change sign"
            + (f" (largest |logit| among them {near:.3g})" if flips else ""))
    print(line, flush=True)
    if table:
        label_table(la, lb, name_a, name_b)
    return line


def real_scenario(args: argparse.Namespace) -> None:
    """``before`` and ``after`` alternating (``--rounds`` times), each in a fresh child process,
    then ``fast`` once and with ``--compile`` ``after + compile`` (warm) once; see the module
    docstring."""
    import tempfile

    ct = shared_dir() / "data" / "totalsegmentator" / "example_ct.nii.gz"
    if not ct.exists():
        raise SystemExit(f"{ct} not found: set CDPDNET_SHARED_DIR")
    model = args.predictor in ("full", "tiny")
    before_predictor = {"full": "full-before", "tiny": "tiny-before"}.get(args.predictor, args.predictor)
    rows: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        def path(name: str) -> str:
            return str(Path(tmp) / name)

        print("exact before (every model speed-up off, MONAI window order, freed memory unmapped: the "
              "computation before issue 18) and exact after (all model speed-ups, window order 'slices', "
              "freed memory reused, no compile), alternating, each in a fresh process", flush=True)
        for r in range(1, args.rounds + 1):
            rows["before"].append(run_child(str(ct), "exact", args.channels, args, save=path(f"before{r}.npy"),
                                            predictor=before_predictor, order="monai", label=f"before #{r}",
                                            reuse_memory=False))
            rows["after"].append(run_child(str(ct), "exact", args.channels, args, save=path(f"after{r}.npy"),
                                           order="slices", label=f"after #{r}"))
            b, a = rows["before"][-1]["timings"]["total"], rows["after"][-1]["timings"]["total"]
            print(f"  round {r}: factor after over before {b / a:.2f} (total)", flush=True)
            compare_runs(path, f"before{r}", f"after{r}", f"before #{r}", f"after #{r}")
            if r == 1 and args.fast:  # early, so that a long run stopped in round 2 still has it
                fast = run_child(str(ct), "fast", args.channels, args, save=path("fast.npy"), order="slices",
                                 label="fast")
                compare_runs(path, "after1", "fast", "exact", "fast", table=True)
        for part in ("inference", "total"):
            b = [row["timings"][part] for row in rows["before"]]
            a = [row["timings"][part] for row in rows["after"]]
            pairs = ", ".join(f"{x / y:.2f}" for x, y in zip(b, a, strict=True))
            print(f"  factor after over before, {part}: {sum(b) / sum(a):.2f} (sum of rounds; per round {pairs})")
        if model:
            mb = [row["model_s"] for row in rows["before"]]
            ma = [row["model_s"] for row in rows["after"]]
            print(f"  factor after over before, model calls only: {sum(mb) / sum(ma):.2f}; engine outside the "
                  f"model: before {statistics.mean(row['timings']['total'] - row['model_s'] for row in rows['before']):.1f} s, "
                  f"after {statistics.mean(row['timings']['total'] - row['model_s'] for row in rows['after']):.1f} s")
        peak_b = max(row["peak_rss_mb"] for row in rows["before"])
        peak_a = max(row["peak_rss_mb"] for row in rows["after"])
        print(f"  peak RSS: before {peak_b / 1024:.2f} GB, after {peak_a / 1024:.2f} GB "
              f"(after - before {(peak_a - peak_b) / 1024:+.2f} GB)")
        if args.rounds > 1:
            compare_runs(path, "before1", f"before{args.rounds}", "before #1", f"before #{args.rounds}")
            compare_runs(path, "after1", f"after{args.rounds}", "after #1", f"after #{args.rounds}")
        if args.fast:
            after_s = statistics.mean(row["timings"]["total"] for row in rows["after"])
            before_s = statistics.mean(row["timings"]["total"] for row in rows["before"])
            print(f"  fast: total {fast['timings']['total']:.1f} s = {after_s / fast['timings']['total']:.2f}x "
                  f"faster than exact after (mean), {before_s / fast['timings']['total']:.2f}x than exact before "
                  f"(not alternated: one run, after round 1; autocast {fast['autocast']})")
        if args.compile:
            prime = run_child(str(ct), "exact", args.channels, args, save="", order="slices", compile=True,
                              label="compile (prime)", prime_only=True)
            print(f"  compile in a fresh process (fills inductor's on-disk cache; cold if it was empty): "
                  f"{prime['compile_s']:.1f} s{'' if prime['compiled'] else ' -- FAILED, eager'}", flush=True)
            comp = run_child(str(ct), "exact", args.channels, args, save=path("compiled.npy"), order="slices",
                             compile=True, label="after+compile")
            after_s = statistics.mean(row["timings"]["inference"] for row in rows["after"])
            print(f"  compile (warm): inference {comp['timings']['inference']:.1f} s, extra factor over after "
                  f"{after_s / comp['timings']['inference']:.2f} (not alternated: one run)")
            compare_runs(path, "after1", "compiled", "after", "after+compile")


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
    parser.add_argument("--rounds", type=int, default=2, help="'real': before/after pairs to alternate")
    parser.add_argument("--compile", action="store_true",
                        help="'real': also compile once (cold if inductor's cache is empty) and time after+compile warm")
    parser.add_argument("--fast", action="store_true", help="'real': also run the fast preset once")
    parser.add_argument("--prime-only", action="store_true", help=argparse.SUPPRESS)
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
