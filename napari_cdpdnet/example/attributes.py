"""Attribute prompts: what a structure usually looks like (cards) and what one instance looks like.

Part of "segment by example" (issue 8): a clinician marks a structure instead of naming it, and the
tool describes the marked region with the same words a card uses for each of the 32 structures.

* :class:`AttributeCard` — one per vocabulary structure, read from ``resources/attribute_cards.json``
  (region, patient-side laterality, typical shape, density band in HU, volume band in mL,
  neighbours). Textbook-level approximations, meant for prompt sentences and plausibility checks.
* :func:`body_frame` — the body's own midline and cranio-caudal extent (HU > −500, largest
  component), so "left" and "upper" mean the same on any voxel grid.
* :func:`instance_attributes` — volume, centroid, laterality, level, HU mean/SD, components and
  elongation of a mask, all computed in **patient (LPS) millimetres** through the
  :class:`~napari_cdpdnet.geometry.Geometry`, never in voxel order: a flipped or oblique grid of
  the same patient gives the same answers.
* :func:`attribute_sentence` — a sentence from a card and/or an instance, kept within CLIP's
  77-token context (counted with open_clip's tokenizer when it is importable, else with a
  conservative estimate).

No napari, Qt or torch import here (open_clip is imported lazily, only to count tokens).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from napari_cdpdnet._resources import load_json
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry

__all__ = [
    "AttributeCard",
    "BodyFrame",
    "InstanceAttributes",
    "CLIP_CONTEXT",
    "FEATURE_NAMES",
    "attribute_card",
    "attribute_cards",
    "body_frame",
    "instance_attributes",
    "attribute_sentence",
    "count_clip_tokens",
    "density_word",
    "size_word",
]

logger = logging.getLogger(__name__)

#: CLIP's text context length, start and end tokens included.
CLIP_CONTEXT = 77

#: Body threshold: soft tissue and fat are above it, air and lung parenchyma mostly below.
BODY_HU = -500.0

#: At most this many voxels are used to find the body (the CT is subsampled by a stride).
_BODY_VOXELS = 2_000_000

_LATERALITIES = ("left", "right", "midline", "bilateral")

#: (upper bound in HU, word), first match wins.
_DENSITY_WORDS: tuple[tuple[float, str], ...] = (
    (-500.0, "air-filled"),
    (-100.0, "partly air-filled"),
    (-10.0, "fat-density"),
    (30.0, "fluid-density"),
    (90.0, "soft-tissue density"),
    (300.0, "enhancing"),
    (math.inf, "bone-density"),
)

#: (upper bound in mL, word), first match wins.
_SIZE_WORDS: tuple[tuple[float, str], ...] = (
    (5.0, "tiny"),
    (50.0, "small"),
    (500.0, "medium-sized"),
    (2000.0, "large"),
    (math.inf, "very large"),
)


def density_word(hu: float) -> str:
    """A radiologist's word for a mean density in HU ("fluid-density", "enhancing", …)."""
    for bound, word in _DENSITY_WORDS:
        if hu <= bound:
            return word
    return _DENSITY_WORDS[-1][1]  # pragma: no cover - inf bound always matches


def size_word(volume_ml: float) -> str:
    """A size word for a volume in mL ("tiny" < 5 mL … "very large" > 2 L)."""
    for bound, word in _SIZE_WORDS:
        if volume_ml <= bound:
            return word
    return _SIZE_WORDS[-1][1]  # pragma: no cover


def shape_word(elongation: float) -> str:
    """"elongated", "oval" or "rounded" from the major/intermediate axis ratio."""
    if elongation >= 2.5:
        return "elongated"
    if elongation >= 1.5:
        return "oval"
    return "rounded"


