"""``cdpdnet train-roi-prompts``: distil the checkpoint's organ embeddings into an ROI mapper."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.inference.settings import PRESETS, preset_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-roi-prompts",
        help="train the ROI → structure mapper used by segment-by-example --mapper",
        description=(
            "Sample ROIs (jittered boxes, synthetic scribbles, clicks) from reference label maps, "
            "compute their features (instance attributes in patient space, HU histogram and, "
            "with --with-model, the 32 pooled CDPDNet probabilities) and train a small MLP to "
            "predict the structure's CLIP text embedding (the checkpoint's organ embedding) by "
            "self-adding-noise distillation. Writes a small separate weights file."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet train-roi-prompts --ct ct.nii.gz --labels seg.nii.gz --map totalsegmentator -o roi_mapper.pt\n"
            "  cdpdnet train-roi-prompts --ct a.nii.gz --labels a_seg.nii.gz --ct b.nii.gz --labels b_seg.nii.gz \\\n"
            "      --teacher txt_encoding.pth -o roi_mapper.pt\n"
        ),
    )
    p.add_argument("--ct", type=Path, action="append", required=True, help="CT (repeatable)")
    p.add_argument("--labels", type=Path, action="append", required=True,
                   help="reference label map on that CT's grid (repeatable, same order as --ct)")
    p.add_argument("--map", metavar="MAPPING",
                   help="label values → structure indices: 'totalsegmentator', a JSON file or "
                        "'5=6,1=1' (default: values already are structure indices 1..32)")
    p.add_argument("-o", "--output", type=Path, required=True, help="mapper weights file (.pt)")
    p.add_argument("--teacher", type=Path,
                   help="organ embeddings: a CDPDNet checkpoint or txt_encoding.pth (default: the checkpoint)")
    p.add_argument("--clip-weights", type=Path, nargs="?", const=Path(""), default=None, metavar="FILE",
                   help="ensemble the teacher with attribute sentences encoded by CLIP ViT-B/32 "
                        "(open_clip weights file; without FILE: the weights folder/cache)")
    p.add_argument("--ensemble-weight", type=float, default=0.5,
                   help="weight of the attribute sentences in the teacher ensemble (default 0.5)")
    p.add_argument("--with-model", action="store_true",
                   help="add pooled CDPDNet probabilities to the features (runs the model on every CT)")
    p.add_argument("--per-kind", type=int, default=12, help="ROIs per structure and kind (default 12)")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling and training seed")
    p.add_argument("--checkpoint", type=Path, help="official CDPDNet checkpoint (cdpdnet.pth)")
    p.add_argument("--dino", type=Path, help="DINOv2-base weights (only with --with-model)")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--device", default="auto", help="device for --with-model")
    p.add_argument("--preset", choices=tuple(PRESETS), default="fast", help="pipeline preset for --with-model: " + preset_help())
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_cdpdnet.example.mapper import (
        TrainingConfig,
        sample_rois,
        train_mapper,
        training_set,
    )
    from napari_cdpdnet.fileutil import check_writable
    from napari_cdpdnet.io.images import read_ct, read_label_map
    from napari_cdpdnet.model.text import load_organ_embeddings
    from napari_cdpdnet.vocabulary.labelmaps import parse_label_values, remap

    if len(args.ct) != len(args.labels):
        raise InputError(f"{len(args.ct)} --ct but {len(args.labels)} --labels: give one label map per CT")
    for path in [*args.ct, *args.labels]:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
    if args.per_kind < 1 or args.epochs < 1:
        raise InputError("--per-kind and --epochs must be at least 1")
    check_writable(args.output, overwrite=args.overwrite)
    mapping = parse_label_values(args.map)
    if args.teacher is not None:
        teacher = load_organ_embeddings(args.teacher)
        teacher_source = str(args.teacher)
    else:
        from napari_cdpdnet.weights import resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint, allow_download=not args.offline)
        teacher = load_organ_embeddings(ckpt)
        teacher_source = str(ckpt)
    if args.clip_weights is not None:
        from napari_cdpdnet.example.mapper import ensemble_teacher
        from napari_cdpdnet.model.text import load_clip_text_tower

        clip = load_clip_text_tower(args.clip_weights if str(args.clip_weights) else None,
                                    allow_download=not args.offline)
        teacher = ensemble_teacher(teacher, clip.encode, weight=args.ensemble_weight)
        teacher_source += f" + CLIP attribute sentences (weight {args.ensemble_weight:g})"
    segmenter = None
    if args.with_model:
        from napari_cdpdnet.inference.segmenter import Segmenter

        segmenter = Segmenter(checkpoint=args.checkpoint, dino=args.dino, allow_download=not args.offline)

    rng = np.random.default_rng(args.seed)
    xs, ys = [], []
    for ct_path, lab_path in zip(args.ct, args.labels, strict=True):
        ct = read_ct(ct_path)
        labels, lg = read_label_map(lab_path)
        if not lg.same_grid(ct.geometry):
            raise InputError(f"{lab_path}: not on the voxel grid of {ct_path}")
        labels = remap(labels, mapping)
        probabilities = None
        if segmenter is not None:
            probabilities = _probabilities(segmenter, ct, args)
        rois = sample_rois(labels, rng, per_kind=args.per_kind)
        if not rois:
            raise InputError(f"{lab_path}: no mapped structure to sample ROIs from (check --map)")
        x, y = training_set(rois, ct.array, ct.geometry, probabilities=probabilities)
        xs.append(x)
        ys.append(y)
        print(f"{ct_path}: {len(rois)} ROIs of {len(set(y.tolist()))} structures", file=sys.stderr)
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    config = TrainingConfig(epochs=args.epochs, seed=args.seed)
    mapper = train_mapper(x, y, teacher, uses_model_features=args.with_model, config=config,
                          log=lambda line: print(line, file=sys.stderr))
    mapper.info.update({"teacher": teacher_source, "cts": [str(p) for p in args.ct],
                        "labels": [str(p) for p in args.labels], "map": args.map or ""})
    train_acc = float((mapper.probabilities(x).argmax(axis=1) + 1 == y).mean())
    mapper.info["train_top1"] = train_acc
    mapper.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(x)} ROIs, {len(mapper.info['structures'])} structures, "
          f"{'attributes + model' if args.with_model else 'attributes only'}, "
          f"training top-1 {train_acc:.1%} (not a hold-out figure; see scripts/roi_accuracy.py)")
    return 0


def _probabilities(segmenter, ct, args: argparse.Namespace) -> dict:
    """All 32 sigmoid maps of one CT (7 task passes)."""
    from napari_cdpdnet.example.run import run_all_structures
    from napari_cdpdnet.inference.settings import SegmentationSettings

    settings = SegmentationSettings(preset=args.preset, device=args.device)
    return run_all_structures(segmenter, ct.array, ct.geometry, settings).probabilities or {}
