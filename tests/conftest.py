"""Shared fixtures.

Real data lives outside the repository, in ``../shared`` beside the checkout (or wherever
``CDPDNET_SHARED_DIR`` points). Tests that need it ask for ``shared_path(...)`` and are skipped,
with the reason printed, where it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_shared_dir() -> Path | None:
    """``$CDPDNET_SHARED_DIR``, else ``../shared`` beside the checkout; None when absent."""
    env = os.environ.get("CDPDNET_SHARED_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_path() -> Callable[..., Path]:
    """Return a function mapping path parts under ``shared/`` to a Path, skipping if absent."""

    root = resolve_shared_dir()

    def get(*parts: str) -> Path:
        if root is None:
            pytest.skip(
                "shared test data not found: set CDPDNET_SHARED_DIR or place 'shared/' "
                f"beside the checkout ({REPO_ROOT.parent / 'shared'})"
            )
        p = root.joinpath(*parts)
        if not p.exists():
            pytest.skip(f"shared test file missing: {p}")
        return p

    return get


@pytest.fixture(scope="session", autouse=True)
def _no_triton_next_to_opengl() -> None:
    """GUI tests create OpenGL canvases (Mesa llvmpipe under Xvfb); triton imported afterwards
    would crash the whole test process. The plugin guards against this the same way."""
    from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda

    block_triton_without_cuda()


@pytest.fixture(autouse=True)
def _recovery_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The dock autosaves edited layers: each test gets its own recovery folder, never the user's."""
    monkeypatch.setenv("CDPDNET_RECOVERY_DIR", str(tmp_path_factory.mktemp("recovery")))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: the Hugging Face hub is forced offline for every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------ shared by the CLI and GUI tests
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random model in the official checkpoint format: (checkpoint, DINO weights)."""
    from model_support import write_tiny_weights

    ckpt, dino, _ = write_tiny_weights(tmp_path_factory.mktemp("weights"))
    return ckpt, dino


@pytest.fixture(scope="module")
def segmenter(weights):
    """A Segmenter on the tiny weights that never downloads."""
    from napari_cdpdnet.inference.segmenter import Segmenter

    return Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False)


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What the segmentation widget showed as napari notifications, by kind."""
    import napari_cdpdnet._gui.notify as w

    seen: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for kind in seen:
        real = getattr(w, f"show_{kind}")

        def capture(message: str, _kind: str = kind, _real: Any = real) -> None:
            seen[_kind].append(str(message))
            _real(message)

        monkeypatch.setattr(w, f"show_{kind}", capture)
    return seen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, None]:
    """A test skipped during set-up (shared data absent) after napari's viewer fixture ran
    never gets napari's ``rep_call``; its teardown then raises AttributeError instead of
    letting the skip stand. Give it the set-up report as ``rep_call``."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "setup" and not rep.passed and not hasattr(item, "rep_call"):
        item.rep_call = rep
