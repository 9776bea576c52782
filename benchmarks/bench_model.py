"""Benchmark of CDPDNet per 96³ window on this machine: each exact speed-up's factor and max |diff|.

Default: one real window *column* — consecutive windows of the example CT's exact plan that differ
only along the slicing axis, as the engine's ``window_order="slices"`` runs them — through the
full-size model (random weights, seed 0: time does not depend on the weight values) with

* ``before``: every speed-up off (``Speedups.none()``: the model as it was before issue 18),
* each speed-up of :class:`~napari_cdpdnet.model.speedups.Speedups` alone,
* ``all bit-exact``: every speed-up that changes no bit of the logits (all but ``fast_norm`` and
  ``channels_last``),
* ``all``: every speed-up on (the default), and with ``--compile`` also ``all + compile`` (timed
  warm: a first pass compiles and is not counted),

run in ONE process: every window runs through every variant back to back (each variant with its
own slice cache, so each sees the column in order), rotating which variant goes first, so a shared
machine's changing load hits all variants alike; under ``torch.inference_mode`` as the engine
runs the model. Printed per variant: mean seconds per window, the factor over ``before`` (total
time ratio) and the max |difference| of its logits from ``before`` over all windows and all 32
channels (0 = bit-identical). ``--autocast bf16`` adds ``all + bf16`` (not exact; the max
|diff| says how far). ``--allocator`` instead times every speed-up with glibc's default
allocator against freed memory reused as the engine runs (page faults, system time).
``--straightforward`` instead compares the official evaluation order with
ours in separate processes (peak memory of each), as before.

    python benchmarks/bench_model.py [--windows 5] [--rounds 2] [--threads 2] [--compile] [--autocast bf16]
    python benchmarks/bench_model.py --allocator [--windows 5] [--rounds 2]
    python benchmarks/bench_model.py --straightforward [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    env = os.environ.get("CDPDNET_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


# --------------------------------------------------------------------------- real window column
def column_windows(count: int):
    """``count`` consecutive windows of one column of the example CT's exact plan (most tissue).

    Returns (list of [1, 1, 96, 96, 96] tensors, description).
    """
    import numpy as np
    import SimpleITK as sitk
    import torch

    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.inference.sliding_window import ROI_SIZE, plan_windows
    from napari_cdpdnet.inference.transforms import preprocess

    ct = shared_dir() / "data" / "totalsegmentator" / "example_ct.nii.gz"
    if not ct.exists():
        raise SystemExit(f"{ct} not found: set CDPDNET_SHARED_DIR")
    image = sitk.ReadImage(str(ct))
    pre = preprocess(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))
    plan = plan_windows(pre.shape, overlap=0.5)
    img = np.zeros(plan.padded_shape, np.float32)
    sl = tuple(slice(p, p + n) for p, n in zip(plan.pad_before, plan.image_shape, strict=True))
    img[sl] = pre.image
    columns: dict[tuple[int, int], list[int]] = {}
    for s in plan.starts:
        columns.setdefault((s[1], s[2]), []).append(s[0])

    def tissue(key: tuple[int, int]) -> float:
        b, c = key
        return float((img[:, b:b + ROI_SIZE[1], c:c + ROI_SIZE[2]] > 0).mean())

    key = max(columns, key=tissue)
    starts = sorted(columns[key])[:count]
    wins = [torch.from_numpy(img[a:a + 96, key[0]:key[0] + 96, key[1]:key[1] + 96].copy())[None, None]
            for a in starts]
    what = (f"example_ct.nii.gz, model grid {pre.shape}, column (axis1, axis2) = {key}, "
            f"axis-0 starts {starts} (of {len(columns[key])} in the column)")
    return wins, what


def run_window(model, w, task, speedups, cache, *, autocast: str | None = None, compile: bool = False):
    """One window with ``speedups`` and the variant's own slice cache; returns (seconds, logits)."""
    import contextlib

    import torch

    model.speedups = speedups
    model.slice_cache = cache
    model.set_compile(compile)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        t0 = time.perf_counter()
        y = model(w, task)
        return time.perf_counter() - t0, y


