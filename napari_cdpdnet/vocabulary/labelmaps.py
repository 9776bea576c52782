"""Reference label maps from other tools, mapped onto the 32 CDPDNet structures.

Training and evaluating ROI prompts needs labelled CTs; their label numbers rarely follow
CDPDNet's. A mapping is ``{source label value: structure index}``; several source values may map
to one structure (the lung lobes), unmapped values become background.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from napari_cdpdnet.errors import InputError

__all__ = ["TOTALSEGMENTATOR_TOTAL", "PRESETS", "remap", "parse_mapping"]

#: TotalSegmentator ``total`` task → CDPDNet structure index (shared/data/README.md).
TOTALSEGMENTATOR_TOTAL: dict[int, int] = {
    1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13,
    19: 14, 12: 16, 13: 16, 14: 16, 10: 17, 11: 17, 20: 18, 18: 19, 21: 21, 22: 22,
}

#: Mappings known by name (``--map totalsegmentator``).
PRESETS: dict[str, dict[int, int]] = {"totalsegmentator": TOTALSEGMENTATOR_TOTAL}


def remap(labels: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    """``labels`` with values translated to structure indices (uint8); None keeps values 1..32."""
    labels = np.asarray(labels)
    if mapping is None:
        if labels.max(initial=0) > 32 or labels.min(initial=0) < 0:
            raise InputError(
                "the label map has values outside 1..32: give a mapping onto CDPDNet structures "
                "(e.g. --map totalsegmentator or --map mapping.json)"
            )
        return labels.astype(np.uint8)
    top = int(max(labels.max(initial=0), max(mapping, default=0)))
    lut = np.zeros(top + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        if not 1 <= int(dst) <= 32:
            raise InputError(f"mapping {src} -> {dst}: structures are numbered 1..32")
        lut[int(src)] = int(dst)
    return lut[labels.astype(np.int64)]


def parse_mapping(text: str | None) -> dict[int, int] | None:
    """A mapping from a preset name, a JSON file ``{"src": dst}`` or ``"src=dst,src=dst"``."""
    if text is None:
        return None
    if text.lower() in PRESETS:
        return dict(PRESETS[text.lower()])
    path = Path(text)
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            return {int(k): int(v) for k, v in raw.items()}
        return {int(a): int(b) for a, b in (item.split("=") for item in text.split(",") if item.strip())}
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(
            f"mapping {text!r}: give {', '.join(PRESETS)}, a JSON file {{\"label\": structure}} "
            f"or 'label=structure,...' ({exc})"
        ) from exc
