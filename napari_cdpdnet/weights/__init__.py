"""Model weights: where they come from, where they are found, and whether they are intact.

CDPDNet needs three third-party downloads, each with its own terms (see :data:`REGISTRY`): the
CDPDNet checkpoint, DINOv2-base (a frozen image encoder the checkpoint does not contain), and,
only for free-text structure matching, the CLIP ViT-B/32 text tower.

This package owns everything between "a model needs its files" and "here are intact paths":

* :mod:`.registry` — the components and their files, as data (add a component here);
* :mod:`.store` — the weights folders (``$CDPDNET_WEIGHTS_DIR``, the cache), the checksum
  manifest ``cdpdnet-weights.json`` and file hashing;
* :mod:`.verify` — is a file intact (recorded checksums, then a structural check that also
  catches truncation where no checksum is recorded); ``cdpdnet weights verify``;
* :mod:`.download` — the hub download (one reachability probe first, verified, atomic) and the
  one error that lists every missing file with where to get it and where to put it;
* :mod:`.resolve` — the lookup order (explicit path, weights folder, cache, Hugging Face cache,
  download) behind :func:`resolve_weights`, :func:`resolve_checkpoint` and :func:`resolve_clip`.

Loading the files into a model is :mod:`napari_cdpdnet.model`'s job; nothing here imports torch.
Nothing runs at import time: paths and environment variables are read when a function is
called, and only then is ``huggingface_hub`` imported.
"""

from __future__ import annotations

from napari_cdpdnet.weights.download import (
    ENV_OFFLINE,
    Downloader,
    ProgressCallback,
    download_all,
    downloads_disabled,
    hf_downloader,
    hub_unreachable,
)
from napari_cdpdnet.weights.registry import REGISTRY, WeightFile, WeightSpec, spec
from napari_cdpdnet.weights.resolve import (
    WeightFiles,
    locate,
    resolve_checkpoint,
    resolve_clip,
    resolve_component,
    resolve_weights,
)
from napari_cdpdnet.weights.store import (
    ENV_CACHE_DIR,
    ENV_WEIGHTS_DIR,
    MANIFEST_NAME,
    cache_dir,
    env_weights_dir,
    search_folders,
    weights_cache_dir,
)
from napari_cdpdnet.weights.verify import (
    FileCheck,
    VerifyReport,
    record_checksums,
    verify,
    verify_file,
)

__all__ = [
    "WeightFile",
    "WeightSpec",
    "REGISTRY",
    "WeightFiles",
    "FileCheck",
    "VerifyReport",
    "ProgressCallback",
    "Downloader",
    "MANIFEST_NAME",
    "ENV_WEIGHTS_DIR",
    "ENV_CACHE_DIR",
    "ENV_OFFLINE",
    "spec",
    "cache_dir",
    "weights_cache_dir",
    "env_weights_dir",
    "downloads_disabled",
    "resolve_component",
    "resolve_weights",
    "resolve_checkpoint",
    "resolve_clip",
    "download_all",
    "hf_downloader",
    "hub_unreachable",
    "verify",
    "verify_file",
    "record_checksums",
    "locate",
    "search_folders",
]