# --------------------------------------------------------------------------- cards
@dataclass(frozen=True)
class AttributeCard:
    """Typical appearance of one of the 32 structures (see module docstring)."""

    index: int
    key: str
    name: str
    region: str
    laterality: str
    shape: str
    hu_band: tuple[float, float]
    volume_ml_band: tuple[float, float]
    neighbours: tuple[str, ...]

    @property
    def density(self) -> str:
        """Density word of the band's middle."""
        return density_word(0.5 * (self.hu_band[0] + self.hu_band[1]))

    @property
    def size(self) -> str:
        """Size word of the band's geometric middle (volumes spread over orders of magnitude)."""
        return size_word(math.sqrt(max(self.volume_ml_band[0], 1e-3) * self.volume_ml_band[1]))

    def neighbour_names(self) -> list[str]:
        """Display names of the neighbours, lower case."""
        from napari_cdpdnet.vocabulary.catalog import structure

        return [structure(k).name.lower() for k in self.neighbours]


@lru_cache(maxsize=1)
def attribute_cards() -> tuple[AttributeCard, ...]:
    """All 32 cards in structure order; a malformed resource is a packaging bug and fails loudly."""
    from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure

    data = load_json("attribute_cards.json")
    raw_cards = data.get("cards", [])
    if len(raw_cards) != len(STRUCTURES):
        raise RuntimeError(f"attribute_cards.json: {len(raw_cards)} cards, expected {len(STRUCTURES)}")
    cards = []
    for n, (raw, s) in enumerate(zip(raw_cards, STRUCTURES, strict=True), start=1):
        if raw["index"] != n or raw["key"] != s.key:
            raise RuntimeError(f"attribute_cards.json: card {n} is {raw['key']!r}, expected {s.key!r}")
        if raw["laterality"] not in _LATERALITIES:
            raise RuntimeError(f"attribute_cards.json: {s.key} has laterality {raw['laterality']!r}")
        lo, hi = raw["hu_band"]
        vlo, vhi = raw["volume_ml_band"]
        if not (lo < hi and 0 < vlo < vhi):
            raise RuntimeError(f"attribute_cards.json: {s.key} has an empty HU or volume band")
        for k in raw["neighbours"]:
            structure(k)  # raises VocabularyError for a typo
        cards.append(AttributeCard(
            index=n, key=s.key, name=s.name, region=raw["region"], laterality=raw["laterality"],
            shape=raw["shape"], hu_band=(float(lo), float(hi)), volume_ml_band=(float(vlo), float(vhi)),
            neighbours=tuple(raw["neighbours"]),
        ))
    return tuple(cards)


def attribute_card(which: int | str) -> AttributeCard:
    """The card of a structure given by index (1..32), key or any name the vocabulary knows."""
    from napari_cdpdnet.vocabulary.catalog import structure

    return attribute_cards()[structure(which).index - 1]  # VocabularyError for unknown names


# --------------------------------------------------------------------------- body frame
@dataclass(frozen=True)
class BodyFrame:
    """Where the patient's body is, in LPS mm: the reference for laterality and level.

    Attributes:
        centroid: LPS centroid of the body (its x is the body's own midline).
        x_range, y_range, z_range: 1st–99th percentile of the body's LPS x (right→left),
            y (anterior→posterior) and z (inferior→superior) coordinates.
    """

    centroid: tuple[float, float, float]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    z_range: tuple[float, float]

    @property
    def half_width(self) -> float:
        return max(0.5 * (self.x_range[1] - self.x_range[0]), 1.0)

    @property
    def half_depth(self) -> float:
        return max(0.5 * (self.y_range[1] - self.y_range[0]), 1.0)

    @property
    def length(self) -> float:
        return max(self.z_range[1] - self.z_range[0], 1.0)


def _stride_for(shape: Sequence[int], limit: int) -> int:
    n = int(np.prod(shape))
    return max(1, math.ceil((n / limit) ** (1.0 / 3.0)))


