"""Finding the weights a run needs: explicit paths, weights folders, caches, then a download.

Each file is looked for, in this order, and the first intact copy wins:

1. an explicit path given by the caller (``--checkpoint``, ``--dino``, ``--clip-weights``);
2. the weights folder named by ``$CDPDNET_WEIGHTS_DIR`` (what an air-gapped site copies in);
3. the local cache, ``$CDPDNET_CACHE_DIR/weights`` or a per-user cache folder;
4. the Hugging Face cache (``~/.cache/huggingface``), when another tool already downloaded it;
5. a download into the local cache (:mod:`.download`), unless downloads are disabled
   (``allow_download=False``, ``HF_HUB_OFFLINE=1`` or ``CDPDNET_OFFLINE=1``).

Files still missing after step 4 are gathered first, so a single error lists all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import WeightsError
from napari_cdpdnet.weights.download import Downloader, Missing, ProgressCallback, fetch_missing
from napari_cdpdnet.weights.registry import WeightFile, WeightSpec, spec
from napari_cdpdnet.weights.store import (
    git_blob_matches,
    hf_cache_dir,
    is_sha256,
    read_manifest,
    search_folders,
    weights_cache_dir,
)
from napari_cdpdnet.weights.verify import FileCheck, check_in_folder, verify_file

__all__ = [
    "WeightFiles",
    "locate",
    "resolve_component",
    "resolve_weights",
    "resolve_checkpoint",
    "resolve_clip",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFiles:
    """Paths of the files a CDPDNet model needs, and where each was found.

    ``dino_config`` is None when only a bare DINOv2 weights file was given (the DINOv2-base
    configuration is then implied). ``sources`` maps each role to "explicit",
    "CDPDNET_WEIGHTS_DIR", "cache", "huggingface cache" or "downloaded".
    """

    checkpoint: Path
    dino_weights: Path
    dino_config: Path | None
    sources: dict[str, str] = field(default_factory=dict)


def _explicit_files(component: WeightSpec, path: Path, argument: str) -> dict[str, FileCheck]:
    """Files of a component from an explicit path: a file (the main weights) or a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{argument} {path}: no such file or folder")
    out: dict[str, FileCheck] = {}
    main = component.files[-1]
    for wf in component.files:
        if path.is_dir():
            candidates = [path / n for n in (wf.filename, *wf.alternatives)]
            candidates += [path / component.name / n for n in (wf.filename, *wf.alternatives)]
            found = next((c for c in candidates if c.is_file()), None)
        elif wf is main:
            found = path
        else:
            found = path.with_name(wf.filename)
            found = found if found.is_file() else None
        if found is None:
            if wf is main or path.is_dir() and wf.role != "config":
                raise WeightsError(
                    f"{argument} {path}: no {wf.filename} there; point it at the file itself or at a "
                    f"folder holding {wf.filename}"
                )
            continue
        check = verify_file(
            found, expected=wf if found.name == wf.filename else None, record=_nearby_record(found)
        )
        if not check.usable:
            raise WeightsError(
                f"{argument} {found}: {check.message}. The file is damaged; copy it again or "
                f"download it from {component.url(wf.filename)}"
            )
        out[wf.role] = check
    return out


def _nearby_record(path: Path) -> dict[str, Any] | None:
    """The manifest record of ``path`` when it sits in a weights folder (``DIR/<comp>/<file>``)."""
    folder = path.parent.parent
    try:
        return read_manifest(folder).get(f"{path.parent.name}/{path.name}")
    except WeightsError:
        return None


def locate(
    component: WeightSpec, wf: WeightFile, *, quick: bool = False
) -> tuple[str, FileCheck] | None:
    """Where an intact copy of ``wf`` is found without downloading, as (source, check)."""
    found, _ = _locate(component, wf, quick=quick)
    return found


def _locate(
    component: WeightSpec, wf: WeightFile, *, quick: bool = False
) -> tuple[tuple[str, FileCheck] | None, list[str]]:
    problems: list[str] = []
    for source, folder in search_folders():
        check = check_in_folder(folder, component, wf, quick=quick)
        if check.usable:
            if check.status == "unrecorded":
                logger.warning(
                    "%s has no recorded checksum (copied by hand?); its structure is intact. Run "
                    "`cdpdnet weights verify --record` to record one.",
                    check.path,
                )
            return (source, check), problems
        if check.status == "corrupted":
            problems.append(f"{check.path} is damaged: {check.message}")
            logger.warning("ignoring damaged weights file %s: %s", check.path, check.message)
    cached = _hf_cached(component, wf, quick=quick)
    if cached is not None:
        if cached.usable:
            return ("huggingface cache", cached), problems
        problems.append(f"{cached.path} is damaged: {cached.message}")
    return None, problems


