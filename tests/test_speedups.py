"""The exact speed-ups of issue 18 change no result: DINO slice cache, matmul kernels, lean calls,
window order bit for bit; the fast norm and the channels-last CNN within float32 round-off;
compile falls back cleanly; fast's reduced precision is chosen per device.
Tiny models only (the full-size figures are benchmarks/bench_model.py's)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.inference import devices
from napari_cdpdnet.inference.settings import SegmentationSettings
from napari_cdpdnet.inference.sliding_window import (
    ordered_by_columns,
    plan_windows,
    set_predictor_compile,
    sliding_window,
)
from napari_cdpdnet.model import CDPDNetConfig, CDPDNetModel, build_model
from napari_cdpdnet.model.dino import SliceCache
from napari_cdpdnet.model.speedups import Compiler, Speedups, pointwise_matmul, upsample_matmul

TASK = torch.tensor([2])


@pytest.fixture(scope="module")
def tiny() -> CDPDNetModel:
    return build_model(CDPDNetConfig.tiny(), seed=0).eval()


@pytest.fixture(scope="module")
def column() -> list[torch.Tensor]:
    """Three windows of one column as the sliding window cuts them: starts 0, 48 and 51 (a last
    window clamped to the volume's end shares 93 slices with the one before)."""
    vol = torch.rand(1, 1, 147, 96, 96, generator=torch.Generator().manual_seed(5))
    return [vol[:, :, a:a + 96].contiguous() for a in (0, 48, 51)]


def _run(model: CDPDNetModel, wins: list[torch.Tensor], speedups: Speedups) -> list[torch.Tensor]:
    model.speedups = speedups
    model.clear_caches()
    with torch.inference_mode():
        return [model(w, TASK) for w in wins]


# --------------------------------------------------------------------------- DINO slice cache
def test_slice_cache_reuses_shared_slices_and_changes_nothing(tiny, column) -> None:
    plain = _run(tiny, column, Speedups.none())
    cached = _run(tiny, column, Speedups().only("slice_cache"))
    cache = tiny.slice_cache
    # 84 slices per window are used; window 2 shares 36 with window 1, window 3 shares 81 with 2
    assert cache.lookups == 3 * 84 and cache.hits == 36 + 81
    # new slices: 84, 48, then 3 padded to min_batch so that the GEMMs block as for a window
    assert cache.encoded == 84 + 48 + cache.min_batch
    for a, b in zip(plain, cached, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
        assert torch.equal(a, b)  # measured bit-identical (AVX-512 and the tiny model)


def test_slice_cache_stays_within_its_bound(tiny) -> None:
    tiny.speedups = Speedups()
    tiny.slice_cache = SliceCache(max_slices=40, min_batch=4)
    try:
        vol = torch.rand(1, 1, 96 + 5 * 48, 96, 96, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            for a in range(0, 5 * 48 + 1, 48):
                tiny(vol[:, :, a:a + 96].contiguous(), TASK)
                assert len(tiny.slice_cache) <= 40
        cfg = tiny.config
        per_slice = 3 * 49 * cfg.dino_hidden_size * 4 + 96 * 96 * 4
        assert tiny.slice_cache.nbytes <= 40 * per_slice
        tiny.clear_caches()
        assert len(tiny.slice_cache) == 0 and tiny.slice_cache.nbytes == 0
    finally:
        tiny.slice_cache = SliceCache()


def test_slice_cache_follows_weight_changes_and_never_trusts_the_digest_alone(monkeypatch) -> None:
    model = build_model(CDPDNetConfig.tiny(), seed=1).eval()
    vol = torch.rand(1, 1, 144, 96, 96, generator=torch.Generator().manual_seed(2))
    wins = [vol[:, :, a:a + 96].contiguous() for a in (0, 48)]
    _run(model, wins[:1], Speedups())
    with torch.no_grad():  # new DINO weights: cached features must not be reused
        model.dino.vit.encoder.layer[-1].mlp.fc2.bias.add_(0.5)
    model.speedups = Speedups.bit_exact()
    with torch.inference_mode():
        after = model(wins[1], TASK)
    torch.testing.assert_close(after, _run(model, wins[1:], Speedups.none())[0], rtol=0, atol=0)

    # every slice gets the same digest: the stored pixels still tell them apart
    import napari_cdpdnet.model.dino as dino

    monkeypatch.setattr(dino, "_slice_key", lambda pixels: ((96, 96), b"same"))
    collided = _run(model, wins, Speedups.bit_exact())
    plain = _run(model, wins, Speedups.none())
    for a, b in zip(plain, collided, strict=True):
        assert torch.equal(a, b)


def test_slice_cache_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SliceCache(max_slices=0)


# --------------------------------------------------------------------------- matmul kernels
@pytest.mark.parametrize(("cin", "cout", "kernel", "size"), [
    (16, 8, (1, 2, 2), (12, 6, 6)), (12, 8, (2, 2, 2), (6, 3, 3)), (21, 20, (2, 2, 2), (3, 3, 3)),
])
def test_transposed_convolution_as_matmul_is_bit_identical(cin, cout, kernel, size) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *size, generator=gen)
    w = torch.randn(cin, cout, *kernel, generator=gen)
    expected = F.conv_transpose3d(x, w, stride=kernel)
    assert torch.equal(upsample_matmul(x, w), expected)
    buf = torch.full((2, cout + 3, *expected.shape[2:]), 7.0)
    upsample_matmul(x, w, out=buf)
    assert torch.equal(buf[:, :cout], expected) and (buf[:, cout:] == 7.0).all()


def test_pointwise_head_as_matmul_is_bit_identical() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 24, 24, 24, generator=gen)
    w = torch.randn(32, 32, 1, 1, 1, generator=gen)
    assert torch.equal(pointwise_matmul(x, w), F.conv3d(x, w))


@pytest.mark.parametrize("name", ["fused_dino", "lean_lwca", "matmul_upsampling", "matmul_head", "lean_calls"])
def test_each_kernel_speedup_leaves_the_logits_bit_identical(tiny, column, name) -> None:
    plain = _run(tiny, column[:1], Speedups.none())[0]
    assert torch.equal(_run(tiny, column[:1], Speedups().only(name))[0], plain)


@pytest.mark.parametrize("name", ["fast_norm", "channels_last"])
def test_layout_and_norm_speedups_stay_within_float32_round_off(tiny, column, name) -> None:
    """Not bit-identical (other summation orders), but as close to the plain model as two CPUs
    of different kinds are to each other, and the same decisions wherever a logit is not ~0."""
    plain = _run(tiny, column[:1], Speedups.none())[0]
    for variant in (Speedups().only(name), Speedups()):
        out = _run(tiny, column[:1], variant)[0]
        assert out.shape == plain.shape and out.is_contiguous()
        assert (out - plain).abs().max().item() <= 1e-4
        decided = plain.abs() > 1e-3
        assert torch.equal((out > 0)[decided], (plain > 0)[decided])


def test_bit_exact_speedups_are_all_but_norm_and_layout() -> None:
    exact = Speedups.bit_exact()
    assert not exact.fast_norm and not exact.channels_last
    assert all(getattr(exact, n) for n in Speedups.names() if n not in ("fast_norm", "channels_last"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 32, 24, 20, 16), (2, 8, 6, 6, 6), (1, 5, 3, 7, 2)])
