#!/usr/bin/env python
"""Partial-label loss vs naive loss on the TotalSegmentator example CT (issue 7 demonstration).

    python scripts/train_demo.py --threads 1 --parallel      # 900 steps per model, about 53 min

An experiment, not part of the package: it uses only what ``cdpdnet train``/``evaluate`` use
(training config, trainer, evaluation) plus the TotalSegmentator label mapping of the vocabulary.
``tests/test_training_demo.py`` imports it from here. See docs/training.md for recorded runs.

The TotalSegmentator example (``example_ct.nii.gz`` with ``example_seg_full.nii.gz``) is cut at
the body's left-right midpoint into two images, the patient's right and left side, which become
two pseudo datasets labelling disjoint halves of the structures (A on the right image, B on the
left), each with its own task prompt as every official dataset has. Several structures cross
the midline (small intestine, urinary bladder, colon, liver), so each pseudo dataset *shows*
parts of structures it does not label. A tiny random-init CDPDNet is trained twice on them,
CPU-sized (5 mm grid, one 96³ crop per step):

* with the official partial-label loss, such a part is unknown: nothing is learned from it;
* with the naive loss, it is background: the network is taught to suppress it.

Both models are then run on each side image with its dataset's prompt, the two predictions are
put together on the source grid and scored (Dice, HD95 in mm) against the *full* reference. The
"unseen" column is the recall of each structure inside the other side: the part its pseudo
dataset never labelled, which only a model that did not call it background can find.

Why not the same image twice (the first version of this demo, recorded in docs/training.md):
with the official BCE + Dice loss the naive model is not taught to suppress anything there. The
Dice term of a structure that a sample calls background is ``1 − 0/(Σp + 1)`` = 1, constant, so
only the BCE pushes down, and it is outweighed by the labelling dataset's Dice term on the very
same voxels. Suppression needs the unlabelled structure where no labelled copy contradicts it,
as in real collections whose images differ.

Status (docs/training.md): the 900-step run shows the effect in both halves; shorter runs
(≤ 400 steps, models not yet fitted) are mixed.

These label maps are TotalSegmentator model outputs, not manual ground truth; the point is the
comparison, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the package is imported inside functions, after main() found it
    from napari_cdpdnet.geometry import Geometry

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("train_demo")

#: The two disjoint halves (structure keys). A is labelled on the patient's right side image, B
#: on the left one; each half has structures crossing the midline (A: small intestine, urinary
#: bladder, liver; B: colon, stomach) and structures that do not (kidneys, spleen).
HALF_A: tuple[str, ...] = ("liver", "right_kidney", "small_intestine", "urinary_bladder")
HALF_B: tuple[str, ...] = ("spleen", "left_kidney", "stomach", "colon")

#: Which side of the body each pseudo dataset's image shows.
SIDES: tuple[str, str] = ("right", "left")

#: Task prompt of each pseudo dataset (each official dataset has its own, SPEC §7).
TASKS: tuple[int, int] = (0, 1)

#: CNN widths of the demo's model: ``CDPDNetConfig.tiny()`` with twice the channels. The tiny
#: model's 4 full-resolution channels feed all 32 bias-free output channels, a rank-4
#: bottleneck that needs far more steps than a CPU demo affords to tell 8 organs apart.
#: Demo-only; the official and the tiny architecture are unchanged.
DEMO_WIDTHS: tuple[int, ...] = (8, 16, 24, 32, 40, 40)


def _indices(keys: Sequence[str]) -> list[int]:
    from napari_cdpdnet.vocabulary.catalog import structure

    return [structure(k).index for k in keys]


@dataclass(frozen=True)
class SideImage:
    """One pseudo dataset's image: one side of the CT, its partial label map, where it sits."""

    side: str  # "right" | "left" (the patient's)
    image: Path
    labels: Path  # only this side's half
    all_labels: Path  # every structure of both halves (for the pretraining run)
    geometry: Geometry
    region: tuple[slice, slice, slice]  # its voxels in the full ``[z, y, x]`` grid


