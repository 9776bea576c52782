"""Training config: defaults, folder patterns, label tables (reviewed = labelled) and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.export.labeltable import build_label_table, write_label_table
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import write_label_map
from napari_cdpdnet.training.config import default_task_for, load_config, parse_config


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    g = Geometry.identity((4, 5, 6), (2.0, 2.0, 2.0))
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1:3, 1:3, 1:3] = 6
    lab[0, 0, 0] = 1
    for n in ("a", "b"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "lab").mkdir(exist_ok=True)
        write_label_map(tmp_path / "img" / f"{n}.nii.gz", lab, g)  # content irrelevant here
        write_label_map(tmp_path / "lab" / f"{n}.nii.gz", lab, g)
    rows = build_label_table(lab, g, reviewed=[6])
    write_label_table(tmp_path / "lab" / "a.csv", rows)
    return tmp_path


def _base(**over) -> dict:
    d = {"output_dir": "out", "datasets": [{"name": "x", "labelled": ["liver"],
                                            "cases": [{"image": "img/a.nii.gz", "label": "lab/a.nii.gz"}]}]}
    d.update(over)
    return d


def test_defaults_are_the_official_recipe(files: Path) -> None:
    cfg = parse_config(_base(), files)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs) == (4e-4, 1e-5, 50, 1000)
    assert (cfg.crop, cfg.samples_per_volume, cfg.batch_size, cfg.spacing) == (96, 2, 1, 1.5)
    assert cfg.init is None and cfg.loss == "partial" and cfg.uniform_sample
    ds = cfg.datasets[0]
    assert ds.cases[0].labelled == {6}
    assert ds.label_values[6] == 6  # default numbering: CDPDNet structure indices
    assert ds.task == 2  # the smallest task label set covering the liver: CHAOS (liver only)
    assert cfg.output_dir == files / "out"


def test_default_task() -> None:
    assert default_task_for({1}) == 6  # spleen: AbdomenCT-1K (5 structures) before MSD (9)
    assert default_task_for({2, 3, 26}) == 4  # kidneys + kidney tumour: KiTS
    assert default_task_for({6, 1, 20}) == 5  # nothing covers all: WORD covers the most (all three)
    assert default_task_for({6, 30, 20}) == 8  # WORD and MSD cover 2 each: the smaller set (MSD)


def test_folder_pattern_mapping_and_yaml(files: Path) -> None:
    (files / "cfg.yaml").write_text(
        "output_dir: runs/x\nepochs: 3\nwarmup_epochs: 1\ndatasets:\n"
        "  - name: site\n    images: img/*.nii.gz\n    labels: lab/{name}.nii.gz\n"
        "    labelled: [liver, spleen]\n    label_values: {6: liver, 1: spleen}\n    task: amos\n"
    )
    cfg = load_config(files / "cfg.yaml")
    assert [c.image.name for c in cfg.datasets[0].cases] == ["a.nii.gz", "b.nii.gz"]
    assert cfg.datasets[0].label_values == {6: 6, 1: 1}
    assert cfg.datasets[0].task == 7
    assert cfg.output_dir == files / "runs" / "x"


def test_label_table_reviewed_column_defines_the_labelled_set(files: Path) -> None:
    d = _base()
    d["datasets"][0]["cases"][0]["label_table"] = "lab/a.csv"
    del d["datasets"][0]["labelled"]
    cfg = parse_config(d, files)
    assert cfg.datasets[0].cases[0].labelled == {6}  # liver reviewed, spleen (value 1) not


def test_json_config(files: Path) -> None:
    (files / "c.json").write_text(json.dumps(_base(loss="naive", model="tiny")))
    cfg = load_config(files / "c.json")
    assert cfg.loss == "naive" and cfg.model == "tiny"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(epoch=3), r"top level: unknown key\(s\) \['epoch'\]"),
        (lambda d: d.pop("datasets"), "datasets: missing"),
        (lambda d: d.update(lr=-1), "lr: must be > 0"),
        (lambda d: d.update(epochs="ten"), "epochs: expected a whole number"),
        (lambda d: d.update(warmup_epochs=2000), "warmup_epochs: 2000 is more than epochs=1000"),
        (lambda d: d.update(crop=128), "crop: at most 96"),
        (lambda d: d.update(loss="focal"), 'loss: expected "partial" or "naive"'),
        (lambda d: d.update(init="missing.pth"), "init: .*missing.pth does not exist"),
        (lambda d: d["datasets"][0].pop("labelled"), r"datasets\[0\].cases\[0\]: which structures are labelled"),
        (lambda d: d["datasets"][0].update(labelled=["livr"]), r"datasets\[0\].labelled\[0\]: 'livr' is not a CDPDNet"),
        (lambda d: d["datasets"][0]["cases"][0].update(label="nope.nii.gz"), r"cases\[0\].label: .*nope.nii.gz does not exist"),
        (lambda d: d["datasets"][0].update(label_values={1: "spleen"}), r"labelled structure\(s\) \[6\] have no value"),
        (lambda d: d["datasets"][0].update(label_values={0: "liver"}), "label values must be > 0"),
        (lambda d: d["datasets"][0].update(task=11), r"datasets\[0\].task: unknown task 11"),
        (lambda d: d["datasets"][0].update(images="img/*.nii.gz"), "either 'cases' or 'images'"),
        (lambda d: d.update(datasets=[d["datasets"][0], d["datasets"][0]]), "names must be unique"),
    ],
)
def test_errors_name_the_key(files: Path, change, message: str) -> None:
    d = _base()
    change(d)
    with pytest.raises(InputError, match=message):
        parse_config(d, files)


def test_bad_files(files: Path) -> None:
    (files / "bad.yaml").write_text("datasets: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(files / "bad.yaml")
    with pytest.raises(InputError, match="does not exist"):
        load_config(files / "nothing.yaml")
    (files / "t.csv").write_text("value,key\n6,liver\n")
    d = _base()
    d["datasets"][0]["label_table"] = "t.csv"
    del d["datasets"][0]["labelled"]
    with pytest.raises(InputError, match=r"missing column\(s\) \['reviewed'\]"):
        parse_config(d, files)
