"""Training data: the official MONAI transform chain, 32-channel targets and labelled-channel masks.

Each sample is a dict with

* ``image``: ``[1, 96, 96, 96]`` float in 0…1 (the official window −175…250 HU),
* ``target``: ``[32, 96, 96, 96]`` uint8, channel ``c`` = structure ``c + 1``,
* ``labelled``: ``[32]`` bool, the channels this case has ground truth for (the loss mask),
* ``task_id``: the task prompt of the case's dataset.

The chain follows the official ``train_transforms`` (SPEC §13): Orientation RAS, Spacing 1.5 mm
(bilinear / nearest), ScaleIntensityRange −175…250 → 0…1 clipped, CropForeground (image > 0),
SpatialPad to the crop size, ``RandCropByPosNegLabeld`` (pos 2, neg 1) or, for datasets that
label a tumour, ``RandCropByLabelClassesd`` (background : organ : tumour = 1 : 1 : 5),
RandRotate90 (p 0.1, axes 0-1), RandShiftIntensity (±0.1, p 0.2). Not reproduced: the RandZoom the
official code applies to the MSD datasets only. Spacing and crop size are configurable for CPU
experiments; crops smaller than 96 are zero-padded to the network's 96³ patch.

Label maps are first translated to structure indices (1..32) with the dataset's ``label_values``,
keeping only the case's labelled structures: values of other structures become 0 and their
channels are masked out of the loss, so they are unknown rather than background. One value per
voxel means nested structures (a tumour inside its organ) are not both set; see docs/training.md.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from napari_cdpdnet.inference.transforms import HU_WINDOW
from napari_cdpdnet.training.config import CaseSpec, DatasetSpec, TrainConfig
from napari_cdpdnet.vocabulary.catalog import STRUCTURES

__all__ = [
    "NUM_CHANNELS",
    "case_record",
    "preprocess_transforms",
    "random_transforms",
    "build_dataset",
    "UniformDataset",
    "RemapLabelsd",
    "ToTargetd",
]

logger = logging.getLogger(__name__)

#: One target channel per structure (the model's ``num_classes``, checked against it in
#: tests/test_vocabulary.py).
NUM_CHANNELS = len(STRUCTURES)
#: Official sampler ratios for tumour datasets (background, organ, tumour).
TUMOUR_CLASS_RATIOS = (1, 1, 5)


def _tumour_indices() -> frozenset[int]:
    return frozenset(s.index for s in STRUCTURES if s.group == "tumour")


def case_record(case: CaseSpec, dataset: DatasetSpec) -> dict[str, Any]:
    """The dict a MONAI dataset starts from: file names, value lookup table, mask and task."""
    top = max(dataset.label_values) if dataset.label_values else 0
    lut = np.zeros(top + 1, dtype=np.uint8)
    for value, index in dataset.label_values.items():
        if index in case.labelled:
            lut[value] = index
    labelled = np.zeros(NUM_CHANNELS, dtype=bool)
    labelled[[i - 1 for i in case.labelled]] = True
    return {
        "image": str(case.image),
        "label": str(case.label),
        "lut": lut,
        "labelled": labelled,
        "task_id": dataset.task,
        "dataset": dataset.name,
    }


def _monai():
    import monai.transforms as mt

    return mt


class RemapLabelsd:
    """Label values → structure indices of the labelled set (others 0), plus tumour sampling classes.

    Reads the per-case lookup table from ``data["lut"]`` (values beyond it map to 0) and drops it.
    With ``classes_key`` also writes 0 background / 1 labelled organ / 2 tumour for
    ``RandCropByLabelClassesd``.
    """

    def __init__(self, label_key: str = "label", classes_key: str | None = None) -> None:
        self.label_key = label_key
        self.classes_key = classes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lut = np.asarray(d.pop("lut"))
        label = d[self.label_key]
        values = np.rint(np.asarray(label)).astype(np.int64)
        if values.min() < 0:
            raise ValueError(f"{d.get('label_meta_dict', {}).get('filename_or_obj', 'label map')}: negative label values")
        values[values >= len(lut)] = 0
        mapped = lut[values].astype(np.float32)
        out = label.clone() if isinstance(label, torch.Tensor) else label
        if isinstance(out, torch.Tensor):
            out.copy_(torch.from_numpy(mapped))
        else:
            out = mapped
        d[self.label_key] = out
        if self.classes_key is not None:
            tumour = np.isin(mapped, sorted(_tumour_indices()))
            classes = (mapped > 0).astype(np.float32) + tumour.astype(np.float32)
            c = out.clone() if isinstance(out, torch.Tensor) else classes
            if isinstance(c, torch.Tensor):
                c.copy_(torch.from_numpy(classes))
            d[self.classes_key] = c
        return d


class ToTargetd:
    """``label`` (structure indices) → ``target`` ``[32, ...]`` uint8; image to a plain float tensor."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = torch.as_tensor(np.asarray(d.pop("label"))).round().to(torch.int64)[0]
        channels = torch.arange(1, NUM_CHANNELS + 1).view(-1, 1, 1, 1)
        d["target"] = (label.unsqueeze(0) == channels).to(torch.uint8)
        d["image"] = torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32)
        d["labelled"] = torch.as_tensor(d["labelled"], dtype=torch.bool)
        d["task_id"] = int(d["task_id"])
        d.pop("classes", None)
        for k in [k for k in d if str(k).endswith(("_meta_dict", "_transforms"))]:
            d.pop(k)
        return d


