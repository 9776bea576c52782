"""Exceptions the core raises on purpose.

Every error a user can cause or fix derives from :class:`CdpdnetError`; the CLI prints its
message and exits with the class's ``exit_code``, and the GUI shows it as a notification. Any
other exception is a bug.
"""

from __future__ import annotations

__all__ = [
    "CdpdnetError",
    "InputError",
    "OutputExistsError",
    "WeightsError",
    "VocabularyError",
    "Cancelled",
]


class CdpdnetError(Exception):
    """Base class: the message says what was wrong and what to do about it."""

    exit_code: int = 1


class InputError(CdpdnetError, ValueError):
    """An input file, folder or argument cannot be used (names the file and the problem)."""

    exit_code = 2


class OutputExistsError(CdpdnetError, FileExistsError):
    """Refusing to overwrite a file the user already has (``overwrite=True`` / ``--overwrite`` allow it)."""

    exit_code = 3


class WeightsError(CdpdnetError, RuntimeError):
    """Weights are missing, incomplete, corrupted or do not fit the model."""

    exit_code = 4


class VocabularyError(CdpdnetError, ValueError):
    """A requested structure is not one the model can segment."""

    exit_code = 5


class Cancelled(CdpdnetError):
    """The user cancelled a running job; nothing partial was written."""

    exit_code = 130
