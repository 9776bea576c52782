"""segment_array end to end: real CT with a tiny random model, exactness against MONAI, cancel, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_cdpdnet.errors import Cancelled, InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.inference.devices import resolve_device
from napari_cdpdnet.inference.pipeline import ProgressEvent, segment_array
from napari_cdpdnet.inference.postprocess import merge_labels, postprocess
from napari_cdpdnet.inference.segmenter import postprocess_rules
from napari_cdpdnet.inference.settings import SegmentationSettings
from napari_cdpdnet.inference.sliding_window import importance_map
from napari_cdpdnet.vocabulary.catalog import TASKS

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")


class TinyModel(torch.nn.Module):
    """A tiny randomly initialised stand-in for CDPDNet with the same call signature and output."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.nn.AvgPool3d(4)
        self.conv1 = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(8, 32, 1)
        self.task = torch.nn.Embedding(11, 32)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.eval()

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.pool(x)))
        y = self.conv2(h) + self.task(task_id)[:, :, None, None, None]
        b, c, n = y.shape[0], y.shape[1], y.shape[2]
        # nearest 4× upsampling in one copy, then lean on intensity so that soft tissue lights
        # up some channels
        up = y[:, :, :, None, :, None, :, None].expand(b, c, n, 4, n, 4, n, 4).reshape(b, c, *x.shape[2:])
        return up.add_(12 * x - 5.4)


class Recorder:
    """Counts windows and records progress events."""

    def __init__(self, model) -> None:
        self.model = model
        self.windows = 0
        self.events: list[ProgressEvent] = []

    def __call__(self, x, task_id):
        self.windows += x.shape[0]
        return self.model(x, task_id)


def read(path) -> tuple[np.ndarray, Geometry]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


@pytest.fixture(scope="module")
def small_ct(shared_path) -> tuple[np.ndarray, Geometry]:
    return read(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))


CPU = SegmentationSettings(device="cpu")
#: The official post-processing roles and task count, as the segmenter passes them.
RULES = postprocess_rules()
OFFICIAL = {"rules": RULES, "num_tasks": len(TASKS)}


# --------------------------------------------------------------------------- real CT
def test_real_ct_gives_requested_labels_on_the_source_grid(small_ct) -> None:
    array, geometry = small_ct
    before = array.copy()
    predictor = Recorder(TinyModel())
    events: list[ProgressEvent] = []
    # liver + spleen with one task; vein (needs pancreas), right lung (needs left), kidney tumour
    # (needs kidneys) with another
    passes = [(1, [5, 0]), (0, [9, 15, 25])]
    result = segment_array(array, geometry, passes, predictor, CPU, progress=events.append,
                           **OFFICIAL)

    assert result.labels.shape == geometry.shape and result.labels.dtype == np.uint8
    assert result.geometry.same_grid(geometry)
    requested = {6, 1, 10, 16, 26}
    assert result.requested == tuple(sorted(requested))
    values = set(np.unique(result.labels).tolist()) - {0}
    assert values and values <= requested  # companions (11, 17, 2, 3) never show up
    assert result.structures == {s: int((result.labels == s).sum()) for s in values}
    np.testing.assert_array_equal(array, before)  # the input is not modified

    # 2 passes × 5·3·1 windows of the 241×191×59 (foreground-cropped) model grid
    assert result.windows == result.windows_total == 30 == predictor.windows
    assert set(result.timings) == {"preprocess", "inference", "postprocess", "invert", "total"}
    inference = [e for e in events if e.stage == "inference"]
    assert inference[0].done == 0 and inference[-1].done == inference[-1].total == 30
    assert [e.done for e in inference] == sorted(e.done for e in inference)
    assert inference[-1].eta_s == 0.0
    assert [e.stage for e in events][0] == "preprocess" and events[-1].stage == "invert"


def test_fast_preset_runs_fewer_windows(small_ct) -> None:
    array, geometry = small_ct
    predictor = Recorder(TinyModel())
    fast = segment_array(array, geometry, [(7, [5])], predictor,
                         SegmentationSettings(preset="fast", device="cpu"), **OFFICIAL)
    # overlap 0.25: 4·3·1 windows instead of 5·3·1 (none of them holds only air here)
    assert fast.windows_total == 12
    assert fast.windows == predictor.windows == 12
    assert fast.labels.shape == geometry.shape
    assert set(np.unique(fast.labels)) <= {0, 6}