def preprocess_transforms(spacing: float, crop: int, tumour: bool) -> list[Any]:
    """The deterministic part (cacheable): load, remap, RAS, spacing, window, foreground, pad."""
    mt = _monai()
    keys = ["image", "label"] + (["classes"] if tumour else [])
    a_min, a_max = HU_WINDOW
    return [
        mt.LoadImaged(keys=["image", "label"], ensure_channel_first=True, image_only=True),
        RemapLabelsd("label", "classes" if tumour else None),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=keys, pixdim=(spacing,) * 3, mode=["bilinear"] + ["nearest"] * (len(keys) - 1)),
        mt.ScaleIntensityRanged(keys=["image"], a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        mt.SpatialPadd(keys=keys, spatial_size=(crop,) * 3, mode="constant"),
    ]


def random_transforms(crop: int, samples: int, tumour: bool, patch: int = 96) -> list[Any]:
    """The random part: official crop sampler, pad to the patch, rotate-90, intensity shift."""
    mt = _monai()
    keys = ["image", "label"]
    size = (crop,) * 3
    if tumour:
        sampler = mt.RandCropByLabelClassesd(
            keys=keys + ["classes"], label_key="classes", spatial_size=size,
            ratios=list(TUMOUR_CLASS_RATIOS), num_classes=3, num_samples=samples,
            image_key="image", image_threshold=0, warn=False,
        )
    else:
        sampler = mt.RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=size, pos=2, neg=1,
            num_samples=samples, image_key="image", image_threshold=0,
        )
    out = [sampler]
    if crop < patch:
        out.append(mt.SpatialPadd(keys=keys, spatial_size=(patch,) * 3, mode="constant"))
    out += [
        mt.RandRotate90d(keys=keys, prob=0.1, max_k=3, spatial_axes=(0, 1)),
        mt.RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.2),
        ToTargetd(),
    ]
    return out


def build_dataset(
    dataset: DatasetSpec, config: TrainConfig, *, patch: int = 96
) -> torch.utils.data.Dataset:
    """A MONAI dataset of one :class:`DatasetSpec` (cached after the deterministic part if asked)."""
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    tumour = any(c.labelled & _tumour_indices() for c in dataset.cases)
    transform = Compose(
        preprocess_transforms(config.spacing, config.crop, tumour)
        + random_transforms(config.crop, config.samples_per_volume, tumour, patch)
    )
    records = [case_record(c, dataset) for c in dataset.cases]
    if config.cache:
        return CacheDataset(records, transform, cache_rate=1.0, num_workers=None, progress=False)
    return Dataset(records, transform)


class UniformDataset(torch.utils.data.Dataset):
    """The official ``UniformDataset``: index ``i`` picks dataset ``i mod n``, the case is random.

    Every dataset is seen equally often whatever its size (a 5-case dataset is not drowned by a
    500-case one). Length = total number of cases (an epoch sees as many volumes as there are).
    """

    def __init__(self, parts: Sequence[torch.utils.data.Dataset]) -> None:
        if not parts:
            raise ValueError("no datasets")
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        part = self.parts[index % len(self.parts)]
        # torch's global generator: seeded per run and, in DataLoader workers, per worker
        case = int(torch.randint(len(part), ()).item())  # type: ignore[arg-type]
        return part[case]
