"""A small learned mapper from ROI features to the CLIP text space of CDPDNet's organ embeddings.

Issue 8, after He et al. (*Learning Conceptual Text Prompts from Visual Regions of Interest*): the
image side learns to predict the text embedding of the structure it marks, so nobody has to type a
name. Here, in 3-D and on CPU budgets:

* **features** (:func:`roi_features`) — instance attributes of the marked region in patient space
  (:mod:`~napari_cdpdnet.example.attributes`), the ROI kind, a HU histogram and, when a model ran, the
  mean of the 32 sigmoid probabilities inside the ROI (cheap pooled model features);
* **student** — an MLP (features → 512);
* **teacher** — the checkpoint's fixed ``organ_embedding`` (32 × 512 CLIP ViT-B/32 text
  embeddings of the official prompts);
* **self-adding-noise distillation** — the student's output gets Gaussian noise scaled by its own
  standard deviation, annealed linearly to zero over training; loss = (1 − cosine to the teacher)
  + InfoNCE over the 32 teacher embeddings.

The 32 official prompts share the template "A computerized tomography of a …", so their raw
embeddings are all within cosine 0.76–0.99 of each other. Cosines are therefore measured in the
*centred* teacher space (the mean of the 32 embeddings removed), where they spread over −0.4…0.97;
:meth:`RoiMapper.embed` adds the mean back to return a vector in CLIP's own space.

Weights are a small ``torch.save`` dict (``format``, ``version``, network, feature scaling and
the 32 teacher embeddings it was trained against), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.example.attributes import FEATURE_NAMES as ATTRIBUTE_FEATURES
from napari_cdpdnet.example.attributes import BodyFrame, body_frame, instance_attributes
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.example.ranking import Candidate, Ranking, crop_geometry
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure

__all__ = [
    "MAPPER_FORMAT",
    "MAPPER_VERSION",
    "MAPPER_METHOD",
    "HU_BANDS",
    "feature_names",
    "roi_region",
    "roi_features",
    "card_sentences",
    "ensemble_teacher",
    "sample_rois",
    "split_halves",
    "training_set",
    "TrainingConfig",
    "RoiMapper",
    "train_mapper",
]

logger = logging.getLogger(__name__)

MAPPER_FORMAT = "napari-cdpdnet roi-prompt mapper"
MAPPER_VERSION = 1
MAPPER_METHOD = "learned ROI prompt (mapper)"

#: HU histogram bands (upper bounds) of the ROI region: air, lung/gas, fat, fluid, soft tissue,
#: enhancing, bone.
HU_BANDS: tuple[float, ...] = (-900.0, -200.0, -10.0, 30.0, 90.0, 300.0, math.inf)
_KINDS = ("box", "scribble", "click")
#: Radius of the region a click stands for, and how far scribble voxels are grown (mm).
CLICK_RADIUS_MM = 6.0
SCRIBBLE_RADIUS_MM = 3.0
#: Temperature of the InfoNCE term and of the confidences (cosine / τ in the centred space).
TEMPERATURE = 0.07


def feature_names(model_features: bool) -> list[str]:
    """Names of the feature vector :func:`roi_features` returns."""
    names = list(ATTRIBUTE_FEATURES) + [f"kind_{k}" for k in _KINDS]
    names += [f"hu_fraction_{i}" for i in range(len(HU_BANDS))]
    if model_features:
        names += [f"probability_{s.key}" for s in STRUCTURES]
    return names


# --------------------------------------------------------------------------- features
def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.floor(radius_vox).astype(int), 0)
    zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    rv = np.maximum(radius_vox, 1e-6)
    return (zz / rv[0]) ** 2 + (yy / rv[1]) ** 2 + (xx / rv[2]) ** 2 <= 1.0


def roi_region(roi: ROI, geometry: Geometry) -> tuple[tuple[slice, ...], np.ndarray]:
    """The voxels an ROI stands for, as ``(crop, mask over crop)``.

    A box is its voxels; a click is a ball of 6 mm radius; a scribble is its voxels grown by
    3 mm (in mm, so anisotropic grids give the same region).
    """
    from scipy import ndimage

    shape = np.asarray(geometry.shape)
    if roi.kind == "box":
        bounds = roi.bounds(geometry.shape)
        return bounds, np.ones(tuple(s.stop - s.start for s in bounds), dtype=bool)
    radius = CLICK_RADIUS_MM if roi.kind == "click" else SCRIBBLE_RADIUS_MM
    rv = radius / np.asarray(geometry.spacing)[::-1]
    grow = np.floor(rv).astype(int)
    bounds = roi.bounds(geometry.shape)
    crop = tuple(slice(max(0, s.start - g), min(int(n), s.stop + g)) for s, g, n in zip(bounds, grow, shape, strict=True))
    seeds = roi.shifted([s.start for s in crop]).mask(tuple(s.stop - s.start for s in crop))
    region = ndimage.binary_dilation(seeds, structure=_ball(rv)) if grow.any() else seeds
    return crop, region


def roi_features(
    roi: ROI,
    ct: np.ndarray,
    geometry: Geometry,
    *,
    body: BodyFrame | None = None,
    probabilities: Mapping[int, np.ndarray] | None = None,
    probability_roi: ROI | None = None,
) -> np.ndarray:
    """Feature vector of an ROI (see :func:`feature_names`).

    Args:
        roi, ct, geometry: the ROI on the full CT (the body frame needs the whole scan).
        body: precomputed :func:`~napari_cdpdnet.example.attributes.body_frame` of ``ct``.
        probabilities: structure index → sigmoid map; given → 32 pooled model features.
        probability_roi: the ROI on the probability maps' grid when they cover a crop.
    """
    body = body or body_frame(ct, geometry)
    crop, region = roi_region(roi, geometry)
    sub = ct[crop]
    attrs = instance_attributes(region, sub, crop_geometry(geometry, crop), body=body)
    kind = np.array([roi.kind == k for k in _KINDS], dtype=np.float32)
    values = sub[region]
    edges = np.concatenate([[-np.inf], HU_BANDS])
    hist = np.histogram(values, bins=edges)[0].astype(np.float32) / max(len(values), 1)
    parts = [attrs.features(), kind, hist]
    if probabilities is not None:
        proi = probability_roi or roi
        shape = next(iter(probabilities.values())).shape if probabilities else geometry.shape
        bounds, w = proi.weights(shape)
        total = float(w.sum())
        pooled = np.zeros(len(STRUCTURES), dtype=np.float32)
        for s, p in probabilities.items():
            pooled[s - 1] = float((np.asarray(p[bounds], dtype=np.float32) * w).sum()) / total
        parts.append(pooled)
    return np.concatenate(parts).astype(np.float32)


# --------------------------------------------------------------------------- teacher
def card_sentences() -> list[list[str]]:
    """Attribute sentences per structure (from its card) for the teacher ensemble."""
    from napari_cdpdnet.example.attributes import attribute_card, attribute_sentence

    return [[attribute_sentence(attribute_card(s.index))] for s in STRUCTURES]


def ensemble_teacher(
    teacher: np.ndarray,
    encode: Callable[[list[str]], np.ndarray],
    *,
    sentences: Sequence[Sequence[str]] | None = None,
    weight: float = 0.5,
) -> np.ndarray:
    """Organ embeddings blended with the same CLIP text tower's embedding of attribute sentences.

    ``out_s = |t_s| · unit((1 − weight) · unit(t_s) + weight · unit(mean_i unit(encode(sentence_si))))``:
    the structure's official prompt stays the anchor, the attribute sentences pull it towards how
    the structure looks. ``encode`` maps texts to [n, D] embeddings (e.g.
    :meth:`napari_cdpdnet.model.text.ClipTextTower.encode`).
    """
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"ensemble weight {weight}: must be within 0..1")
    teacher = np.asarray(teacher, dtype=np.float32)
    sentences = sentences if sentences is not None else card_sentences()
    if len(sentences) != len(teacher):
        raise InputError(f"{len(sentences)} sentence lists for {len(teacher)} structures")

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    out = np.empty_like(teacher)
    for i, (t, texts) in enumerate(zip(teacher, sentences, strict=True)):
        e = np.asarray(encode(list(texts)), dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != teacher.shape[1]:
            raise InputError(f"text encoder returned shape {e.shape}, expected (n, {teacher.shape[1]})")
        blend = (1.0 - weight) * unit(t) + weight * unit(unit(e).mean(axis=0))
        out[i] = np.linalg.norm(t) * unit(blend)
    return out


# --------------------------------------------------------------------------- sampling
def split_halves(labels: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Each structure cut at its own cranio-caudal median (LPS z): (superior half, inferior half).

    ROIs drawn on one half and tested on the other never share a voxel: a spatial hold-out within
    every instance, for data sets with only one scan.
    """
    upper = np.zeros_like(labels)
    lower = np.zeros_like(labels)
    for v in np.unique(labels):
        if v == 0:
            continue
        idx = np.argwhere(labels == v)
        z = geometry.index_to_world(idx.astype(float))[:, 2]
        sup = z >= np.median(z)
        upper[tuple(idx[sup].T)] = v
        lower[tuple(idx[~sup].T)] = v
    return upper, lower


def _random_walk(mask: np.ndarray, start: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    moves = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)])
    pts = [start]
    cur = start
    direction = moves[rng.integers(len(moves))]
    for _ in range(steps):
        # Mostly keep going (a stroke, not a blob), sometimes turn; stay inside the mask.
        options = [direction] if rng.random() < 0.7 else []
        options += list(moves[rng.permutation(len(moves))])
        for m in options:
            nxt = cur + m
            if np.all(nxt >= 0) and np.all(nxt < mask.shape) and mask[tuple(nxt)]:
                cur, direction = nxt, m
                pts.append(cur)
                break
        else:
            break
    return np.array(pts)


def sample_rois(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    per_kind: int = 12,
    kinds: Sequence[str] = _KINDS,
    min_voxels: int = 8,
) -> list[tuple[ROI, int]]:
    """ROIs sampled from a reference label map (values = structure indices 1..32).

    Per structure present and per kind: ``per_kind`` jittered boxes (bounding box of a random
    component, each face moved by up to ±20 % of the extent), clicks (random voxels, interior ones
    preferred) and scribbles (random strokes of 4–30 voxels inside the mask).
    """
    from scipy import ndimage

    out: list[tuple[ROI, int]] = []
    for v in (int(x) for x in np.unique(labels) if x != 0):
        mask = labels == v
        if mask.sum() < min_voxels:
            continue
        comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(comp.ravel())[1:]
        big = [i + 1 for i in range(n) if sizes[i] >= min_voxels] or [int(np.argmax(sizes)) + 1]
        objects = ndimage.find_objects(comp)
        interior = ndimage.binary_erosion(mask)
        inner = np.argwhere(interior) if interior.sum() >= min_voxels else np.argwhere(mask)
        for kind in kinds:
            for _ in range(per_kind):
                if kind == "box":
                    c = big[rng.integers(len(big))]
                    sl = objects[c - 1]
                    lo = np.array([s.start for s in sl], float)
                    hi = np.array([s.stop - 1 for s in sl], float)
                    ext = hi - lo + 1
                    lo = lo + rng.uniform(-0.2, 0.2, 3) * ext
                    hi = hi + rng.uniform(-0.2, 0.2, 3) * ext
                    lo = np.clip(lo, 0, np.asarray(mask.shape) - 1)
                    hi = np.clip(np.maximum(hi, lo), 0, np.asarray(mask.shape) - 1)
                    roi = ROI.box(lo, hi)
                elif kind == "click":
                    roi = ROI.click(inner[rng.integers(len(inner))])
                elif kind == "scribble":
                    start = inner[rng.integers(len(inner))]
                    roi = ROI.scribble(_random_walk(mask, start, int(rng.integers(4, 31)), rng))
                else:
                    raise InputError(f"ROI kind {kind!r}: use box, scribble or click")
                out.append((roi, v))
    return out


