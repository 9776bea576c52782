"""Presets live in one list (inference.settings.PRESETS): every face offers exactly those."""

from __future__ import annotations

import argparse
import os

import pytest

from napari_cdpdnet.cli import build_parser
from napari_cdpdnet.inference.settings import PRESETS, Preset, SegmentationSettings

#: A preset added the way a maintainer would: one entry in PRESETS, nothing else.
EXTRA = Preset("careful", 0.75, False, "overlap 0.75: more windows, smoother seams")


def _preset_choices(command: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return list(next(a for a in parser._actions if a.dest == "preset").choices)


@pytest.mark.parametrize("command", ["segment", "segment-by-example", "train-roi-prompts"])
def test_a_preset_added_in_one_place_is_offered_by_every_command(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _preset_choices(command) == list(PRESETS)
    monkeypatch.setitem(PRESETS, EXTRA.name, EXTRA)
    assert _preset_choices(command) == [*PRESETS]
    assert "careful" in _preset_choices(command)
    settings = SegmentationSettings(preset="careful")
    assert settings.effective_overlap == 0.75 and not settings.effective_skip_air


@pytest.mark.gui
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (run under xvfb-run)")
def test_the_dock_offers_the_same_presets_as_the_cli(
    make_napari_viewer, qtbot, segmenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gui_support import add_segmentation_dock

    monkeypatch.setitem(PRESETS, EXTRA.name, EXTRA)
    widget = add_segmentation_dock(make_napari_viewer(), qtbot, segmenter)
    combo = [widget.preset_combo.itemText(i) for i in range(widget.preset_combo.count())]
    assert combo == _preset_choices("segment") == list(PRESETS)
    assert "careful" in widget.preset_combo.toolTip()
