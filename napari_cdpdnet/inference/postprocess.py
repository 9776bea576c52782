"""The official per-structure post-processing (SPEC §12) and the merge into one label map.

Works on boolean masks in model space (``[X, Y, Z]`` = RAS, 1.5 mm, foreground-cropped: axis 0 grows
towards the patient's Right, axis 2 towards Superior), keyed by **structure index** 1…N (SPEC §6.1;
model output channel ``c`` is structure ``c + 1``). The rules are code here, as the official
``organ_post_process``; *which* structure plays which part is data the caller hands in as
:class:`PostprocessRules` (the segmenter builds it from ``resources/postprocess.json`` through the
vocabulary, which this engine never imports). With the official roles:

* largest 26-connected component: 1–9, 11 (pancreas), 12–14, 18–25 and 31 (colon tumour);
* portal/splenic vein (10): the raw mask with every voxel below (lower axis-2 index than) the lowest
  slice of the post-processed pancreas removed. The official code crashes on an empty pancreas; here
  the vein is then kept uncut (with a warning);
* lungs (16, 17): union of both raw masks, the two largest components; the one with the smaller mean
  axis-0 index (further to the patient's left) is the left lung. Fewer than two components: both
  empty (official behaviour; warned);
* kidney tumour (26) / liver tumour (27): the raw tumour inside the union of the raw kidneys (2 largest
  components) / raw liver (largest), closed then dilated with a 5×5×5 cube;
* everything else (15, 28, 29, 30, 32) is the raw mask.

Components are ranked by size; ties go to the component met first in C order over ``[X, Y, Z]``
(the label order ``cc3d`` gives on the official C-ordered arrays, kept by its stable sort).

Label values: :func:`merge_labels` writes **the structure index** as the voxel value; 0 is
background. Structures are independent sigmoids and may overlap; later entries of the merge order
overwrite earlier ones, and the default order puts lesions (the tumour group, 26–32) last so that
**a tumour wins over its organ** (and, among organs, the higher index wins, e.g. hepatic vessel 15
over liver 6).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from napari_cdpdnet.errors import InputError

__all__ = [
    "PostprocessRules",
    "companions",
    "channels_needed",
    "keep_largest_components",
    "split_lungs",
    "cut_portal_vein",
    "filter_tumour",
    "postprocess",
    "merge_order",
    "merge_labels",
]

logger = logging.getLogger(__name__)

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_CUBE5 = np.ones((5, 5, 5), dtype=bool)


@dataclass(frozen=True)
class PostprocessRules:
    """Which structure index plays which part in the official rules, and what each one reads.

    Plain data from the caller: the engine knows the rules, not the structures. The segmenter
    builds it from :data:`napari_cdpdnet.vocabulary.catalog.POSTPROCESS_ROLES` (read from
    ``resources/postprocess.json``), whose keys are these fields.

    Attributes:
        num_structures: structures are numbered 1..num_structures (channel = index - 1).
        largest_component: structures that keep only their largest 26-connected component.
        portal_vein: ``(vein, pancreas)``: the vein is cut below the post-processed pancreas.
        lungs: ``(right, left)``: split from the union of both raw lungs by position.
        tumour_organs: tumour -> (organs whose raw union bounds it, organ components kept).
        lesions: structures merged last, so that they win over their organ.
        companions: structure -> the other structures its rule reads (computed with it).
    """

    num_structures: int
    largest_component: frozenset[int]
    portal_vein: tuple[int, int]
    lungs: tuple[int, int]
    tumour_organs: Mapping[int, tuple[tuple[int, ...], int]]
    lesions: frozenset[int]
    companions: Mapping[int, frozenset[int]]

    def __post_init__(self) -> None:
        # freeze what the caller gave, so one rules object can be shared between runs
        object.__setattr__(self, "largest_component", frozenset(self.largest_component))
        object.__setattr__(self, "lesions", frozenset(self.lesions))
        object.__setattr__(self, "portal_vein", tuple(self.portal_vein))
        object.__setattr__(self, "lungs", tuple(self.lungs))
        object.__setattr__(self, "tumour_organs", MappingProxyType(
            {int(t): (tuple(organs), int(keep)) for t, (organs, keep) in self.tumour_organs.items()}))
        object.__setattr__(self, "companions", MappingProxyType(
            {int(s): frozenset(c) for s, c in self.companions.items()}))
        named = [*self.largest_component, *self.portal_vein, *self.lungs, *self.lesions,
                 *self.tumour_organs, *(o for organs, _ in self.tumour_organs.values() for o in organs),
                 *self.companions, *(c for cs in self.companions.values() for c in cs)]
        if not 1 <= self.num_structures <= 255:
            raise ValueError(f"{self.num_structures} structures do not fit a uint8 label map")
        bad = sorted({s for s in named if not 1 <= s <= self.num_structures})
        if bad:
            raise ValueError(f"post-processing rules name structures {bad} outside 1…{self.num_structures}")


def _check_indices(structures: Iterable[int], rules: PostprocessRules) -> list[int]:
    out = sorted({int(s) for s in structures})
    bad = [s for s in out if not 1 <= s <= rules.num_structures]
    if bad:
        raise InputError(f"structure indices {bad} are outside 1…{rules.num_structures}")
    return out


def companions(structures: Iterable[int], rules: PostprocessRules) -> set[int]:
    """Structures that must also be predicted to post-process ``structures`` (not themselves).

    A tumour needs its organ(s), a lung needs the other lung, the portal/splenic vein needs the
    pancreas.
    """
    requested = set(_check_indices(structures, rules))
    need: set[int] = set()
    for s in requested:
        need.update(rules.companions.get(s, ()))
    return need - requested


def channels_needed(structures: Iterable[int], rules: PostprocessRules) -> list[int]:
    """Output channels (0-based) to compute for ``structures``: the requested ones and companions."""
    s = set(_check_indices(structures, rules))
    return sorted(i - 1 for i in s | companions(s, rules))


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels, grown by ``margin`` and clipped; None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _ranked_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected labels of ``mask`` and the labels ordered by size (largest first, stable)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n == 0:
        return labels, np.zeros(0, dtype=np.intp)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, np.argsort(-sizes, kind="stable") + 1


def keep_largest_components(mask: np.ndarray, k: int = 1) -> np.ndarray:
    """The ``k`` largest 26-connected components of ``mask`` (boolean, same shape)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    box = _bbox(mask)
    if box is None:
        return out
    labels, ranked = _ranked_components(mask[box])
    out[box] = np.isin(labels, ranked[:k])
    return out


