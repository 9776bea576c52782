"""Segment by example without a learned mapper: ROIs, probability dominance, restriction, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from roi_support import flipped

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.example.ranking import (
    FALLBACK_METHOD,
    crop_around,
    crop_geometry,
    rank_by_probability,
    restrict,
)
from napari_cdpdnet.geometry import Geometry


def _maps(shape=(20, 30, 40)) -> dict[int, np.ndarray]:
    """Liver (6) high on the left half of x, spleen (1) high on the right, kidney (3) a small blob."""
    liver = np.zeros(shape, np.float32)
    spleen = np.zeros(shape, np.float32)
    kidney = np.zeros(shape, np.float32)
    liver[:, :, :20] = 0.9
    spleen[:, :, 20:] = 0.8
    kidney[8:12, 12:18, 25:31] = 0.95
    spleen[8:12, 12:18, 25:31] = 0.1
    return {6: liver, 1: spleen, 3: kidney}


def test_box_click_scribble_rankings() -> None:
    maps = _maps()
    r = rank_by_probability(maps, ROI.box((2, 2, 2), (15, 25, 15)))
    assert r.method == FALLBACK_METHOD
    assert [c.structure.index for c in r.candidates] == [6, 1, 3]
    assert r.best.confidence > 0.7 and r.best.score == pytest.approx(0.9)
    assert sum(c.confidence for c in r.candidates) <= 1.0 + 1e-9

    # A click in the kidney blob: the kidney wins although the spleen is non-zero there.
    r = rank_by_probability(maps, ROI.click((10, 15, 28)))
    assert r.best.structure.key == "left_kidney" and r.top(2)[1].structure.key == "spleen"

    # A box mostly over the spleen with a liver strip at its edge: the centre weighting matters.
    r = rank_by_probability(maps, ROI.box((0, 0, 17), (19, 29, 30)))
    assert r.best.structure.key == "spleen"

    # A scribble across the boundary, mostly in the liver.
    pts = [(5, 5, x) for x in range(10, 24)]
    r = rank_by_probability(maps, ROI.scribble(pts))
    assert r.best.structure.key == "liver"
    assert "liver" in r.describe().lower() or "Liver" in r.describe()


def test_background_roi_has_low_confidence() -> None:
    maps = {k: np.zeros((10, 10, 10), np.float32) for k in (1, 2)}
    maps[1][0, 0, 0] = 1.0
    r = rank_by_probability(maps, ROI.box((0, 0, 0), (9, 9, 9)))
    assert r.best.confidence < 0.05 and "background" in r.note


def test_rank_refuses_bad_input() -> None:
    with pytest.raises(InputError, match="no probability maps"):
        rank_by_probability({}, ROI.click((0, 0, 0)))
    with pytest.raises(InputError, match="different shapes"):
        rank_by_probability({1: np.zeros((2, 2, 2)), 2: np.zeros((3, 3, 3))}, ROI.click((0, 0, 0)))
    with pytest.raises(InputError, match="outside"):
        rank_by_probability(_maps(), ROI.click((50, 0, 0)))
    with pytest.raises(InputError, match="outside"):
        ROI.box((30, 40, 50), (35, 45, 55)).check((20, 30, 40))


def test_restrict_keeps_touched_components() -> None:
    mask = np.zeros((10, 20, 20), bool)
    mask[2:5, 2:6, 2:6] = True  # component A
    mask[2:5, 12:16, 12:16] = True  # component B
    out, touched = restrict(mask, ROI.click((3, 3, 3)))
    assert touched and out.sum() == 48 and not out[3, 13, 13]
    out, touched = restrict(mask, ROI.box((0, 0, 0), (9, 19, 19)))
    assert touched and np.array_equal(out, mask)
    out, touched = restrict(mask, ROI.scribble([(3, 14, 14), (3, 15, 15)]))
    assert touched and out[3, 13, 13] and not out[3, 3, 3]
    # Near B but touching nothing: B is kept (nearest), or nothing.
    out, touched = restrict(mask, ROI.click((3, 17, 17)))
    assert not touched and out[3, 13, 13] and not out[3, 3, 3]
    out, touched = restrict(mask, ROI.click((3, 17, 17)), nearest=False)
    assert not touched and not out.any()


def test_nearest_component_uses_millimetres() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[0, 5, 5] = True  # 5 slices away along z
    mask[5, 5, 0] = True  # 5 voxels away along x
    g = Geometry((1.0, 1.0, 5.0), (0, 0, 0), tuple(np.eye(3).ravel()), mask.shape)  # z slices are 5 mm
    out, _ = restrict(mask, ROI.click((5, 5, 5)), geometry=g)
    assert out[5, 5, 0] and not out[0, 5, 5]


def test_mm_rois_follow_patient_space() -> None:
    """The same LPS box/click selects the same tissue on a flipped grid."""
    g = Geometry((2.0, 1.0, 3.0), (10.0, -20.0, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (12, 16, 20))
    tissue = np.zeros(g.shape, np.int16)
    tissue[4:7, 5:9, 6:12] = 1
    ft, fg = flipped(tissue, g, (1, 2))
    a, b = g.index_to_world(np.array([4, 5, 6])), g.index_to_world(np.array([6, 8, 11]))
    for arr, geom in ((tissue, g), (ft, fg)):
        roi = ROI.box_mm(a, b, geom)
        assert roi.mask(geom.shape).sum() == 3 * 4 * 6 and arr[roi.mask(geom.shape)].all()
        click = ROI.click_mm(g.index_to_world(np.array([5, 6, 7])), geom)
        assert arr[tuple(click.points[0])] == 1


def test_crop_around_and_crop_geometry() -> None:
    g = Geometry((1.0, 2.0, 4.0), (3.0, 4.0, 5.0), (0, -1, 0, 1, 0, 0, 0, 0, 1), (30, 40, 50))
    roi = ROI.box((10, 10, 10), (12, 14, 16))
    crop = crop_around(roi, g, 8.0)
    assert crop == (slice(8, 15), slice(6, 19), slice(2, 25))
    cg = crop_geometry(g, crop)
    np.testing.assert_allclose(cg.index_to_world(np.array([1.0, 2.0, 3.0])),
                               g.index_to_world(np.array([9.0, 8.0, 5.0])))
    shifted = roi.shifted([c.start for c in crop])
    assert np.array_equal(shifted.mask(cg.shape), roi.mask(g.shape)[crop])


# --------------------------------------------------------------------------- CLI, tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shared_path) -> dict[str, Path]:
    """Tiny official-format weights and a small real CT crop (one model window per pass)."""
    from model_support import write_tiny_weights

    from napari_cdpdnet.io import read_ct, write_image

    folder = tmp_path_factory.mktemp("roi-cli")
    ckpt, dino, _ = write_tiny_weights(folder / "weights")
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))
    crop = (slice(0, 30), slice(30, 70), slice(40, 80))
    path = write_image(folder / "ct_crop.nii.gz", ct.array[crop], crop_geometry(ct.geometry, crop))
    return {"ckpt": ckpt, "dino": dino, "ct": path, "dir": folder}


def _run(tiny, *args: str) -> int:
    from napari_cdpdnet.cli import main

    return main(["segment-by-example", str(tiny["ct"]), *args, "--checkpoint", str(tiny["ckpt"]),
                 "--dino", str(tiny["dino"]), "--offline", "--no-progress", "--threads", "2"])


@pytest.mark.slow
@pytest.mark.shared
def test_cli_click_writes_one_structure_touching_the_roi(tiny, tmp_path: Path, capsys) -> None:
    from napari_cdpdnet.io.images import read_ct, read_label_map
    from napari_cdpdnet.vocabulary.catalog import STRUCTURES

    out = tmp_path / "example.nii.gz"
    assert _run(tiny, "--voxel", "--click", "20", "20", "15", "-o", str(out)) == 0
    text = capsys.readouterr().out
    assert f"method: {FALLBACK_METHOD}" in text
    lines = [ln for ln in text.splitlines() if ln.strip()[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3
    confidences = [float(ln.rsplit("confidence", 1)[1]) for ln in lines]
    assert confidences == sorted(confidences, reverse=True)
    best_key = lines[0].split("(")[1].split(")")[0]
    best = next(s for s in STRUCTURES if s.key == best_key)
    labels, geom = read_label_map(out)
    assert geom.same_grid(read_ct(tiny["ct"]).geometry)
    assert set(np.unique(labels)) <= {0, best.index}
    if labels.any():  # every kept component touches the click, or the nearest was kept (noted)
        kept, touched = restrict(labels, ROI.click((15, 20, 20)), nearest=False)
        assert touched or "nearest" in capsys.readouterr().err
        if touched:
            assert np.array_equal(kept, labels > 0)
    assert out.with_name("example.csv").exists()


def test_cli_refuses_before_compute(tiny, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine.nii.gz"
    mine.write_bytes(b"keep me")
    assert _run(tiny, "--voxel", "--click", "1", "1", "1", "-o", str(mine)) == 3
    assert mine.read_bytes() == b"keep me"
    assert _run(tiny, "--voxel", "--click", "500", "1", "1", "-o", str(tmp_path / "o.nii.gz")) == 2
    assert "outside the image" in capsys.readouterr().err
    assert _run(tiny, "--click", "1", "1", "1", "-o", str(tmp_path / "o.txt")) == 2
    assert not (tmp_path / "o.nii.gz").exists()


class _IntensityOracle:
    """A stand-in network whose outputs follow the windowed intensity (0 = −175 HU, 1 = 250 HU):
    air → lung tumour (a channel without largest-component post-processing, so the lung is not
    dropped in favour of the outside air), soft tissue → liver, bone → right femoral head. It makes
    the whole chain (crop, resampling to 1.5 mm, windows, inversion, ROI lookup) checkable on a
    real CT."""

    def __new__(cls):
        import torch

        class Oracle(torch.nn.Module):
            def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
                out = torch.full((x.shape[0], 32, *x.shape[2:]), -10.0)
                v = x[:, 0]
                out[:, 29] = torch.where(v < 0.05, 10.0, -10.0)  # lung tumour (30)
                out[:, 5] = torch.where((v > 0.4) & (v < 0.7), 10.0, -10.0)  # liver (6)
                out[:, 23] = torch.where(v > 0.95, 10.0, -10.0)  # right femoral head (24)
                return out

        return Oracle()


@pytest.mark.shared
def test_fallback_chain_lines_up_on_a_real_ct(shared_path) -> None:
    """Clicks in lung and liver of the real scan find the oracle's air and soft-tissue channels,
    on the scan's own grid and on a flipped grid of the same patient."""
    from napari_cdpdnet.example.run import segment_by_example
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.io.images import read_ct, read_label_map

    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))
    seg, _ = read_label_map(shared_path("data", "totalsegmentator", "example_seg.nii.gz"))
    lung = np.argwhere(seg == 14)
    lung_voxel = lung[np.argmin(ct.array[tuple(lung.T)])]  # the darkest right-lower-lobe voxel
    liver = np.argwhere((seg == 5) & (np.abs(ct.array - 50) < 20))
    liver_voxel = liver[len(liver) // 2]
    segmenter = Segmenter(module=_IntensityOracle())
    settings = SegmentationSettings(preset="fast", device="cpu")
    fct, fg = flipped(ct.array, ct.geometry, (1, 2))
    for voxel, key in ((lung_voxel, "lung_tumor"), (liver_voxel, "liver")):
        world = ct.geometry.index_to_world(voxel.astype(float))
        for array, geom in ((ct.array, ct.geometry), (fct, fg)):
            roi = ROI.click_mm(world, geom)
            res = segment_by_example(segmenter, array, geom, roi, settings, context_mm=60)
            assert res.ranking.best.structure.key == key, (key, res.ranking.describe())
            assert res.ranking.best.confidence > 0.8 and res.ranking.method == FALLBACK_METHOD
            assert res.touched and res.mask[tuple(roi.points[0])]
            words = ("air-filled", "partly air-filled") if key == "lung_tumor" else ("soft-tissue density",)
            assert any(w in res.prompt for w in words), res.prompt
            assert "patient's right" in res.prompt, res.prompt  # liver; label 14 = right lower lobe
