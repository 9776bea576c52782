"""Reference label maps from other tools, mapped onto the CDPDNet structures.

Training and evaluating ROI prompts needs labelled CTs; their label numbers rarely follow
CDPDNet's. A *label-value mapping* is ``{source label value: structure index}``: several source
values may map to one structure (the lung lobes), unmapped values become background. The mappings
known by name are data in ``resources/label_mappings.json``; users give their own as
``"value=structure,..."`` or a JSON file (:func:`parse_label_values`).

Not the same thing as the pairs of ``cdpdnet evaluate --map PRED:REF`` (prediction value ->
reference values, :func:`napari_cdpdnet.training.evaluation.parse_pred_ref`), which compare two
label maps without translating either; both read one side's value with :func:`label_value`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from napari_cdpdnet._resources import load_json
from napari_cdpdnet.errors import InputError, VocabularyError
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure

__all__ = [
    "KNOWN_MAPPINGS",
    "TOTALSEGMENTATOR_TOTAL",
    "label_value",
    "remap",
    "parse_label_values",
]


def _load_known() -> Mapping[str, Mapping[int, int]]:
    """label_mappings.json as ``{name: {source value: structure index}}`` (read-only)."""
    out: dict[str, Mapping[int, int]] = {}
    for name, spec in load_json("label_mappings.json")["mappings"].items():
        table: dict[int, int] = {}
        for row in spec["values"]:
            value = int(row["value"])
            if value <= 0 or value in table:
                raise RuntimeError(f"label_mappings.json: {name} value {value} is not a new value > 0")
            s = structure(row["structure"])
            if s.key != row["structure"]:
                raise RuntimeError(f"label_mappings.json: {row['structure']!r} is not a structure key")
            table[value] = s.index
        out[name.casefold()] = MappingProxyType(table)
    return MappingProxyType(out)


#: Mappings known by name (``--map totalsegmentator``), from ``resources/label_mappings.json``.
KNOWN_MAPPINGS: Mapping[str, Mapping[int, int]] = _load_known()

#: TotalSegmentator ``total`` task → CDPDNet structure index (shared/data/README.md).
TOTALSEGMENTATOR_TOTAL: Mapping[int, int] = KNOWN_MAPPINGS["totalsegmentator"]


def label_value(text: str | int) -> int:
    """One label value of a mapping: a whole number > 0 as given, or a structure key or name,
    which stands for its structure index ("liver" -> 6).

    Raises:
        InputError: zero, negative or not a number (nor a structure).
        VocabularyError: a word that is not a CDPDNet structure key or name.
    """
    token = str(text).strip()
    if token.lstrip("+-").isdigit():
        value = int(token)
        if value <= 0:
            raise InputError(f"label values must be > 0 (0 is background), got {value}")
        return value
    if not token:
        raise InputError("empty label value")
    return structure(token).index


def remap(labels: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    """``labels`` with values translated to structure indices (uint8); None keeps structure values."""
    labels = np.asarray(labels)
    n = len(STRUCTURES)
    if mapping is None:
        if labels.max(initial=0) > n or labels.min(initial=0) < 0:
            raise InputError(
                f"the label map has values outside 1..{n}: give a mapping onto CDPDNet structures "
                "(e.g. --map totalsegmentator or --map mapping.json)"
            )
        return labels.astype(np.uint8)
    top = int(max(labels.max(initial=0), max(mapping, default=0)))
    lut = np.zeros(top + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        if not 1 <= int(dst) <= n:
            raise InputError(f"mapping {src} -> {dst}: structures are numbered 1..{n}")
        lut[int(src)] = int(dst)
    return lut[labels.astype(np.int64)]


def parse_label_values(text: str | None) -> dict[int, int] | None:
    """A label-value mapping from a known name, a JSON file ``{"value": structure}`` or
    ``"value=structure,value=structure"``; a structure may be given by index, key or name."""
    if text is None:
        return None
    if text.casefold() in KNOWN_MAPPINGS:
        return dict(KNOWN_MAPPINGS[text.casefold()])
    path = Path(text)
    try:
        if path.suffix.lower() == ".json":
            pairs = json.loads(path.read_text(encoding="utf-8")).items()
        else:
            pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {int(a): label_value(b) for a, b in pairs}
    except (OSError, ValueError, AttributeError, InputError, VocabularyError) as exc:
        raise InputError(
            f"mapping {text!r}: give {', '.join(KNOWN_MAPPINGS)}, a JSON file "
            f"{{\"label\": structure}} or 'label=structure,...' ({exc})"
        ) from exc
