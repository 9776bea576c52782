#!/usr/bin/env python
"""ROI → structure accuracy (top-1, top-3) on held-out ROIs of the real labelled example scan.

Data: ``shared/data/totalsegmentator`` (example_ct.nii.gz + example_seg_full.nii.gz, the
TotalSegmentator labels mapped onto the CDPDNet structures). There is one labelled CT with images,
so the hold-out is spatial: every structure is cut at its own cranio-caudal median; ROIs (jittered
boxes, synthetic scribbles, clicks) sampled on one half train the mapper and ROIs on the other half
test it, then the halves swap. No test ROI shares a voxel with a training ROI, but it is the same
patient: this measures generalisation across positions within an instance, not across patients.

Rows:

* learned mapper, attributes only — needs no CDPDNet weights at all (teacher embeddings only);
* fallback (probability dominance) — needs the network's probabilities; with the official
  weights this is the real number, with the tiny random model used when they are absent it is
  meaningless and printed only to show the pipeline runs;
* learned mapper, attributes + pooled probabilities — same caveat for the model part.

Usage:
    python scripts/roi_accuracy.py [--teacher txt_encoding.pth] [--checkpoint cdpdnet.pth --dino DIR]
        [--fallback auto|skip] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from napari_cdpdnet.example.mapper import (  # noqa: E402
    TrainingConfig,
    sample_rois,
    split_halves,
    train_mapper,
    training_set,
)
from napari_cdpdnet.example.ranking import rank_by_probability  # noqa: E402
from napari_cdpdnet.io.images import read_ct, read_label_map  # noqa: E402
from napari_cdpdnet.model.text import load_organ_embeddings  # noqa: E402
from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap  # noqa: E402

log = logging.getLogger("roi_accuracy")


def shared_dir() -> Path:
    env = os.environ.get("CDPDNET_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


def topk(ranked: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-3 accuracy of ``ranked`` ([N, ≥3] structure indices, best first)."""
    return float((ranked[:, 0] == truth).mean()), float((ranked[:, :3] == truth[:, None]).any(axis=1).mean())


