"""Save docs/screenshot.png: napari with both CDPDNet docks and a result shown over the CT.

Docks: "CDPDNet segmentation" (with its segment-by-example section) and "CDPDNet structures"
(the table filled for the result). The result layer is drawn at a lower opacity so the CT
stays readable under it.

The model is a *tiny random* CDPDNet written on the fly (tests/model_support.py), so the picture
shows the interface, not segmentation quality; the caption in the image says so. Needs a
display: run it under Xvfb from the repository root:

    xvfb-run -a -s "-screen 0 1600x1250x24" python scripts/screenshot.py

Options: ``--ct PATH`` (default: ../shared/data/totalsegmentator/example_ct.nii.gz beside the
checkout), ``--out PATH`` (default docs/screenshot.png), ``--request TEXT``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_BYTES = 1_000_000
#: Opacity of the result layer in the picture (the default 0.5 hides too much of the CT).
RESULT_OPACITY = 0.3


def _register_manifest() -> None:
    """Make napari find this plugin from the source tree when it is not installed."""
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    if "napari-cdpdnet" not in pm._manifests:
        pm.register(npe2.PluginManifest.from_file(REPO / "napari.yaml"))


def _save_png(array, out: Path) -> int:
    """Write RGB(A) pixels as PNG under MAX_BYTES (palette-quantised if the plain PNG is larger)."""
    from PIL import Image

    img = Image.fromarray(array[..., :3])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        raise SystemExit(f"screenshot is {buf.tell()} bytes even quantised; make the window smaller")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return buf.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path,
                        default=REPO.parent / "shared" / "data" / "totalsegmentator" / "example_ct.nii.gz")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    parser.add_argument("--request", default="liver, left kidney")
    args = parser.parse_args(argv)
    if not args.ct.exists():
        raise SystemExit(f"{args.ct}: no such CT (pass --ct)")

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from napari_cdpdnet._triton_guard import block_triton_without_cuda

    block_triton_without_cuda()
    import napari
    from model_support import write_tiny_weights
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_cdpdnet._table_widget import StructureTableWidget
    from napari_cdpdnet._widget import SegmentationWidget
    from napari_cdpdnet.segmenter import Segmenter

    _register_manifest()
    viewer = napari.Viewer(show=True, title="napari-cdpdnet")
    viewer.window.resize(1580, 1230)
    [image] = viewer.open(str(args.ct), plugin="napari-cdpdnet")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, dino, _ = write_tiny_weights(Path(tmp))
        segmenter = Segmenter(checkpoint=ckpt, dino=dino, allow_download=False)
        widget = SegmentationWidget(viewer, segmenter=segmenter)
        viewer.window.add_dock_widget(widget, name="CDPDNet segmentation", area="right")
        table = StructureTableWidget(viewer)
        viewer.window.add_dock_widget(table, name="CDPDNet structures", area="right")
        widget.text_edit.setText(args.request)
        widget.preset_combo.setCurrentText("fast")
        loop = QEventLoop()
        status: list[str] = []
        widget.run_finished.connect(lambda s: (status.append(s), loop.quit()))
        if widget.run() is None:
            raise SystemExit(f"the widget refused to run: {widget.status_label.text()}")
        loop.exec()
        if status != ["done"]:
            raise SystemExit(f"run ended with {status}: {widget.status_label.text()}")
        labels = viewer.layers[-1]
        labels.opacity = RESULT_OPACITY
        table.labels_combo.setCurrentText(labels.name)
        table.table.setMinimumHeight(84)  # header and both rows visible
        table.refresh()
        if not table.rows:
            raise SystemExit(f"the structure table stayed empty: {table.status.text()}")
        # show a slice through the middle of the result
        z = int(labels.data.any(axis=(1, 2)).nonzero()[0].mean()) if labels.data.any() else image.data.shape[0] // 2
        viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])
        viewer.layers.selection.active = labels
        widget.tree.expandItem(widget.tree.topLevelItem(0))
        overlay = viewer.canvas.overlays.text if hasattr(viewer, "canvas") else viewer.text_overlay
        overlay.visible = True
        overlay.font_size = 10
        overlay.color = "yellow"
        overlay.position = "top_left"
        overlay.text = (
            "TINY RANDOM weights: interface demo,\nnot a real segmentation.\n"
            "CT: TotalSegmentator example_ct"
        )
        wait = QEventLoop()
        QTimer.singleShot(1500, wait.quit)
        wait.exec()
        pixels = viewer.screenshot(canvas_only=False, flash=False)
        size = _save_png(pixels, args.out)
    print(f"wrote {args.out} ({size:,} bytes, {pixels.shape[1]}x{pixels.shape[0]})")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
