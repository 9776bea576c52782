"""Geometry maths: index ↔ patient coordinates, LPS/RAS and the napari transform."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cdpdnet.geometry import DicomReference, Geometry


def _oblique() -> Geometry:
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Geometry((0.7, 0.8, 2.5), (-120.0, 30.0, 55.0), tuple(rot.ravel()), (7, 11, 13))


def test_index_world_round_trip_and_sitk_agree() -> None:
    sitk = pytest.importorskip("SimpleITK")
    g = _oblique()
    img = g.to_sitk(np.zeros(g.shape, np.int16))
    for zyx in [(0, 0, 0), (6, 10, 12), (3, 2, 9)]:
        expected = img.TransformIndexToPhysicalPoint(tuple(int(v) for v in zyx[::-1]))
        np.testing.assert_allclose(g.index_to_world(np.array(zyx)), expected, atol=1e-9)
        np.testing.assert_allclose(g.world_to_index(np.array(expected)), zyx, atol=1e-9)
    assert Geometry.from_sitk(img).same_grid(g)
    assert isinstance(img, sitk.Image)


def test_ras_affine_negates_x_and_y() -> None:
    g = _oblique()
    lps, ras = g.affine_lps(), g.affine_ras()
    np.testing.assert_allclose(ras[0], -lps[0])
    np.testing.assert_allclose(ras[1], -lps[1])
    np.testing.assert_allclose(ras[2:], lps[2:])
    assert Geometry.from_affine_ras(ras, g.shape).same_grid(g)


def test_napari_transform_maps_array_indices_to_patient_space() -> None:
    g = _oblique()
    t = g.napari_transform()
    lin = t["rotate"] @ np.diag(t["scale"])
    zyx = np.array([3.0, 2.0, 9.0])
    world_zyx = lin @ zyx + np.asarray(t["translate"])
    np.testing.assert_allclose(world_zyx[::-1], g.index_to_world(zyx), atol=1e-9)


def test_reflected_direction_falls_back_to_affine() -> None:
    g = Geometry((1, 1, 1), (0, 0, 0), tuple(np.diag([1.0, 1.0, -1.0]).ravel()), (2, 2, 2))
    t = g.napari_transform()
    assert set(t) == {"affine"}
    np.testing.assert_allclose(t["affine"][:3, :3] @ [1, 0, 0], [-1, 0, 0])


def test_dict_round_trip_keeps_dicom_references() -> None:
    ref = DicomReference("1.2", "1.2.3", "1.2.4", "1.2.840.10008.5.1.4.1.1.2", ("a", "b"), ("f1", "f2"))
    g = _oblique().with_dicom(ref)
    back = Geometry.from_dict(g.to_dict())
    assert back.same_grid(g) and back.dicom == ref


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="direction"):
        Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="does not match"):
        Geometry.identity((2, 2, 2)).to_sitk(np.zeros((3, 2, 2)))
