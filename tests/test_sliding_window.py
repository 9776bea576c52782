"""Sliding-window inference: equal to MONAI with the official map, plus progress, cancel, ROI and air skip."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cdpdnet.errors import Cancelled, InputError
from napari_cdpdnet.inference.sliding_window import (
    EtaEstimator,
    importance_map,
    plan_windows,
    sliding_window,
    window_starts,
)

torch = pytest.importorskip("torch")

RAMP = torch.linspace(-1.0, 1.0, 96)


def make_predictor(n_channels: int = 32):
    """Deterministic, window-dependent logits: voxel value, window mean, position in the window, task."""
    c = torch.arange(n_channels, dtype=torch.float32).view(1, n_channels, 1, 1, 1)

    def predictor(x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        return _logits(x, task_id, c)

    return predictor


def _logits(x: torch.Tensor, task_id: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # float64 mean: the same value whether MONAI passes a strided view or a packed copy
    mean = x.double().mean(dim=(1, 2, 3, 4), keepdim=True).float()
    return (x * (c + 1) + mean * c - RAMP.view(1, 1, 96, 1, 1) * c
            + RAMP.view(1, 1, 1, 1, 96) + task_id.view(-1, 1, 1, 1, 1).float())


fake_predictor = make_predictor(32)
small_predictor = make_predictor(8)  # cheaper, for tests that need no channel selection from 32


class Counting:
    """Wraps a predictor and counts the windows it sees."""

    def __init__(self, fn=small_predictor) -> None:
        self.fn = fn
        self.windows = 0
        self.calls = 0

    def __call__(self, x, task_id):
        self.calls += 1
        self.windows += x.shape[0]
        return self.fn(x, task_id)


def monai_reference(image: np.ndarray, task: int, batch: int = 2, overlap: float = 0.5) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    def predictor(x):
        return fake_predictor(x, torch.full((x.shape[0],), task, dtype=torch.int64))

    return sliding_window_inference(torch.from_numpy(image)[None, None], (96, 96, 96), batch, predictor,
                                    overlap=overlap, mode="gaussian", roi_weight_map=importance_map())[0]


def test_importance_map_is_monai_09s_gaussian() -> None:
    """MONAI 0.9: GaussianFilter (erf kernel, σ = 12) of a delta at 48, max 1, clamped at 1e-3."""
    from monai.networks.layers import GaussianFilter

    delta = torch.zeros(96, 96, 96)
    delta[48, 48, 48] = 1.0
    ref = GaussianFilter(3, [12.0] * 3)(delta[None, None])[0, 0]
    ref = (ref / ref.max()).float()
    ref = torch.clamp(ref, min=max(ref[ref != 0].min().item(), 1e-3))
    w = importance_map()
    assert torch.equal(w, ref)
    assert w[48, 48, 48] == 1.0 and w.argmax().item() == (48 * 96 + 48) * 96 + 48
    assert w.min().item() == pytest.approx(1e-3)
    # and it is the discrete erf Gaussian of SPEC §11
    from scipy.special import erf

    i = np.arange(96)
    g = 0.5 * (erf((i - 48 + 0.5) / (12 * np.sqrt(2))) - erf((i - 48 - 0.5) / (12 * np.sqrt(2))))
    g /= g.max()
    expected = np.maximum(g[:, None, None] * g[None, :, None] * g[None, None, :], 1e-3)
    np.testing.assert_allclose(w.numpy(), expected, rtol=5e-4)  # float32 erf in the tails


@pytest.mark.parametrize("size", [96, 97, 130, 144, 250, 40])
@pytest.mark.parametrize("overlap", [0.5, 0.25, 0.0])
def test_window_starts_match_monai(size: int, overlap: float) -> None:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = max(size, 96)
    interval = _get_scan_interval((padded,), (96,), 1, (overlap,))
    ref = [s[0].start for s in dense_patch_slices((padded,), (96,), interval)]
    assert window_starts(padded, 96, overlap) == ref
    if size == 250 and overlap == 0.5:
        assert ref == [0, 48, 96, 144, 154]  # SPEC §11 example


@pytest.mark.parametrize(("shape", "batch"), [((150, 97, 96), 3), ((110, 70, 96), 1)])
def test_equals_monai_sliding_window_on_selected_channels(shape, batch) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    channels = [5, 0, 31, 10]
    out = sliding_window(image, fake_predictor, 3, channels, sw_batch_size=batch)
    ref = monai_reference(image, 3, batch=batch)
    assert out.channels == tuple(channels)
    assert out.region == tuple(slice(0, n) for n in shape)
    assert out.logits.shape == (4, *shape)
    assert torch.equal(out.logits, ref[channels])


def test_progress_reports_every_batch() -> None:
    image = np.random.default_rng(1).random((150, 97, 96), dtype=np.float32)
    seen: list[tuple[int, int]] = []
    out = sliding_window(image, small_predictor, 0, [1], sw_batch_size=4,
                         progress=lambda done, total: seen.append((done, total)))
    assert out.windows == 3 * 2 * 1
    assert seen == [(0, 6), (4, 6), (6, 6)]


def test_cancel_takes_effect_within_one_window() -> None:
    image = np.random.default_rng(2).random((150, 97, 96), dtype=np.float32)
    predictor = Counting()
    with pytest.raises(Cancelled, match="after 3 of"):
        sliding_window(image, predictor, 0, [0], sw_batch_size=1,
                       should_stop=lambda: predictor.windows >= 3)
    assert predictor.windows == 3  # no window started after the request


def test_roi_runs_only_covering_windows_and_keeps_their_values() -> None:
    image = np.random.default_rng(3).random((200, 150, 100), dtype=np.float32)
    full = sliding_window(image, small_predictor, 1, [2, 7])
    box = (slice(10, 40), slice(120, 130), slice(60, 70))
    plan = plan_windows(image.shape, box=box)
    predictor = Counting()
    part = sliding_window(image, predictor, 1, [2, 7], plan=plan)
    # starts: axis 0 (0, 48, 96, 104), axis 1 (0, 48, 54), axis 2 (0, 4)
    assert plan.total == full.windows == 4 * 3 * 2
    assert predictor.windows == part.windows == plan.count == 1 * 2 * 2
    # buffers span only the covering windows
    assert part.region == (slice(0, 96), slice(48, 150), slice(0, 100))
    assert part.logits.shape == (2, 96, 102, 100)
    # inside the ROI every covering window ran, so values equal the full run bit for bit
    local = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, part.region, strict=True))
    assert torch.equal(part.logits[(slice(None), *local)], full.logits[(slice(None), *box)])


def test_air_windows_are_skipped() -> None:
    image = np.zeros((200, 97, 96), dtype=np.float32)
    image[:60] = np.random.default_rng(4).random((60, 97, 96), dtype=np.float32)
    plan = plan_windows(image.shape, image=image, skip_air=True)
    full = plan_windows(image.shape)
    # windows along axis 0 start at 0, 48, 96, 104: only the first two see tissue
    assert full.count == 4 * 2 * 1 and plan.count == 2 * 2 * 1
    predictor = Counting()
    out = sliding_window(image, predictor, 0, [0, 3], plan=plan)
    assert predictor.windows == 4
    assert out.region == (slice(0, 144), slice(0, 97), slice(0, 96))
    ref = sliding_window(image, small_predictor, 0, [0, 3])
    # voxels no skipped window covers keep their exact value; the rest of the region is blended
    # from fewer windows
    assert torch.equal(out.logits[:, :48], ref.logits[:, :48])


def test_uncovered_voxels_get_the_fill_value() -> None:
    image = np.zeros((300, 96, 96), dtype=np.float32)
    image[:10] = 0.5
    image[-10:] = 0.5
    plan = plan_windows(image.shape, image=image, skip_air=True)
    assert [s[0] for s in plan.starts] == [0, 204]
    out = sliding_window(image, small_predictor, 0, [4], plan=plan)
    assert torch.isneginf(out.logits[0, 100:200]).all()
    assert torch.isfinite(out.logits[0, :96]).all() and torch.isfinite(out.logits[0, 204:]).all()


def test_bad_predictor_output_and_arguments() -> None:
    image = np.zeros((96, 96, 96), dtype=np.float32)

    def wrong(x, t):
        return torch.zeros(x.shape[0], 32, 48, 48, 48)

    with pytest.raises(RuntimeError, match="expected"):
        sliding_window(image, wrong, 0, [0])
    with pytest.raises(RuntimeError, match="expected"):
        sliding_window(image, lambda x, t: torch.zeros(x.shape[0], 4, 96, 96, 96), 0, [10])
    with pytest.raises(InputError, match="distinct"):
        sliding_window(image, fake_predictor, 0, [1, 1])
    with pytest.raises(InputError, match="3-D"):
        sliding_window(image[0], fake_predictor, 0, [1])
    with pytest.raises(InputError, match="sw_batch_size"):
        sliding_window(image, fake_predictor, 0, [1], sw_batch_size=0)
    with pytest.raises(InputError, match="overlap"):
        plan_windows(image.shape, overlap=1.0)


def test_eta_estimates_from_finished_windows() -> None:
    now = [100.0]
    eta = EtaEstimator(clock=lambda: now[0])
    assert eta.eta(0, 10) is None
    now[0] = 104.0
    assert eta.eta(2, 10) == pytest.approx(16.0)
    assert eta.eta(10, 10) == 0.0
