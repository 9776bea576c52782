"""Stage 2, vocabulary: the 32 structures, the 11 task prompts, and what typed text means.

Owns the fixed CDPDNet label space as data (``resources/*.json``): names, synonyms, colours,
SNOMED codes and post-processing roles (:mod:`.catalog`), pass planning over task prompts,
the resolver from typed text to structures (:mod:`.resolver`), and label numberings of other
tools mapped onto ours (:mod:`.labelmaps`). No torch. Counts are ``len(STRUCTURES)`` and
``len(TASKS)``, never literals. The names below are the public API.
"""

from __future__ import annotations

from napari_cdpdnet.vocabulary.catalog import *  # noqa: F403 - the package's public API
from napari_cdpdnet.vocabulary.catalog import __all__  # noqa: F401