def _left_right_axis(geometry: Geometry) -> tuple[int, bool]:
    """The ``[z, y, x]`` array axis closest to the patient's left-right direction, and whether
    increasing index goes towards the patient's left (+x in LPS)."""
    d = geometry.direction_matrix[0]  # LPS x component of each index axis (x, y, z)
    i = int(np.argmax(np.abs(d)))
    if abs(d[i]) < 0.7:
        raise ValueError("the scan has no image axis within 45° of left-right; cannot split by side")
    return 2 - i, bool(d[i] > 0)


def split_sides(
    hu: np.ndarray, reference: np.ndarray, geometry: Geometry, folder: Path,
    halves: Sequence[Sequence[str]] = (HALF_A, HALF_B), sides: Sequence[str] = SIDES,
) -> list[SideImage]:
    """Cut the CT at the body's left-right midpoint; write each side with its half's labels.

    The body is ``HU > -500``; the cut is the middle of its extent along the left-right axis.
    Side ``sides[n]`` gets the structures of ``halves[n]`` (CDPDNet numbering) and nothing else,
    with the geometry of that part of the source grid.
    """
    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_image, write_label_map

    if sorted(sides) != ["left", "right"]:
        raise ValueError(f"sides must be 'right' and 'left' in some order, got {tuple(sides)}")
    axis, towards_left = _left_right_axis(geometry)
    other = tuple(a for a in range(3) if a != axis)
    occupied = np.nonzero((hu > -500).any(axis=other))[0]
    if occupied.size == 0:
        raise ValueError("no body (HU > -500) in the scan")
    cut = (int(occupied[0]) + int(occupied[-1]) + 1) // 2
    low_side = "right" if towards_left else "left"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (half, side) in enumerate(zip(halves, sides, strict=True)):
        lo, hi = (0, cut) if side == low_side else (cut, hu.shape[axis])
        region = tuple(slice(lo, hi) if a == axis else slice(None) for a in range(3))
        start = np.zeros(3)
        start[axis] = lo
        shape = tuple(hi - lo if a == axis else hu.shape[a] for a in range(3))
        geo = Geometry(geometry.spacing, tuple(geometry.index_to_world(start)), geometry.direction, shape)
        keep = np.isin(reference[region], _indices(half))
        every = np.isin(reference[region], _indices([k for h in halves for k in h]))
        tag = "AB"[n]
        image = write_image(folder / f"image_{tag}_{side}.nii.gz", hu[region], geo, overwrite=True)
        labels = write_label_map(folder / f"partial_{tag}.nii.gz",
                                 np.where(keep, reference[region], 0).astype(np.uint8), geo, overwrite=True)
        all_labels = write_label_map(folder / f"all_{tag}.nii.gz",
                                     np.where(every, reference[region], 0).astype(np.uint8), geo, overwrite=True)
        out.append(SideImage(side, image, labels, all_labels, geo, region))  # type: ignore[arg-type]
    return out


