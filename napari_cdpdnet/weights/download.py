"""Getting weights from the hub: the download step, its offline switches, and its one error.

Downloads go through a :class:`Downloader` (by default :func:`hf_downloader`, i.e.
``huggingface_hub``; tests and mirrors inject their own). Before anything is fetched,
:func:`fetch_missing` asks once whether downloading is possible at all (an offline switch, or
one quick probe of the hub), so an unreachable hub costs seconds, not retries per file. Each
file goes to a temporary name beside its target, is verified, and only then is moved into place
and recorded in the manifest: an interrupted download leaves nothing behind. When files cannot
be had, one :class:`~napari_cdpdnet.errors.WeightsError` lists every file still missing, where
to get it and where to put it (:func:`missing_error`); the lookup in :mod:`.resolve` raises the
same error.

``huggingface_hub`` is imported only when a download starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from napari_cdpdnet.errors import InputError, OutputExistsError, WeightsError
from napari_cdpdnet.weights.registry import REGISTRY, WeightFile, WeightSpec, spec
from napari_cdpdnet.weights.store import (
    ENV_WEIGHTS_DIR,
    is_sha256,
    manifest_key,
    read_manifest,
    sha256_of,
    update_manifest,
    weights_cache_dir,
    where_to_put,
)
from napari_cdpdnet.weights.verify import FileCheck, check_in_folder, verify_file

__all__ = [
    "ENV_OFFLINE",
    "HUB_PROBE_TIMEOUT",
    "ProgressCallback",
    "Downloader",
    "downloads_disabled",
    "hf_downloader",
    "hub_unreachable",
    "Missing",
    "missing_error",
    "fetch_missing",
    "download_all",
]

logger = logging.getLogger(__name__)

ENV_OFFLINE = "CDPDNET_OFFLINE"

#: ``progress(done_bytes, total_bytes_or_None, label)``; called often during a download.
ProgressCallback = Callable[[int, "int | None", str], None]

#: Seconds to wait for the hub to answer before calling it unreachable (a firewall that drops
#: packets would otherwise cost huggingface_hub's five retries, about 30 s, per file).
HUB_PROBE_TIMEOUT = 5.0


# --------------------------------------------------------------------------- may we download?
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def downloads_disabled() -> str | None:
    """Why downloading is impossible right now (an offline switch), or None."""
    for var in (ENV_OFFLINE, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"downloads are disabled ({var}=1)"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return "downloads are disabled (huggingface_hub is in offline mode)"
    return None


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT`` or huggingface.co) cannot be reached, or None.

    One HEAD request with a short timeout, through the same proxy settings as the download
    (urllib reads ``HTTPS_PROXY`` & co.). Any HTTP answer, even an error status, means reachable.
    """
    import urllib.error
    import urllib.request

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"the Hugging Face hub ({endpoint}) cannot be reached: {reason}"


def _source_unreachable(downloader: Downloader) -> str | None:
    """Why the downloader's source cannot be reached (checked once, quickly), or None.

    A downloader may carry an ``unreachable()`` check (the Hugging Face one does); others
    (mirrors, tests) are trusted.
    """
    probe = getattr(downloader, "unreachable", None)
    return probe() if callable(probe) else None


# --------------------------------------------------------------------------- transport
class Downloader(Protocol):
    """Fetch ``filename`` of ``repo_id@revision`` into exactly ``dest`` (a temporary path).

    Returns the hub's SHA-256 of the content when it knows one (LFS files), else None.
    """

    def __call__(
        self,
        repo_id: str,
        filename: str,
        revision: str,
        dest: Path,
        progress: ProgressCallback | None,
    ) -> str | None: ...


def _tqdm_class(progress: ProgressCallback, label: str) -> type:
    """A tqdm subclass that reports to ``progress`` instead of drawing a bar."""
    from tqdm.auto import tqdm

    class _CallbackTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            progress(self._done, int(self.total) if self.total else None, label)
            return super().update(n)

    return _CallbackTqdm


def hf_downloader(
    repo_id: str, filename: str, revision: str, dest: Path, progress: ProgressCallback | None
) -> str | None:
    """The default :class:`Downloader`: ``huggingface_hub.hf_hub_download`` into a staging folder.

    The staging folder sits beside ``dest`` (same file system, so the final move is atomic) and
    is removed whatever happens. ``$HF_ENDPOINT`` is read at call time; tokens, proxies and
    mirrors work as for any Hugging Face download.
    """
    from huggingface_hub import hf_hub_download

    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        local = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=staging,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            tqdm_class=_tqdm_class(progress, filename) if progress else None,
        )
        blob = Path(os.path.realpath(local))
        shutil.move(str(blob), str(dest))
        return blob.name if is_sha256(blob.name) else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


hf_downloader.unreachable = hub_unreachable  # type: ignore[attr-defined]


class _DownloadFailed(WeightsError):
    """One file's transfer failed; the caller turns it into the list of everything still missing."""


