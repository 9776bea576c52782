"""Recovery store: autosaved copies of edited label maps, so a crash or a closed window loses nothing.

Corrections painted in napari live only in memory until they are exported. The dock saves each
edited result layer here (:mod:`napari_cdpdnet._gui.recovery` decides when) and offers the copies
back when the same CT is opened again. No napari or Qt here.

Layout: ``<folder>/<CT key>/<entry id>@<time in ns>/`` holding ``labels.npz`` (the label map and
the mask of voxels a person edited), ``table.csv`` (the label table, as an export writes it) and
``meta.json`` (layer name and metadata, the CT's geometry, when it was saved). A save writes a
complete copy into a hidden folder beside it and renames that folder into place (one atomic
rename), then removes the older copies of the entry; a crash at any moment leaves the previous
complete copy or the new one, never half of one.

Which CT (:func:`ct_fingerprint`): a SHA-256 of the grid (shape, voxel type, spacing, origin and
direction, rounded to 1e-6) and of the voxels of up to 32 evenly spaced slices. The content
decides, not the path: a CT that was moved, renamed or opened from a copy is recognised, and a
different scan saved under the same name is not mistaken for it. Hashing 32 slices of a
512×512 CT reads 16 MB, a few milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.export.labeltable import LabelRow

__all__ = ["ct_fingerprint", "new_entry_id", "RecoveryEntry", "Recovered", "RecoveryStore", "FORMAT"]

logger = logging.getLogger(__name__)

#: meta.json ``format`` value; a store written by another format is left alone.
FORMAT = "napari-cdpdnet recovery 1"
_SAMPLED_SLICES = 32
_ENTRY = re.compile(r"^(?P<id>[0-9a-f]{32})@(?P<ns>\d+)$")


def ct_fingerprint(array: np.ndarray, geometry: Geometry) -> str:
    """The key of a CT in the store: its grid and sampled voxels (see the module docstring)."""
    a = np.asarray(array)
    h = hashlib.sha256()
    grid = {
        "shape": list(a.shape),
        "dtype": a.dtype.str,
        "spacing": [round(float(v), 6) for v in geometry.spacing],
        "origin": [round(float(v), 6) for v in geometry.origin],
        "direction": [round(float(v), 6) for v in geometry.direction],
    }
    h.update(json.dumps(grid, sort_keys=True).encode())
    if a.ndim and a.shape[0]:
        for k in np.unique(np.linspace(0, a.shape[0] - 1, min(_SAMPLED_SLICES, a.shape[0])).round().astype(int)):
            h.update(np.ascontiguousarray(a[k]).tobytes())
    return h.hexdigest()[:32]


def new_entry_id() -> str:
    """A fresh id for one result layer's entry."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RecoveryEntry:
    """One saved layer: where it is and what ``meta.json`` says about it."""

    key: str
    entry_id: str
    folder: Path
    saved_at: float
    meta: dict[str, Any]

    @property
    def layer_name(self) -> str:
        return str(self.meta.get("layer_name") or "labels")

    @property
    def exported(self) -> bool:
        """True when the layer was exported after its last edit (nothing left to recover)."""
        return bool(self.meta.get("exported"))

    def describe(self) -> str:
        """``CDPDNet: liver (saved 14:02:11, 3 labels)`` for the restore question."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
        n = int(self.meta.get("n_labels", 0))
        return f"{self.layer_name} (saved {when}, {n} label{'s' if n != 1 else ''})"


@dataclass
class Recovered:
    """What :meth:`RecoveryStore.load` gives back."""

    labels: np.ndarray
    edited: np.ndarray | None
    geometry: Geometry
    meta: dict[str, Any]


def _jsonable(value: Any) -> Any:
    """Layer metadata as JSON: geometries as dicts, sets as sorted lists, the rest dropped."""
    if isinstance(value, Geometry):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _jsonable(v)) for k, v in value.items()) if v is not _SKIP}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [v for v in (_jsonable(x) for x in items) if v is not _SKIP]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return _SKIP


_SKIP = object()


class RecoveryStore:
    """The recovery folder: save, list, load and discard copies of edited label maps."""

    def __init__(self, folder: str | os.PathLike[str], *, max_age_days: float = 30.0) -> None:
        self.folder = Path(folder)
        self.max_age_days = max_age_days

    # ------------------------------------------------------------------ writing
    def save(
        self,
        key: str,
        entry_id: str,
        labels: np.ndarray,
        geometry: Geometry,
        *,
        layer_name: str,
        metadata: dict[str, Any] | None = None,
        rows: Sequence[LabelRow] = (),
        edited: np.ndarray | None = None,
        exported: bool = False,
    ) -> RecoveryEntry:
        """Save one layer's label map (and table, edit mask, metadata) as entry ``entry_id``.

        Atomic: the copy appears complete under its name or not at all; the previous copy is
        removed only after the new one is in place.
        """
        from napari_cdpdnet.export.labeltable import write_label_table

        labels = np.asarray(labels)
        if labels.shape != tuple(geometry.shape):
            raise ValueError(f"label map {labels.shape} is not on its CT grid {tuple(geometry.shape)}")
        key_dir = self.folder / key
        key_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry_id}-", dir=key_dir))
        saved_at = time.time()
        try:
            arrays: dict[str, np.ndarray] = {"labels": labels}
            if edited is not None and np.any(edited):
                arrays["edited"] = np.packbits(np.asarray(edited, bool).ravel())
            with open(tmp / "labels.npz", "wb") as fh:
                np.savez_compressed(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            write_label_table(tmp / "table.csv", rows)
            meta = {
                "format": FORMAT,
                "key": key,
                "entry_id": entry_id,
                "saved_at": saved_at,
                "layer_name": layer_name,
                "geometry": geometry.to_dict(),
                "metadata": _jsonable({k: v for k, v in (metadata or {}).items() if k != "geometry"}),
                "n_labels": len(rows) if rows else int(np.unique(labels[labels != 0]).size),
                "exported": exported,
            }
            with open(tmp / "meta.json", "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            final = key_dir / f"{entry_id}@{time.time_ns()}"
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._versions(key_dir, entry_id)[1:]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("autosaved %r to %s", layer_name, final)
        return RecoveryEntry(key, entry_id, final, saved_at, meta)

    def mark_exported(self, entry: RecoveryEntry, exported: bool = True) -> None:
        """Record that the layer was exported (its copy stays, but is no longer offered)."""
        meta = dict(entry.meta, exported=exported)
        with tempfile.NamedTemporaryFile("w", dir=entry.folder, suffix=".tmp", delete=False,
                                         encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(fh.name, entry.folder / "meta.json")

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _versions(key_dir: Path, entry_id: str) -> list[Path]:
        """Complete copies of one entry, newest first."""
        found = []
        for d in key_dir.glob(f"{entry_id}@*"):
            m = _ENTRY.match(d.name)
            if m and (d / "meta.json").is_file():
                found.append((int(m.group("ns")), d))
        return [d for _, d in sorted(found, reverse=True)]

    def entries(self, key: str, *, include_exported: bool = False) -> list[RecoveryEntry]:
        """The saved layers of CT ``key``, newest first (exported ones only when asked)."""
        key_dir = self.folder / key
        if not key_dir.is_dir():
            return []
        ids = {m.group("id") for d in key_dir.iterdir() if (m := _ENTRY.match(d.name))}
        out = []
        for entry_id in ids:
            versions = self._versions(key_dir, entry_id)
            if not versions:
                continue
            try:
                meta = json.loads((versions[0] / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("%s: unreadable recovery copy, skipped", versions[0])
                continue
            if meta.get("format") != FORMAT:
                continue
            entry = RecoveryEntry(key, entry_id, versions[0], float(meta.get("saved_at", 0)), meta)
            if include_exported or not entry.exported:
                out.append(entry)
        return sorted(out, key=lambda e: e.saved_at, reverse=True)

    def load(self, entry: RecoveryEntry) -> Recovered:
        """The saved label map, edit mask, geometry and layer metadata of ``entry``."""
        with np.load(entry.folder / "labels.npz") as data:
            labels = data["labels"]
            edited = None
            if "edited" in data:
                edited = np.unpackbits(data["edited"], count=labels.size).astype(bool).reshape(labels.shape)
        return Recovered(labels, edited, Geometry.from_dict(entry.meta["geometry"]), dict(entry.meta))

    # ------------------------------------------------------------------ tidying
    def discard(self, entry: RecoveryEntry) -> None:
        """Remove every copy of ``entry``."""
        for d in self._versions(entry.folder.parent, entry.entry_id):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            entry.folder.parent.rmdir()  # only when empty

    def prune(self) -> int:
        """Remove copies older than ``max_age_days`` and leftovers of interrupted saves."""
        if not self.folder.is_dir():
            return 0
        limit = time.time() - self.max_age_days * 86400
        removed = 0
        for key_dir in [d for d in self.folder.iterdir() if d.is_dir()]:
            for d in list(key_dir.iterdir()):
                stale_tmp = d.name.startswith(".tmp-") and d.stat().st_mtime < time.time() - 3600
                m = _ENTRY.match(d.name)
                old = m is not None and int(m.group("ns")) / 1e9 < limit
                if stale_tmp or old:
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
            with contextlib.suppress(OSError):
                key_dir.rmdir()
        return removed