def body_frame(ct: np.ndarray, geometry: Geometry, *, threshold: float = BODY_HU) -> BodyFrame:
    """The body (largest connected region above ``threshold`` HU) in patient coordinates.

    Large scans are subsampled by a voxel stride so that at most ~2 million voxels are examined;
    the largest component drops the scanner table and outside air.

    Raises:
        InputError: the array does not match the geometry, or nothing is above the threshold.
    """
    from scipy import ndimage

    ct = np.asarray(ct)
    if ct.shape != geometry.shape:
        raise InputError(f"CT of shape {ct.shape} does not match its geometry {geometry.shape}")
    step = _stride_for(ct.shape, _BODY_VOXELS)
    sub = ct[::step, ::step, ::step] > threshold
    labels, n = ndimage.label(sub)
    if n == 0:
        raise InputError(f"no body found: no voxel above {threshold:g} HU (is this a CT in HU?)")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    world = geometry.index_to_world(np.argwhere(body).astype(np.float64) * step)
    lo = np.percentile(world, 1, axis=0)
    hi = np.percentile(world, 99, axis=0)
    c = world.mean(axis=0)
    return BodyFrame(
        centroid=(float(c[0]), float(c[1]), float(c[2])),
        x_range=(float(lo[0]), float(hi[0])),
        y_range=(float(lo[1]), float(hi[1])),
        z_range=(float(lo[2]), float(hi[2])),
    )


# --------------------------------------------------------------------------- instances
#: Names of :meth:`InstanceAttributes.features`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "lateral_offset",  # (x - body midline) / body half-width; + = patient left
    "ap_offset",  # (y - body centre) / body half-depth; + = posterior
    "level_fraction",  # 0 = inferior end of the body, 1 = superior end
    "hu_mean",  # / 500, clipped to ±3
    "hu_sd",  # / 300, clipped to 3
    "log_volume",  # log10(mL + 0.01) / 3
    "log_elongation",  # ln(major / intermediate axis)
    "log_flatness",  # ln(intermediate / minor axis)
    "log_components",  # ln(number of components)
    "extent_x",  # extent of the LPS bounding box along x (mm) / 300
    "extent_y",
    "extent_z",
)


@dataclass(frozen=True)
class InstanceAttributes:
    """Attributes of one marked instance, in patient coordinates.

    Attributes:
        volume_ml: mask volume.
        centroid: LPS centroid (mm).
        laterality: "left", "right" or "midline" (patient's side, relative to the body midline).
        lateral_offset_mm: centroid x minus the body midline (positive = patient left).
        ap_offset_mm: centroid y minus the body centre (positive = posterior).
        level: "upper", "mid" or "lower" third of the body's cranio-caudal extent.
        level_fraction: 0 (inferior end of the body) … 1 (superior end).
        hu_mean, hu_sd: CT values inside the mask.
        density: word for ``hu_mean``.
        components: connected components (26-connectivity).
        axes_mm: principal extents (mm, largest first): √(12 λ) of the second moments, the side
            length of a uniform block with the same spread.
        elongation: largest / intermediate principal extent (1 = round).
        flatness: intermediate / smallest principal extent.
        bbox_mm: extent of the LPS bounding box along x, y, z (mm).
    """

    volume_ml: float
    centroid: tuple[float, float, float]
    laterality: str
    lateral_offset_mm: float
    ap_offset_mm: float
    level: str
    level_fraction: float
    hu_mean: float
    hu_sd: float
    density: str
    components: int
    axes_mm: tuple[float, float, float]
    elongation: float
    flatness: float
    bbox_mm: tuple[float, float, float]
    body: BodyFrame

    @property
    def size(self) -> str:
        return size_word(self.volume_ml)

    @property
    def shape(self) -> str:
        return shape_word(self.elongation)

    def features(self) -> np.ndarray:
        """Normalised numeric vector (see :data:`FEATURE_NAMES`) for the ROI mapper."""
        b = self.body
        v = [
            self.lateral_offset_mm / b.half_width,
            self.ap_offset_mm / b.half_depth,
            self.level_fraction,
            float(np.clip(self.hu_mean / 500.0, -3, 3)),
            float(np.clip(self.hu_sd / 300.0, 0, 3)),
            math.log10(self.volume_ml + 0.01) / 3.0,
            math.log(self.elongation),
            math.log(self.flatness),
            math.log(max(self.components, 1)),
            self.bbox_mm[0] / 300.0,
            self.bbox_mm[1] / 300.0,
            self.bbox_mm[2] / 300.0,
        ]
        return np.asarray(v, dtype=np.float32)


