#!/usr/bin/env python
"""Benchmark of cohort runs: cases/hour for 1 vs 2 ranks, with and without prefetch (not a test).

Runs ``cdpdnet segment`` on cohorts made from the real example CT (``example_ct.nii.gz`` of the
shared data) with the tiny random model of the tests (``tests/model_support.py``), in fresh
processes, configurations interleaved (ABCDE ABCDE …) so that a change in machine load hits all
alike. Two scenarios:

* ``small``: crops at the CT's own 3 mm (1–2 sliding windows each, a few MB): the device stage
  dominates, reading and preprocessing cost ~0.1 s;
* ``large``: fine scans of one window's field of view (crops resampled to 0.4 × 0.4 × 0.8 mm,
  15–20 M voxels each, as many as a clinical CT's 512 × 512 × 70): reading, mapping the labels
  back, measuring and writing cost about as much as the tiny model's window, as reading and
  writing a full CT do next to a GPU running the official model.

Configurations: one process with ``--workers 0`` (no prefetch: reading and preprocessing in the
device loop) and ``--workers 2``, the same with ``--threads 1`` (one core for torch), and
``torchrun --nproc_per_node 2`` (one thread per rank, as torchrun sets) with ``--workers 0`` and
``--workers 1``. Printed per configuration (median over repetitions): cases/hour end to end
(start-up, model loading and torchrun's rendezvous included) and in steady state (loop time:
first case to last written, slowest rank), the seconds the device loop waited for data, and the
device-busy fraction (sliding-window time / loop time, mean over ranks), all from ``run.json``.

On a CPU the "device" is the cores the workers use too: prefetching overlaps reading with
inference only as far as cores are idle. The figures measure this machine and the tiny model.

Examples::

    python benchmarks/bench_cohort.py                          # both scenarios, 8 cases, 2 reps
    python benchmarks/bench_cohort.py --scenario large --cases 12 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny official-format weights of the tests


def shared_dir() -> Path:
    env = os.environ.get("CDPDNET_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def _example_ct():
    from napari_cdpdnet.io.images import read_ct

    return read_ct(shared_dir() / "data" / "totalsegmentator" / "example_ct.nii.gz")


def make_small(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` crops of the example CT (24–48 × 30–48 × 30–64 voxels at 3 mm: 1–2 windows)."""
    import numpy as np

    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_image

    ct = _example_ct()
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = (int(rng.integers(24, 49)), int(rng.integers(30, 49)), int(rng.integers(30, 65)))
        start = [int(rng.integers(0, s - d + 1)) for s, d in zip(ct.array.shape, size, strict=True)]
        part = np.ascontiguousarray(ct.array[tuple(slice(a, a + d) for a, d in zip(start, size, strict=True))])
        origin = ct.geometry.index_to_world(np.array([start], float))[0]
        g = Geometry(ct.geometry.spacing, tuple(origin), ct.geometry.direction, part.shape)
        write_image(folder / f"case{i:03d}" / "ct.nii.gz", part, g)
    return []