def predict_labels(
    model: torch.nn.Module, image_path: Path, geometry: Geometry, spacing: float,
    task_id: int, structures: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ``structures`` with the training preprocessing at ``spacing``, back on the source grid.

    The volume is cropped to the body as in training and, at coarse spacing, fits one 96³
    window (larger volumes go through MONAI's sliding window). Each voxel gets the most probable
    requested structure among those with probability > 0.5, then the map is resampled to the
    source grid (nearest). Returns the label map and the probabilities of ``structures``
    (``[len(structures), z, y, x]``, 0 outside the body crop), both on the source grid.
    """
    import monai.transforms as mt
    from monai.inferers import sliding_window_inference
    from scipy import ndimage

    from napari_cdpdnet.inference.transforms import HU_WINDOW

    pre = mt.Compose([
        mt.LoadImaged(keys=["image"], ensure_channel_first=True, image_only=True),
        mt.Orientationd(keys=["image"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=["image"], pixdim=(spacing,) * 3, mode="bilinear"),
        mt.ScaleIntensityRanged(keys=["image"], a_min=HU_WINDOW[0], a_max=HU_WINDOW[1],
                                b_min=0.0, b_max=1.0, clip=True),
        mt.CropForegroundd(keys=["image"], source_key="image", allow_smaller=True),
    ])
    image = pre({"image": str(image_path)})["image"]
    affine = np.asarray(image.affine, dtype=float)  # model (X, Y, Z) index -> RAS mm
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = sliding_window_inference(
                x, (96, 96, 96), 1, lambda p: model(p, torch.tensor([task_id])), overlap=0.5,
            )
    finally:
        model.train(was_training)
    prob = torch.sigmoid(logits[0]).numpy()
    channels = [s - 1 for s in structures]
    sub = prob[channels]
    best = sub.argmax(axis=0)
    labels_xyz = np.where(sub.max(axis=0) > 0.5, np.asarray(structures, dtype=np.uint8)[best], 0)
    labels_xyz = labels_xyz.astype(np.uint8)
    zyx_to_xyz = np.eye(4)[[2, 1, 0, 3]]
    src_to_model = np.linalg.solve(affine, geometry.affine_ras() @ zyx_to_xyz)

    def to_source(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(a, src_to_model[:3, :3], src_to_model[:3, 3],
                                        output_shape=geometry.shape, order=0, mode="constant", cval=0)

    return to_source(labels_xyz), np.stack([to_source(c) for c in sub])


@dataclass
class DemoResult:
    """Per-structure evaluation rows of both models plus what the run cost."""

    partial: list  # list[evaluation.StructureScore]
    naive: list
    partial_prob: dict[str, float]  # structure name -> mean probability inside the reference
    naive_prob: dict[str, float]
    partial_unseen: dict[str, float]  # name -> recall inside the other side (nan: nothing there)
    naive_unseen: dict[str, float]
    partial_unseen_prob: dict[str, float]  # name -> mean probability inside the other side
    naive_unseen_prob: dict[str, float]
    halves: tuple[tuple[str, ...], ...]
    sides: tuple[str, ...]
    steps: int
    seconds: float
    widths: tuple[int, ...] | None = None  # CNN widths of the tiny model (None: CDPDNetConfig.tiny())
    pretrain_steps: int = 0  # steps of the all-labels model both started from (0: from scratch)
    pretrained: list | None = None  # its evaluation rows


def _config(work: Path, parts: Sequence[SideImage], loss: str, *, steps: int, spacing: float,
            lr: float, seed: int, halves: Sequence[Sequence[str]], tasks: Sequence[int],
            name: str | None = None, init: Path | None = None, every: bool = False) -> dict:
    """Training config; ``every``: each side labels all structures (the pretraining run)."""
    epochs = max(1, steps // len(halves))  # an epoch = one crop of each pseudo dataset
    union = [k for h in halves for k in h]
    datasets = [
        {"name": f"half_{'AB'[n]}_{part.side}", "label_values": "cdpdnet",
         "labelled": union if every else list(half), "task": task,
         "cases": [{"image": str(part.image), "label": str(part.all_labels if every else part.labels)}]}
        for n, (half, part, task) in enumerate(zip(halves, parts, tasks, strict=True))
    ]
    start = {"init": str(init), "dino": str(init.parent / "dino.safetensors")} if init else {"init": "scratch"}
    return {
        "output_dir": str(work / (name or loss)), "model": "tiny", **start, "epochs": epochs,
        "warmup_epochs": 0, "lr": lr, "eta_min": lr / 10, "spacing": spacing, "crop": 96,
        "samples_per_volume": 1, "batch_size": 1, "num_workers": 0, "cache": True,
        "checkpoint_every": epochs, "seed": seed, "loss": loss, "uniform_sample": False,
        "datasets": datasets,
    }


def _score(
    model: torch.nn.Module, work: Path, parts: Sequence[SideImage], *, spacing: float,
    halves: Sequence[Sequence[str]], tasks: Sequence[int],
) -> tuple[list, dict[str, float], dict[str, float], dict[str, float]]:
    """Scores on the full reference: rows, p inside, unseen recall, unseen probability.

    Each side image is segmented with its own dataset's task prompt, as in training, and the two
    predictions are put together on the source grid.
    """
    from napari_cdpdnet.io.images import read_label_map
    from napari_cdpdnet.training.evaluation import evaluate_labels
    from napari_cdpdnet.vocabulary.catalog import structure

    full, geometry = read_label_map(work / "labels" / "reference_cdpdnet.nii.gz")
    wanted = _indices([k for h in halves for k in h])
    pred = np.zeros(full.shape, dtype=np.uint8)
    prob = np.zeros((len(wanted), *full.shape), dtype=np.float32)
    for part, task in zip(parts, tasks, strict=True):
        labels, p = predict_labels(model, part.image, part.geometry, spacing, task, wanted)
        pred[part.region] = labels
        prob[(slice(None), *part.region)] = p
    rows = evaluate_labels(pred, geometry, full, geometry, {i: [i] for i in wanted})
    probs = {structure(i).name: float(prob[n][full == i].mean()) for n, i in enumerate(wanted)}
    unseen: dict[str, float] = {}
    unseen_prob: dict[str, float] = {}
    for n, half in enumerate(halves):
        other = np.zeros(full.shape, dtype=bool)
        for m, part in enumerate(parts):
            if m != n:
                other[part.region] = True
        for i in _indices(half):
            there = (full == i) & other
            name = structure(i).name
            unseen[name] = float((pred[there] == i).mean()) if there.any() else float("nan")
            unseen_prob[name] = float(prob[wanted.index(i)][there].mean()) if there.any() else float("nan")
    return rows, probs, unseen, unseen_prob


def _train(
    loss: str, work: Path, parts: Sequence[SideImage], *, steps: int, spacing: float, lr: float,
    seed: int, halves: Sequence[Sequence[str]], tasks: Sequence[int], progress: bool,
    threads: int | None, widths: Sequence[int] | None, name: str | None = None,
    init: Path | None = None, every: bool = False,
) -> torch.nn.Module:
    """Train one model with ``loss``; returns it (plain, not DDP-wrapped)."""
    from napari_cdpdnet.model import CDPDNetConfig
    from napari_cdpdnet.training.config import parse_config
    from napari_cdpdnet.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = parse_config(_config(work, parts, loss, steps=steps, spacing=spacing, lr=lr, seed=seed,
                               halves=halves, tasks=tasks, name=name, init=init, every=every))
    arch = CDPDNetConfig.tiny().replace(widths=tuple(widths)) if widths and init is None else None
    trainer = Trainer(cfg, device="cpu", progress=progress, architecture=arch)
    trainer.fit()
    return trainer.model_plain


def _train_and_score(
    loss: str, work: Path, parts: Sequence[SideImage], *, spacing: float,
    halves: Sequence[Sequence[str]], tasks: Sequence[int], **kw,
) -> tuple[list, dict[str, float], dict[str, float], dict[str, float]]:
    """Train one model with ``loss`` and score it on the full reference (own process if asked)."""
    model = _train(loss, work, parts, spacing=spacing, halves=halves, tasks=tasks, **kw)
    out = _score(model, work, parts, spacing=spacing, halves=halves, tasks=tasks)
    logger.info("%s model trained and scored", loss)
    return out


def run_demo(
    ct: Path, reference: Path, work: Path, *, steps: int = 60, spacing: float = 5.0, lr: float = 1e-2,
    seed: int = 0, halves: Sequence[Sequence[str]] = (HALF_A, HALF_B), sides: Sequence[str] = SIDES,
    tasks: Sequence[int] = TASKS, progress: bool = False, threads: int | None = None,
    parallel: bool = False, widths: Sequence[int] | None = DEMO_WIDTHS, pretrain_steps: int = 0,
    finetune_lr: float | None = None,
) -> DemoResult:
    """Train the partial-label and the naive model and score both on the full reference.

    An epoch is one crop of each pseudo dataset in random order, one optimiser step per crop
    (a side image fits one 96³ crop at ``spacing``); ``steps`` is rounded down to whole epochs.
    ``parallel`` trains the two models in two processes (``threads`` each). ``widths`` are the
    CNN widths of the tiny model (default :data:`DEMO_WIDTHS`; None = ``CDPDNetConfig.tiny()``).

    ``pretrain_steps`` > 0 first trains one model (at ``lr``) with *every* structure labelled on
    both sides, a stand-in for the official checkpoint that cannot be downloaded here, and both
    models are then fine-tuned from it for ``steps`` at ``finetune_lr`` (default ``lr``/3):
    the user's case of adapting a trained model to partially labelled data.
    """
    from napari_cdpdnet.io import read_ct, read_label_map, write_label_map
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap

    t0 = time.perf_counter()
    raw, geometry = read_label_map(reference)
    scan = read_ct(ct)
    if not scan.geometry.same_grid(geometry):
        raise ValueError(f"{reference} is not on the grid of {ct}")
    full = remap(raw, TOTALSEGMENTATOR_TOTAL)
    parts = split_sides(scan.array, full, geometry, work / "labels", halves, sides)
    write_label_map(work / "labels" / "reference_cdpdnet.nii.gz", full, geometry, overwrite=True)
    kw = dict(steps=steps, spacing=spacing, lr=lr, seed=seed, halves=halves, tasks=tuple(tasks),
              progress=progress and not parallel, threads=threads,
              widths=tuple(widths) if widths else None)
    pretrained = None
    if pretrain_steps > 0:
        pre_kw = {**kw, "steps": pretrain_steps, "progress": progress,
                  "threads": (threads or 1) * (2 if parallel else 1)}
        teacher = _train("partial", work, parts, name="pretrained", every=True, **pre_kw)
        pretrained = _score(teacher, work, parts, spacing=spacing, halves=halves, tasks=tuple(tasks))[0]
        del teacher
        kw.update(init=work / "pretrained" / "latest.pth",
                  lr=finetune_lr if finetune_lr is not None else lr / 3)
    if parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            futures = {loss: pool.submit(_train_and_score, loss, work, parts, **kw)
                       for loss in ("partial", "naive")}
            out = {loss: f.result() for loss, f in futures.items()}
    else:
        out = {loss: _train_and_score(loss, work, parts, **kw) for loss in ("partial", "naive")}
    return DemoResult(out["partial"][0], out["naive"][0], out["partial"][1], out["naive"][1],
                      out["partial"][2], out["naive"][2], out["partial"][3], out["naive"][3],
                      tuple(tuple(h) for h in halves),
                      tuple(sides), steps, time.perf_counter() - t0,
                      tuple(widths) if widths else None, pretrain_steps, pretrained)


def format_tables(result: DemoResult) -> str:
    """Both tables side by side, grouped by half, with half means.

    Per model: Dice and HD95 (mm) on the full reference, mean probability inside the reference
    structure, and "unseen", the recall inside the other side's image ("—": the structure does
    not reach there).
    """
    from napari_cdpdnet.vocabulary.catalog import structure

    cols = f"{'Dice':>7} {'HD95 mm':>8} {'p inside':>8} {'unseen':>7}"
    lines = [
        f"{'':<29}{'partial-label loss':^34}   {'naive loss':^34}",
        f"{'half':<10} {'structure':<18} {cols}   {cols}",
    ]
    by_name = {r.name: r for r in result.partial}
    by_name_n = {r.name: r for r in result.naive}

    def fmt(v: float | None, w: int, p: int) -> str:
        return f"{'—':>{w}}" if v is None or not np.isfinite(v) else f"{v:>{w}.{p}f}"

    def nanmean(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    for n, half in enumerate(result.halves):
        tag = f"{'AB'[n]} {result.sides[n]}"
        names = [structure(k).name for k in half]
        for name in names:
            a, b = by_name[name], by_name_n[name]
            lines.append(
                f"{tag:<10} {name:<18} {fmt(a.dice, 7, 3)} {fmt(a.hd95_mm, 8, 1)} "
                f"{fmt(result.partial_prob[name], 8, 3)} {fmt(result.partial_unseen[name], 7, 3)}   "
                f"{fmt(b.dice, 7, 3)} {fmt(b.hd95_mm, 8, 1)} {fmt(result.naive_prob[name], 8, 3)} "
                f"{fmt(result.naive_unseen[name], 7, 3)}"
            )
        means = []
        for rows, prob, unseen in ((by_name, result.partial_prob, result.partial_unseen),
                                   (by_name_n, result.naive_prob, result.naive_unseen)):
            means.append(f"{fmt(nanmean([rows[k].dice for k in names]), 7, 3)} {'':>8} "
                         f"{fmt(nanmean([prob[k] for k in names]), 8, 3)} "
                         f"{fmt(nanmean([unseen[k] for k in names]), 7, 3)}")
        lines.append(f"{tag:<10} {'mean':<18} {means[0]}   {means[1]}")
    arch = f"widths {','.join(map(str, result.widths))}" if result.widths else "CDPDNetConfig.tiny()"
    if result.pretrained is not None:
        start = {r.name: r.dice for r in result.pretrained}
        lines.append("Dice of the all-labels model both were fine-tuned from: " + ", ".join(
            f"{structure(k).name} {fmt(start[structure(k).name], 0, 3).strip()}"
            for half in result.halves for k in half))
        how = (f"{result.pretrain_steps} steps with all labels, then {result.steps} fine-tuning steps "
               "per model")
    else:
        how = f"{result.steps} steps per model from random init"
    lines.append(f"({how}, {result.seconds:.0f} s in total, CPU, tiny model, {arch})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "totalsegmentator",
                   help="folder with example_ct.nii.gz and example_seg_full.nii.gz")
    p.add_argument("--work", type=Path, help="output folder (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=900, help="optimiser steps per model (900: about "
                   "53 min on 2 CPU cores with --parallel --threads 1)")
    p.add_argument("--lr", type=float, default=3e-2, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="first train a model with every structure labelled for this many steps and "
                   "fine-tune both models from it (a stand-in for the official checkpoint)")
    p.add_argument("--finetune-lr", type=float, help="peak learning rate of fine-tuning (default lr/3)")
    p.add_argument("--spacing", type=float, default=5.0, help="training grid spacing in mm")
    p.add_argument("--tasks", default="0,1", help="task prompts of pseudo datasets A and B (default 0,1)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widths", help="CNN widths of the tiny model, 6 comma-separated ints "
                   "(default: DEMO_WIDTHS; 'tiny' = CDPDNetConfig.tiny())")
    p.add_argument("--parallel", action="store_true", help="train both models at once (two processes)")
    p.add_argument("--half-a", help="structure keys of pseudo dataset A (the patient's right side), "
                   "comma-separated (default: HALF_A)")
    p.add_argument("--half-b", help="structure keys of pseudo dataset B (the left side), comma-separated "
                   "(default: HALF_B)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

    widths: tuple[int, ...] | None = DEMO_WIDTHS
    if args.widths == "tiny":
        widths = None
    elif args.widths:
        try:
            widths = tuple(int(v) for v in args.widths.split(","))
            from napari_cdpdnet.model import CDPDNetConfig

            CDPDNetConfig.tiny().replace(widths=widths)  # validates before any training
        except ValueError as exc:
            print(f"--widths {args.widths!r}: {exc}", file=sys.stderr)
            return 2

    halves = tuple(
        tuple(k.strip() for k in text.split(",") if k.strip()) if text else default
        for text, default in ((args.half_a, HALF_A), (args.half_b, HALF_B))
    )
    if set(halves[0]) & set(halves[1]):
        print(f"the halves must be disjoint: {sorted(set(halves[0]) & set(halves[1]))}", file=sys.stderr)
        return 2

    try:
        tasks = tuple(int(v) for v in args.tasks.split(","))
    except ValueError:
        tasks = ()
    from napari_cdpdnet.vocabulary import catalog

    if len(tasks) != 2 or not all(0 <= t < len(catalog.TASKS) for t in tasks):
        print(f"--tasks {args.tasks!r}: give two task ids 0..{len(catalog.TASKS) - 1}, e.g. 0,1",
              file=sys.stderr)
        return 2

    ct, ref = args.data / "example_ct.nii.gz", args.data / "example_seg_full.nii.gz"
    for f in (ct, ref):
        if not f.is_file():
            print(f"missing {f} (see shared/data/README.md)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result = run_demo(ct, ref, work, steps=args.steps, lr=args.lr, spacing=args.spacing,
                          seed=args.seed, tasks=tasks, threads=args.threads, progress=args.verbose,
                          parallel=args.parallel, halves=halves, widths=widths,
                          pretrain_steps=args.pretrain_steps, finetune_lr=args.finetune_lr)
    print(format_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
