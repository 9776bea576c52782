"""The official post-processing rules (SPEC §12) on small synthetic masks, and the label merge."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.inference.postprocess import (
    PostprocessRules,
    channels_needed,
    companions,
    cut_portal_vein,
    filter_tumour,
    keep_largest_components,
    merge_labels,
    merge_order,
    postprocess,
    split_lungs,
)
from napari_cdpdnet.inference.segmenter import postprocess_rules

SHAPE = (30, 24, 20)
#: The official roles, from resources/postprocess.json through the vocabulary.
RULES = postprocess_rules()


def box(*slices: slice, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[slices] = True
    return m


# --------------------------------------------------------------------------- components
def test_keep_largest_components() -> None:
    big = box(slice(2, 8), slice(2, 8), slice(2, 8))
    small = box(slice(20, 22), slice(20, 22), slice(15, 17))
    mid = box(slice(12, 15), slice(2, 5), slice(2, 5))
    mask = big | small | mid
    np.testing.assert_array_equal(keep_largest_components(mask), big)
    np.testing.assert_array_equal(keep_largest_components(mask, 2), big | mid)
    assert not keep_largest_components(np.zeros(SHAPE, bool)).any()


def test_components_are_26_connected() -> None:
    """Voxels touching only at a corner belong to one component (cc3d connectivity=26)."""
    mask = np.zeros(SHAPE, bool)
    mask[5, 5, 5] = mask[6, 6, 6] = mask[7, 7, 7] = True
    mask[20, 20, 10] = mask[20, 21, 10] = True
    np.testing.assert_array_equal(keep_largest_components(mask), box(slice(5, 8), slice(5, 8), slice(5, 8))
                                  & (np.indices(SHAPE)[0] == np.indices(SHAPE)[1])
                                  & (np.indices(SHAPE)[1] == np.indices(SHAPE)[2]))


def test_size_ties_go_to_the_first_component_in_c_order() -> None:
    first = box(slice(1, 3), slice(10, 12), slice(10, 12))
    second = box(slice(10, 12), slice(0, 2), slice(0, 2))
    np.testing.assert_array_equal(keep_largest_components(first | second), first)


# --------------------------------------------------------------------------- lungs
def test_lung_split_by_position_not_by_channel() -> None:
    """Axis 0 grows to the patient's right: the component with the smaller mean index is the left lung."""
    low_x = box(slice(1, 10), slice(2, 20), slice(2, 18))   # patient's left
    high_x = box(slice(18, 29), slice(2, 20), slice(2, 18))  # patient's right
    speck = box(slice(14, 15), slice(22, 23), slice(0, 1))
    # the raw channels got the sides wrong and leaked: position decides
    right_raw = low_x | speck
    left_raw = high_x
    right, left = split_lungs(right_raw, left_raw)
    np.testing.assert_array_equal(left, low_x)
    np.testing.assert_array_equal(right, high_x)


def test_lungs_in_one_piece_are_both_empty_as_officially(caplog) -> None:
    fused = box(slice(1, 29), slice(2, 20), slice(2, 18))
    with caplog.at_level(logging.WARNING):
        right, left = split_lungs(fused, np.zeros(SHAPE, bool))
    assert not right.any() and not left.any()
    assert "not two" in caplog.text


# --------------------------------------------------------------------------- portal/splenic vein
def test_portal_vein_is_cut_below_the_pancreas() -> None:
    vein = box(slice(10, 12), slice(5, 20), slice(0, 20))
    pancreas = box(slice(5, 25), slice(10, 14), slice(8, 12))
    cut = cut_portal_vein(vein, pancreas)
    np.testing.assert_array_equal(cut, vein & (np.indices(SHAPE)[2] >= 8))


def test_empty_pancreas_leaves_the_vein_uncut(caplog) -> None:
    """The official code crashes here (min of an empty set)."""
    vein = box(slice(10, 12), slice(5, 20), slice(0, 20))
    with caplog.at_level(logging.WARNING):
        cut = cut_portal_vein(vein, np.zeros(SHAPE, bool))
    np.testing.assert_array_equal(cut, vein)
    assert "no pancreas" in caplog.text


def test_portal_vein_uses_the_post_processed_pancreas() -> None:
    vein = box(slice(10, 12), slice(5, 20), slice(0, 20))
    pancreas = box(slice(5, 25), slice(10, 14), slice(8, 12))
    stray = box(slice(26, 28), slice(0, 2), slice(1, 2))  # a false positive far below
    out = postprocess({10: vein, 11: pancreas | stray}, [10, 11], RULES)
    np.testing.assert_array_equal(out[11], pancreas)
    np.testing.assert_array_equal(out[10], vein & (np.indices(SHAPE)[2] >= 8))


# --------------------------------------------------------------------------- tumours
def official_tumour(tumour, organ_union, keep):
    """The official rule on the whole array, for comparison with the cropped implementation."""
    organ = keep_largest_components(organ_union, keep)
    organ = ndimage.binary_closing(organ, structure=np.ones((5, 5, 5)))
    organ = ndimage.binary_dilation(organ, structure=np.ones((5, 5, 5)))
    return tumour & organ


