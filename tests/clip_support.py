"""CLIP stand-ins for the tests (no network, no real weights).

* :class:`StubScorer` — a text scorer whose ranking is meaningful by construction: it knows a few
  descriptions the lexicon does not ("main artery of the abdomen") and gives every other text
  cosines too flat to trust. Used where the ranking must make sense (GUI, CLI behaviour).
* :func:`tiny_clip_files` — a tiny randomly initialised open_clip model registered under
  :data:`TINY_ARCH` and saved as ``open_clip_model.safetensors``: the real loading code runs on
  it (fake hub download, checksums, open_clip.create_model, tokenizer, scoring), although its
  ranking means nothing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure

#: open_clip architecture name of the tiny test model (registered by :func:`tiny_clip_files`).
TINY_ARCH = "cdpdnet-test-tiny-clip"

#: What the stub "knows": text -> {structure key: cosine}; every other structure gets 0.80.
KNOWN = {
    "main artery of the abdomen": {
        "aorta": 0.931, "celiac_trunk": 0.902, "inferior_vena_cava": 0.884, "hepatic_vessel": 0.871,
    },
    "the big organ under the right ribs": {
        "liver": 0.924, "gallbladder": 0.893, "right_kidney": 0.882, "right_lung": 0.874,
        "left_lung": 0.95,  # the typed side must exclude it
    },
    "bean shaped organ": {"right_kidney": 0.912, "left_kidney": 0.909, "spleen": 0.87},
}


class StubScorer:
    """A :class:`~napari_cdpdnet.vocabulary.clip_stage.TextScorer` with a fixed, sensible table.

    ``gate``: when set, scoring waits until the event is set (to let a test change the text while
    CLIP "works"); ``calls`` records the texts scored, ``threads`` the threads that scored them.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate: threading.Event | None = None
        self.calls: list[str] = []
        self.threads: list[str] = []

    def similarities(self, text: str) -> list[float]:
        self.calls.append(text)
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(30), "the test never released the stub scorer"
        if self.delay:
            time.sleep(self.delay)
        known = KNOWN.get(" ".join(text.lower().split()))
        if known is None:  # unknown text: flat and low, nothing to trust
            return [0.80 + 0.001 * (i % 3) for i in range(len(STRUCTURES))]
        cos = [0.80] * len(STRUCTURES)
        for key, value in known.items():
            cos[structure(key).channel] = value
        return cos


def tiny_clip_files(folder: Path, *, seed: int = 0) -> Path:
    """Register :data:`TINY_ARCH` with open_clip and write its random weights; returns the
    ``open_clip_model.safetensors`` path. Text width 16, one layer, 512-d embeddings (the organ
    embeddings' size), CLIP's real tokenizer and vocabulary."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_ARCH}.json"
    config.write_text(json.dumps({
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    }))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights
