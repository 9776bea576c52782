"""napari reader and writer adapters, called directly (plus one small test in a real viewer)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_synth import stack_positions, write_series

from napari_cdpdnet._reader import ABDOMEN_WINDOW, napari_get_reader
from napari_cdpdnet._writer import geometry_for_layer, write_labels
from napari_cdpdnet.errors import CdpdnetError, InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io.images import read_label_map

REPO = Path(__file__).resolve().parent.parent
METADATA_KEYS = {"geometry", "source_path", "warnings", "info"}


def _oblique() -> Geometry:
    a = np.deg2rad(25.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return Geometry((0.8, 0.9, 2.5), (-100.0, 50.0, 30.0), tuple(rot.ravel()), (4, 6, 7))


def _world_from_layer_kwargs(kwargs: dict, zyx: np.ndarray) -> np.ndarray:
    """Apply napari's scale → rotate → translate (or the affine) to a data index, in zyx."""
    if "affine" in kwargs:
        return (kwargs["affine"] @ np.append(zyx, 1.0))[:3]
    return kwargs["rotate"] @ (np.asarray(kwargs["scale"]) * zyx) + np.asarray(kwargs["translate"])


@pytest.fixture
def nifti_ct(tmp_path: Path) -> tuple[Path, Geometry, np.ndarray]:
    g = _oblique()
    hu = np.random.default_rng(1).integers(-1000, 1000, size=g.shape).astype(np.int16)
    path = tmp_path / "patient_ct.nii.gz"
    sitk.WriteImage(g.to_sitk(hu), str(path), True)
    return path, g, hu


# ================================================================== reader
def test_reader_declines_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty").mkdir()
    for p in ["notes.txt", "photo.png", "empty", "missing.nii.gz"]:
        assert napari_get_reader(str(tmp_path / p)) is None, p
    assert napari_get_reader([]) is None
    assert napari_get_reader([str(tmp_path / "notes.txt")]) is None
    assert napari_get_reader(None) is None  # type: ignore[arg-type]  # never raises


def test_reader_opens_ct_with_patient_geometry(nifti_ct) -> None:
    path, g, hu = nifti_ct
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    np.testing.assert_array_equal(data, hu)
    assert kwargs["name"] == "patient_ct"
    assert kwargs["contrast_limits"] == ABDOMEN_WINDOW
    meta = kwargs["metadata"]
    assert set(meta) == METADATA_KEYS
    assert meta["geometry"].same_grid(g, atol=1e-4)
    assert meta["source_path"] == str(path)
    assert meta["warnings"] == [] and meta["info"]["format"] == "NIfTI"
    for zyx in ([0, 0, 0], [3, 5, 6], [1, 2, 3]):
        world_zyx = _world_from_layer_kwargs(kwargs, np.array(zyx, float))
        np.testing.assert_allclose(world_zyx[::-1], g.index_to_world(np.array(zyx)), atol=1e-4)


def test_reader_opens_label_map_as_labels(shared_path) -> None:
    path = shared_path("data", "dcmqi", "liver_seg.nrrd")
    [(data, kwargs, kind)] = napari_get_reader(str(path))(str(path))
    assert kind == "labels"
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    assert kwargs["name"] == "liver_seg"
    assert set(kwargs["metadata"]) == METADATA_KEYS
    assert "contrast_limits" not in kwargs


def test_reader_opens_dicom_folder_and_its_label_map_on_one_grid(shared_path) -> None:
    folder = shared_path("data", "dcmqi", "ct-3slice")
    seg = shared_path("data", "dcmqi", "liver_seg.nrrd")
    [(ct, ct_kwargs, kind)] = napari_get_reader(str(folder))(str(folder))
    [(_, seg_kwargs, _)] = napari_get_reader(str(seg))(str(seg))
    assert kind == "image" and ct.shape == (3, 512, 512)
    geometry = ct_kwargs["metadata"]["geometry"]
    assert geometry.dicom is not None and len(geometry.dicom.sop_instance_uids) == 3
    assert ct_kwargs["name"] == "ct-3slice"  # no series description: the folder name
    for key in ("scale", "translate", "rotate"):
        np.testing.assert_allclose(ct_kwargs[key], seg_kwargs[key], atol=1e-3)


def test_reader_turns_warnings_into_notifications_and_metadata(shared_path) -> None:
    folder = shared_path("data", "monai_ct_dicom")
    with pytest.warns(UserWarning, match="uneven slice spacing"):
        [(_, kwargs, _)] = napari_get_reader(str(folder))(str(folder))
    assert any("uneven slice spacing" in w for w in kwargs["metadata"]["warnings"])
    assert kwargs["name"] == "Routine Brain"


def test_reader_reads_several_paths(nifti_ct, tmp_path: Path) -> None:
    path, _, _ = nifti_ct
    write_series(tmp_path / "dcm", np.full((3, 4, 4), 40, np.int16),
                 positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 2, 4]), description="Abdomen")
    paths = [str(path), str(tmp_path / "dcm")]
    layers = napari_get_reader(paths)(paths)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [("patient_ct", "image"), ("Abdomen", "image")]


def test_reader_shows_non_ct_with_a_warning_and_no_hu_window(tmp_path: Path) -> None:
    write_series(tmp_path, np.full((3, 4, 4), 300, np.int16),
                 positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 1, 2]), modality="MR")
    with pytest.warns(UserWarning, match="modality MR"):
        [(_, kwargs, kind)] = napari_get_reader(str(tmp_path))(str(tmp_path))
    assert kind == "image" and "contrast_limits" not in kwargs