def test_liver_tumour_is_kept_inside_the_liver() -> None:
    shape = (40, 40, 40)
    liver = box(slice(5, 25), slice(5, 25), slice(5, 25), shape=shape)
    stray_liver = box(slice(30, 33), slice(30, 33), slice(30, 33), shape=shape)
    inside = box(slice(10, 14), slice(10, 14), slice(10, 14), shape=shape)
    rim = box(slice(25, 27), slice(10, 12), slice(10, 12), shape=shape)  # within the 2-voxel dilation
    outside = box(slice(30, 33), slice(30, 33), slice(30, 33), shape=shape)  # in the dropped piece
    far = box(slice(34, 36), slice(0, 2), slice(0, 2), shape=shape)
    tumour = inside | rim | outside | far
    out = filter_tumour(tumour, [liver | stray_liver], keep=1)
    np.testing.assert_array_equal(out, inside | rim)
    np.testing.assert_array_equal(out, official_tumour(tumour, liver | stray_liver, 1))


def test_kidney_tumour_keeps_both_kidneys_and_matches_the_whole_array_rule() -> None:
    shape = (40, 30, 30)
    right = box(slice(0, 12), slice(5, 20), slice(5, 20), shape=shape)
    left = box(slice(25, 38), slice(5, 20), slice(5, 20), shape=shape)
    speck = box(slice(18, 20), slice(26, 28), slice(0, 2), shape=shape)
    rng = np.random.default_rng(0)
    tumour = rng.random(shape) > 0.7
    # an organ touching the array border exercises scipy's border_value=0 erosion
    out = filter_tumour(tumour, [right, left | speck], keep=2)
    np.testing.assert_array_equal(out, official_tumour(tumour, right | left | speck, 2))
    assert out[5, 10, 10] == tumour[5, 10, 10] and out[30, 10, 10] == tumour[30, 10, 10]
    assert not out[18:20, 26:28, 0:2].any()


# --------------------------------------------------------------------------- the whole rule set
def test_postprocess_returns_only_requested_structures() -> None:
    rng = np.random.default_rng(1)
    raw = {s: rng.random(SHAPE) > 0.6 for s in (2, 3, 6, 15, 16, 17, 26)}
    out = postprocess(raw, [15, 26, 6], RULES)
    assert sorted(out) == [6, 15, 26]
    np.testing.assert_array_equal(out[15], raw[15])  # hepatic vessel: raw
    np.testing.assert_array_equal(out[6], keep_largest_components(raw[6]))
    np.testing.assert_array_equal(out[26], official_tumour(raw[26], raw[2] | raw[3], 2))
    assert out[15] is not raw[15]  # never aliases the caller's arrays


def test_postprocess_needs_the_companions() -> None:
    raw = {26: np.ones(SHAPE, bool), 2: np.ones(SHAPE, bool)}
    with pytest.raises(InputError, match=r"\[3\]"):
        postprocess(raw, [26], RULES)
    with pytest.raises(InputError, match="outside"):
        postprocess(raw, [33], RULES)


def test_companions_and_channels() -> None:
    assert companions([10], RULES) == {11}
    assert companions([16], RULES) == {17} and companions([17, 16], RULES) == set()
    assert companions([26, 27], RULES) == {2, 3, 6}
    assert companions([1, 28], RULES) == set()
    assert channels_needed([10, 26], RULES) == [1, 2, 9, 10, 25]


# --------------------------------------------------------------------------- merge
def test_merge_values_are_structure_indices_and_tumours_win() -> None:
    liver = box(slice(0, 20), slice(0, 20), slice(0, 20))
    tumour = box(slice(5, 8), slice(5, 8), slice(5, 8))
    vessel = box(slice(10, 12), slice(0, 24), slice(0, 20))
    labels = merge_labels({27: tumour, 6: liver, 15: vessel}, RULES)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 6, 15, 27}
    assert (labels[tumour] == 27).all()
    assert (labels[vessel] == 15).all()
    assert (labels[liver & ~tumour & ~vessel] == 6).all()
    assert merge_order([27, 6, 32, 15, 1], RULES) == [1, 6, 15, 27, 32]
    # an explicit order is honoured (later wins)
    assert (merge_labels({27: tumour, 6: liver}, RULES, order=[27, 6])[tumour] == 6).all()


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="no masks"):
        merge_labels({}, RULES)
    with pytest.raises(InputError, match="different shapes"):
        merge_labels({1: np.ones((2, 2, 2), bool), 2: np.ones((2, 2, 3), bool)}, RULES)
    with pytest.raises(InputError, match="no mask"):
        merge_labels({1: np.ones((2, 2, 2), bool)}, RULES, order=[1, 2])


# --------------------------------------------------------------------------- the roles as data
def test_roles_from_resources_are_the_official_ones() -> None:
    """resources/postprocess.json, read through the vocabulary, gives SPEC §12's index sets."""
    assert RULES.num_structures == 32
    assert RULES.largest_component == {*range(1, 10), 11, 12, 13, 14, *range(18, 26), 31}
    assert RULES.portal_vein == (10, 11) and RULES.lungs == (16, 17)
    assert dict(RULES.tumour_organs) == {26: ((2, 3), 2), 27: ((6,), 1)}
    assert RULES.lesions == set(range(26, 33))
    with pytest.raises(ValueError, match="outside"):
        PostprocessRules(**{**vars(RULES), "lesions": {33}})
