"""Nothing a person painted is lost: the recovery store, the dock's autosave, the restore offer
after a killed viewer, and the question before closing with unexported edits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.export.labeltable import LabelRow
from napari_cdpdnet.export.recovery import FORMAT, RecoveryStore, ct_fingerprint, new_entry_id
from napari_cdpdnet.geometry import DicomReference, Geometry

REPO = Path(__file__).resolve().parent.parent


def _geometry(shape=(4, 6, 7)) -> Geometry:
    ref = DicomReference("1.2.3", "1.2.3.4", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.2",
                         tuple(f"1.2.3.4.{k}" for k in range(shape[0])), tuple(f"/x/{k}.dcm" for k in range(shape[0])))
    return Geometry((0.8, 0.9, 2.5), (-10.0, 20.0, 30.0), tuple(np.eye(3).ravel()), shape, dicom=ref)


# ============================================================================ the store (no Qt)
def test_fingerprint_follows_content_and_grid_not_the_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ct = rng.integers(-1000, 1000, (40, 16, 16)).astype(np.int16)
    g = _geometry(ct.shape)
    key = ct_fingerprint(ct, g)
    assert key == ct_fingerprint(ct.copy(), g)  # a copy (a moved or renamed file) is the same CT
    sampled = ct.copy()
    sampled[0, 5, 5] += 1  # slice 0 is always sampled
    assert ct_fingerprint(sampled, g) != key
    moved = Geometry(g.spacing, (-10.0, 20.0, 31.0), g.direction, g.shape)
    assert ct_fingerprint(ct, moved) != key
    assert ct_fingerprint(ct.astype(np.float32), g) != key
    assert len(key) == 32


def test_save_load_round_trip_keeps_voxels_edits_table_and_metadata(tmp_path: Path) -> None:
    store = RecoveryStore(tmp_path)
    g = _geometry()
    labels = np.zeros(g.shape, np.uint8)
    labels[1:3, 2:4, 2:5] = 6
    labels[0, 0, 0] = 40  # a plain label a person painted
    edited = np.zeros(g.shape, bool)
    edited[0, 0, 0] = True
    rows = [LabelRow(6, "liver", "Liver", "#dc6e5a", "abdomen", "", "", "", "", 12, 0.27, 40.0, 3.0, True,
                     "CDPDNet+edited")]
    meta = {"cdpdnet": {"structures": ["liver"], "run": 2, "edited": True}, "reviewed_labels": {6},
            "geometry": g, "opaque": object()}
    entry_id = new_entry_id()
    saved = store.save("k" * 32, entry_id, labels, g, layer_name="CDPDNet: liver #2", metadata=meta, rows=rows,
                       edited=edited)
    [entry] = store.entries("k" * 32)
    assert entry.entry_id == entry_id and entry.folder == saved.folder
    assert entry.layer_name == "CDPDNet: liver #2" and entry.meta["format"] == FORMAT
    back = store.load(entry)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.edited, edited)
    assert back.geometry == g  # the DICOM references too
    assert back.meta["metadata"]["cdpdnet"]["structures"] == ["liver"]
    assert back.meta["metadata"]["reviewed_labels"] == [6] and "opaque" not in back.meta["metadata"]
    table = (entry.folder / "table.csv").read_text().splitlines()
    assert len(table) == 2 and table[1].startswith("6,liver,Liver")
    assert "1 label" in entry.describe()


def test_a_new_copy_replaces_the_old_only_once_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_cdpdnet.export.labeltable as labeltable

    store = RecoveryStore(tmp_path)
    g = _geometry()
    first = np.ones(g.shape, np.uint8)
    store.save("key", "a" * 32, first, g, layer_name="L")
    store.save("key", "a" * 32, first * 2, g, layer_name="L")
    assert len(list((tmp_path / "key").iterdir())) == 1  # the older copy is gone

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(labeltable, "write_label_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save("key", "a" * 32, first * 3, g, layer_name="L")
    [entry] = store.entries("key")
    np.testing.assert_array_equal(store.load(entry).labels, first * 2)  # the last complete copy
    assert [p.name for p in (tmp_path / "key").iterdir() if p.name.startswith(".tmp")] == []


def test_exported_discarded_and_old_copies(tmp_path: Path) -> None:
    store = RecoveryStore(tmp_path, max_age_days=1)
    g = _geometry()
    a = store.save("key", "a" * 32, np.ones(g.shape, np.uint8), g, layer_name="A")
    b = store.save("key", "b" * 32, np.ones(g.shape, np.uint8), g, layer_name="B")
    store.mark_exported(a)
    assert [e.layer_name for e in store.entries("key")] == ["B"]
    assert {e.layer_name for e in store.entries("key", include_exported=True)} == {"A", "B"}
    store.discard(b)
    assert store.entries("key") == []
    old = tmp_path / "key" / f"{'c' * 32}@{int((time.time() - 3 * 86400) * 1e9)}"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    assert store.prune() == 1 and not old.exists()


# ============================================================================ the dock
@pytest.fixture
def dcmqi(shared_path) -> Path:
    return shared_path("data", "dcmqi", "ct-3slice")


def _result_layer(widget, image, value: int = 6):
    from napari_cdpdnet._gui.layer_input import ImageSnapshot
    from napari_cdpdnet.vocabulary.catalog import structure

    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 180:300, 150:280] = value
    return widget.add_result_layer(labels, [structure(value)], ImageSnapshot.of(image), request="liver", preset="fast")


def _paint(layer, zyx, value: int, size: int = 15) -> None:
    layer.brush_size = size
    layer.paint(zyx, value)  # napari's brush: one undoable edit, reported by the paint event


def test_edits_are_autosaved_throttled_in_the_background(make_napari_viewer, qtbot, dcmqi, monkeypatch) -> None:
    from gui_support import add_segmentation_dock

    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot)
    recovery = widget.recovery
    recovery.interval_ms = 300
    saves = []
    real_save = recovery.store.save
    monkeypatch.setattr(recovery.store, "save", lambda *a, **k: saves.append(time.time()) or real_save(*a, **k))
    [image] = viewer.open(str(dcmqi), plugin="napari-cdpdnet")
    layer = _result_layer(widget, image)
    qtbot.wait(600)
    assert saves == []  # a run's result is not an edit: nothing to save yet
    for k in range(5):  # five strokes within one interval: one copy
        _paint(layer, (1, 200 + 10 * k, 200), 1)
    qtbot.waitUntil(lambda: len(saves) == 1, timeout=10_000)
    qtbot.wait(700)
    assert len(saves) == 1
    key = ct_fingerprint(np.asarray(image.data), image.metadata["geometry"])
    [entry] = recovery.store.entries(key)
    saved = recovery.store.load(entry)
    np.testing.assert_array_equal(saved.labels, layer.data)
    assert saved.edited is not None and saved.edited[1, 200, 200] and not saved.edited[0, 0, 0]
    assert recovery.unexported() == [layer.name]


_KILLED_SESSION = textwrap.dedent('''
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_cdpdnet._widget import SegmentationWidget
    from napari_cdpdnet._gui.layer_input import ImageSnapshot
    from napari_cdpdnet.export.recovery import ct_fingerprint
    from napari_cdpdnet.vocabulary.catalog import structure

    ct, expected = sys.argv[1], sys.argv[2]
    viewer = napari.Viewer(show=False)
    widget = SegmentationWidget(viewer)
    widget.recovery.interval_ms = 300
    [image] = viewer.open(ct, plugin="napari-cdpdnet")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 180:300, 150:280] = 6
    layer = widget.add_result_layer(labels, [structure(6)], ImageSnapshot.of(image), request="liver", preset="fast")
    layer.brush_size = 21
    layer.paint((1, 240, 200), 0)      # erase part of the liver
    layer.paint((2, 100, 400), 1)      # paint a spleen elsewhere
    layer.brush_size = 5
    layer.paint((0, 400, 100), 40)     # and a label of one's own
    key = ct_fingerprint(np.asarray(image.data), image.metadata["geometry"])
    app = QApplication.instance()
    deadline = time.time() + 120
    while time.time() < deadline:
        app.processEvents()
        entries = widget.recovery.store.entries(key)
        if entries and np.array_equal(widget.recovery.store.load(entries[0]).labels, layer.data):
            break
        time.sleep(0.05)
    np.save(expected, np.asarray(layer.data))
    print("SAVED", flush=True)
    while True:  # a viewer still open, never exported: killed from outside
        app.processEvents()
        time.sleep(0.05)
''')


@pytest.mark.gui
def test_killed_viewer_edits_are_offered_back_and_restored_voxel_for_voxel(
    make_napari_viewer, qtbot, dcmqi, tmp_path: Path, notes
) -> None:
    if not os.environ.get("DISPLAY"):
        pytest.skip("the killed session needs a display (run under xvfb-run)")
    from gui_support import add_segmentation_dock

    expected_file = tmp_path / "painted.npy"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    session = subprocess.Popen([sys.executable, "-c", _KILLED_SESSION, str(dcmqi), str(expected_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        line = session.stdout.readline()  # blocks until the copy is on disk (or the session died)
        assert line.strip() == "SAVED", "the session ended before autosaving"
    finally:
        session.send_signal(signal.SIGKILL)  # no close, no flush, no export
        session.wait(30)
    assert session.returncode == -signal.SIGKILL
    painted = np.load(expected_file)

    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot)
    offers = []
    widget.recovery.ask_restore = lambda entries, name: offers.append((entries, name)) or "restore"
    viewer.open(str(dcmqi), plugin="napari-cdpdnet")
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=20_000)
    [(entries, image_name)] = offers
    assert [e.layer_name for e in entries] == ["CDPDNet: liver"] and image_name == "ct-3slice"
    image, restored = viewer.layers
    np.testing.assert_array_equal(restored.data, painted)  # voxel for voxel
    assert {0, 1, 6, 40} == set(np.unique(restored.data))
    assert restored.name == "CDPDNet: liver" and restored.metadata["image_layer"] == "ct-3slice"
    assert restored.metadata["geometry"].same_grid(image.metadata["geometry"])
    tracker = widget.trackers[id(restored)]
    assert tracker.mask is not None and tracker.mask[2, 100, 400] and tracker.mask[1, 240, 200]
    assert any("Restored 1 layer" in m for m in notes["info"])
    # the restored layer keeps being saved under the same entry
    widget.recovery.interval_ms = 200
    _paint(restored, (0, 50, 50), 3)
    store, key = widget.recovery.store, entries[0].key
    qtbot.waitUntil(lambda: store.load(store.entries(key)[0]).labels[0, 50, 50] == 3, timeout=10_000)
    assert [e.entry_id for e in store.entries(key)] == [entries[0].entry_id]


def test_discard_later_and_exported_copies_are_not_offered(make_napari_viewer, qtbot, dcmqi, tmp_path: Path) -> None:
    from gui_support import add_segmentation_dock

    from napari_cdpdnet._gui.recovery import note_export

    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot)
    widget.recovery.interval_ms = 100
    [image] = viewer.open(str(dcmqi), plugin="napari-cdpdnet")
    layer = _result_layer(widget, image)
    _paint(layer, (1, 200, 200), 1)
    widget.recovery.flush()
    store = widget.recovery.store
    key = ct_fingerprint(np.asarray(image.data), image.metadata["geometry"])
    assert len(store.entries(key)) == 1
    note_export(layer, [tmp_path / "x.nii.gz"])  # what the structure table does after an export
    widget.recovery.flush()
    qtbot.waitUntil(lambda: store.entries(key) == [], timeout=5_000)
    assert widget.recovery.unexported() == []
    _paint(layer, (1, 250, 200), 1)  # edited again after the export: offered again
    widget.recovery.flush()
    assert len(store.entries(key)) == 1 and widget.recovery.unexported() == [layer.name]

    for answer, left in (("later", 1), ("discard", 0)):
        other = make_napari_viewer()
        dock = add_segmentation_dock(other, qtbot)
        asked: list[str] = []
        dock.recovery.ask_restore = lambda entries, name, a=answer, seen=asked: seen.append(name) or a
        other.open(str(dcmqi), plugin="napari-cdpdnet")
        qtbot.waitUntil(lambda seen=asked: bool(seen), timeout=10_000)
        assert len(other.layers) == 1 and len(store.entries(key)) == left


def test_closing_with_unexported_edits_asks_and_headless_closes_never_do(make_napari_viewer, qtbot, dcmqi) -> None:
    from gui_support import add_segmentation_dock
    from qtpy.QtCore import QEvent
    from qtpy.QtGui import QCloseEvent

    from napari_cdpdnet._gui.recovery import note_export

    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot)
    recovery = widget.recovery
    [image] = viewer.open(str(dcmqi), plugin="napari-cdpdnet")
    layer = _result_layer(widget, image)
    asked: list[list[str]] = []
    answer = [False]
    recovery.confirm_close = lambda names: asked.append(names) or answer[0]
    assert not recovery.interactive()  # a test viewer is never on screen: no question by default
    window = viewer.window._qt_window
    assert recovery.may_close(asked_by_user=True) and asked == []  # no edits yet

    _paint(layer, (1, 200, 200), 1)
    recovery.interactive = lambda: True  # as if on screen
    window.close(False, True)  # napari's "Close Window": declined, the viewer stays
    assert asked == [[layer.name]] and len(viewer.layers) == 2
    assert recovery.store.entries(ct_fingerprint(np.asarray(image.data), image.metadata["geometry"]))  # saved first

    class UserClose(QCloseEvent):  # the window's close button (a spontaneous event)
        def spontaneous(self) -> bool:
            return True

    event = UserClose()
    assert recovery._filter.eventFilter(window, event) is True and not event.isAccepted()
    assert len(asked) == 2
    event = QCloseEvent()  # a script's close: never asked
    assert recovery._filter.eventFilter(window, event) is False and len(asked) == 2
    assert event.type() == QEvent.Type.Close

    note_export(layer, [])
    assert recovery.may_close(asked_by_user=True) and len(asked) == 2  # exported: nothing to ask