def speedup_table(args: argparse.Namespace) -> int:
    import torch

    from napari_cdpdnet.model import CDPDNetConfig, build_model
    from napari_cdpdnet.model.dino import SliceCache
    from napari_cdpdnet.model.speedups import Speedups

    if args.threads:
        torch.set_num_threads(args.threads)
    wins, what = column_windows(args.windows)
    model = build_model(CDPDNetConfig.official(), seed=0).eval()
    task = torch.tensor([0])
    variants: dict[str, tuple[Speedups, dict]] = {"before": (Speedups.none(), {})}
    for name in Speedups.names():
        variants[name] = (Speedups().only(name), {})
    variants["all bit-exact"] = (Speedups.bit_exact(), {})
    variants["all"] = (Speedups(), {})
    if args.autocast:
        variants[f"all + {args.autocast}"] = (Speedups(), {"autocast": args.autocast})
    if args.compile:
        variants["all + compile"] = (Speedups(), {"compile": True})
        t0 = time.perf_counter()
        warm = SliceCache()
        for w in wins[:3]:  # compiles the CNN and DINO for a whole window, a cached and a padded batch
            run_window(model, w, task, Speedups(), warm, compile=True)
        print(f"compile (first three windows, inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR')}): "
              f"{time.perf_counter() - t0:.1f} s{'' if model.compiled else ' -- FAILED: ' + str(model._compiler.failed)}",
              flush=True)

    times: dict[str, list[float]] = {k: [] for k in variants}  # per window, all rounds
    diffs: dict[str, float] = {k: 0.0 for k in variants}
    print(f"{what}\nfull-size CDPDNet, random weights (seed 0), task 0, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; every window runs every variant back to back (rotating who goes "
          f"first), {args.rounds} round(s)", flush=True)
    for r in range(args.rounds):
        caches = {k: SliceCache() for k in variants}  # each variant sees the column in order
        for i, w in enumerate(wins):
            names = list(variants)
            k = (r * len(wins) + i) % len(names)
            names = names[k:] + names[:k]
            out: dict[str, torch.Tensor] = {}
            for name in names:
                sp, extra = variants[name]
                t, out[name] = run_window(model, w, task, sp, caches[name], **extra)
                times[name].append(t)
            for name in variants:
                diffs[name] = max(diffs[name], (out[name] - out["before"]).abs().max().item())
            del out
            print(f"  round {r + 1} window {i + 1}: " + "  ".join(
                f"{n} {times[n][-1]:.2f}" for n in variants), flush=True)
    model.set_compile(False)
    base = times["before"]
    print(f"\n{'variant':20}{'s/window':>10}{'factor':>9}{'max |diff| vs before':>24}")
    for name in variants:
        factor = sum(base) / sum(times[name])
        print(f"{name:20}{sum(times[name]) / len(times[name]):>10.2f}{factor:>9.2f}{diffs[name]:>24.3g}")
    print("factor = total time of 'before' / total time of the variant over the same windows; "
          "per-window ratios (median): " + ", ".join(
              f"{n} {statistics.median(b / t for b, t in zip(base, times[n], strict=True)):.2f}"
              for n in variants if n != "before"))
    cache = caches["all"]
    print(f"slice cache of 'all' over its last column: {cache.lookups} lookups, {cache.hits} hits, "
          f"{cache.encoded} slices encoded (incl. padding to {cache.min_batch}), at most "
          f"{cache.max_slices} slices kept")
    return 0


