"""The dock's Structures box with CLIP: live matching off the GUI thread, how text was understood,
alternatives that replace a phrase, stale answers dropped, the run using CLIP's choice, and CLIP
absent (offline: one note; online: the download offered, with progress, checksummed).

A stub scorer gives the rankings that must make sense (tests/clip_support.py); the download
test serves the tiny random open_clip model, so the real loading path runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clip_support import TINY_ARCH, StubScorer, tiny_clip_files
from gui_support import add_segmentation_dock

from napari_cdpdnet.inference.segmenter import Segmenter

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display: run under xvfb-run -a"),
]

PHRASE = "main artery of the abdomen"
NOTE = "CLIP text matching is unavailable"


def _open_small_ct(viewer: Any, shared_path: Any) -> Any:
    [layer] = viewer.open(str(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz")),
                          plugin="napari-cdpdnet")
    return layer


def _lines(widget: Any) -> list[str]:
    return [lbl.text() for lbl in widget.understanding.lines]


@pytest.mark.shared
@pytest.mark.slow
def test_a_phrase_only_clip_knows_is_shown_with_alternatives_and_runs(
    make_napari_viewer, qtbot, shared_path, weights, notes
) -> None:
    stub = StubScorer(delay=0.2)
    segmenter = Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False, clip=stub)
    viewer = make_napari_viewer()
    image = _open_small_ct(viewer, shared_path)
    widget = add_segmentation_dock(viewer, qtbot, segmenter)

    widget.text_edit.setText(f"liver, {PHRASE}")
    qtbot.waitUntil(lambda: "CLIP: matching" in widget.understanding.status_label.text(), timeout=5000)
    qtbot.waitUntil(lambda: any("CLIP: cosine" in line for line in _lines(widget)), timeout=20_000)
    assert stub.calls == [PHRASE]  # "liver" never went to CLIP
    assert stub.threads and "MainThread" not in stub.threads  # scored in a worker
    lines = _lines(widget)
    assert "'liver'</b> &rarr; Liver" in lines[0] and "[name]" in lines[0]
    assert f"'{PHRASE}'</b> &rarr; Aorta" in lines[1]
    assert "[CLIP: cosine 0.931, margin 0.029 over Celiac Trunk]" in lines[1]
    choices = widget.understanding.choices
    assert set(choices) == {(PHRASE, k) for k in ("celiac_trunk", "inferior_vena_cava", "hepatic_vessel")}
    assert choices[(PHRASE, "celiac_trunk")].text() == "Celiac Trunk 0.902"
    [prompt] = widget.understanding.prompt_labels
    assert 'task prompt: "A task of segmenting' in prompt.text()
    assert "Aorta" in widget.resolved_label.text() and "not resolved" not in widget.resolved_label.text()
    texts = [lbl.text() for lbl in widget.understanding.findChildren(type(prompt))]
    assert any("only chooses which of the 32" in t for t in texts)  # never an open vocabulary

    # the run segments what CLIP chose (limited to a box: seconds, not minutes)
    geometry = image.metadata["geometry"]
    z = geometry.shape[0] // 2
    corners = np.array([[z, 30, 40], [z, 30, 80], [z, 70, 80], [z, 70, 40]], float)
    viewer.add_shapes(np.array([image.data_to_world(c) for c in corners]), shape_type="rectangle", name="box")
    viewer.layers.selection.active = image
    widget.box_check.setChecked(True)
    widget.preset_combo.setCurrentText("fast")
    with qtbot.waitSignal(widget.run_finished, timeout=180_000) as finished:
        widget.run_button.click()
    assert finished.args == ["done"], widget.status_label.text()
    [layer] = [lyr for lyr in viewer.layers if lyr.metadata.get("cdpdnet")]
    assert layer.metadata["cdpdnet"]["structures"] == ["liver", "aorta"]
    assert notes["error"] == []

    # an alternative replaces that phrase, and the lexicon takes it from there
    choices[(PHRASE, "celiac_trunk")].click()
    assert widget.text_edit.text() == "liver, Celiac Trunk"
    qtbot.waitUntil(lambda: "Celiac Trunk (exact 1.00)" in widget.resolved_label.text(), timeout=5000)
    assert stub.calls == [PHRASE]


@pytest.mark.shared
def test_typing_never_waits_for_clip_and_stale_answers_are_dropped(
    make_napari_viewer, qtbot, shared_path, weights, notes
) -> None:
    stub = StubScorer()
    stub.gate = threading.Event()
    segmenter = Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False, clip=stub)
    viewer = make_napari_viewer()
    _open_small_ct(viewer, shared_path)
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    box = widget.run_panel.request
    try:
        widget.text_edit.setText(PHRASE)
        qtbot.waitUntil(lambda: stub.calls == [PHRASE], timeout=5000)  # CLIP is busy with it...
        # ...and the GUI thread is not: a name the lexicon knows resolves at once
        widget.text_edit.setText("liver")
        qtbot.waitUntil(lambda: "Liver (exact 1.00)" in widget.resolved_label.text(), timeout=2000)
        # while CLIP has not answered for the current text, Run says so instead of guessing
        widget.text_edit.setText("the big organ under the right ribs")
        qtbot.waitUntil(lambda: "matching 'the big organ" in widget.understanding.status_label.text(), timeout=2000)
        assert widget.run() is None and not widget.is_running
        assert "still matching" in notes["error"][-1]
    finally:
        stub.gate.set()
    qtbot.waitUntil(lambda: any("&rarr; Liver" in line and "CLIP" in line for line in _lines(widget)),
                    timeout=20_000)
    assert box.dropped >= 1  # the answer for the first phrase came too late and was not shown
    assert not any("Aorta" in line for line in _lines(widget))
    assert "Liver ('the big organ under the right ribs', clip 0.92)" in widget.resolved_label.text()
    assert widget.run_panel.request.resolve()[0].key == "liver"


@pytest.mark.shared
def test_clip_absent_and_offline_refuses_with_one_note_and_names_still_work(
    make_napari_viewer, qtbot, shared_path, weights, notes, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("CDPDNET_OFFLINE", "1")
    segmenter = Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False)  # clip="auto"
    viewer = make_napari_viewer()
    _open_small_ct(viewer, shared_path)
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    view = widget.understanding
    qtbot.waitUntil(lambda: "not downloaded" in widget.weights_panel.clip_label.text(), timeout=10_000)

    widget.text_edit.setText(PHRASE)
    qtbot.waitUntil(lambda: not view.note_label.isHidden(), timeout=20_000)
    assert NOTE in view.note_label.text() and "CDPDNET_OFFLINE=1" in view.note_label.text()
    assert view.download_button.isHidden()  # offline: nothing to offer
    assert "not resolved" in widget.resolved_label.text() and NOTE not in widget.resolved_label.text()
    assert (PHRASE, "aorta") in view.choices  # the lexicon's nearest, clickable
    widget.run_button.click()
    assert not widget.is_running
    assert notes["error"][-1].count(NOTE) == 1 and "not one of the 32" in notes["error"][-1]

    widget.text_edit.setText("liver, IVC, Milz")  # names the lexicon knows: no note, no error
    qtbot.waitUntil(lambda: "Spleen (" in widget.resolved_label.text(), timeout=5000)
    assert view.note_label.isHidden()
    assert any("[language: German]" in line for line in _lines(widget))


@pytest.mark.shared
@pytest.mark.slow
def test_clip_absent_but_downloadable_is_fetched_on_first_need_with_progress(
    make_napari_viewer, qtbot, shared_path, weights, notes, monkeypatch, tmp_path: Path
) -> None:
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    from napari_cdpdnet.weights.store import read_manifest

    tiny = tiny_clip_files(tmp_path / "tiny")
    monkeypatch.setattr("napari_cdpdnet.model.text.CLIP_ARCH", TINY_ARCH)
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    for var in ("CDPDNET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    served: list[str] = []

    def fake_hub(repo_id: str, filename: str, revision: str, dest: Path, progress) -> None:
        served.append(f"{repo_id}/{filename}")
        data = tiny.read_bytes()
        with open(dest, "wb") as fh:
            for i in range(0, len(data), 1 << 18):
                fh.write(data[i:i + (1 << 18)])
                if progress:
                    progress(min(i + (1 << 18), len(data)), len(data), filename)

    monkeypatch.setattr("napari_cdpdnet.weights.download.hf_downloader", fake_hub)
    segmenter = Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False)
    viewer = make_napari_viewer()
    _open_small_ct(viewer, shared_path)
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    view = widget.understanding

    widget.text_edit.setText(PHRASE)
    qtbot.waitUntil(lambda: not view.download_button.isHidden(), timeout=20_000)
    assert served == []  # the dock never downloads on its own
    progress: list[tuple[int, int, str]] = []
    widget.download_progressed.connect(lambda d, t, n: progress.append((d, t, n)))
    view.download_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled() and view.note_label.isHidden(), timeout=30_000)
    assert served == ["timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors"]
    assert progress and progress[-1][0] == progress[-1][1] == tiny.stat().st_size
    cached = tmp_path / "cache" / "weights" / "clip-vit-b-32" / "open_clip_model.safetensors"
    assert cached.read_bytes() == tiny.read_bytes()
    assert read_manifest(cached.parent.parent)["clip-vit-b-32/open_clip_model.safetensors"]["sha256"]
    # the phrase is matched again, now by CLIP (a random tiny model: its ranking is shown, and
    # at the default thresholds it is not trusted)
    request = widget.run_panel.request
    qtbot.waitUntil(lambda: request._outcome is not None and request._outcome.key == (PHRASE,), timeout=30_000)
    outcome = request._outcome
    assert outcome.refusal is None or outcome.refusal.clip is not None
    assert notes["error"] == []
    qtbot.waitUntil(lambda: "ready" in widget.weights_panel.clip_label.text(), timeout=10_000)
