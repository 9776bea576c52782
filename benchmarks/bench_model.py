"""Benchmark: one 96³ patch through the full-size CDPDNet on this machine (not a test).

Prints wall time and peak memory of

* the straightforward evaluation — every module run as the official code runs it (all 96 DINO
  slices, all four hidden states, the final LayerNorm, the FiLM blocks recomputed from the text
  embeddings, all five output heads, ``no_grad``), and
* ours — only what reaches the output (84 DINO slices, three hidden states, one head, FiLM
  folded into per-channel constants, ``inference_mode``),

and their ratio. Each mode runs in a fresh subprocess so that peak RSS is its own. Weights are
random (the official ones are not needed to time the arithmetic).

    python benchmarks/bench_model.py [--repeats 3] [--threads N] [--device cpu|cuda] [--autocast bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _worker(mode: str, repeats: int, threads: int | None, device: str, autocast: str | None) -> dict:
    import resource
    import time

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None)
    p.add_argument("--worker", choices=("straightforward", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats, args.threads, args.device, args.autocast)))
        return 0

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


if __name__ == "__main__":
    sys.exit(main())