def _level(fraction: float) -> str:
    if fraction >= 2.0 / 3.0:
        return "upper"
    if fraction < 1.0 / 3.0:
        return "lower"
    return "mid"


def instance_attributes(
    mask: np.ndarray,
    ct: np.ndarray,
    geometry: Geometry,
    *,
    body: BodyFrame | None = None,
    midline_mm: float | None = None,
) -> InstanceAttributes:
    """Attributes of the voxels of ``mask`` (any non-zero value) in the CT, in patient space.

    Args:
        mask: ``[z, y, x]`` on ``geometry``.
        ct: ``[z, y, x]`` HU on ``geometry``.
        geometry: the grid of both; every position goes through it to LPS mm.
        body: a precomputed :func:`body_frame` (pass it when describing many masks of one CT).
        midline_mm: centroids closer than this to the body midline are "midline"; default 6 %
            of the body width, at least 15 mm.

    Raises:
        InputError: shapes differ from the geometry, or the mask is empty.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    ct = np.asarray(ct)
    if mask.shape != geometry.shape or ct.shape != geometry.shape:
        raise InputError(
            f"mask {mask.shape} and CT {ct.shape} must both match the geometry {geometry.shape}"
        )
    mask = mask != 0
    idx = np.argwhere(mask)
    if len(idx) == 0:
        raise InputError("the mask is empty: nothing to describe")
    body = body or body_frame(ct, geometry)
    world = geometry.index_to_world(idx.astype(np.float64))
    centroid = world.mean(axis=0)
    volume_ml = len(idx) * geometry.voxel_volume_mm3 / 1000.0

    # Second moments in mm, plus those of one voxel (a uniform box), so a single voxel or a
    # one-voxel-thin line still has a finite, grid-independent spread.
    d = world - centroid
    cov = d.T @ d / len(d)
    lin = geometry.direction_matrix * np.asarray(geometry.spacing)
    cov += lin @ lin.T / 12.0
    eig = np.sort(np.clip(np.linalg.eigvalsh(cov), 1e-9, None))[::-1]
    axes = np.sqrt(12.0 * eig)

    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    _, n_components = ndimage.label(crop, structure=np.ones((3, 3, 3), dtype=bool))
    values = ct[mask].astype(np.float64)
    extent = world.max(axis=0) - world.min(axis=0) + np.abs(lin).sum(axis=1)

    dx = float(centroid[0] - body.centroid[0])
    dy = float(centroid[1] - body.centroid[1])
    threshold = midline_mm if midline_mm is not None else max(15.0, 0.06 * 2 * body.half_width)
    laterality = "midline" if abs(dx) <= threshold else ("left" if dx > 0 else "right")
    fraction = float(np.clip((centroid[2] - body.z_range[0]) / body.length, 0.0, 1.0))
    hu_mean = float(values.mean())
    return InstanceAttributes(
        volume_ml=volume_ml,
        centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        laterality=laterality,
        lateral_offset_mm=dx,
        ap_offset_mm=dy,
        level=_level(fraction),
        level_fraction=fraction,
        hu_mean=hu_mean,
        hu_sd=float(values.std()),
        density=density_word(hu_mean),
        components=int(n_components),
        axes_mm=(float(axes[0]), float(axes[1]), float(axes[2])),
        elongation=float(axes[0] / axes[1]),
        flatness=float(axes[1] / axes[2]),
        bbox_mm=(float(extent[0]), float(extent[1]), float(extent[2])),
        body=body,
    )


# --------------------------------------------------------------------------- sentences
#: CLIP's pre-tokenisation (open_clip ``SimpleTokenizer``): letters runs, single digits, others.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_", re.IGNORECASE)


@lru_cache(maxsize=1)
def _open_clip_encoder():
    """open_clip's BPE tokenizer (ships its vocabulary, no download), or None when absent."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except Exception as exc:  # noqa: BLE001 - any import problem means: estimate instead
        logger.info("open_clip tokenizer not importable (%s): token counts are estimated", exc)
        return None
    return SimpleTokenizer()


