"""Attribute cards and instance attributes (issue 8): patient-space answers on any grid."""

from __future__ import annotations

import numpy as np
import pytest
from roi_support import flipped, oblique, rotation

from napari_cdpdnet.example.attributes import (
    CLIP_CONTEXT,
    FEATURE_NAMES,
    attribute_card,
    attribute_cards,
    attribute_sentence,
    body_frame,
    count_clip_tokens,
    instance_attributes,
)
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES
from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, parse_label_values, remap

# Structures of the example scan checked on every grid: (CDPDNet key, expected side, level).
CHECKED = [
    ("left_kidney", "left", "upper"),
    ("right_kidney", "right", "upper"),
    ("spleen", "left", "upper"),
    ("liver", "right", "upper"),
    ("urinary_bladder", "midline", "lower"),
]


@pytest.fixture(scope="module")
def example(shared_path):
    from napari_cdpdnet.io.images import read_ct, read_label_map

    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, geom = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    assert geom.same_grid(ct.geometry)
    return ct.array, remap(seg, TOTALSEGMENTATOR_TOTAL), ct.geometry


def _describe(ct: np.ndarray, labels: np.ndarray, geometry: Geometry) -> dict:
    from napari_cdpdnet.vocabulary.catalog import structure

    body = body_frame(ct, geometry)
    return {key: instance_attributes(labels == structure(key).index, ct, geometry, body=body)
            for key, _, _ in CHECKED}


def test_cards_cover_the_vocabulary_and_agree_with_its_sides() -> None:
    cards = attribute_cards()
    assert [c.key for c in cards] == [s.key for s in STRUCTURES]
    for c, s in zip(cards, STRUCTURES, strict=True):
        if s.laterality is not None:  # a named side must be the card's side
            assert c.laterality == s.laterality, c.key
        assert c.neighbours and c.key not in c.neighbours
    assert attribute_card("left kidney") is attribute_card(3)
    assert attribute_card("spleen").laterality == "left"


def test_real_scan_attributes_match_anatomy(example) -> None:
    ct, labels, geometry = example
    got = _describe(ct, labels, geometry)
    for key, side, level in CHECKED:
        a = got[key]
        assert (a.laterality, a.level) == (side, level), key
        card = attribute_card(key)
        if card.laterality in ("left", "right"):
            assert a.laterality == card.laterality
    assert 1000 < got["liver"].volume_ml < 2000
    assert got["left_kidney"].components == 1
    assert got["liver"].elongation < 3
    # The example scan's direction is (-1, -1, 1): array x grows to the patient's right, so the
    # left kidney has the *smaller* array x although it lies on the patient's left.
    zyx_left = np.argwhere(labels == 3).mean(axis=0)
    zyx_right = np.argwhere(labels == 2).mean(axis=0)
    assert zyx_left[2] < zyx_right[2]
    assert got["left_kidney"].lateral_offset_mm > 0 > got["right_kidney"].lateral_offset_mm


def _assert_same(a: dict, b: dict, volume_rtol: float, level_atol: float) -> None:
    for key, _, _ in CHECKED:
        x, y = a[key], b[key]
        assert (x.laterality, x.level) == (y.laterality, y.level), key
        assert y.volume_ml == pytest.approx(x.volume_ml, rel=volume_rtol), key
        assert y.level_fraction == pytest.approx(x.level_fraction, abs=level_atol), key
        assert y.lateral_offset_mm == pytest.approx(x.lateral_offset_mm, abs=6.0), key


def test_flipped_grid_gives_the_same_attributes(example) -> None:
    ct, labels, geometry = example
    ref = _describe(ct, labels, geometry)
    for axes in [(2,), (1, 2), (0, 1, 2)]:
        fct, fg = flipped(ct, geometry, axes)
        flab, fg2 = flipped(labels, geometry, axes)
        assert fg == fg2 and not np.array_equal(fct, ct)
        got = _describe(fct, flab, fg)
        _assert_same(ref, got, 1e-9, 1e-6)
        for key, _, _ in CHECKED:
            np.testing.assert_allclose(got[key].centroid, ref[key].centroid, atol=1e-6)
            np.testing.assert_allclose(got[key].axes_mm, ref[key].axes_mm, rtol=1e-6)


def test_oblique_grid_gives_the_same_attributes(example) -> None:
    ct, labels, geometry = example
    ref = _describe(ct, labels, geometry)
    rot = rotation((0.3, 0.2, 1.0), 25.0)
    (oct_, olab), og = oblique([(ct, -1024, False), (labels, 0, True)], geometry, rot)
    assert not np.allclose(og.direction_matrix, geometry.direction_matrix, atol=0.1)
    got = _describe(oct_, olab, og)
    _assert_same(ref, got, 0.06, 0.03)


