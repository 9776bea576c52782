"""Is a weights file intact? Structural checks, checksums, and whole-folder verification.

A file is checked against everything known about it: the registry's size and SHA-256 (when
pinned), the manifest record made at download, the hub's own checksum, and its structure (a
truncated ``.safetensors``, ``.pth`` or ``config.json`` is caught even without a checksum). A
damaged file is never used. :func:`verify` and :func:`record_checksums` serve
``cdpdnet weights verify [--record]``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.weights.registry import REGISTRY, WeightFile, WeightSpec, spec
from napari_cdpdnet.weights.store import (
    env_weights_dir,
    manifest_key,
    read_manifest,
    sha256_of,
    weights_cache_dir,
    write_manifest,
)

__all__ = [
    "FileCheck",
    "VerifyReport",
    "verify_file",
    "check_in_folder",
    "verify",
    "record_checksums",
]

logger = logging.getLogger(__name__)


def _structure_problem(path: Path) -> str | None:
    """Cheap format check that catches truncated or foreign files without a checksum."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    name = path.name.lower()
    try:
        if name.endswith(".safetensors"):
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return "too short for a safetensors file"
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 1024 * 1024:
                    return "the safetensors header is cut off"
                header = json.loads(fh.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            expected = 8 + n + max(ends, default=0)
            if size != expected:
                return f"safetensors data is {'cut off' if size < expected else 'followed by junk'} ({size} bytes, expected {expected})"
        elif name.endswith((".pth", ".pt", ".bin")):
            with open(path, "rb") as fh:
                magic = fh.read(4)
            if magic.startswith(b"PK"):
                with zipfile.ZipFile(path) as zf:
                    if not any(n.endswith("data.pkl") for n in zf.namelist()):
                        return "not a PyTorch checkpoint (no data.pkl in the archive)"
            elif not magic.startswith(b"\x80"):
                return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
            else:
                logger.info(
                    "%s is a legacy (non-zip) torch file: only its checksum can be checked", path
                )
        elif name.endswith(".json") and not isinstance(
            json.loads(path.read_text(encoding="utf-8")), dict
        ):
            return "not a JSON object"
    except (
        zipfile.BadZipFile,
        ValueError,
        KeyError,
        TypeError,
        struct.error,
        UnicodeDecodeError,
    ) as exc:
        return f"the file is damaged or truncated ({type(exc).__name__}: {exc})"
    return None


@dataclass(frozen=True)
class FileCheck:
    """Result of checking one file.

    ``status``: "ok" (checksum verified), "unrecorded" (intact structure, no checksum known),
    "unchecked" (quick check passed, checksum not read), "missing" or "corrupted".
    ``usable`` is True for the first three.
    """

    path: Path
    status: str
    message: str
    sha256: str | None = None
    component: str = ""
    filename: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "unrecorded", "unchecked")


def verify_file(
    path: Path,
    *,
    expected: WeightFile | None = None,
    record: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
    quick: bool = False,
) -> FileCheck:
    """Check one file against what is known about it (registry, manifest record, hub etag).

    ``quick`` skips reading the whole file for its SHA-256 (sizes and structure still checked);
    a file that passes is then "unchecked", not "ok".
    """
    path = Path(path)
    if not path.is_file():
        return FileCheck(path, "missing", "not found")
    size = path.stat().st_size
    for what, want in (
        ("registry", expected.size if expected else None),
        ("recorded", (record or {}).get("size")),
    ):
        if want is not None and size != int(want):
            return FileCheck(
                path,
                "corrupted",
                f"size {size} bytes differs from the {what} size {want} (truncated or replaced)",
            )
    problem = _structure_problem(path)
    if problem:
        return FileCheck(path, "corrupted", problem)
    wanted = [
        (what, h.lower())
        for what, h in (
            ("registry", expected.sha256 if expected else None),
            ("recorded", (record or {}).get("sha256")),
            ("hub", expected_sha256),
        )
        if h
    ]
    if not wanted:
        return FileCheck(path, "unrecorded", "structure intact; no checksum recorded")
    if quick:
        return FileCheck(
            path, "unchecked", "size and structure intact; checksum not read (quick check)"
        )
    digest = sha256_of(path)
    for what, want in wanted:
        if digest != want:
            return FileCheck(
                path,
                "corrupted",
                f"SHA-256 {digest[:12]}… differs from the {what} {want[:12]}…",
                digest,
            )
    return FileCheck(path, "ok", f"SHA-256 verified ({', '.join(w for w, _ in wanted)})", digest)


def check_in_folder(
    folder: Path, component: WeightSpec, wf: WeightFile, *, quick: bool = False
) -> FileCheck:
    """Check ``folder/<component>/<file or alternative>``; the first present name is checked."""
    manifest = read_manifest(folder) if folder.is_dir() else {}
    for filename in (wf.filename, *wf.alternatives):
        path = folder / component.name / filename
        if path.is_file():
            key = manifest_key(component, filename)
            c = verify_file(
                path,
                expected=wf if filename == wf.filename else None,
                record=manifest.get(key),
                quick=quick,
            )
            return FileCheck(c.path, c.status, c.message, c.sha256, component.name, filename)
    return FileCheck(
        folder / component.name / wf.filename,
        "missing",
        "not found",
        None,
        component.name,
        wf.filename,
    )


# --------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class VerifyReport:
    """Checks of every registry file in one weights folder."""

    folder: Path
    checks: tuple[FileCheck, ...]

    @property
    def ok(self) -> bool:
        """No required file damaged or missing (unrecorded files are intact, so they pass)."""
        return all(c.usable for c in self.checks if not spec(c.component).optional) and not any(
            c.status == "corrupted" for c in self.checks
        )

    def lines(self) -> list[str]:
        out = []
        for c in self.checks:
            status, message = c.status, c.message
            if status == "missing" and spec(c.component).optional:
                status, message = "optional", f"not present ({spec(c.component).needed_for})"
            out.append(f"{status:<10} {c.component}/{c.filename}: {message}")
        return out


def verify(folder: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check every file of a weights folder (default: ``$CDPDNET_WEIGHTS_DIR`` or the cache).

    Reads every byte of every present file (SHA-256), so it takes a few seconds per GB.
    """
    root = (
        Path(folder).expanduser()
        if folder is not None
        else (env_weights_dir() or weights_cache_dir())
    )
    if not root.is_dir():
        raise InputError(f"{root}: no such weights folder")
    checks = tuple(check_in_folder(root, c, wf) for c in REGISTRY for wf in c.files)
    return VerifyReport(root, checks)


def record_checksums(folder: str | os.PathLike[str]) -> list[FileCheck]:
    """Record SHA-256 for intact files that have none (e.g. copied in by hand).

    Only files whose structure checks out are recorded; damaged ones are reported, not recorded.
    """
    root = Path(folder).expanduser()
    report = verify(root)
    files = read_manifest(root)
    out = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for c in report.checks:
        if c.status != "unrecorded":
            out.append(c)
            continue
        digest = sha256_of(c.path)
        files[f"{c.component}/{c.filename}"] = {
            "sha256": digest,
            "size": c.path.stat().st_size,
            "source": "recorded from a file found in place (`cdpdnet weights verify --record`)",
            "recorded": stamp,
        }
        out.append(
            FileCheck(c.path, "ok", "checksum recorded now", digest, c.component, c.filename)
        )
    if len(files) != len(read_manifest(root)):
        write_manifest(root, files)
    return out