# --------------------------------------------------------------------------- allocator
def allocator_table(args: argparse.Namespace) -> int:
    """The column with every speed-up, once with glibc unmapping freed tensors (its default) and
    once inside :func:`~napari_cdpdnet.inference.memory.reuse_freed_memory` (as the engine runs),
    alternating per round: seconds, minor page faults and system CPU time per window."""
    import resource

    import torch

    from napari_cdpdnet.inference import memory
    from napari_cdpdnet.model import CDPDNetConfig, build_model
    from napari_cdpdnet.model.dino import SliceCache
    from napari_cdpdnet.model.speedups import Speedups

    if not memory.available():
        raise SystemExit("reusing freed memory needs Linux with glibc (and CDPDNET_REUSE_FREED_MEMORY not 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    wins, what = column_windows(args.windows)
    model = build_model(CDPDNetConfig.official(), seed=0).eval()
    task = torch.tensor([0])
    print(f"{what}\nfull-size CDPDNet, every speed-up, {torch.get_num_threads()} threads; "
          f"{args.rounds} round(s) of: default allocator, then freed memory reused", flush=True)
    stats: dict[str, list[tuple[float, int, float]]] = {"unmapped (glibc default)": [], "reused": []}
    for r in range(args.rounds):
        for name in (list(stats) if r % 2 == 0 else list(stats)[::-1]):
            ctx = memory.reuse_freed_memory() if name == "reused" else contextlib.nullcontext()
            with ctx:
                cache = SliceCache()
                for i, w in enumerate(wins):
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                    t, _ = run_window(model, w, task, Speedups(), cache)
                    r1 = resource.getrusage(resource.RUSAGE_SELF)
                    if i:  # the first window of a column pays for the column's first slices
                        stats[name].append((t, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
    print(f"\n{'allocator':26}{'s/window':>10}{'page faults':>14}{'system s':>10}")
    for name, rows in stats.items():
        n = len(rows)
        print(f"{name:26}{sum(r[0] for r in rows) / n:>10.2f}{sum(r[1] for r in rows) // n:>14}"
              f"{sum(r[2] for r in rows) / n:>10.2f}")
    a, b = (sum(r[0] for r in rows) for rows in stats.values())
    print(f"factor {a / b:.2f} (windows 2.. of the column, all rounds)")
    return 0


# --------------------------------------------------------------------------- straightforward vs ours
def _worker(mode: str, repeats: int, threads: int | None, device: str, autocast: str | None) -> dict:
    import resource

    import torch

    from napari_cdpdnet.model import CDPDNetConfig, build_model

    if threads:
        torch.set_num_threads(threads)
    model = build_model(CDPDNetConfig.official(), seed=0).eval().to(device)
    model.efficient = mode == "ours"
    if autocast:
        model.autocast_dtype = autocast
    x = torch.rand(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0)).to(device)
    task = torch.tensor([0], device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = model(x, task)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del y
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "mode": mode,
        "median_s": sorted(times[1:])[len(times[1:]) // 2],
        "runs_s": [round(t, 2) for t in times],
        "peak_rss_mb": round(peak),
        "rss_after_load_mb": round(rss_before),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def straightforward_table(args: argparse.Namespace) -> int:
    results = {}
    for mode in ("straightforward", "ours"):
        cmd = [sys.executable, __file__, "--worker", mode, "--repeats", str(args.repeats), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.autocast:
            cmd += ["--autocast", args.autocast]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    s, o = results["straightforward"], results["ours"]
    print(f"CDPDNet full size, one 96³ patch, device {args.device}, {o['threads']} threads"
          f"{', autocast ' + args.autocast if args.autocast else ''}, median of {args.repeats} after warm-up")
    print(f"{'':18}{'time (s)':>10}{'peak RSS (MB)':>15}{'RSS after load':>16}")
    for name, r in (("straightforward", s), ("ours", o)):
        print(f"{name:18}{r['median_s']:>10.2f}{r['peak_rss_mb']:>15}{r['rss_after_load_mb']:>16}")
    print(f"speed-up {s['median_s'] / o['median_s']:.2f}×, peak memory ratio "
          f"{o['peak_rss_mb'] / s['peak_rss_mb']:.2f} (ours / straightforward)")
    if "peak_cuda_mb" in o:
        print(f"peak CUDA memory: straightforward {s['peak_cuda_mb']} MB, ours {o['peak_cuda_mb']} MB")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=5, help="windows of the column (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time all speed-ups + torch.compile (warm)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="add 'all + autocast' (CPU: bf16); with --straightforward: autocast both")
    p.add_argument("--allocator", action="store_true",
                   help="instead: every speed-up with glibc's default allocator vs freed memory reused")
    p.add_argument("--straightforward", action="store_true",
                   help="instead: official evaluation order vs ours, one random patch, separate processes")
    p.add_argument("--repeats", type=int, default=3, help="--straightforward: timed runs after a warm-up")
    p.add_argument("--device", default="cpu", help="--straightforward: device")
    p.add_argument("--worker", choices=("straightforward", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats, args.threads, args.device, args.autocast)))
        return 0
    if args.straightforward:
        return straightforward_table(args)
    if args.allocator:
        return allocator_table(args)
    return speedup_table(args)


if __name__ == "__main__":
    sys.exit(main())
