"""Stage 2, vocabulary: the 32 structures, the 11 task prompts, and what typed text means.

Owns the fixed CDPDNet label space as data (``resources/*.json``): names, synonyms, colours,
SNOMED codes, tasks and post-processing roles, and pass planning over task prompts
(:mod:`.catalog`); what typed words mean (:mod:`.terms`, word lists in ``terms.json``) and the
resolver from typed text to structures (:mod:`.resolver`); label numberings of other tools
mapped onto ours (:mod:`.labelmaps`, tables in ``label_mappings.json``). No torch, and no
import of the engine: the segmenter hands the roles to it. Counts are ``len(STRUCTURES)`` and
``len(TASKS)``, never literals. The names below are the public API.
"""

from __future__ import annotations

from napari_cdpdnet.vocabulary.catalog import *  # noqa: F403 - the package's public API
from napari_cdpdnet.vocabulary.catalog import __all__  # noqa: F401
