"""The learned ROI → CLIP-text-space mapper (issue 8): features, sampling, distillation, files, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from roi_support import flipped

from napari_cdpdnet.errors import InputError, OutputExistsError, WeightsError
from napari_cdpdnet.example.mapper import (
    MAPPER_METHOD,
    RoiMapper,
    TrainingConfig,
    _noise_scale,
    feature_names,
    roi_features,
    roi_region,
    sample_rois,
    split_halves,
    train_mapper,
    training_set,
)
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap


def _tiny512():
    """The tiny test model with CLIP-sized (512) text embeddings, so its checkpoint can teach."""
    from napari_cdpdnet.model import CDPDNetConfig

    return CDPDNetConfig.tiny().replace(text_dim=512)


def _teacher(seed: int = 0) -> np.ndarray:
    """CLIP-like teacher: a large shared component plus small per-structure parts (cos ≈ 0.9)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=512)
    return (3 * common[None, :] + rng.normal(size=(32, 512))).astype(np.float32)


def _clusters(n_per: int, structures: list[int], n_features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = {s: rng.normal(scale=3.0, size=n_features) for s in structures}
    x = np.concatenate([centres[s] + rng.normal(size=(n_per, n_features)) for s in structures])
    y = np.repeat(structures, n_per)
    return x.astype(np.float32), y


def test_noise_is_annealed_linearly_to_zero() -> None:
    cfg = TrainingConfig(noise=0.8)
    values = [_noise_scale(cfg, s, 11) for s in range(11)]
    assert values[0] == pytest.approx(0.8) and values[-1] == pytest.approx(0.0)
    assert np.allclose(np.diff(values), -0.08)


def test_distillation_learns_separable_rois_and_lands_near_the_teacher(tmp_path: Path) -> None:
    teacher = _teacher()
    n_f = len(feature_names(False))
    structures = [1, 2, 3, 6, 8]
    x, y = _clusters(40, structures, n_f)
    xt, yt = _clusters(10, structures, n_f, seed=0)  # same centres (seed), fresh noise below
    xt = xt + np.random.default_rng(5).normal(scale=0.3, size=xt.shape).astype(np.float32)
    mapper = train_mapper(x, y, teacher, uses_model_features=False, config=TrainingConfig(epochs=60))
    p = mapper.probabilities(xt)
    assert p.shape == (len(xt), 32) and np.allclose(p.sum(axis=1), 1.0)
    assert (p.argmax(axis=1) + 1 == yt).mean() > 0.95
    # The embedding is in CLIP's raw space: closest (raw cosine) to its own structure's teacher.
    emb = mapper.embed(xt)
    unit_t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    raw = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ unit_t.T
    assert (raw.argmax(axis=1) + 1 == yt).mean() > 0.95
    assert mapper.info["structures"] == structures

    # Round trip through the weights file gives the same answers; the file is never clobbered.
    path = mapper.save(tmp_path / "m.pt")
    again = RoiMapper.load(path)
    np.testing.assert_allclose(again.probabilities(xt), p, rtol=1e-5, atol=1e-7)
    assert not again.uses_model_features and again.info["samples"] == len(x)
    with pytest.raises(OutputExistsError):
        mapper.save(path)
    with pytest.raises(InputError, match="trained on"):
        again.probabilities(np.zeros((1, n_f + 32), np.float32))


def test_mapper_file_errors(tmp_path: Path) -> None:
    import torch

    with pytest.raises(WeightsError, match="no such"):
        RoiMapper.load(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(WeightsError, match="not an ROI prompt mapper"):
        RoiMapper.load(bad)
    x, y = _clusters(5, [1, 2], len(feature_names(False)))
    state = train_mapper(x, y, _teacher(), uses_model_features=False, config=TrainingConfig(epochs=2)).state()
    state["version"] = 99
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="newer"):
        RoiMapper.load(bad)
    with pytest.raises(InputError, match="1..32"):
        train_mapper(x, np.zeros(len(x), int), _teacher(), uses_model_features=False)


def test_teacher_from_tiny_checkpoint_and_official_file(tmp_path: Path, shared_path) -> None:
    from model_support import write_tiny_weights

    from napari_cdpdnet.model import load_official_checkpoint
    from napari_cdpdnet.model.text import load_organ_embeddings

    small, _, _ = write_tiny_weights(tmp_path / "small")  # 32-dim text: not a CLIP teacher
    with pytest.raises(WeightsError, match=r"\(32, 512\)"):
        load_organ_embeddings(small)
    ckpt, _, _ = write_tiny_weights(tmp_path / "w", config=_tiny512())
    t = load_organ_embeddings(ckpt)
    assert t.shape == (32, 512)
    np.testing.assert_array_equal(t, load_official_checkpoint(ckpt)["organ_embedding"].numpy())
    official = load_organ_embeddings(shared_path("cdpdnet", "text_embeddings", "txt_encoding.pth"))
    assert official.shape == (32, 512) and official.dtype == np.float32
    with pytest.raises(WeightsError):
        load_organ_embeddings(tmp_path / "missing.pth")


def test_sampled_rois_lie_on_their_structure() -> None:
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:10, 3:12, 3:12] = 6
    labels[12:18, 20:26, 20:26] = 3
    labels[15, 2, 2] = 1  # too small to sample
    rois = sample_rois(labels, np.random.default_rng(0), per_kind=5)
    assert len(rois) == 2 * 3 * 5
    assert {v for _, v in rois} == {3, 6}
    for roi, v in rois:
        m = roi.mask(labels.shape)
        if roi.kind == "box":
            assert (labels[m] == v).mean() > 0.3
        else:
            assert (labels[m] == v).all(), roi.kind
    assert {r.kind for r, _ in rois} == {"box", "scribble", "click"}
    assert max(len(r.points) for r, _ in rois if r.kind == "scribble") > 3


