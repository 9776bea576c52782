"""Where weights live on disk, the checksum manifest of a weights folder, and file hashing.

A weights folder holds ``<component>/<file>`` and ``cdpdnet-weights.json``, the manifest with
the size and SHA-256 of every file recorded when it was downloaded (or recorded by hand). The
folders are the one named by ``$CDPDNET_WEIGHTS_DIR`` (what an offline site copies in) and the
cache, ``$CDPDNET_CACHE_DIR/weights`` or a per-user cache folder. Environment variables are read
when a function is called, never at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import WeightsError
from napari_cdpdnet.weights.registry import WeightFile, WeightSpec

__all__ = [
    "ENV_WEIGHTS_DIR",
    "ENV_CACHE_DIR",
    "MANIFEST_NAME",
    "cache_dir",
    "weights_cache_dir",
    "env_weights_dir",
    "search_folders",
    "where_to_put",
    "hf_cache_dir",
    "manifest_key",
    "read_manifest",
    "write_manifest",
    "update_manifest",
    "sha256_of",
    "is_sha256",
    "git_blob_matches",
]

logger = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "CDPDNET_WEIGHTS_DIR"
ENV_CACHE_DIR = "CDPDNET_CACHE_DIR"
MANIFEST_NAME = "cdpdnet-weights.json"
_MANIFEST_FORMAT = "napari-cdpdnet weights manifest"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """The napari-cdpdnet cache folder: ``$CDPDNET_CACHE_DIR``, else the per-user cache."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "napari-cdpdnet" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "napari-cdpdnet"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-cdpdnet"


def weights_cache_dir() -> Path:
    """The weights folder inside the cache (downloads land here)."""
    return cache_dir() / "weights"


def env_weights_dir() -> Path | None:
    """The folder named by ``$CDPDNET_WEIGHTS_DIR``, or None when unset."""
    env = os.environ.get(ENV_WEIGHTS_DIR)
    return Path(env).expanduser() if env else None


def search_folders() -> list[tuple[str, Path]]:
    """The weights folders searched, in order, as (source, path): the env folder, the cache."""
    out = []
    env = env_weights_dir()
    if env is not None:
        if not env.is_dir():
            logger.warning("%s=%s is not a folder; ignoring it", ENV_WEIGHTS_DIR, env)
        else:
            out.append((ENV_WEIGHTS_DIR, env))
    out.append(("cache", weights_cache_dir()))
    return out


def where_to_put(component: WeightSpec, wf: WeightFile, folder: Path | None = None) -> str:
    """Where a user should place a file fetched by hand (default: the env folder, else the cache)."""
    if folder is None:
        env = env_weights_dir()
        folder = env if env is not None else weights_cache_dir()
    return str(folder / component.name / wf.filename)


def hf_cache_dir() -> str | None:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


# --------------------------------------------------------------------------- manifest
def manifest_key(component: WeightSpec, filename: str) -> str:
    """A file's key in the manifest: its path relative to the weights folder."""
    return f"{component.name}/{filename}"


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's records by :func:`manifest_key` (empty when the folder has none).

    Raises:
        WeightsError: the manifest exists but is unreadable or foreign.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: the checksum manifest cannot be read ({exc}); restore it from the source "
            "folder, or delete it and run `cdpdnet weights verify --record` to rebuild it"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
        raise WeightsError(f"{path} is not a napari-cdpdnet weights manifest; move it away")
    files = data.get("files", {})
    return files if isinstance(files, dict) else {}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Replace the manifest atomically (a crash leaves the old or the new one, never half)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": _MANIFEST_FORMAT, "version": 1, "files": dict(sorted(files.items()))}
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, folder / MANIFEST_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_manifest(folder: Path, key: str, record: dict[str, Any]) -> None:
    """Add or replace one record."""
    files = read_manifest(folder)
    files[key] = record
    write_manifest(folder, files)


# --------------------------------------------------------------------------- hashing
_HASH_MEMO: dict[tuple[str, int, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, remembered per process while size and mtime are unchanged."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def is_sha256(name: str) -> bool:
    """Hub LFS blobs are named by the SHA-256 of their content."""
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def git_blob_matches(path: Path, blob_id: str) -> bool:
    """Small non-LFS hub files are cached under their git blob SHA-1."""
    if len(blob_id) != 40 or path.stat().st_size > 50 * 1024 * 1024:
        return False
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob_id  # noqa: S324
