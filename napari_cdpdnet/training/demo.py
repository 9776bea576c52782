"""Partial labels vs the naive loss on one real CT (issue 7): why unlabelled must not be background.

The TotalSegmentator example (``example_ct.nii.gz`` with ``example_seg_full.nii.gz``) is turned
into two pseudo datasets that share the image but label disjoint halves of the structures. A tiny
random-init CDPDNet is trained twice on them, CPU-sized (5 mm grid, one 96³ crop per step):

* with the official partial-label loss, each pseudo dataset teaches only its own half;
* with the naive loss, each pseudo dataset also teaches that the *other* half is background.

Both pseudo datasets show the same image with the same task prompt, so the naive loss gives
contradicting BCE targets for every structure (its Dice term is constant where a structure is
"background", so it does not push down); the partial-label one sees each structure only where it
is labelled. Both are then scored (Dice, HD95 in mm) against the *full* reference on the source
grid. The recorded runs (docs/training.md) show the partial-label model with higher probability
inside the structures but, at CPU budgets, *not* higher Dice.
These label maps are TotalSegmentator model outputs, not manual ground truth; the point is the
comparison, not the absolute numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_cdpdnet.geometry import Geometry

__all__ = [
    "TOTALSEG_TO_CDPDNET",
    "HALF_A",
    "HALF_B",
    "DEMO_WIDTHS",
    "DemoResult",
    "totalseg_to_cdpdnet",
    "write_partial_maps",
    "predict_labels",
    "run_demo",
    "format_tables",
]

logger = logging.getLogger(__name__)

#: TotalSegmentator ``total`` label values → CDPDNet structure index (shared/data/README.md).
TOTALSEG_TO_CDPDNET: dict[int, int] = {
    1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13,
    19: 14, 12: 16, 13: 16, 14: 16, 10: 17, 11: 17, 20: 18, 18: 19, 21: 21, 22: 22,
}

#: The two disjoint halves (structure keys), each mixing large and small structures.
HALF_A: tuple[str, ...] = ("liver", "right_kidney", "stomach", "urinary_bladder")
HALF_B: tuple[str, ...] = ("spleen", "left_kidney", "colon", "small_intestine")

#: CNN widths of the demo's model: ``CDPDNetConfig.tiny()`` with twice the channels. The tiny
#: model's 4 full-resolution channels feed all 32 bias-free output channels, a rank-4
#: bottleneck that needs far more steps than a CPU demo affords to tell 8 organs apart.
#: Demo-only; the official and the tiny architecture are unchanged.
DEMO_WIDTHS: tuple[int, ...] = (8, 16, 24, 32, 40, 40)


def totalseg_to_cdpdnet(labels: np.ndarray) -> np.ndarray:
    """A TotalSegmentator ``total`` label map in CDPDNet numbering (unmapped values → 0)."""
    lut = np.zeros(max(int(labels.max(initial=0)), max(TOTALSEG_TO_CDPDNET)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_CDPDNET.items():
        lut[src] = dst
    return lut[labels]


def _indices(keys: Sequence[str]) -> list[int]:
    from napari_cdpdnet.vocabulary import structure

    return [structure(k).index for k in keys]


def write_partial_maps(
    reference: np.ndarray, geometry: Geometry, folder: Path,
    halves: Sequence[Sequence[str]] = (HALF_A, HALF_B),
) -> list[Path]:
    """One label map per half (CDPDNet numbering) keeping only that half's structures."""
    from napari_cdpdnet.io import write_label_map

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, half in enumerate(halves):
        keep = np.isin(reference, _indices(half))
        path = folder / f"partial_{'AB'[n]}.nii.gz"
        write_label_map(path, np.where(keep, reference, 0).astype(np.uint8), geometry, overwrite=True)
        out.append(path)
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

    from napari_cdpdnet.transforms import HU_WINDOW

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
    halves: tuple[tuple[str, ...], ...]
    steps: int
    seconds: float
    widths: tuple[int, ...] | None = None  # CNN widths of the tiny model (None: CDPDNetConfig.tiny())