def make_large(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` fine scans of one window's field of view: crops of 36–40 × 44–48 × 44–48 voxels
    (3 mm) resampled to 0.4 × 0.4 × 0.8 mm (about 15–20 M voxels, 30–40 MB in memory)."""
    import numpy as np
    import SimpleITK as sitk

    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_image

    ct = _example_ct()
    rng = np.random.default_rng(seed)
    spacing = (0.4, 0.4, 0.8)
    for i in range(n):
        size = (int(rng.integers(36, 41)), int(rng.integers(44, 49)), int(rng.integers(44, 49)))
        start = [int(rng.integers(0, s - d + 1)) for s, d in zip(ct.array.shape, size, strict=True)]
        part = np.ascontiguousarray(ct.array[tuple(slice(a, a + d) for a, d in zip(start, size, strict=True))])
        origin = ct.geometry.index_to_world(np.array([start], float))[0]
        image = Geometry(ct.geometry.spacing, tuple(origin), ct.geometry.direction, part.shape).to_sitk(part)
        fine_size = [int(k * s / t) for k, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)]
        fine = sitk.Resample(image, fine_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                             image.GetDirection(), -1024.0, sitk.sitkInt16)
        write_image(folder / f"case{i:03d}" / "ct.nii.gz", sitk.GetArrayFromImage(fine), Geometry.from_sitk(fine))
    return []


def run(ranks: int, workers: int, threads: int | None, cohort: Path, weights: tuple[Path, Path],
        out: Path, extra: list[str]) -> dict:
    """One run in fresh processes; figures from its report."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "napari_cdpdnet.cli", "segment", str(cohort), "-s", "liver", "-o", str(out),
           "--checkpoint", str(weights[0]), "--dino", str(weights[1]), "--offline", "--no-progress",
           "--workers", str(workers), *extra, *(["--threads", str(threads)] if threads else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((out / "run.json").read_text())
    info = report["runs"][-1]["ranks"]
    return {
        "wall": wall,
        "loop": max(r["wall_s"] for r in info),
        "wait": sum(r["wait_s"] for r in info),
        "busy": statistics.mean(r["device_busy"] for r in info),
        "ok": report["summary"]["ok"],
    }


#: (ranks, --workers, --threads); None: torch's default (all cores) for one process.
CONFIGS = [(1, 0, None), (1, 2, None), (1, 0, 1), (2, 0, None), (2, 1, None)]


def scenario(name: str, n: int, reps: int, tmp: Path, weights: tuple[Path, Path]) -> None:
    cohort = tmp / name
    t0 = time.perf_counter()
    extra = (make_small if name == "small" else make_large)(cohort, n)
    print(f"\n== {name}: {n} cases made in {time.perf_counter() - t0:.0f} s {' '.join(extra)}", flush=True)
    results: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    for rep in range(reps):
        for ranks, workers, threads in CONFIGS:
            out = tmp / f"out-{name}-{ranks}-{workers}-{threads}-{rep}"
            r = run(ranks, workers, threads, cohort, weights, out, extra)
            assert r["ok"] == n, r
            results[(ranks, workers, threads)].append(r)
            print(f"  rep {rep + 1}: {ranks} rank(s), --workers {workers}, threads {threads or ('1/rank' if ranks > 1 else 'all')}: "
                  f"{r['wall']:.1f} s wall, {r['loop']:.1f} s loop, busy {r['busy']:.2f}", flush=True)
            shutil.rmtree(out)
    print(f"\n{name}: median of {reps} runs, {n} cases")
    print(f"{'ranks':>5} {'workers':>7} {'threads':>7} {'wall s':>7} {'cases/h':>8} {'loop s':>7} "
          f"{'cases/h':>8} {'waited s':>8} {'busy':>5}")
    print(f"{'':>21} {'(end to end)':>16} {'(steady state)':>16}")
    for (ranks, workers, threads), rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        loop = statistics.median(r["loop"] for r in rs)
        wait = statistics.median(r["wait"] for r in rs)
        busy = statistics.median(r["busy"] for r in rs)
        per_rank = "1/rank" if ranks > 1 else "all"
        print(f"{ranks:>5} {workers:>7} {threads or per_rank:>7} {wall:>7.1f} {n * 3600 / wall:>8.0f} "
              f"{loop:>7.1f} {n * 3600 / loop:>8.0f} {wait:>8.1f} {busy:>5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("small", "large", "both"), default="both")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from model_support import write_tiny_weights

    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        tmp = Path(tmp)
        ckpt, dino, _ = write_tiny_weights(tmp / "weights")
        print(f"tiny random CDPDNet; {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}")
        for name in ("small", "large") if args.scenario == "both" else (args.scenario,):
            scenario(name, args.cases, args.reps, tmp, (ckpt, dino))


if __name__ == "__main__":
    main()