def test_roi_limits_windows_and_labels(shared_path) -> None:
    array, geometry = read(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    centre = geometry.index_to_world(np.asarray(geometry.shape) / 2)
    roi = (tuple(centre - 20), tuple(centre + 20))
    predictor = Recorder(TinyModel())
    result = segment_array(array, geometry, [(0, [5])], predictor,
                           SegmentationSettings(device="cpu", box=roi), **OFFICIAL)
    # a 40 mm box meets at most 3 windows per axis; the whole image needs 5·3·5 + … = 80
    assert result.windows == predictor.windows <= 27 < result.windows_total == 80
    # labels only inside the box (voxel centres within 20 mm of the centre on every axis)
    lps = geometry.index_to_world(np.argwhere(result.labels > 0))
    assert len(lps) > 0
    assert np.all(np.abs(lps - centre) <= 20 + 1e-6)


# --------------------------------------------------------------------------- exactness
def official_reference(array: np.ndarray, geometry: Geometry, model, task: int, structures) -> np.ndarray:
    """The official chain built from MONAI pieces: transforms, sliding window, sigmoid > 0.5, Invertd."""
    from monai.inferers import sliding_window_inference
    from test_transforms import monai_forward, monai_image, monai_invert

    image = monai_forward()({"image": monai_image(array, geometry)})["image"]
    with torch.no_grad():
        logits = sliding_window_inference(
            image[None].as_tensor(), (96, 96, 96), 2,
            lambda x: model(x, torch.full((x.shape[0],), task, dtype=torch.int64)),
            overlap=0.5, mode="gaussian", roi_weight_map=importance_map())[0]
    raw = {c + 1: (torch.sigmoid(logits[c]) > 0.5).numpy() for c in range(32)}
    merged = merge_labels(postprocess(raw, structures, RULES), RULES)
    return monai_invert(array, geometry, merged, nearest=True).astype(np.uint8)


def test_exact_mode_equals_the_official_chain() -> None:
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    rot /= np.linalg.norm(rot, axis=0)
    geometry = Geometry((0.83, 0.91, 2.2), (-60.0, -40.0, -50.0), tuple(rot.ravel()), (48, 150, 140))
    zyx = np.indices(geometry.shape).reshape(3, -1).T
    world = geometry.index_to_world(zyx)
    centre = world.mean(axis=0)
    r = np.linalg.norm((world - centre) / [50.0, 40.0, 45.0], axis=1).reshape(geometry.shape)
    rng = np.random.default_rng(0)
    array = np.where(r < 1, 60 + 40 * np.sin(zyx[:, 2] / 7.0).reshape(geometry.shape), -900)
    array = (array + rng.normal(0, 20, geometry.shape)).astype(np.int16)
    model = TinyModel(seed=3)
    structures = [6, 10, 16, 26, 15]
    ours = segment_array(array, geometry, [(2, [s - 1 for s in structures])], model, CPU,
                         **OFFICIAL)
    ref = official_reference(array, geometry, model, 2, structures)
    assert set(np.unique(ref)) - {0}, "reference found nothing: the test would be vacuous"
    np.testing.assert_array_equal(ours.labels, ref)


# --------------------------------------------------------------------------- probabilities
def test_probabilities_on_the_source_grid() -> None:
    """On a grid that already is the model grid, probabilities come back unchanged and bound the labels."""
    geometry = Geometry((1.5, 1.5, 1.5), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (40, 70, 60))
    rng = np.random.default_rng(1)
    array = rng.normal(0, 150, geometry.shape).astype(np.int16)
    result = segment_array(array, geometry, [(0, [5, 26])], TinyModel(1),
                           SegmentationSettings(device="cpu", return_probabilities=True),
                           **OFFICIAL)
    assert sorted(result.probabilities) == [6, 27]
    for s, p in result.probabilities.items():
        assert p.shape == geometry.shape and p.dtype == np.float32
        assert p.min() >= 0.0 and p.max() <= 1.0
        # post-processing only removes voxels
        assert (p[result.labels == s] > 0.5).all()
    assert (result.labels == 6).any()


# --------------------------------------------------------------------------- cancel and errors
def test_cancel_stops_within_one_window_and_returns_nothing(small_ct) -> None:
    array, geometry = small_ct
    predictor = Recorder(TinyModel())
    stop = {"now": False}

    def progress(event: ProgressEvent) -> None:
        if event.stage == "inference" and event.done == 2:
            stop["now"] = True

    threads = torch.get_num_threads()
    with pytest.raises(Cancelled, match="after 2 of"):
        segment_array(array, geometry, [(0, [5])], predictor,
                      SegmentationSettings(device="cpu", threads=1),
                      progress=progress, should_stop=lambda: stop["now"], **OFFICIAL)
    assert predictor.windows == 2
    assert torch.get_num_threads() == threads  # the thread setting is restored


def test_cancel_before_start() -> None:
    geometry = Geometry.identity((10, 10, 10))
    predictor = Recorder(TinyModel())
    with pytest.raises(Cancelled):
        segment_array(np.zeros(geometry.shape, np.int16), geometry, [(0, [5])], predictor, CPU,
                      should_stop=lambda: True, **OFFICIAL)
    assert predictor.windows == 0


@pytest.mark.parametrize(("passes", "match"), [
    ([], "no passes"),
    ([(11, [5])], "task id"),
    ([(0, [32])], "outside"),
    ([(0, [])], "no channels"),
    ([(0, [5]), (1, [5, 6])], "more than one pass"),
    ([("x", [5])], "expected"),
])
def test_bad_passes(passes, match) -> None:
    geometry = Geometry.identity((10, 10, 10))
    with pytest.raises(InputError, match=match):
        segment_array(np.zeros(geometry.shape, np.int16), geometry, passes, TinyModel(), CPU,
                      **OFFICIAL)


def test_bad_arrays_and_settings() -> None:
    geometry = Geometry.identity((10, 10, 10))
    with pytest.raises(InputError, match="does not match"):
        segment_array(np.zeros((10, 10, 11), np.int16), geometry, [(0, [5])], TinyModel(), CPU,
                      **OFFICIAL)
    with pytest.raises(InputError, match="no voxel above"):
        segment_array(np.full(geometry.shape, -1000, np.int16), geometry, [(0, [5])], TinyModel(), CPU,
                      **OFFICIAL)
    with pytest.raises(InputError, match="does not overlap"):
        segment_array(np.zeros(geometry.shape, np.int16), geometry, [(0, [5])], TinyModel(),
                      SegmentationSettings(device="cpu", box=((500, 500, 500), (600, 600, 600))),
                      **OFFICIAL)
    with pytest.raises(InputError, match="preset"):
        SegmentationSettings(preset="quick")
    with pytest.raises(InputError, match="overlap"):
        SegmentationSettings(overlap=1.5)
    with pytest.raises(InputError, match="threads"):
        SegmentationSettings(threads=0)
    with pytest.raises(InputError, match="sw_batch_size"):
        SegmentationSettings(sw_batch_size=0)


def test_presets_and_defaults() -> None:
    exact = SegmentationSettings()
    assert exact.preset == "exact" and exact.is_official
    assert exact.effective_overlap == 0.5 and not exact.effective_skip_air
    fast = SegmentationSettings(preset="fast")
    assert fast.effective_overlap == 0.25 and fast.effective_skip_air and not fast.is_official
    assert fast.effective_autocast and not exact.effective_autocast
    # fast also uses reduced precision (issue 18): all three overridden give the official pipeline
    assert not SegmentationSettings(preset="fast", overlap=0.5, skip_air=False).is_official
    assert SegmentationSettings(preset="fast", overlap=0.5, skip_air=False, autocast=False).is_official
    assert exact.batch_size_for(torch.device("cpu")) == 1
    assert exact.batch_size_for(torch.device("cuda")) == 2


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    else:
        assert auto.type in {"mps", "cpu"}
        with pytest.raises(InputError, match="cuda"):
            resolve_device("cuda")
        with pytest.raises(InputError, match="cuda"):
            resolve_device("cuda:1")
    if not (torch.backends.mps.is_available()):
        with pytest.raises(InputError, match="MPS"):
            resolve_device("mps")
    for bad in ("gpu", "tpu", "cuda:x", ""):
        with pytest.raises(InputError, match="device"):
            resolve_device(bad)


def test_engine_modules_import_without_heavy_dependencies() -> None:
    """torch, MONAI, scipy and nibabel load only when a segmentation runs."""
    code = (
        "import sys, napari_cdpdnet.inference.pipeline, napari_cdpdnet.inference.transforms, "
        "napari_cdpdnet.inference.sliding_window, napari_cdpdnet.inference.postprocess\n"
        "heavy = [m for m in ('torch', 'monai', 'scipy', 'nibabel', 'SimpleITK') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_model_in_training_mode_is_flagged(caplog) -> None:
    geometry = Geometry.identity((10, 10, 10), (1.5, 1.5, 1.5))
    model = TinyModel().train()
    with caplog.at_level("WARNING", logger="napari_cdpdnet.inference.pipeline"):
        segment_array(np.zeros(geometry.shape, np.int16), geometry, [(0, [5])], model, CPU,
                      **OFFICIAL)
    assert "training mode" in caplog.text