def test_fast_instance_norm_matches_pytorch_and_float64(shape, channels_last) -> None:
    from napari_cdpdnet.model.speedups import instance_norm_act_, is_channels_last

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen) * 3 + 40  # a large mean: naive E[x²]-E[x]² would lose it
    w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    ref = F.leaky_relu(F.instance_norm(x, weight=w, bias=b, eps=1e-5), 0.01)
    ref64 = F.leaky_relu(F.instance_norm(x.double(), weight=w.double(), bias=b.double(), eps=1e-5), 0.01)
    y = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x.clone()
    out = instance_norm_act_(y, w, b, 1e-5, 0.01)
    assert out.data_ptr() == y.data_ptr()  # in place
    assert is_channels_last(out) == (channels_last and shape[1] > 1)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out.double() - ref64).abs().max().item() <= 5 * max((ref.double() - ref64).abs().max().item(), 1e-6)


@pytest.mark.parametrize(("cin", "cout", "kernel", "size"), [(16, 8, (1, 2, 2), (12, 6, 6)), (12, 8, (2, 2, 2), (6, 3, 3))])
def test_matmul_kernels_take_channels_last_input(cin, cout, kernel, size) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin, *size, generator=gen)
    w = torch.randn(cin, cout, *kernel, generator=gen)
    xcl = x.contiguous(memory_format=torch.channels_last_3d)
    up = upsample_matmul(xcl, w)
    assert up.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(up, F.conv_transpose3d(x, w, stride=kernel), rtol=1e-6, atol=1e-5)
    head = torch.randn(4, cin, 1, 1, 1, generator=gen)
    out = pointwise_matmul(xcl, head)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.conv3d(x, head), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("kernel", "bias"), [((1, 3, 3), True), ((3, 3, 3), False), ((3, 1, 5), True)])
