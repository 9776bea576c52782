"""Training samples: image/target alignment through the MONAI chain, label remapping, masks, samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import write_image, write_label_map
from napari_cdpdnet.training.config import parse_config
from napari_cdpdnet.training.data import UniformDataset, build_dataset


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An oblique-free but LPS-flipped 3 mm CT with a liver (value 2) holding a tumour (value 3)."""
    root = tmp_path_factory.mktemp("data")
    g = Geometry((3.0, 2.0, 4.0), (10.0, -20.0, 5.0), np.diag([1.0, -1.0, 1.0]).ravel(), (30, 36, 40))
    ct = np.full((30, 36, 40), -1000, np.int16)
    ct[3:27, 4:32, 4:36] = 0  # body
    lab = np.zeros(ct.shape, np.uint8)
    lab[8:20, 8:20, 6:18] = 2  # liver
    lab[12:16, 12:16, 10:14] = 3  # tumour
    lab[8:20, 22:30, 24:32] = 7  # something not labelled
    ct[lab == 2] = 100
    ct[lab == 3] = 200
    ct[lab == 7] = 30
    write_image(root / "ct.nii.gz", ct, g)
    write_label_map(root / "lab.nii.gz", lab, g)
    return root


def _cfg(case: Path, labelled: list[str], **over):
    d = {"output_dir": str(case / "out"), "spacing": 3.0, "crop": 32, "samples_per_volume": 3,
         "datasets": [{"name": "d", "labelled": labelled,
                       "label_values": {2: "liver", 3: "liver_tumor", 7: "stomach"},
                       "cases": [{"image": str(case / "ct.nii.gz"), "label": str(case / "lab.nii.gz")}]}]}
    d.update(over)
    return parse_config(d)


@pytest.mark.parametrize("labelled", [["liver"], ["liver", "liver_tumor"]])
def test_samples_are_aligned_remapped_and_masked(case: Path, labelled: list[str]) -> None:
    cfg = _cfg(case, labelled)
    ds = build_dataset(cfg.datasets[0], cfg)
    torch.manual_seed(0)
    samples = ds[0]
    assert len(samples) == 3
    window = lambda hu: (hu + 175) / 425  # noqa: E731
    checked_liver = checked_tumour = 0
    for s in samples:
        assert tuple(s["image"].shape) == (1, 96, 96, 96)  # 32³ crop padded to the 96³ patch
        assert s["target"].shape == (32, 96, 96, 96) and s["target"].dtype == torch.uint8
        want = {5} | ({26} if "liver_tumor" in labelled else set())
        assert set(s["labelled"].nonzero().reshape(-1).tolist()) == want
        assert s["task_id"] == cfg.datasets[0].task
        img = s["image"][0]
        # the unlabelled stomach (7) and, when not labelled, the tumour are dropped from the target
        assert s["target"][6].sum() == 0
        liver = s["target"][5].bool()
        if liver.any():  # intensity shift is at most ±0.1; nearest/bilinear edges are excluded
            core = torch.nn.functional.max_pool3d((~liver)[None, None].float(), 3, 1, 1)[0, 0] == 0
            if core.any():
                assert abs(float(img[core].median()) - window(100)) < 0.11
                checked_liver += 1
        tumour = s["target"][26].bool()
        if "liver_tumor" not in labelled:
            assert not tumour.any()
        elif tumour.any():
            assert abs(float(img[tumour].max()) - window(200)) < 0.11
            checked_tumour += 1
        # one label per voxel: the tumour is not also liver
        assert not (liver & tumour).any()
    assert checked_liver >= 1  # positive-centred crops (2 of 3 on average) contain the liver
    assert checked_tumour >= ("liver_tumor" in labelled)


def test_tumour_datasets_use_the_class_sampler(case: Path) -> None:
    from monai.transforms import RandCropByLabelClassesd, RandCropByPosNegLabeld

    with_tumour = build_dataset(_cfg(case, ["liver", "liver_tumor"]).datasets[0], _cfg(case, ["liver"]))
    organs = build_dataset(_cfg(case, ["liver"]).datasets[0], _cfg(case, ["liver"]))
    assert any(isinstance(t, RandCropByLabelClassesd) for t in with_tumour.transform.transforms)
    assert any(isinstance(t, RandCropByPosNegLabeld) for t in organs.transform.transforms)


def test_uniform_dataset_alternates_datasets() -> None:
    parts = [[("a", i) for i in range(5)], [("b", 0)]]
    ds = UniformDataset(parts)
    assert len(ds) == 6
    assert [ds[i][0] for i in range(6)] == ["a", "b", "a", "b", "a", "b"]