def _hf_cached(component: WeightSpec, wf: WeightFile, *, quick: bool = False) -> FileCheck | None:
    """A copy in the Hugging Face cache, checked against its content-addressed blob name."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for filename in (wf.filename, *wf.alternatives):
        try:
            found = try_to_load_from_cache(
                component.repo_id, filename, cache_dir=hf_cache_dir(), revision=component.revision
            )
        except Exception as exc:  # noqa: BLE001 - a broken HF cache must not stop resolution
            logger.debug("Hugging Face cache lookup failed for %s: %s", filename, exc)
            continue
        if not isinstance(found, str) or not os.path.isfile(found):
            continue
        path = Path(found)
        blob = Path(os.path.realpath(found)).name
        sha = blob if is_sha256(blob) else None
        if sha is None and not git_blob_matches(path, blob):
            return FileCheck(
                path,
                "corrupted",
                "content differs from its Hugging Face cache blob id",
                None,
                component.name,
                filename,
            )
        c = verify_file(
            path, expected=wf if filename == wf.filename else None, expected_sha256=sha, quick=quick
        )
        if sha is None and c.status == "unrecorded":
            c = FileCheck(path, "ok", "git blob id verified (Hugging Face cache)")
        return FileCheck(c.path, c.status, c.message, c.sha256, component.name, filename)
    return None


def resolve_component(
    name: str,
    *,
    explicit: str | os.PathLike[str] | None = None,
    argument: str | None = None,
    allow_download: bool = True,
    progress: ProgressCallback | None = None,
    downloader: Downloader | None = None,
) -> dict[str, tuple[Path, str]]:
    """Paths of one component's files by role ("checkpoint", "config", "weights"), with sources.

    Raises:
        WeightsError: a file is missing or damaged everywhere and cannot be downloaded; the
            message lists each file, where to get it and where to put it.
    """
    return _resolve_many(
        [(spec(name), explicit, argument or spec(name).option.split()[0])],
        allow_download=allow_download,
        progress=progress,
        downloader=downloader,
    )[name]


def _resolve_many(
    wanted: Iterable[tuple[WeightSpec, str | os.PathLike[str] | None, str]],
    *,
    allow_download: bool,
    progress: ProgressCallback | None,
    downloader: Downloader | None,
) -> dict[str, dict[str, tuple[Path, str]]]:
    out: dict[str, dict[str, tuple[Path, str]]] = {}
    missing: list[Missing] = []
    for component, explicit, argument in wanted:
        files: dict[str, tuple[Path, str]] = {}
        if explicit is not None:
            for role, check in _explicit_files(component, Path(explicit), argument).items():
                files[role] = (check.path, "explicit")
            out[component.name] = files
            continue
        for wf in component.files:
            found, problems = _locate(component, wf)
            if found is not None:
                files[wf.role] = (found[1].path, found[0])
            elif not wf.optional:
                missing.append(Missing(component, wf, problems))
        out[component.name] = files
    if not missing:
        return out
    fetched = fetch_missing(
        missing,
        weights_cache_dir(),
        downloader=downloader,
        progress=progress,
        refused=None if allow_download else "downloading was not allowed",
    )
    for m, check in zip(missing, fetched, strict=True):
        out[m.component.name][m.wf.role] = (check.path, "downloaded")
    return out


def resolve_weights(
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    dino: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    progress: ProgressCallback | None = None,
    downloader: Downloader | None = None,
) -> WeightFiles:
    """Find (and if allowed, download) the CDPDNet checkpoint and DINOv2-base, checked intact.

    Args:
        checkpoint: explicit ``cdpdnet.pth`` (or a folder holding it).
        dino: explicit DINOv2 weights file, or a folder with ``config.json`` and
            ``model.safetensors`` / ``pytorch_model.bin``.
        allow_download: False never touches the network.
        progress: ``progress(done_bytes, total_bytes, filename)`` during downloads; None shows
            huggingface_hub's progress bar on stderr.
        downloader: replaces the Hugging Face download (tests, mirrors).

    Raises:
        WeightsError: listing every file that is missing or damaged, with where to get it and
            where to put it.
    """
    found = _resolve_many(
        [(spec("cdpdnet"), checkpoint, "--checkpoint"), (spec("dinov2-base"), dino, "--dino")],
        allow_download=allow_download,
        progress=progress,
        downloader=downloader,
    )
    ck, dn = found["cdpdnet"], found["dinov2-base"]
    config = dn.get("config")
    return WeightFiles(
        checkpoint=ck["checkpoint"][0],
        dino_weights=dn["weights"][0],
        dino_config=config[0] if config else None,
        sources={
            "checkpoint": ck["checkpoint"][1],
            "dino_weights": dn["weights"][1],
            **({"dino_config": config[1]} if config else {}),
        },
    )


def resolve_checkpoint(
    path: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = True,
    progress: ProgressCallback | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Only the CDPDNet checkpoint (e.g. to read its fixed organ embeddings)."""
    return resolve_component(
        "cdpdnet",
        explicit=path,
        argument="--checkpoint",
        allow_download=allow_download,
        progress=progress,
        downloader=downloader,
    )["checkpoint"][0]


def resolve_clip(
    path: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = True,
    progress: ProgressCallback | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """The open_clip ViT-B/32 (OpenAI) weights file, for free-text structure matching."""
    return resolve_component(
        "clip-vit-b-32",
        explicit=path,
        argument="--clip-weights",
        allow_download=allow_download,
        progress=progress,
        downloader=downloader,
    )["weights"][0]