def test_one_channel_convolution_as_matmul_writes_channels_last(kernel, bias) -> None:
    from napari_cdpdnet.model.speedups import conv_one_channel_cl

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 9, 8, 7, generator=gen)
    w = torch.randn(6, 1, *kernel, generator=gen)
    b = torch.randn(6, generator=gen) if bias else None
    out = conv_one_channel_cl(x, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, F.conv3d(x, w, b, padding=tuple(k // 2 for k in kernel)), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="one input channel"):
        conv_one_channel_cl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(3, 2, 3, 3, 3), None)


def test_fused_dino_block_equals_the_transformers_layer(tiny) -> None:
    from napari_cdpdnet.model.dino import fused_block

    layer = tiny.dino.vit.encoder.layer[1]
    hidden = torch.randn(20, 50, tiny.config.dino_hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fused_block(layer, hidden), layer(hidden))
    with torch.enable_grad():  # with gradients it is the layer itself
        assert torch.equal(fused_block(layer, hidden), layer(hidden))


def test_lean_lwca_is_bit_identical_also_where_the_shift_mask_matters() -> None:
    from napari_cdpdnet.model.lwca import LWCA

    torch.manual_seed(0)
    lwca = LWCA(16, heads=4).eval()
    with torch.no_grad():
        for p in lwca.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, y = torch.randn(2, 16, 6, 9, 3), torch.randn(2, 16, 6, 9, 3)
    with torch.inference_mode():
        assert torch.equal(lwca(x, y, lean=True), lwca(x, y))
        odd = torch.randn(1, 16, 5, 6, 6)  # needs padding: the lean path steps aside
        assert torch.equal(lwca(odd, odd, lean=True), lwca(odd, odd))


def test_lean_calls_copy_only_outside_inference_mode(tiny, column) -> None:
    tiny.speedups = Speedups()
    with torch.inference_mode():
        inside = tiny(column[0], TASK)
    outside = tiny(column[0], TASK)
    assert inside.is_inference() and not outside.is_inference()
    assert torch.equal(inside, outside)


def test_task_ids_are_checked_once_per_tensor_but_always_checked(tiny, column) -> None:
    tiny.speedups = Speedups()
    task = torch.tensor([3])
    with torch.inference_mode():
        tiny(column[0], task)
        with pytest.raises(InputError, match="task_id 11"):
            tiny(column[0], torch.tensor([11]))
        task.fill_(12)  # the same tensor changed in place is checked again
        with pytest.raises(InputError, match="task_id 12"):
            tiny(column[0], task)


# --------------------------------------------------------------------------- window order
def test_column_order_groups_windows_along_the_slicing_axis() -> None:
    plan = plan_windows((200, 150, 100))
    ordered = ordered_by_columns(plan.starts)
    assert sorted(ordered) == sorted(plan.starts)
    assert ordered[:3] == ((0, 0, 0), (48, 0, 0), (96, 0, 0))
    assert plan.starts[:2] == ((0, 0, 0), (0, 0, 4))  # MONAI: axis 2 fastest


def _smooth_predictor(x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
    ramp = torch.linspace(-3.0, 3.0, 96)
    return (x * 7.0 - 2.1 + ramp.view(1, 1, 96, 1, 1) - ramp.view(1, 1, 1, 96, 1) * 0.5).expand(-1, 4, -1, -1, -1)


def test_window_order_changes_the_blend_only_by_float32_rounding() -> None:
    image = np.random.default_rng(0).random((200, 150, 120), dtype=np.float32)
    blends = {order: sliding_window(image, _smooth_predictor, 0, [0, 3], order=order).logits
              for order in ("monai", "slices")}
    diff = (blends["monai"] - blends["slices"]).abs()
    scale = blends["monai"].abs().clamp(min=1.0)
    assert float((diff / scale).max()) <= 1e-6  # a few float32 ulps, never more
    decided = blends["monai"].abs() > 1e-5
    assert torch.equal((blends["monai"] > 0)[decided], (blends["slices"] > 0)[decided])


def test_sliding_window_with_the_model_hits_the_cache_and_clears_it(tiny) -> None:
    image = np.random.default_rng(3).random((150, 96, 96), dtype=np.float32)
    tiny.speedups = Speedups()
    tiny.clear_caches()
    seen = {}

    class Spy:
        def __call__(self, x, task):
            return tiny(x, task)

        def clear_caches(self):
            seen["hits"] = tiny.slice_cache.hits
            tiny.clear_caches()

    fast = sliding_window(image, Spy(), 2, [0, 5], order="slices").logits
    # starts 0, 48, 54: window 2 shares 36 slices with window 1, window 3 shares 78 with window 2
    assert seen["hits"] == 36 + 78
    assert len(tiny.slice_cache) == 0
    tiny.speedups = Speedups.none()
    plain = sliding_window(image, tiny, 2, [0, 5], order="monai").logits
    assert (fast - plain).abs().max().item() <= 1e-4


def test_bad_window_order_is_refused() -> None:
    with pytest.raises(InputError, match="window order 'diagonal'"):
        sliding_window(np.zeros((96, 96, 96), np.float32), _smooth_predictor, 0, [0], order="diagonal")
    with pytest.raises(InputError, match="window_order 'x'"):
        SegmentationSettings(window_order="x")


# --------------------------------------------------------------------------- compile
def test_compile_falls_back_with_a_clear_message_where_inductor_cannot_work(tiny, column, monkeypatch, caplog) -> None:
    model = build_model(CDPDNetConfig.tiny(), seed=0).eval()
    monkeypatch.setattr(Compiler, "unavailable_reason",
                        staticmethod(lambda device: "no C++ compiler found (inductor needs g++ ...)"))
    with caplog.at_level(logging.WARNING):
        assert model.set_compile(True) is False
    assert "torch.compile is not available here, running without it: no C++ compiler" in caplog.text
    assert not model.compiled
    tiny.speedups = Speedups()
    with torch.inference_mode():
        assert torch.equal(model(column[0], TASK), tiny(column[0], TASK))


def test_compile_errors_at_the_first_call_fall_back_to_eager(column, monkeypatch, caplog) -> None:
    model = build_model(CDPDNetConfig.tiny(), seed=0).eval()
    monkeypatch.setattr(Compiler, "unavailable_reason", staticmethod(lambda device: None))

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: C++ compile error\nlong log")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    assert model.set_compile(True) is True
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        y = model(column[0], TASK)
    assert "running without it: RuntimeError: InductorError: C++ compile error" in caplog.text
    assert not model.compiled
    model.set_compile(False)
    with torch.inference_mode():
        assert torch.equal(y, model(column[0], TASK))


def test_the_engine_switches_compile_only_on_predictors_that_offer_it(caplog) -> None:
    calls = []

    class Compilable:
        def set_compile(self, enabled):
            calls.append(enabled)

    set_predictor_compile(Compilable(), True)
    set_predictor_compile(Compilable(), False)
    assert calls == [True, False]
    with caplog.at_level(logging.WARNING):
        set_predictor_compile(_smooth_predictor, True)
    assert "has no set_compile" in caplog.text


def test_inductor_cache_goes_to_the_user_cache_folder(monkeypatch, tmp_path) -> None:
    from napari_cdpdnet.model.speedups import inductor_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path))
    assert inductor_cache_dir() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")


def test_inductor_cache_moves_from_the_default_that_importing_inductor_sets(monkeypatch, tmp_path) -> None:
    """``import torch._inductor`` writes its /tmp default into $TORCHINDUCTOR_CACHE_DIR: that must
    not count as the user's choice, or the cache would never reach the user cache folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from napari_cdpdnet.model.speedups import use_inductor_cache_dir

    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use_inductor_cache_dir() == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_inductor_cache_dir() == str(tmp_path / "mine")


@pytest.mark.slow
def test_compiled_tiny_model_matches_eager(column, monkeypatch, tmp_path) -> None:
    """A real inductor compile of the tiny model, one window (1-2 minutes on 2 CPU cores, more
    under load): same logits within 1e-4, inductor's files where it was told to put them."""
    if Compiler.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip(Compiler.unavailable_reason(torch.device("cpu")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = build_model(CDPDNetConfig.tiny(), seed=0).eval()
    eager = _run(model, column[:1], Speedups())
    assert model.set_compile(True)
    compiled = _run(model, column[:1], Speedups())
    assert model.compiled, model._compiler.failed
    for a, b in zip(eager, compiled, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
    assert any(tmp_path.iterdir())  # inductor wrote its cache where it was told


# --------------------------------------------------------------------------- reduced precision
def test_reduced_precision_is_chosen_per_device(monkeypatch) -> None:
    assert devices.fast_autocast_dtype(torch.device("cuda")) == torch.float16
    assert devices.fast_autocast_dtype(torch.device("mps")) is None
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.fast_autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.fast_autocast_dtype(torch.device("cpu")) is None
    assert SegmentationSettings(preset="fast").effective_autocast
    assert not SegmentationSettings(preset="fast", autocast=False).effective_autocast
    assert not SegmentationSettings().effective_autocast


def test_autocast_without_a_fast_path_is_ignored_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    seen = []

    def predictor(x, task):
        seen.append(torch.is_autocast_enabled("cpu"))
        return _smooth_predictor(x, task)

    with caplog.at_level(logging.WARNING):
        sliding_window(np.zeros((96, 96, 96), np.float32), predictor, 0, [0], autocast=True)
    assert seen == [False] and "no fast reduced-precision path" in caplog.text


def test_model_keeps_the_callers_autocast(tiny, column) -> None:
    """The model must not switch off an autocast the engine asked for (it used to)."""
    tiny.speedups = Speedups()
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(column[0], TASK)
        full = tiny(column[0], TASK)
    assert low.dtype == torch.float32
    assert 0 < (low - full).abs().max().item() < 1.0


def test_cli_offers_compile_and_autocast_switches() -> None:
    from napari_cdpdnet.cli import build_parser

    args = build_parser().parse_args(["segment", "ct.nii.gz", "-s", "liver", "-o", "o.nii.gz", "--compile",
                                      "--no-autocast"])
    assert args.compile is True and args.autocast is False
    args = build_parser().parse_args(["segment", "ct.nii.gz", "-s", "liver", "-o", "o.nii.gz"])
    assert args.compile is False and args.autocast is None
