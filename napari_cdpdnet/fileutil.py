"""Safe file output: every writer in the project goes through :func:`atomic_output`.

A crash, a full disk or Ctrl-C while writing must never leave a half-written label map, CSV or
DICOM-SEG under the name the user asked for, and an existing file must never be replaced unless
the caller says so. The data is therefore written to a temporary file in the destination folder
(same file system, so the final rename is atomic) and moved onto the real name only on success.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from napari_cdpdnet.errors import InputError, OutputExistsError

__all__ = ["atomic_output", "full_suffix", "check_writable"]

logger = logging.getLogger(__name__)

#: Multi-part suffixes that name one format; checked before the plain last suffix.
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz", ".csv.gz")


def full_suffix(path: str | os.PathLike[str]) -> str:
    """The format-defining suffix of ``path``, lower case: ``.nii.gz``, ``.seg.nrrd``, ``.csv``.

    ``Path.suffix`` alone would turn ``scan.nii.gz`` into ``.gz``; ``Path.suffixes`` would turn
    ``patient.1.2.nrrd`` into ``.1.2.nrrd``. Known compound suffixes are matched first.
    """
    name = Path(path).name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if name.endswith(compound) and len(name) > len(compound):
            return compound
    return Path(name).suffix


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Fail early, before any expensive work, if ``path`` cannot be written.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        InputError: ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name to write to")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(
            f"{path} already exists; choose another name, or allow replacing it"
        )
    return path


def _create_temp(path: Path) -> Path:
    """Create an empty, uniquely named file beside ``path`` that keeps its suffix."""
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    for _ in range(100):
        tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{stem}{suffix}")
        try:
            # 0o666 & ~umask, like any normally created file (mkstemp would force 0o600).
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise InputError(f"{path.parent}: cannot create a temporary file there")  # pragma: no cover


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``path``; without ``overwrite`` never clobber a file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails if ``path`` appeared meanwhile: no window for a silent overwrite.
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(
            f"{path} was created by something else while writing; nothing was replaced"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # File systems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(path):
            raise OutputExistsError(
                f"{path} was created by something else while writing; nothing was replaced"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; it becomes ``path`` only if the block succeeds.

    The temporary file sits in the destination folder and keeps the real suffix
    (``.tmp-1a2b3c4d-liver.nii.gz``), so writers that choose the format from the suffix work.
    The parent folder is created if needed. On any exception (including KeyboardInterrupt) the
    temporary file is removed and the exception propagates; ``path`` is left untouched.

    Args:
        path: the file to produce.
        overwrite: replace ``path`` if it exists; otherwise raise before anything is written.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        InputError: the folder cannot be created or written to, or ``path`` is a folder.

    Examples:
        >>> with atomic_output("out/labels.nii.gz") as tmp:  # doctest: +SKIP
        ...     sitk.WriteImage(image, str(tmp))
    """
    path = check_writable(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    logger.debug("wrote %s", path)