def test_split_halves_is_a_partition() -> None:
    g = Geometry((1, 1, 2), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, -1), (10, 4, 4))  # z runs inferior
    labels = np.zeros(g.shape, np.uint8)
    labels[:, 1:3, 1:3] = 5
    up, lo = split_halves(labels, g)
    assert not np.any((up > 0) & (lo > 0)) and np.array_equal(np.maximum(up, lo), labels)
    assert up[0].any() and not up[9].any()  # index 0 is the superior end on this grid


def test_click_region_and_features_are_grid_independent() -> None:
    g = Geometry((1.5, 1.5, 3.0), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (30, 40, 40))
    ct = np.full(g.shape, -1000, np.int16)
    ct[3:27, 5:35, 5:35] = 40
    ct[10:20, 10:20, 25:32] = 300
    _, region = roi_region(ROI.click((15, 15, 28)), g)
    assert 30 < region.sum() * 1.5 * 1.5 * 3 / (4 / 3 * np.pi * 6 ** 3) * 100 < 200  # ~ a 6 mm ball
    f = roi_features(ROI.click((15, 15, 28)), ct, g)
    fct, fg = flipped(ct, g, (1, 2))
    click = ROI.click_mm(g.index_to_world(np.array([15, 15, 28])), fg)
    f2 = roi_features(click, fct, fg)
    np.testing.assert_allclose(f2, f, atol=1e-5)
    assert len(f) == len(feature_names(False))
    probs = {3: np.full(g.shape, 0.5, np.float32)}
    fm = roi_features(ROI.click((15, 15, 28)), ct, g, probabilities=probs)
    assert len(fm) == len(feature_names(True)) and fm[-32 + 2] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.shared
def test_real_scan_held_out_halves(shared_path) -> None:
    """Attributes-only mapper: ROIs from each structure's superior half train, inferior half tests."""
    from napari_cdpdnet.io.images import read_ct, read_label_map
    from napari_cdpdnet.model.text import load_organ_embeddings

    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, g = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    labels = remap(seg, TOTALSEGMENTATOR_TOTAL)
    teacher = load_organ_embeddings(shared_path("cdpdnet", "text_embeddings", "txt_encoding.pth"))
    up, lo = split_halves(labels, g)
    x, y = training_set(sample_rois(up, np.random.default_rng(0), per_kind=6), ct.array, g)
    xt, yt = training_set(sample_rois(lo, np.random.default_rng(1), per_kind=3), ct.array, g)
    mapper = train_mapper(x, y, teacher, uses_model_features=False, config=TrainingConfig(epochs=120))
    top3 = np.argsort(-mapper.probabilities(xt), axis=1)[:, :3] + 1
    chance3 = 3 / len(set(y.tolist()))
    assert (top3 == yt[:, None]).any(axis=1).mean() > max(0.6, 2 * chance3)
    ranking = mapper.rank(ROI.click(np.argwhere(labels == 6).mean(axis=0)), ct.array, g)
    assert ranking.method == MAPPER_METHOD and "Liver" in [c.structure.name for c in ranking.top(3)]