def count_clip_tokens(text: str, *, exact: bool | None = None) -> tuple[int, bool]:
    """Tokens CLIP ViT-B/32 uses for ``text`` including start/end tokens, and whether exact.

    With open_clip importable the count is exact. Otherwise it is an upper-bound estimate: every
    digit and punctuation mark is one token (as in CLIP) and a word of n letters counts
    ⌈n / 3⌉ tokens (CLIP's BPE splits common words rarely and medical words into pieces of 3+
    letters). ``exact=False`` forces the estimate (for tests).
    """
    enc = _open_clip_encoder() if exact is not False else None
    if enc is not None:
        return len(enc.encode(text)) + 2, True
    if exact:
        raise RuntimeError("open_clip is not importable: no exact CLIP token count")
    n = 0
    for piece in _CLIP_PIECES.findall(text.lower()):
        if piece[0].isalpha():
            n += max(1, math.ceil(len(piece) / 3))
        else:
            n += len(piece)
    return n + 2, False


def _join(names: Sequence[str]) -> str:
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _card_clauses(card: AttributeCard) -> list[str]:
    side = {"left": "on the left", "right": "on the right", "midline": "near the midline",
            "bilateral": "on either side"}[card.laterality]
    lo, hi = card.hu_band
    return [
        f"a {card.shape} in the {card.region}",
        f"{side}",
        f"{card.density} ({lo:.0f} to {hi:.0f} HU)",
        f"{card.size} ({card.volume_ml_band[0]:g} to {card.volume_ml_band[1]:g} mL)",
        f"next to the {_join(card.neighbour_names()[:3])}",
    ]


def _instance_clauses(inst: InstanceAttributes) -> list[str]:
    side = "in the midline" if inst.laterality == "midline" else f"on the patient's {inst.laterality}"
    pieces = "in one piece" if inst.components == 1 else f"in {inst.components} pieces"
    return [
        f"{inst.size} {inst.shape} {inst.density} structure {side} at the {inst.level} body level",
        f"{inst.volume_ml:.0f} mL, mean {inst.hu_mean:.0f} HU",
        pieces,
    ]


def attribute_sentence(
    card: AttributeCard | None = None,
    instance: InstanceAttributes | None = None,
    *,
    limit: int = CLIP_CONTEXT,
    exact: bool | None = None,
) -> str:
    """One prompt sentence from a card, an instance, or both, within ``limit`` CLIP tokens.

    Clauses are added in order of importance and a clause that would exceed the limit is
    dropped, so the result always fits (the leading phrase alone is far below 77 tokens).
    ``exact`` is passed to :func:`count_clip_tokens` (False: use the estimate).

    Examples:
        >>> attribute_sentence(attribute_card("spleen"))  # doctest: +SKIP
        'A computerized tomography of a spleen: a crescent-shaped solid organ in the left upper
        abdomen, on the left, soft-tissue density (40 to 140 HU), ...'
    """
    if card is None and instance is None:
        raise InputError("attribute_sentence needs a card, an instance or both")
    if card is not None:
        text = f"A computerized tomography of a {card.name.lower()}"
        clauses = _card_clauses(card)
        if instance is not None:
            clauses = clauses[:2] + [f"here a {c}" if i == 0 else c
                                     for i, c in enumerate(_instance_clauses(instance))] + clauses[2:]
        sep_first = ": "
    else:
        assert instance is not None
        first, *rest = _instance_clauses(instance)
        text = f"A computerized tomography of a {first}"
        clauses = rest
        sep_first = ", "
    if count_clip_tokens(text + ".", exact=exact)[0] > limit:
        raise InputError(f"limit {limit} is too small for even the leading phrase of a prompt")
    sep = sep_first
    for clause in clauses:
        candidate = f"{text}{sep}{clause}"
        if count_clip_tokens(candidate + ".", exact=exact)[0] <= limit:
            text = candidate
            sep = ", "
    return text + "."
