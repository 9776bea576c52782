"""The weights registry: which third-party files CDPDNet needs, as data.

Each :class:`WeightSpec` names a Hugging Face repository, revision and files, with what a user
must know before using them (size, terms, what they are needed for, the option that replaces
them). Adding a component is one entry in :data:`REGISTRY`; nothing here touches the disk or the
network.
"""

from __future__ import annotations

from dataclasses import dataclass

from napari_cdpdnet.errors import InputError

__all__ = ["WeightFile", "WeightSpec", "REGISTRY", "spec"]


@dataclass(frozen=True)
class WeightFile:
    """One file of a component, as named in its hub repository.

    ``alternatives`` are other file names accepted in its place (e.g. ``pytorch_model.bin`` for
    ``model.safetensors``); only ``filename`` is downloaded. ``sha256``/``size`` are checked when
    known; otherwise the values recorded at download are.
    """

    filename: str
    role: str
    alternatives: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class WeightSpec:
    """A downloadable component: hub repository, files, and what a user must know about it."""

    name: str
    title: str
    repo_id: str
    revision: str
    files: tuple[WeightFile, ...]
    approx_size: str
    terms: str
    needed_for: str
    option: str
    #: Not needed to segment (CLIP): absent is fine, only a damaged copy is a problem.
    optional: bool = False

    def url(self, filename: str) -> str:
        """Where a browser can fetch the file (the hub's plain download URL)."""
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{filename}"

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


#: The three components. Revisions are branch names: the repositories publish no release tags
#: and no checksums are known here, so the SHA-256 recorded at first download is what later
#: checks compare against. Pin a commit hash here once one has been verified.
REGISTRY: tuple[WeightSpec, ...] = (
    WeightSpec(
        name="cdpdnet",
        title="CDPDNet checkpoint",
        repo_id="jwu2009/CDPDNet",
        revision="main",
        files=(WeightFile("cdpdnet.pth", "checkpoint"),),
        approx_size="0.3-0.8 GB",
        terms=(
            "Third-party weights by the CDPDNet authors (Wu et al., arXiv 2505.18958). No licence is "
            "stated for them or for the official code; check the model page and ask the authors "
            "before redistributing or using them clinically."
        ),
        needed_for="segmentation (always)",
        option="--checkpoint PATH",
    ),
    WeightSpec(
        name="dinov2-base",
        title="DINOv2-base image encoder",
        repo_id="facebook/dinov2-base",
        revision="main",
        files=(
            WeightFile("config.json", "config"),
            WeightFile("model.safetensors", "weights", alternatives=("pytorch_model.bin",)),
        ),
        approx_size="0.35 GB",
        terms="Third-party weights by Meta AI, released under the Apache-2.0 licence (see the model page).",
        needed_for="segmentation (always; the checkpoint does not contain it)",
        option="--dino PATH",
    ),
    WeightSpec(
        name="clip-vit-b-32",
        title="CLIP ViT-B/32 (OpenAI) for open_clip",
        repo_id="timm/vit_base_patch32_clip_224.openai",
        revision="main",
        files=(
            WeightFile(
                "open_clip_model.safetensors",
                "weights",
                alternatives=("open_clip_pytorch_model.bin",),
            ),
        ),
        approx_size="0.6 GB",
        terms=(
            "Third-party weights by OpenAI (CLIP, MIT licence in github.com/openai/CLIP), "
            "redistributed on the hub by timm; see the model page."
        ),
        needed_for=(
            "optional: matching typed wording the lexicon does not know to one of the 32 "
            "structures (--clip; names, synonyms, abbreviations, typos and other languages work "
            "without it)"
        ),
        option="--clip-weights PATH",
        optional=True,
    ),
)


def spec(name: str) -> WeightSpec:
    """The registry entry named ``name`` ("cdpdnet", "dinov2-base", "clip-vit-b-32")."""
    for s in REGISTRY:
        if s.name == name:
            return s
    raise InputError(
        f"unknown weights component {name!r}; known: {', '.join(s.name for s in REGISTRY)}"
    )