def training_set(
    rois: Sequence[tuple[ROI, int]],
    ct: np.ndarray,
    geometry: Geometry,
    *,
    probabilities: Mapping[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix [N, F] and structure indices [N] for sampled ROIs of one scan."""
    body = body_frame(ct, geometry)
    x = [roi_features(r, ct, geometry, body=body, probabilities=probabilities) for r, _ in rois]
    return np.stack(x), np.array([v for _, v in rois], dtype=np.int64)


# --------------------------------------------------------------------------- the mapper
@dataclass(frozen=True)
class TrainingConfig:
    """Distillation settings (defaults train in seconds on CPU for one scan)."""

    hidden: int = 256
    epochs: int = 200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 1.0  # initial noise scale, × the output's own std, annealed linearly to 0
    contrastive_weight: float = 1.0
    temperature: float = TEMPERATURE
    seed: int = 0


def _build_net(n_in: int, hidden: int):
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        torch.nn.Linear(hidden, 512),
    )


@dataclass
class RoiMapper:
    """Trained mapper: features → CLIP text space → nearest of the 32 structures.

    Attributes:
        net: the MLP (torch module, eval mode).
        teacher: 32 × 512 organ embeddings it was distilled from.
        feature_mean, feature_std: input standardisation from the training set.
        uses_model_features: the features include 32 pooled model probabilities.
        info: training record (samples, structures seen, losses, sources).
    """

    net: Any
    teacher: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    uses_model_features: bool
    temperature: float = TEMPERATURE
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ geometry of the space
    @property
    def teacher_mean(self) -> np.ndarray:
        return self.teacher.mean(axis=0)

    def _centred_teacher(self):
        import torch

        t = torch.as_tensor(self.teacher - self.teacher_mean)
        return torch.nn.functional.normalize(t, dim=-1)

    def _raw(self, features: np.ndarray):
        import torch

        x = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if x.shape[1] != len(self.feature_mean):
            raise InputError(
                f"{x.shape[1]} ROI features, but this mapper was trained on {len(self.feature_mean)} "
                f"({'with' if self.uses_model_features else 'without'} model features)"
            )
        x = (x - self.feature_mean) / self.feature_std
        self.net.eval()
        with torch.inference_mode():
            return self.net(torch.as_tensor(x))

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Predicted embeddings in CLIP's text space, [N, 512] (teacher mean + scaled direction)."""
        import torch

        y = torch.nn.functional.normalize(self._raw(features), dim=-1).numpy()
        spread = float(np.linalg.norm(self.teacher - self.teacher_mean, axis=1).mean())
        return self.teacher_mean[None, :] + spread * y

    def cosines(self, features: np.ndarray) -> np.ndarray:
        """Cosine of each prediction to each structure in the centred teacher space, [N, 32]."""
        import torch

        y = torch.nn.functional.normalize(self._raw(features), dim=-1)
        return (y @ self._centred_teacher().T).numpy()

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Softmax over the 32 structures of cosine / temperature, [N, 32]."""
        z = self.cosines(features).astype(np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def rank(
        self,
        roi: ROI,
        ct: np.ndarray,
        geometry: Geometry,
        *,
        body: BodyFrame | None = None,
        probabilities: Mapping[int, np.ndarray] | None = None,
        probability_roi: ROI | None = None,
    ) -> Ranking:
        """Rank the 32 structures for one ROI on the full CT."""
        if self.uses_model_features and probabilities is None:
            raise InputError("this mapper uses model features: run the model first (probabilities)")
        f = roi_features(roi, ct, geometry, body=body,
                         probabilities=probabilities if self.uses_model_features else None,
                         probability_roi=probability_roi)
        p = self.probabilities(f)[0]
        cos = self.cosines(f)[0]
        order = np.argsort(-p, kind="stable")
        cands = tuple(Candidate(structure(int(i) + 1), float(cos[i]), float(p[i])) for i in order)
        seen = set(self.info.get("structures", []))
        note = ""
        if seen and cands[0].structure.index not in seen:
            note = "the answer is a structure the mapper never saw in training"
        return Ranking(cands, MAPPER_METHOD, note)

    # ------------------------------------------------------------------ files
    def state(self) -> dict[str, Any]:
        """The saved dict (tensors, numbers, strings and lists only)."""
        import torch

        return {
            "format": MAPPER_FORMAT,
            "version": MAPPER_VERSION,
            "hidden": int(self.net[0].out_features),
            "n_features": int(len(self.feature_mean)),
            "feature_names": feature_names(self.uses_model_features),
            "uses_model_features": bool(self.uses_model_features),
            "temperature": float(self.temperature),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "feature_mean": torch.as_tensor(self.feature_mean),
            "feature_std": torch.as_tensor(self.feature_std),
            "teacher": torch.as_tensor(self.teacher),
            "info": self.info,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the weights file atomically; never replaces a file unless ``overwrite``."""
        import torch

        from napari_cdpdnet.fileutil import atomic_output

        path = Path(path)
        with atomic_output(path, overwrite=overwrite) as tmp:
            torch.save(self.state(), tmp)
        logger.info("wrote ROI mapper %s", path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoiMapper:
        """Read a weights file written by :meth:`save`.

        Raises:
            WeightsError: missing, unreadable, another format or a newer version.
        """
        import torch

        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: no such ROI mapper file (train one with 'cdpdnet train-roi-prompts')")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{path}: cannot read the ROI mapper ({type(exc).__name__}: {exc})") from exc
        if not isinstance(d, dict) or d.get("format") != MAPPER_FORMAT:
            raise WeightsError(f"{path}: not an ROI prompt mapper file")
        if int(d.get("version", 0)) > MAPPER_VERSION:
            raise WeightsError(f"{path}: mapper version {d['version']} is newer than this napari-cdpdnet "
                               f"understands ({MAPPER_VERSION}); update napari-cdpdnet")
        try:
            net = _build_net(int(d["n_features"]), int(d["hidden"]))
            net.load_state_dict(d["state_dict"])
            mapper = cls(net.eval(), d["teacher"].float().numpy(), d["feature_mean"].numpy(),
                         d["feature_std"].numpy(), bool(d["uses_model_features"]),
                         float(d.get("temperature", TEMPERATURE)), dict(d.get("info", {})))
        except (KeyError, RuntimeError, AttributeError) as exc:
            raise WeightsError(f"{path}: damaged ROI mapper file ({exc})") from exc
        if mapper.teacher.shape != (len(STRUCTURES), 512):
            raise WeightsError(f"{path}: teacher embeddings of shape {mapper.teacher.shape}, expected (32, 512)")
        return mapper


def _noise_scale(cfg: TrainingConfig, step: int, total: int) -> float:
    """Self-adding-noise schedule: ``cfg.noise`` at the first step, linearly down to 0 at the last."""
    return cfg.noise * (1.0 - step / max(total - 1, 1))


def _fit(net, opt, sched, xt, yt, tc, cfg: TrainingConfig, steps_per_epoch: int, total: int,
         g, log: Callable[[str], None] | None) -> list[float]:
    """The distillation loop; returns the mean loss per epoch."""
    import torch
    import torch.nn.functional as F

    history: list[float] = []
    step = 0
    net.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=g)
        run_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            out = net(xt[idx])
            # Self-adding noise: scaled by the output's own spread, annealed linearly to zero.
            alpha = _noise_scale(cfg, step, total)
            noisy = out + alpha * out.detach().std(dim=-1, keepdim=True) * torch.randn(out.shape, generator=g)
            cos_all = F.normalize(noisy, dim=-1) @ tc.T
            target = yt[idx]
            distil = (1.0 - cos_all.gather(1, target[:, None])).mean()
            nce = F.cross_entropy(cos_all / cfg.temperature, target)
            loss = distil + cfg.contrastive_weight * nce
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach()) / steps_per_epoch
        if log and (epoch % 50 == 0 or epoch == cfg.epochs - 1):
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {run_loss:.4f}")
        history.append(run_loss)
    return history