@pytest.mark.slow
@pytest.mark.shared
def test_cli_train_then_segment_by_example(tmp_path: Path, shared_path, capsys) -> None:
    from model_support import write_tiny_weights

    from napari_cdpdnet.cli import main
    from napari_cdpdnet.example.ranking import crop_geometry
    from napari_cdpdnet.io import read_ct, read_label_map, write_image

    ckpt, dino, _ = write_tiny_weights(tmp_path / "w", config=_tiny512())
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, _ = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    out = tmp_path / "mapper.pt"
    args = ["train-roi-prompts", "--ct", str(ct.path), "--labels",
            str(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz")),
            "--map", "totalsegmentator", "-o", str(out), "--checkpoint", str(ckpt), "--offline",
            "--per-kind", "2", "--epochs", "30"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    mapper = RoiMapper.load(out)
    present = set(np.unique(remap(seg, TOTALSEGMENTATOR_TOTAL)).tolist()) - {0}
    assert not mapper.uses_model_features and set(mapper.info["structures"]) == present
    assert main(args) == 3  # no overwrite
    assert main([*args, "--ct", str(ct.path), "--overwrite"]) == 2  # two CTs, one label map
    assert "one label map per CT" in capsys.readouterr().err

    # The attributes-only mapper needs no model for the ranking; the tiny model segments.
    crop = (slice(40, 80), slice(30, 70), slice(40, 80))
    small = write_image(tmp_path / "crop.nii.gz", ct.array[crop], crop_geometry(ct.geometry, crop))
    res = tmp_path / "res.nii.gz"
    code = main(["segment-by-example", str(small), "--voxel", "--click", "20", "20", "20", "-o", str(res),
                 "--mapper", str(out), "--checkpoint", str(ckpt), "--dino", str(dino), "--offline",
                 "--no-progress", "--preset", "fast"])
    assert code == 0
    text = capsys.readouterr().out
    assert f"method: {MAPPER_METHOD}" in text and text.count("confidence") == 3
    labels, _ = read_label_map(res)
    assert len(np.unique(labels)) <= 2


def test_teacher_ensemble_with_attribute_sentences() -> None:
    from napari_cdpdnet.example.mapper import card_sentences, ensemble_teacher

    teacher = _teacher()
    sentences = card_sentences()
    assert len(sentences) == 32 and sentences[0][0].startswith("A computerized tomography of a spleen")
    seen: list[str] = []
    rng = np.random.default_rng(3)
    table: dict[str, np.ndarray] = {}

    def encode(texts: list[str]) -> np.ndarray:  # a deterministic fake text tower
        seen.extend(texts)
        return np.stack([table.setdefault(t, rng.normal(size=512)) for t in texts])

    assert np.allclose(ensemble_teacher(teacher, encode, weight=0.0), teacher, atol=1e-5)
    mixed = ensemble_teacher(teacher, encode, weight=0.5)
    assert mixed.shape == teacher.shape
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), np.linalg.norm(teacher, axis=1), rtol=1e-5)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    sent = unit(np.stack([table[s[0]] for s in sentences]))
    # Every blended embedding moved towards its own sentence, and stays closest to its own prompt.
    assert np.all(np.sum(unit(mixed) * sent, axis=1) > np.sum(unit(teacher) * sent, axis=1))
    assert np.all(np.argmax(unit(mixed) @ unit(teacher).T, axis=1) == np.arange(32))
    assert set(seen) == {s[0] for s in sentences}
    with pytest.raises(InputError):
        ensemble_teacher(teacher, encode, weight=1.5)


def test_cli_ensemble_without_clip_weights_fails_clearly(tmp_path: Path, shared_path, capsys) -> None:
    from napari_cdpdnet.cli import main

    seg = shared_path("data", "totalsegmentator", "example_seg_full.nii.gz")
    ct = shared_path("data", "totalsegmentator", "example_ct.nii.gz")
    teacher = shared_path("cdpdnet", "text_embeddings", "txt_encoding.pth")
    code = main(["train-roi-prompts", "--ct", str(ct), "--labels", str(seg), "--map", "totalsegmentator",
                 "--teacher", str(teacher), "--clip-weights", str(tmp_path / "none.safetensors"),
                 "--offline", "-o", str(tmp_path / "m.pt")])
    assert code == 4 and "none.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
@pytest.mark.shared
def test_cli_with_model_features(tmp_path: Path, shared_path, capsys) -> None:
    """--with-model: pooled probabilities join the features at training and at use."""
    from model_support import write_tiny_weights

    from napari_cdpdnet.cli import main
    from napari_cdpdnet.example.ranking import crop_geometry
    from napari_cdpdnet.io import read_ct, read_label_map, write_image, write_label_map

    ckpt, dino, _ = write_tiny_weights(tmp_path / "w", config=_tiny512())
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))
    seg, _ = read_label_map(shared_path("data", "totalsegmentator", "example_seg.nii.gz"))
    crop = (slice(0, 30), slice(30, 80), slice(30, 90))
    cg = crop_geometry(ct.geometry, crop)
    ct_path = write_image(tmp_path / "ct.nii.gz", ct.array[crop], cg)
    lab_path = write_label_map(tmp_path / "seg.nii.gz", seg[crop], cg)
    weights = ["--checkpoint", str(ckpt), "--dino", str(dino), "--offline"]
    out = tmp_path / "m.pt"
    assert main(["train-roi-prompts", "--ct", str(ct_path), "--labels", str(lab_path), "--map", "totalsegmentator",
                 "-o", str(out), "--with-model", "--per-kind", "2", "--epochs", "5", *weights]) == 0
    mapper = RoiMapper.load(out)
    assert mapper.uses_model_features and len(mapper.feature_mean) == len(feature_names(True))
    res = tmp_path / "res.nii.gz"
    assert main(["segment-by-example", str(ct_path), "--voxel", "--click", "30", "25", "15", "-o", str(res),
                 "--mapper", str(out), "--no-progress", "--preset", "fast", *weights]) == 0
    assert f"method: {MAPPER_METHOD}" in capsys.readouterr().out and res.exists()
