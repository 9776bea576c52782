"""Label statistics agree with direct per-mask computation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cdpdnet.export.measure import label_statistics
from napari_cdpdnet.geometry import Geometry


def test_statistics_match_per_mask_numpy() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (9, 10, 11)).astype(np.uint8)
    labels[labels == 2] = 0  # value 2 absent
    image = rng.normal(40, 30, labels.shape).astype(np.float32)
    geom = Geometry.identity(labels.shape, spacing=(0.5, 0.8, 2.0))
    stats = {s.value: s for s in label_statistics(labels, geom, image)}
    assert sorted(stats) == [1, 3]
    for v, s in stats.items():
        m = labels == v
        assert s.voxel_count == m.sum()
        assert s.volume_ml == pytest.approx(m.sum() * 0.5 * 0.8 * 2.0 / 1000)
        assert s.hu_mean == pytest.approx(image[m].mean(), rel=1e-6)
        assert s.hu_sd == pytest.approx(image[m].std(), rel=1e-5)
        assert (s.hu_min, s.hu_max) == pytest.approx((image[m].min(), image[m].max()))


def test_requested_values_include_absent_ones_without_density() -> None:
    labels = np.zeros((2, 2, 2), np.uint16)
    labels[0, 0, 0] = 7
    stats = label_statistics(labels, voxel_volume_mm3=1000.0, values=[7, 9])
    assert [(s.value, s.voxel_count, s.volume_ml) for s in stats] == [(7, 1, 1.0), (9, 0, 0.0)]
    assert np.isnan(stats[0].hu_mean)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_cdpdnet.export.measure as measure

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (5, 6, 7))
    image = rng.integers(-1000, 1000, labels.shape).astype(np.int16)
    whole = measure.label_statistics(labels, image=image, voxel_volume_mm3=1.0)
    monkeypatch.setattr(measure, "_CHUNK", 13)
    assert measure.label_statistics(labels, image=image, voxel_volume_mm3=1.0) == whole


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="integer"):
        label_statistics(np.zeros((2, 2, 2), np.float32), voxel_volume_mm3=1)
    with pytest.raises(ValueError, match="shape"):
        label_statistics(np.zeros((2, 2, 2), np.uint8), image=np.zeros((2, 2)), voxel_volume_mm3=1)
    with pytest.raises(ValueError, match="geometry"):
        label_statistics(np.zeros((2, 2, 2), np.uint8))
