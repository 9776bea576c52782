"""The CPU stage of a cohort run as a ``torch.utils.data`` pipeline: read and preprocess ahead.

:class:`CaseDataset` reads one case (:func:`~napari_cdpdnet.io.images.read_ct`) and prepares it
(:meth:`~napari_cdpdnet.inference.segmenter.Segmenter.prepare`: resampling, windowing, window
plan) in a DataLoader worker process while the device runs the previous case. A case that
cannot be read is returned as a :class:`Failed` record, never raised, so one bad file costs one
row of the report and the loader carries on. The arrays travel to the device loop as torch
tensors, which torch's multiprocessing moves through shared memory instead of pickling them
through a pipe.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from napari_cdpdnet.cohort.inputs import Case
from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.export.formats import check_dicom_source
from napari_cdpdnet.inference.segmenter import PreparedCase, Segmenter
from napari_cdpdnet.inference.settings import SegmentationSettings

__all__ = ["CaseDataset", "Loaded", "Failed", "make_loader", "unpack"]

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A case read and prepared; ``arrays`` holds its big arrays while in transit."""

    index: int
    prepared: PreparedCase
    warnings: tuple[str, ...]
    read_s: float
    preprocess_s: float
    arrays: dict[str, Any] | None = None


@dataclass
class Failed:
    """A case that could not be read or prepared."""

    index: int
    error: BaseException
    details: str
    read_s: float


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception type may come out of a reader
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _tensor(a: np.ndarray) -> Any:
    try:
        return torch.from_numpy(np.ascontiguousarray(a))
    except TypeError:  # a dtype torch has no tensor for: sent as numpy
        return a


def _pack(item: Loaded) -> Loaded:
    """Move the CT and the model-space image into tensors (shared memory between processes)."""
    p = item.prepared
    pre = p.image.pre
    arrays = {"array": _tensor(p.array), "image": _tensor(pre.image)}
    light = replace(p, array=None, image=replace(p.image, pre=replace(pre, image=None)))
    return replace(item, prepared=light, arrays=arrays)


def unpack(item: Loaded) -> Loaded:
    """Inverse of the packing done in the worker (no copy)."""
    if item.arrays is None:
        return item
    a = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in item.arrays.items()}
    p = item.prepared
    pre = replace(p.image.pre, image=a["image"])
    prepared = replace(p, array=a["array"], image=replace(p.image, pre=pre))
    return replace(item, prepared=prepared, arrays=None)


class CaseDataset(torch.utils.data.Dataset):
    """Cases by index; ``dataset[i]`` is a :class:`Loaded` or a :class:`Failed` record.

    Args:
        cases: the cases (the sampler picks this rank's).
        settings: what preparation depends on (overlap, skip-air, box).
        formats: the optional export formats chosen (a DICOM-SEG needs a DICOM source with
            UIDs: such a case is refused when read, before its compute).
        pack: hand arrays over as tensors (True in worker processes).
    """

    def __init__(self, cases: Sequence[Case], settings: SegmentationSettings,
                 formats: Sequence[str] = (), pack: bool = True) -> None:
        self.cases = list(cases)
        self.settings = settings
        self.formats = tuple(formats)
        self.pack = pack

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Loaded | Failed:
        from napari_cdpdnet.io.images import read_ct

        case = self.cases[index]
        t0 = time.perf_counter()
        read_s = 0.0
        try:
            ct = read_ct(case.source, series_uid=case.series_uid)
            read_s = time.perf_counter() - t0
            check_dicom_source(case.source, ct.geometry, self.formats)
            t1 = time.perf_counter()
            prepared = Segmenter.prepare(ct.array, ct.geometry, self.settings)
            item = Loaded(index, prepared, tuple(ct.warnings), read_s, time.perf_counter() - t1)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the loader
            details = "" if isinstance(exc, CdpdnetError) else traceback.format_exc()
            return Failed(index, _picklable(exc), details, read_s or time.perf_counter() - t0)
        return _pack(item) if self.pack else item


def _worker_init(_worker_id: int) -> None:
    """Workers ignore SIGTERM: torchrun and Slurm signal the whole process group, and the
    device loop stops them itself (a worker killed mid-read would look like a failed case)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _keep(item: Any) -> Any:
    """The DataLoader's collate function: items go through unchanged (no batching)."""
    return item


def make_loader(dataset: CaseDataset, indices: Sequence[int], workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``indices`` in order, ``workers`` cases ahead (0: in this process)."""
    dataset.pack = workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=list(indices), num_workers=workers, collate_fn=_keep,
        prefetch_factor=1 if workers > 0 else None, persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None)