def test_rotated_patient_keeps_its_sides(example) -> None:
    """Same array, direction rotated by 12 degrees (the patient lies a little askew)."""
    ct, labels, geometry = example
    rot = rotation((0.0, 0.1, 1.0), 12.0)
    rg = Geometry(geometry.spacing, geometry.origin, tuple((rot @ geometry.direction_matrix).ravel()), geometry.shape)
    got = _describe(ct, labels, rg)
    for key, side, _ in CHECKED:
        assert got[key].laterality == side, key
    assert got["left_kidney"].volume_ml == pytest.approx(_describe(ct, labels, geometry)["left_kidney"].volume_ml)


def test_synthetic_blob_attributes() -> None:
    """A block of known size and HU on an anisotropic grid: volume, HU, elongation, components."""
    ct = np.full((40, 60, 60), -1000, dtype=np.int16)
    ct[5:35, 10:50, 2:58] = 40  # the body
    mask = np.zeros(ct.shape, dtype=bool)
    mask[10:30, 20:25, 46:51] = True  # 20 slices x 5 x 5 voxels, patient left of the body centre
    mask[10:12, 40:42, 12:14] = True  # a second piece
    ct[mask] = 200
    g = Geometry((1.0, 1.0, 2.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), ct.shape)
    a = instance_attributes(mask, ct, g)
    assert a.volume_ml == pytest.approx(mask.sum() * 2.5 / 1000)
    assert a.hu_mean == pytest.approx(200) and a.hu_sd == pytest.approx(0)
    assert a.density == "enhancing" and a.components == 2
    assert a.laterality == "left" and a.level == "mid"
    main = instance_attributes(mask & (np.arange(60) >= 20)[None, None, :], ct, g)
    assert main.axes_mm[0] == pytest.approx(50.0, rel=0.01)  # 20 slices x 2.5 mm
    assert main.elongation == pytest.approx(10.0, rel=0.01)
    assert main.features().shape == (len(FEATURE_NAMES),)
    with pytest.raises(Exception, match="empty"):
        instance_attributes(np.zeros_like(mask), ct, g)


def test_sentences_fit_clip_context(example) -> None:
    ct, labels, geometry = example
    inst = _describe(ct, labels, geometry)["spleen"]
    for card in attribute_cards():
        for text in (attribute_sentence(card), attribute_sentence(card, inst)):
            assert text.startswith(f"A computerized tomography of a {card.name.lower()}")
            assert count_clip_tokens(text)[0] <= CLIP_CONTEXT
        for text in (attribute_sentence(card, exact=False), attribute_sentence(card, inst, exact=False)):
            assert count_clip_tokens(text, exact=False)[0] <= CLIP_CONTEXT
    only = attribute_sentence(instance=inst)
    assert "left" in only and "upper" in only and f"{inst.volume_ml:.0f} mL" in only
    tight = attribute_sentence(attribute_card("liver"), inst, limit=30)
    assert count_clip_tokens(tight)[0] <= 30


def test_token_estimate_is_an_upper_bound() -> None:
    pytest.importorskip("open_clip")
    for card in attribute_cards():
        text = attribute_sentence(card, limit=200)
        exact, is_exact = count_clip_tokens(text)
        assert is_exact and count_clip_tokens(text, exact=False)[0] >= exact


def test_mappings() -> None:
    labels = np.array([[[0, 3, 12, 13, 99]]])
    assert remap(labels, TOTALSEGMENTATOR_TOTAL).tolist() == [[[0, 3, 16, 16, 0]]]
    assert parse_label_values("5=6,1=1") == {5: 6, 1: 1}
    assert parse_label_values("TotalSegmentator") == TOTALSEGMENTATOR_TOTAL
    with pytest.raises(Exception, match="outside 1..32"):
        remap(labels, None)


def test_roi_core_is_headless_and_light() -> None:
    """The ROI core never imports napari or Qt, and loads torch only when a model is used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import napari_cdpdnet.example.attributes, napari_cdpdnet.example.ranking, napari_cdpdnet.example.mapper\n"
        "import napari_cdpdnet.example.run, napari_cdpdnet.commands.segment_by_example\n"
        "import napari_cdpdnet.commands.train_roi_prompts\n"
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'PyQt6', 'open_clip') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