def _download_one(
    folder: Path,
    component: WeightSpec,
    wf: WeightFile,
    *,
    downloader: Downloader,
    progress: ProgressCallback | None,
) -> FileCheck:
    """Download one file into ``folder``, verify it, move it into place and record it."""
    target = folder / component.name / wf.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{wf.filename}.{uuid.uuid4().hex[:8]}.part")
    logger.info("downloading %s from %s", wf.filename, component.url(wf.filename))
    try:
        try:
            hub_sha = downloader(component.repo_id, wf.filename, component.revision, part, progress)
        except (KeyboardInterrupt, WeightsError):
            raise
        except Exception as exc:  # noqa: BLE001 - any transport error becomes one clear message
            raise _DownloadFailed(
                f"downloading {wf.filename} from {component.url(wf.filename)} failed: "
                f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"
            ) from exc
        check = verify_file(part, expected=wf, expected_sha256=hub_sha)
        if not check.usable:
            raise WeightsError(
                f"the download of {wf.filename} from {component.url(wf.filename)} is damaged "
                f"({check.message}); it was discarded. Try again."
            )
        digest = check.sha256 or sha256_of(part)
        os.replace(part, target)
        update_manifest(
            folder,
            manifest_key(component, wf.filename),
            {
                "sha256": digest,
                "size": target.stat().st_size,
                "source": component.url(wf.filename),
                "repo_id": component.repo_id,
                "revision": component.revision,
                "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        return FileCheck(
            target, "ok", "downloaded and verified", digest, component.name, wf.filename
        )
    finally:
        if part.exists():
            part.unlink()


# --------------------------------------------------------------------------- missing files
@dataclass
class Missing:
    """A file that is needed and not found intact, with what was wrong with the copies seen."""

    component: WeightSpec
    wf: WeightFile
    problems: list[str]


def missing_error(
    missing: Sequence[Missing],
    why: str,
    *,
    folder: Path | None = None,
    headline: str | None = None,
) -> WeightsError:
    """One error for every missing file: where to get it, where to put it, the offline recipe.

    ``folder`` is where files should go (default: ``$CDPDNET_WEIGHTS_DIR``, else the cache).
    """
    lines = [f"{headline or 'CDPDNet cannot find intact weights'}, and {why}. Missing:"]
    for m in missing:
        lines.append(
            f"  - {m.wf.filename} ({m.component.title}, {m.component.approx_size}; needed for {m.component.needed_for})"
        )
        for p in m.problems:
            lines.append(f"      problem:     {p}")
        lines.append(f"      get it from: {m.component.url(m.wf.filename)}")
        lines.append(f"      put it at:   {where_to_put(m.component, m.wf, folder)}")
        lines.append(f"                   (or pass {m.component.option})")
    lines.append(
        "On a machine with internet access run `cdpdnet weights download --to DIR`, copy DIR here "
        f"and set {ENV_WEIGHTS_DIR}=DIR (the copy keeps its checksums). Run `cdpdnet weights info` "
        "to see where each file is looked for."
    )
    return WeightsError("\n".join(lines))


def fetch_missing(
    missing: Sequence[Missing],
    folder: Path,
    *,
    downloader: Downloader | None = None,
    progress: ProgressCallback | None = None,
    refused: str | None = None,
    put_at: Path | None = None,
    headline: str | None = None,
) -> list[FileCheck]:
    """Download every missing file into ``folder``, or raise one error listing what is missing.

    Downloading is first checked once (``refused``, the offline switches, one quick probe of the
    downloader's source); then the files are fetched in turn. When one fails, the error lists it
    and every file after it.

    Args:
        refused: why the caller forbids downloading (e.g. ``allow_download=False``), or None.
        put_at: the folder the error tells users to fill by hand (see :func:`missing_error`).
        headline: the error's first words.
    """
    downloader = downloader or hf_downloader
    why = refused or downloads_disabled() or _source_unreachable(downloader)
    if why:
        raise missing_error(missing, why, folder=put_at, headline=headline)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, m in enumerate(missing):
        try:
            results.append(
                _download_one(folder, m.component, m.wf, downloader=downloader, progress=progress)
            )
        except _DownloadFailed as exc:
            raise missing_error(
                missing[i:], str(exc), folder=put_at, headline=headline
            ) from exc
    return results


def download_all(
    to_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    *,
    components: Sequence[str] | None = None,
    downloader: Downloader | None = None,
    overwrite: bool = False,
) -> list[FileCheck]:
    """Fill a portable weights folder (default: the cache) that an offline site can copy.

    Files already there and intact are kept. A damaged file that this tool recorded is
    replaced; any other existing file is left alone unless ``overwrite`` is set.

    Returns:
        One check per file, status "ok" (downloaded or verified) or "unrecorded" (kept as found).

    Raises:
        WeightsError: offline, or a download failed (nothing partial is left behind).
        OutputExistsError: a damaged file not made by this tool is in the way.
    """
    folder = Path(to_dir).expanduser() if to_dir is not None else weights_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--to {folder}: exists and is not a folder")
    chosen = [spec(n) for n in (components or [s.name for s in REGISTRY])]
    todo: list[Missing] = []
    results: list[FileCheck] = []
    manifest = read_manifest(folder) if folder.is_dir() else {}
    for component in chosen:
        for wf in component.files:
            check = check_in_folder(folder, component, wf)
            if check.usable:
                logger.info("%s: already present (%s)", check.path, check.message)
                results.append(check)
                continue
            if check.status == "corrupted":
                ours = manifest_key(component, check.filename) in manifest
                if not (ours or overwrite):
                    raise OutputExistsError(
                        f"{check.path} exists but is damaged ({check.message}) and was not downloaded "
                        "by napari-cdpdnet; move it away or pass --overwrite to replace it"
                    )
                logger.warning("replacing damaged %s (%s)", check.path, check.message)
            todo.append(Missing(component, wf, []))
    if not todo:
        return results
    return results + fetch_missing(
        todo,
        folder,
        downloader=downloader,
        progress=progress,
        put_at=folder,
        headline=f"cannot fill the weights folder {folder}",
    )