def split_lungs(right_raw: np.ndarray, left_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Official lung rule: ``(right, left)`` from the two largest components of both raw masks."""
    union = np.asarray(right_raw, dtype=bool) | np.asarray(left_raw, dtype=bool)
    right = np.zeros(union.shape, dtype=bool)
    left = np.zeros(union.shape, dtype=bool)
    box = _bbox(union)
    labels, ranked = _ranked_components(union[box]) if box is not None else (None, [])
    if len(ranked) < 2:
        logger.warning(
            "lung post-processing: the predicted lungs form %d connected region(s), not two; as in "
            "the official pipeline both lungs are left empty", len(ranked))
        return right, left
    one, two = labels == ranked[0], labels == ranked[1]
    mean_one = np.nonzero(one)[0].mean()
    mean_two = np.nonzero(two)[0].mean()
    # axis 0 grows towards the patient's right: the smaller mean is the left lung
    left_part, right_part = (one, two) if mean_one < mean_two else (two, one)
    left[box] = left_part
    right[box] = right_part
    return right, left


def cut_portal_vein(vein_raw: np.ndarray, pancreas: np.ndarray) -> np.ndarray:
    """Official portal/splenic vein rule: drop the part below the pancreas' lowest axial slice.

    An empty pancreas (where the official code crashes) leaves the vein uncut.
    """
    out = np.array(vein_raw, dtype=bool, copy=True)
    slices = np.flatnonzero(np.asarray(pancreas, dtype=bool).any(axis=(0, 1)))
    if slices.size == 0:
        logger.warning("portal/splenic vein: no pancreas was found, so the vein is not cut below it")
        return out
    out[:, :, : slices[0]] = False
    return out


def filter_tumour(tumour_raw: np.ndarray, organ_raws: Sequence[np.ndarray], keep: int) -> np.ndarray:
    """Official tumour rule: the raw tumour inside its organ region.

    The organ region is the union of ``organ_raws`` reduced to its ``keep`` largest components,
    then binary closing and binary dilation with a 5×5×5 cube (scipy, border value 0). Computed on
    the organ's bounding box grown by 6 voxels, which gives the same result as on the whole array.
    """
    from scipy import ndimage

    tumour = np.asarray(tumour_raw, dtype=bool)
    union = np.zeros(tumour.shape, dtype=bool)
    for organ in organ_raws:
        union |= np.asarray(organ, dtype=bool)
    organ = keep_largest_components(union, keep)
    out = np.zeros(tumour.shape, dtype=bool)
    box = _bbox(organ, margin=6)
    if box is None:
        return out
    region = ndimage.binary_closing(organ[box], structure=_CUBE5)
    region = ndimage.binary_dilation(region, structure=_CUBE5)
    out[box] = tumour[box] & region
    return out


def postprocess(
    raw: Mapping[int, np.ndarray], requested: Iterable[int], rules: PostprocessRules
) -> dict[int, np.ndarray]:
    """Apply the official rules to the requested structures.

    Args:
        raw: thresholded masks (sigmoid > 0.5) by structure index; must hold every requested
            structure and its :func:`companions`.
        requested: structure indices to return.
        rules: which structure plays which part (:class:`PostprocessRules`).

    Returns:
        Boolean masks by structure index, for the requested structures only.

    Raises:
        InputError: an index outside 1…``rules.num_structures``, or a needed mask missing from
            ``raw``.
    """
    wanted = _check_indices(requested, rules)
    missing = sorted((set(wanted) | companions(wanted, rules)) - set(raw))
    if missing:
        raise InputError(f"post-processing needs the masks of structures {missing} as well")
    cache: dict[int, np.ndarray] = {}

    def largest(s: int) -> np.ndarray:
        if s not in cache:
            cache[s] = keep_largest_components(raw[s], 1)
        return cache[s]

    right_lung, left_lung = rules.lungs
    vein, pancreas = rules.portal_vein
    out: dict[int, np.ndarray] = {}
    for s in wanted:
        if s in rules.lungs:
            if right_lung not in cache:
                cache[right_lung], cache[left_lung] = split_lungs(raw[right_lung], raw[left_lung])
            out[s] = cache[s]
        elif s == vein:
            out[s] = cut_portal_vein(raw[s], largest(pancreas))
        elif s in rules.largest_component:
            out[s] = largest(s)
        elif s in rules.tumour_organs:
            organs, keep = rules.tumour_organs[s]
            out[s] = filter_tumour(raw[s], [raw[o] for o in organs], keep)
        else:
            out[s] = np.array(raw[s], dtype=bool, copy=True)
    return out


def merge_order(structures: Iterable[int], rules: PostprocessRules) -> list[int]:
    """Default overlap order: organs and vessels by index, then lesions — last one wins."""
    return sorted(_check_indices(structures, rules), key=lambda s: (s in rules.lesions, s))


def merge_labels(
    masks: Mapping[int, np.ndarray], rules: PostprocessRules, order: Sequence[int] | None = None
) -> np.ndarray:
    """One ``uint8`` label map from boolean masks; voxel value = structure index (0 background).

    Args:
        masks: boolean masks of equal shape by structure index (1…``rules.num_structures``).
        rules: give the default order (lesions last) and the valid indices.
        order: painting order (later wins); default :func:`merge_order`. Must list only keys of
            ``masks``; masks not listed are left out.

    Raises:
        InputError: no masks, unequal shapes, or an order naming a structure without a mask.
    """
    if not masks:
        raise InputError("merge_labels: no masks given")
    order = merge_order(masks, rules) if order is None else [int(s) for s in order]
    _check_indices(order, rules)
    unknown = [s for s in order if s not in masks]
    if unknown:
        raise InputError(f"merge_labels: order names structures {unknown} that have no mask")
    shapes = {np.shape(m) for m in masks.values()}
    if len(shapes) != 1:
        raise InputError(f"merge_labels: masks have different shapes {sorted(shapes)}")
    out = np.zeros(shapes.pop(), dtype=np.uint8)
    for s in order:
        out[np.asarray(masks[s], dtype=bool)] = s
    return out