def test_reader_function_notifies_the_specific_error_for_a_damaged_file(tmp_path: Path, notes) -> None:
    from napari_cdpdnet._reader import read_layers

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not really gzip")
    reader = napari_get_reader(str(bad))  # cheap check passes on the suffix
    assert callable(reader)
    assert reader(str(bad)) == [(None,)]  # napari's "nothing to add": no traceback dialog
    [message] = notes["error"]
    assert re.search(r"broken\.nii\.gz: not a readable NIfTI image", message)
    with pytest.raises(CdpdnetError, match=r"broken\.nii\.gz: not a readable NIfTI image"):
        read_layers(str(bad))  # the raising variant, for code that wants the exception


# ================================================================== writer
def test_writer_saves_on_the_stored_ct_grid(nifti_ct, tmp_path: Path) -> None:
    path, g, hu = nifti_ct
    [(_, kwargs, _)] = napari_get_reader(str(path))(str(path))
    labels = (hu > 0).astype(np.int32) * 3
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        out = tmp_path / f"mask{suffix}"
        assert write_labels(str(out), labels, {"metadata": kwargs["metadata"], "scale": (9, 9, 9)}) == [str(out)]
        back, bg = read_label_map(out)
        np.testing.assert_array_equal(back, labels)
        assert bg.same_grid(g, atol=1e-4)  # the stored geometry wins over the layer's scale


def test_writer_accepts_geometry_stored_as_a_dict(tmp_path: Path) -> None:
    g = _oblique()
    out = tmp_path / "m.nrrd"
    write_labels(str(out), np.ones(g.shape, np.uint8), {"metadata": {"geometry": g.to_dict()}})
    assert read_label_map(out)[1].same_grid(g)


def test_writer_falls_back_to_the_layer_transform_with_a_warning(tmp_path: Path) -> None:
    g = _oblique()
    t = g.napari_transform()
    attrs = {"metadata": {}, "scale": t["scale"], "translate": t["translate"], "rotate": t["rotate"]}
    out = tmp_path / "drawn.nii.gz"
    with pytest.warns(UserWarning, match="no CT geometry"):
        write_labels(str(out), np.ones(g.shape, np.uint8), attrs)
    assert read_label_map(out)[1].same_grid(g, atol=1e-4)
    # napari's affine (e.g. from an image whose direction has a reflection) is honoured too
    flipped = Geometry((1.0, 2.0, 3.0), (5.0, 6.0, 7.0), tuple(np.diag([1.0, 1.0, -1.0]).ravel()), (2, 3, 4))
    with pytest.warns(UserWarning):
        got = geometry_for_layer(flipped.shape, {"metadata": {}, **flipped.napari_transform()})
    assert got.same_grid(flipped)


def test_writer_overwrites_the_path_napari_confirmed(tmp_path: Path) -> None:
    g = _oblique()
    out = tmp_path / "m.mha"
    out.write_bytes(b"old")
    write_labels(str(out), np.ones(g.shape, np.uint8), {"metadata": {"geometry": g}})
    np.testing.assert_array_equal(read_label_map(out)[0], 1)


def test_writer_errors(tmp_path: Path) -> None:
    g = _oblique()
    meta = {"metadata": {"geometry": g}}
    with pytest.raises(InputError, match="shape .* but its CT grid is"):
        write_labels(str(tmp_path / "a.nrrd"), np.ones((1, 2, 3), np.uint8), meta)
    with pytest.raises(InputError, match="only 3-D label layers"):
        write_labels(str(tmp_path / "a.nrrd"), np.ones((5, 5), np.uint8), meta)
    with pytest.raises(InputError, match=r"cannot write label maps as '\.png'"):
        write_labels(str(tmp_path / "a.png"), np.ones(g.shape, np.uint8), meta)
    with pytest.raises(InputError, match="sheared"):
        write_labels(str(tmp_path / "a.nrrd"), np.ones(g.shape, np.uint8),
                     {"metadata": {}, "shear": (0.3, 0.0, 0.0)})
    assert list(tmp_path.iterdir()) == []


# ================================================================== manifest + a real viewer
def _register_manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    if "napari-cdpdnet" not in pm._manifests:
        pm.register(npe2.PluginManifest.from_file(REPO / "napari.yaml"))
    return pm


def test_manifest_routes_files_and_folders_to_our_reader(tmp_path: Path) -> None:
    pm = _register_manifest()
    for p in ["a.nii.gz", "b.NRRD", "c.mha", "d.dcm"]:
        names = {r.plugin_name for r in pm.iter_compatible_readers([str(tmp_path / p)])}
        assert "napari-cdpdnet" in names, p
    names = {r.plugin_name for r in pm.iter_compatible_readers([str(tmp_path)])}
    assert "napari-cdpdnet" in names
    writers = {w.command for w in pm.iter_compatible_writers(["labels"])}
    assert "napari-cdpdnet.write_labels" in writers


@pytest.mark.gui
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display: run under xvfb-run -a")
def test_viewer_opens_ct_and_saves_labels_on_its_grid(make_napari_viewer, nifti_ct, tmp_path: Path) -> None:
    _register_manifest()
    path, g, hu = nifti_ct
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-cdpdnet")
    assert layer.metadata["geometry"].same_grid(g, atol=1e-4)
    np.testing.assert_allclose(
        layer.data_to_world([3, 5, 6])[::-1], g.index_to_world(np.array([3, 5, 6])), atol=1e-4
    )
    labels = viewer.add_labels((hu > 0).astype(np.uint8), metadata=dict(layer.metadata),
                               **g.napari_transform())
    out = tmp_path / "saved.nii.gz"
    labels.save(str(out), plugin="napari-cdpdnet")
    back, bg = read_label_map(out)
    np.testing.assert_array_equal(back, hu > 0)
    assert bg.same_grid(g, atol=1e-4)