def train_mapper(
    features: np.ndarray,
    targets: Sequence[int],
    teacher: np.ndarray,
    *,
    uses_model_features: bool,
    config: TrainingConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> RoiMapper:
    """Distil the teacher's organ embeddings into an MLP over ROI features.

    Args:
        features: [N, F] from :func:`roi_features`.
        targets: N structure indices (1..32).
        teacher: [32, 512] organ embeddings
            (:func:`napari_cdpdnet.model.text.load_organ_embeddings`).
        uses_model_features: whether ``features`` include the 32 pooled probabilities.
        config: :class:`TrainingConfig`.
        log: receives one line every 50 epochs.
    """
    import torch

    cfg = config or TrainingConfig()
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.int64) - 1
    teacher = np.asarray(teacher, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise InputError(f"need N feature rows and N targets, got {x.shape} and {y.shape}")
    if np.any((y < 0) | (y >= len(STRUCTURES))):
        raise InputError("targets must be structure indices 1..32")
    if teacher.shape != (len(STRUCTURES), 512):
        raise InputError(f"teacher embeddings must be (32, 512), got {teacher.shape}")
    expected = len(feature_names(uses_model_features))
    if x.shape[1] != expected:
        raise InputError(f"{x.shape[1]} features, expected {expected}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = _build_net(x.shape[1], cfg.hidden)
    mapper = RoiMapper(net, teacher, mean, std, uses_model_features, cfg.temperature)
    tc = mapper._centred_teacher()
    xt = torch.as_tensor((x - mean) / std)
    yt = torch.as_tensor(y)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # A 100k-parameter MLP gains nothing from threads; on a busy CPU they only contend.
    torch.set_num_threads(1)
    try:
        history = _fit(net, opt, sched, xt, yt, tc, cfg, steps_per_epoch, total, g, log)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    mapper.info = {
        "samples": int(len(x)),
        "structures": sorted({int(v) + 1 for v in y}),
        "final_loss": float(history[-1]),
        "epochs": cfg.epochs,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    logger.info("trained ROI mapper on %d ROIs of %d structures in %.1f s (loss %.4f)", len(x),
                len(mapper.info["structures"]), mapper.info["seconds"], history[-1])
    return mapper
