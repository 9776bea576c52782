"""CDPDNet's text side: the fixed CLIP text embeddings, and CLIP ViT-B/32 for free text.

The network's text conditioning is fixed. The authors computed 32 organ and 11 task embeddings
with CLIP ViT-B/32 from the official prompts ("A computerized tomography of a {name}"); every
checkpoint carries them as the ``organ_embedding`` and ``task_embedding`` buffers, and they ship
separately as the tables ``txt_encoding.pth`` and ``txt_task_encoding.pth``.

* :func:`load_organ_embeddings`: the 32 × 512 organ embeddings from either kind of file (the
  resolver's CLIP stage, the segment-by-example teacher);
* :func:`load_text_embedding_tables`: both tables, to train from scratch with the official
  conditioning.

CLIP itself is optional: the ``[clip]`` extra (open_clip_torch) and third-party weights found
through :mod:`napari_cdpdnet.weights`. It never changes what is segmented, only which of the 32
structures a free text is taken to mean.

* :func:`load_clip_text_tower`: the one loader of the open_clip ViT-B/32 text tower, from a path
  or the weights registry;
* :class:`ClipScorer`: the resolver's CLIP stage (cosine of a prompted text to the 32 organ
  embeddings). Constructing one loads nothing; weights are read at the first score. Which scorer
  a request uses (``--clip auto|on|off``) is :mod:`napari_cdpdnet.inference.clip_choice`'s job.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.extras import import_extra
from napari_cdpdnet.model.checkpoint import check_file, read_torch_file, unwrap_checkpoint
from napari_cdpdnet.vocabulary import PROMPT_TEMPLATE, STRUCTURES

__all__ = [
    "CLIP_ARCH",
    "CLIP_TEXT_DIM",
    "load_organ_embeddings",
    "load_text_embedding_tables",
    "ClipTextTower",
    "load_clip_text_tower",
    "ClipScorer",
]

logger = logging.getLogger(__name__)

#: open_clip's name of the architecture the embeddings came from, and its embedding size.
CLIP_ARCH = "ViT-B-32"
CLIP_TEXT_DIM = 512


# --------------------------------------------------------------------------- fixed embeddings
def _table(obj: torch.Tensor, path: Path, rows: int) -> torch.Tensor:
    """A saved embedding table as float32 [rows, 512] (the official files may add a unit axis)."""
    t = obj.detach().float().reshape(obj.shape[0], -1)
    if tuple(t.shape) != (rows, CLIP_TEXT_DIM):
        raise WeightsError(
            f"{path}: tensor of shape {tuple(obj.shape)}, expected ({rows}, {CLIP_TEXT_DIM})"
        )
    return t


def load_organ_embeddings(path: str | os.PathLike[str]) -> np.ndarray:
    """The 32 fixed organ embeddings [32, 512] as float32.

    ``path`` is a CDPDNet checkpoint (its ``organ_embedding`` buffer; official, trained or bare
    state dict; only that buffer is read, the file is memory-mapped) or the official table
    ``txt_encoding.pth``.

    Raises:
        WeightsError: the file is missing, unreadable, holds no organ embeddings, or holds
            embeddings of another shape (e.g. a tiny test model's).
    """
    what = "organ embeddings (a CDPDNet checkpoint or txt_encoding.pth)"
    p = check_file(path, what)
    if p.is_dir():
        raise WeightsError(f"the {what} {p} is a folder; pass the file itself")
    obj = read_torch_file(p, what, mmap=True)
    if isinstance(obj, torch.Tensor):
        return np.ascontiguousarray(_table(obj, p, len(STRUCTURES)).numpy(), dtype=np.float32)
    state, _ = unwrap_checkpoint(obj, p, what)
    keys = [k for k in state if k == "organ_embedding" or k.endswith(".organ_embedding")]
    if not keys:
        raise WeightsError(f"{p}: no organ_embedding in the checkpoint; is it a CDPDNet checkpoint?")
    emb = state[keys[0]]
    expected = (len(STRUCTURES), CLIP_TEXT_DIM)
    if tuple(emb.shape) != expected:
        raise WeightsError(f"{p}: organ_embedding has shape {tuple(emb.shape)}, expected {expected}")
    return np.asarray(emb.detach().float().cpu().numpy(), dtype=np.float32)


def load_text_embedding_tables(folder: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``txt_encoding.pth`` [32, 512] and ``txt_task_encoding.pth`` [11, 512] of ``folder``, float32.

    Raises:
        InputError: a table is missing or is not a tensor (the folder is a config setting).
        WeightsError: a table cannot be read.
    """
    out = []
    for name in ("txt_encoding.pth", "txt_task_encoding.pth"):
        p = Path(folder) / name
        if not p.is_file():
            raise InputError(f"text_embeddings: {p} not found (need txt_encoding.pth and txt_task_encoding.pth)")
        t = read_torch_file(p, "text-embedding table")
        if not isinstance(t, torch.Tensor):
            raise InputError(f"text_embeddings: {p} does not hold a tensor")
        out.append(t.float())
    return out[0], out[1]


# --------------------------------------------------------------------------- CLIP
@dataclass
class ClipTextTower:
    """CLIP ViT-B/32's text side: texts to embeddings in the space of the organ embeddings."""

    #: An open_clip CLIP model (only ``encode_text`` and ``logit_scale`` are used).
    model: Any
    #: open_clip's tokenizer for the same architecture: list of texts -> token tensor.
    tokenizer: Callable[[list[str]], torch.Tensor]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [len(texts), 512] as float32 (not normalised)."""
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(list(texts))).float().cpu().numpy()

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for the OpenAI weights)."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp()) if scale is not None else 100.0


def _open_clip() -> Any:
    return import_extra("open_clip", "clip", "matching free text with CLIP")


def load_clip_text_tower(
    path: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = False,
    progress: Callable[[int, int | None, str], None] | None = None,
) -> ClipTextTower:
    """The open_clip ViT-B/32 (OpenAI) model, ready to encode text.

    Args:
        path: the weights file (or a folder holding it); None looks it up through the weights
            registry (``$CDPDNET_WEIGHTS_DIR``, the cache, the Hugging Face cache).
        allow_download: fetch the weights (0.6 GB) when they are nowhere on disk.
        progress: ``progress(done_bytes, total_bytes, filename)`` while downloading.

    Raises:
        InputError: open_clip is not installed (the ``[clip]`` extra).
        WeightsError: the weights are missing (the message lists where to get them) or unusable.
    """
    open_clip = _open_clip()
    from napari_cdpdnet.weights import resolve_clip

    weights = resolve_clip(path, allow_download=allow_download, progress=progress)
    logger.info("loading CLIP ViT-B/32 text tower from %s", weights)
    try:
        model = open_clip.create_model(CLIP_ARCH, pretrained=str(weights), force_quick_gelu=True)
    except Exception as exc:  # noqa: BLE001 - the file passed its checks but does not load
        raise WeightsError(f"{weights}: not usable as open_clip ViT-B-32 weights ({exc})") from exc
    return ClipTextTower(model.eval(), open_clip.get_tokenizer(CLIP_ARCH))


class ClipScorer:
    """Scores free text against the checkpoint's 32 fixed organ embeddings with CLIP ViT-B/32.

    The typed text goes through the official template ("A computerized tomography of a
    {text}") and CLIP's text tower; its cosine similarity to each of the 32 organ embeddings
    (computed by the authors from the official names with the same template) ranks the
    structures, and CLIP's own logit scale turns the cosines into probabilities. This only
    ranks the fixed 32 structures: the model's text conditioning does not depend on the query.

    Nothing is loaded until the first score is asked for. Give ``model`` (an open_clip model)
    and ``organ_embeddings`` directly, or let them come from the weights (``clip_weights``
    resolved through :mod:`napari_cdpdnet.weights`). The organ embeddings are the checkpoint's
    ``organ_embedding`` buffer when a checkpoint is given or found on disk (never downloaded
    for this); otherwise the tower computes them from the official prompts, which is how the
    authors made that buffer (same model and template; it differs only by the authors' float16
    rounding), so text matching does not need the 0.3-0.8 GB checkpoint. ``organ_source`` says
    which was used. Thread-safe: the dock scores in workers. This is the object
    :func:`napari_cdpdnet.vocabulary.resolver.resolve` takes as ``clip_scorer``.
    """

    def __init__(
        self,
        model: Any = None,
        organ_embeddings: Any = None,
        *,
        tokenizer: Any = None,
        clip_weights: str | os.PathLike[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        allow_download: bool = False,
        progress: Callable[[int, int | None, str], None] | None = None,
    ) -> None:
        self._model = model
        self._organ = organ_embeddings
        self._tokenizer = tokenizer
        self._clip_weights = clip_weights
        self._checkpoint = checkpoint
        self._allow_download = allow_download
        self._progress = progress
        self._tower: ClipTextTower | None = None
        self._organ_unit: torch.Tensor | None = None
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.RLock()
        #: Where the 32 organ embeddings came from (set at the first score).
        self.organ_source = "given" if organ_embeddings is not None else ""

    def _ensure(self) -> tuple[ClipTextTower, torch.Tensor]:
        with self._lock:
            if self._tower is None:
                if self._model is None:
                    self._tower = load_clip_text_tower(
                        self._clip_weights, allow_download=self._allow_download, progress=self._progress
                    )
                else:
                    tokenizer = self._tokenizer or _open_clip().get_tokenizer(CLIP_ARCH)
                    self._tower = ClipTextTower(self._model.eval(), tokenizer)
            if self._organ_unit is None:
                self._organ_unit = self._organ_embeddings(self._tower)
            return self._tower, self._organ_unit

    def _organ_embeddings(self, tower: ClipTextTower) -> torch.Tensor:
        """The 32 organ embeddings, unit length: given, the checkpoint's, or computed."""
        if self._organ is None:
            from napari_cdpdnet.weights import resolve_checkpoint

            try:  # looked for, never downloaded for this
                path = resolve_checkpoint(self._checkpoint, allow_download=False)
                self._organ = load_organ_embeddings(path)
                self.organ_source = f"checkpoint buffer ({path})"
            except WeightsError as exc:  # absent, or not the official 32 x 512 table
                if self._checkpoint is not None:
                    logger.warning("CLIP: %s; computing the organ embeddings instead", exc)
                self._organ = tower.encode([s.prompt for s in STRUCTURES])
                self.organ_source = "computed by CLIP from the official prompts"
            logger.info("CLIP organ embeddings: %s", self.organ_source)
        organ = torch.as_tensor(np.asarray(self._organ, dtype=np.float32))
        expected = (len(STRUCTURES), CLIP_TEXT_DIM)
        if tuple(organ.shape) != expected:
            raise WeightsError(f"organ embeddings have shape {tuple(organ.shape)}, expected {expected}")
        return torch.nn.functional.normalize(organ, dim=-1)

    def load(self) -> ClipScorer:
        """Load the weights now (the first score does it otherwise); returns self."""
        self._ensure()
        return self

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for the OpenAI weights)."""
        return self._ensure()[0].logit_scale

    def similarities(self, text: str) -> np.ndarray:
        """Cosine similarity of the prompted text to each of the 32 organ embeddings, [32]."""
        key = " ".join(text.split())
        with self._lock:
            if key not in self._cache:
                tower, organ_unit = self._ensure()
                emb = torch.as_tensor(tower.encode([PROMPT_TEMPLATE.format(key)]))
                unit = torch.nn.functional.normalize(emb, dim=-1)
                self._cache[key] = (unit @ organ_unit.T)[0].cpu().numpy()
            return self._cache[key]

    def probabilities(self, text: str) -> np.ndarray:
        """Softmax over the 32 structures of ``logit_scale`` x cosine, [32]."""
        logits = self.logit_scale * self.similarities(text).astype(np.float64)
        e = np.exp(logits - logits.max())
        return e / e.sum()