def _config(work: Path, partial_maps: Sequence[Path], image: Path, loss: str, *, steps: int,
            spacing: float, lr: float, seed: int, halves: Sequence[Sequence[str]], task: int) -> dict:
    epochs = max(1, steps // len(halves))  # an epoch = one crop of each pseudo dataset
    datasets = [
        {"name": f"half_{'AB'[n]}", "label_values": "cdpdnet", "labelled": list(half), "task": task,
         "cases": [{"image": str(image), "label": str(path)}]}
        for n, (half, path) in enumerate(zip(halves, partial_maps, strict=True))
    ]
    return {
        "output_dir": str(work / loss), "model": "tiny", "init": "scratch", "epochs": epochs,
        "warmup_epochs": 0, "lr": lr, "eta_min": lr / 10, "spacing": spacing, "crop": 96,
        "samples_per_volume": 1, "batch_size": 1, "num_workers": 0, "cache": True,
        "checkpoint_every": epochs, "seed": seed, "loss": loss, "uniform_sample": False,
        "datasets": datasets,
    }


def _train_and_score(
    loss: str, ct: Path, work: Path, maps: Sequence[Path], *, steps: int, spacing: float, lr: float,
    seed: int, halves: Sequence[Sequence[str]], task: int, progress: bool, threads: int | None,
    widths: Sequence[int] | None,
) -> tuple[list, dict[str, float]]:
    """Train one model with ``loss`` and score it on the full reference (own process if asked)."""
    from napari_cdpdnet.io import read_label_map
    from napari_cdpdnet.model import CDPDNetConfig
    from napari_cdpdnet.training.config import parse_config
    from napari_cdpdnet.training.evaluation import evaluate_labels
    from napari_cdpdnet.training.trainer import Trainer
    from napari_cdpdnet.vocabulary import structure

    if threads:
        torch.set_num_threads(threads)
    cfg = parse_config(_config(work, maps, ct, loss, steps=steps, spacing=spacing, lr=lr,
                               seed=seed, halves=halves, task=task))
    arch = CDPDNetConfig.tiny().replace(widths=tuple(widths)) if widths else None
    trainer = Trainer(cfg, device="cpu", progress=progress, architecture=arch)
    trainer.fit()
    full_path = work / "labels" / "reference_cdpdnet.nii.gz"
    full, geometry = read_label_map(full_path)
    wanted = _indices([k for h in halves for k in h])
    pred, prob = predict_labels(trainer.model_plain, ct, geometry, spacing, task, wanted)
    rows = evaluate_labels(pred, geometry, full, geometry, {i: [i] for i in wanted})
    probs = {structure(i).name: float(prob[n][full == i].mean()) for n, i in enumerate(wanted)}
    logger.info("%s model trained and scored", loss)
    return rows, probs


def run_demo(
    ct: Path, reference: Path, work: Path, *, steps: int = 60, spacing: float = 5.0, lr: float = 1e-2,
    seed: int = 0, halves: Sequence[Sequence[str]] = (HALF_A, HALF_B), task: int = 0,
    progress: bool = False, threads: int | None = None, parallel: bool = False,
    widths: Sequence[int] | None = DEMO_WIDTHS,
) -> DemoResult:
    """Train the partial-label and the naive model and score both on the full reference.

    An epoch is one crop of each pseudo dataset in random order, one optimiser step per crop
    (the whole body fits one 96³ crop at ``spacing``); ``steps`` is rounded down to whole epochs.
    ``parallel`` trains the two models in two processes (``threads`` each). ``widths`` are the
    CNN widths of the tiny model (default :data:`DEMO_WIDTHS`; None = ``CDPDNetConfig.tiny()``).
    """
    from napari_cdpdnet.io import read_label_map, write_label_map

    t0 = time.perf_counter()
    raw, geometry = read_label_map(reference)
    full = totalseg_to_cdpdnet(raw)
    maps = write_partial_maps(full, geometry, work / "labels", halves)
    write_label_map(work / "labels" / "reference_cdpdnet.nii.gz", full, geometry, overwrite=True)
    kw = dict(steps=steps, spacing=spacing, lr=lr, seed=seed, halves=halves, task=task,
              progress=progress and not parallel, threads=threads,
              widths=tuple(widths) if widths else None)
    if parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            futures = {loss: pool.submit(_train_and_score, loss, ct, work, maps, **kw)
                       for loss in ("partial", "naive")}
            out = {loss: f.result() for loss, f in futures.items()}
    else:
        out = {loss: _train_and_score(loss, ct, work, maps, **kw) for loss in ("partial", "naive")}
    return DemoResult(out["partial"][0], out["naive"][0], out["partial"][1], out["naive"][1],
                      tuple(tuple(h) for h in halves), steps, time.perf_counter() - t0,
                      tuple(widths) if widths else None)


def format_tables(result: DemoResult) -> str:
    """Both Dice/HD95 tables side by side, grouped by half, with half means."""
    from napari_cdpdnet.vocabulary import structure

    lines = [
        f"{'':<24}{'partial-label loss':^30}   {'naive loss':^30}",
        f"{'half':<5} {'structure':<18} {'Dice':>8} {'HD95 mm':>9} {'p inside':>9}   {'Dice':>8} {'HD95 mm':>9} {'p inside':>9}",
    ]
    by_name = {r.name: r for r in result.partial}
    by_name_n = {r.name: r for r in result.naive}

    def fmt(v: float, w: int, p: int) -> str:
        return f"{'—':>{w}}" if v is None or not np.isfinite(v) else f"{v:>{w}.{p}f}"

    for n, half in enumerate(result.halves):
        dp, dn = [], []
        for key in half:
            name = structure(key).name
            a, b = by_name[name], by_name_n[name]
            dp.append(a.dice)
            dn.append(b.dice)
            lines.append(f"{'AB'[n]:<5} {name:<18} {fmt(a.dice, 8, 3)} {fmt(a.hd95_mm, 9, 1)} "
                         f"{result.partial_prob[name]:>9.3f}   {fmt(b.dice, 8, 3)} {fmt(b.hd95_mm, 9, 1)} "
                         f"{result.naive_prob[name]:>9.3f}")
        pp = np.mean([result.partial_prob[structure(k).name] for k in half])
        pn = np.mean([result.naive_prob[structure(k).name] for k in half])
        lines.append(f"{'AB'[n]:<5} {'mean':<18} {np.mean(dp):>8.3f} {'':>9} {pp:>9.3f}   "
                     f"{np.mean(dn):>8.3f} {'':>9} {pn:>9.3f}")
    arch = f"widths {','.join(map(str, result.widths))}" if result.widths else "CDPDNetConfig.tiny()"
    lines.append(f"({result.steps} steps per model, {result.seconds:.0f} s in total, CPU, "
                 f"random-init tiny model, {arch})")
    return "\n".join(lines)