def get_probabilities(ct, args, cache: Path) -> tuple[dict[int, np.ndarray], str]:
    """All 32 probability maps of the example CT: official weights if found offline, else tiny random."""
    from napari_cdpdnet.errors import WeightsError
    from napari_cdpdnet.example.run import run_all_structures
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.weights import resolve_weights

    try:
        files = resolve_weights(checkpoint=args.checkpoint, dino=args.dino, allow_download=False)
        segmenter = Segmenter(checkpoint=files.checkpoint, dino=files.dino_weights, allow_download=False)
        kind = "official"
        key = hashlib.sha256(f"{files.checkpoint}:{Path(files.checkpoint).stat().st_size}".encode()).hexdigest()[:12]
    except WeightsError as exc:
        from napari_cdpdnet.model import CDPDNetConfig, build_model

        log.warning("official weights not found offline (%s): using a tiny RANDOM model", str(exc).splitlines()[0])
        segmenter = Segmenter(module=build_model(CDPDNetConfig.tiny(), seed=0).eval())
        kind = "tiny-random"
        key = "tiny-random-seed0"
    path = cache / f"probs-{key}-{args.preset}.npz"
    if path.exists():
        with np.load(path) as z:
            return {int(k): z[k] for k in z.files}, kind
    t0 = time.perf_counter()
    settings = SegmentationSettings(preset=args.preset, threads=args.threads)
    result = run_all_structures(segmenter, ct.array, ct.geometry, settings)
    probs = result.probabilities or {}
    log.info("probabilities for 32 structures in %.0f s (%d windows)", time.perf_counter() - t0, result.windows)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{str(k): v.astype(np.float16) for k, v in probs.items()})
    return probs, kind


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="folder with example_ct.nii.gz and example_seg_full.nii.gz")
    p.add_argument("--teacher", type=Path, default=None,
                   help="organ embeddings (checkpoint or txt_encoding.pth; default shared/cdpdnet/text_embeddings)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--dino", type=Path, default=None)
    p.add_argument("--fallback", choices=("auto", "skip"), default="auto",
                   help="auto: run the network (official weights if present offline, else tiny random)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cdpdnet-roi-accuracy")
    p.add_argument("--preset", choices=("exact", "fast"), default="fast")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--per-kind-train", type=int, default=12)
    p.add_argument("--per-kind-test", type=int, default=6)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    data = args.data or shared_dir() / "data" / "totalsegmentator"
    teacher_path = args.teacher or shared_dir() / "cdpdnet" / "text_embeddings" / "txt_encoding.pth"
    if not teacher_path.exists() and args.checkpoint is not None:
        teacher_path = args.checkpoint
    ct = read_ct(data / "example_ct.nii.gz")
    seg, g = read_label_map(data / "example_seg_full.nii.gz")
    labels = remap(seg, TOTALSEGMENTATOR_TOTAL)
    teacher = load_organ_embeddings(teacher_path)
    upper, lower = split_halves(labels, g)

    t0 = time.perf_counter()
    halves = {"superior": upper, "inferior": lower}
    train_rois = {h: sample_rois(m, np.random.default_rng(args.seed), per_kind=args.per_kind_train) for h, m in halves.items()}
    test_rois = {h: sample_rois(m, np.random.default_rng(args.seed + 1000), per_kind=args.per_kind_test) for h, m in halves.items()}
    feats = {}
    for name, sets in (("train", train_rois), ("test", test_rois)):
        for h, rois in sets.items():
            feats[name, h] = training_set(rois, ct.array, g)
    structures = sorted(set(np.unique(labels).tolist()) - {0})
    log.info("%d structures, ROI features in %.0f s", len(structures), time.perf_counter() - t0)

    rows: list[tuple[str, str, float, float, int]] = []
    kinds_all = np.array([r.kind for h in halves for r, _ in test_rois[h]])

    def evaluate(label: str, ranked_by_half: dict[str, np.ndarray]) -> None:
        truth = np.concatenate([feats["test", h][1] for h in halves])
        ranked = np.concatenate([ranked_by_half[h] for h in halves])
        t1, t3 = topk(ranked, truth)
        rows.append((label, "all", t1, t3, len(truth)))
        for k in ("box", "scribble", "click"):
            sel = kinds_all == k
            a1, a3 = topk(ranked[sel], truth[sel])
            rows.append((label, k, a1, a3, int(sel.sum())))

    cfg = TrainingConfig(epochs=args.epochs, seed=args.seed)
    other = {"superior": "inferior", "inferior": "superior"}
    ranked = {}
    for test_half in halves:
        x, y = feats["train", other[test_half]]
        mapper = train_mapper(x, y, teacher, uses_model_features=False, config=cfg)
        ranked[test_half] = np.argsort(-mapper.probabilities(feats["test", test_half][0]), axis=1)[:, :3] + 1
    evaluate("learned mapper, attributes only", ranked)

    model_kind = None
    if args.fallback == "auto":
        probs, model_kind = get_probabilities(ct, args, args.cache)
        probs = {k: v.astype(np.float32) for k, v in probs.items()}
        ranked = {}
        for h in halves:
            out = []
            for roi, _ in test_rois[h]:
                r = rank_by_probability(probs, roi)
                out.append([c.structure.index for c in r.top(3)])
            ranked[h] = np.array(out)
        evaluate(f"fallback: probability dominance ({model_kind} weights)", ranked)
        ranked = {}
        for test_half in halves:
            tr = train_rois[other[test_half]]
            x, y = training_set(tr, ct.array, g, probabilities=probs)
            xt, _ = training_set(test_rois[test_half], ct.array, g, probabilities=probs)
            mapper = train_mapper(x, y, teacher, uses_model_features=True, config=cfg)
            ranked[test_half] = np.argsort(-mapper.probabilities(xt), axis=1)[:, :3] + 1
        evaluate(f"learned mapper, attributes + pooled probabilities ({model_kind} weights)", ranked)

    n_train = sum(len(v) for v in train_rois.values())
    print(f"\nROI -> structure accuracy on {data / 'example_ct.nii.gz'}")
    print(f"{len(structures)} structures present (labels: TotalSegmentator model output mapped to CDPDNet); "
          f"{n_train} training ROIs, {len(kinds_all)} held-out ROIs; hold-out = the other cranio-caudal half "
          "of every structure (swapped both ways)")
    print(f"chance: top-1 {1 / len(structures):.1%}, top-3 {3 / len(structures):.1%}; teacher: {teacher_path}\n")
    print("| method | ROI kind | top-1 | top-3 | ROIs |")
    print("|---|---|---|---|---|")
    for label, kind, t1, t3, n in rows:
        print(f"| {label} | {kind} | {t1:.1%} | {t3:.1%} | {n} |")
    if model_kind == "tiny-random":
        print("\nNOTE: no official CDPDNet weights were found offline, so the network rows use a tiny "
              "RANDOM model: their numbers are meaningless (they only show the code path runs). "
              "Rerun with --checkpoint/--dino (or CDPDNET_WEIGHTS_DIR) for real fallback figures.")
    print("NOTE: one patient only; the learned mapper is trained and tested on the same scan (other half "
          "of each structure), so its figures are optimistic for new patients.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
