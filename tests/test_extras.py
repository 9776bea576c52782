"""Optional extras: declared in pyproject, and a missing package names the extra to install.

Each test makes one package unimportable (``sys.modules[name] = None``, what the import system
reads as "not installed") and runs the feature that needs it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.extras import import_extra

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "napari_cdpdnet"


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_every_extra_named_in_the_code_is_declared_and_kept_out_of_the_base_install() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    named = {
        m.group(1)
        for path in PACKAGE.rglob("*.py")
        for m in re.finditer(r'import_extra\(\s*"[^"]+",\s*"(\w+)"', path.read_text(encoding="utf-8"))
    }
    assert named == {"train", "clip"}
    assert {"train", "clip"} <= set(extras)
    # what the scripts install (setup.sh: [all]; tests/run.sh: [all,testing]) includes both
    for bundle in ("all", "testing"):
        assert "napari-cdpdnet[train,clip]" in extras[bundle]
    base = " ".join(project["dependencies"]).lower()
    for name in ("monai", "open_clip", "matplotlib", "pyyaml"):
        assert name not in base


def test_import_extra_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert import_extra("json", "train", "anything") is json
    _missing(monkeypatch, "monai")
    with pytest.raises(InputError, match=r"training needs monai.*pip install 'napari-cdpdnet\[train\]'"):
        import_extra("monai", "train", "training")


def test_clip_without_open_clip_names_the_clip_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from napari_cdpdnet.model.text import ClipScorer, load_clip_text_tower
    from napari_cdpdnet.vocabulary.resolver import resolve

    _missing(monkeypatch, "open_clip")
    with pytest.raises(InputError, match=r"pip install 'napari-cdpdnet\[clip\]'"):
        load_clip_text_tower()
    scorer = ClipScorer()
    assert resolve("liver", clip_scorer=scorer).method == "exact"  # names need no CLIP
    with pytest.raises(InputError, match=r"napari-cdpdnet\[clip\]"):
        resolve("zzqv blob", clip_scorer=scorer)
    assert main(["structures", "--resolve", "zzqv blob", "--clip"]) == InputError.exit_code
    err = capsys.readouterr().err
    assert "cdpdnet structures: error:" in err and "pip install 'napari-cdpdnet[clip]'" in err


def test_train_without_monai_names_the_train_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_image, write_label_map

    g = Geometry((3.0, 3.0, 3.0), (0.0, 0.0, 0.0), np.eye(3).ravel(), (8, 8, 8))
    write_image(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16), g)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:5, 2:5, 2:5] = 6
    write_label_map(tmp_path / "lab.nii.gz", lab, g)
    config = {
        "output_dir": str(tmp_path / "run"), "model": "tiny", "epochs": 1, "warmup_epochs": 0,
        "datasets": [{"name": "one", "labelled": ["liver"], "cases": [
            {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}]}],
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    (tmp_path / "train.yaml").write_text(json.dumps(config))  # JSON is valid YAML
    _missing(monkeypatch, "monai", "yaml")
    assert main(["train", "--config", str(tmp_path / "train.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cdpdnet train: error: training (cdpdnet train) needs monai" in err
    assert "pip install 'napari-cdpdnet[train]'" in err
    assert not (tmp_path / "run" / "latest.pth").exists()
    assert main(["train", "--config", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    assert "YAML training config" in err and "pip install 'napari-cdpdnet[train]'" in err


def test_evaluate_plot_without_matplotlib_refuses_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_label_map

    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3).ravel(), (6, 6, 6))
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:4, 1:4, 1:4] = 6
    write_label_map(tmp_path / "ref.nii.gz", lab, g)
    _missing(monkeypatch, "matplotlib")
    args = ["evaluate", "--pred", str(tmp_path / "ref.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz"),
            "-o", str(tmp_path / "s.csv")]
    assert main([*args, "--plot", str(tmp_path / "s.png")]) == 2
    assert "pip install 'napari-cdpdnet[train]'" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    assert main(args) == 0  # scores alone need no extra
    assert (tmp_path / "s.csv").is_file()
