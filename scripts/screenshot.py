"""Save docs/screenshot.png: the correction workflow in napari, on a real CT and a real label map.

What the picture shows is true: the example CT opened with the napari-cdpdnet reader, and a label
map opened from file, TotalSegmentator's segmentation of that CT (shared/data) mapped onto
CDPDNet's structure numbering, as a CDPDNet result layer; the brush is active on it, the
structure table shows the measured volumes and HU, and the segmentation dock shows the request
that names the same structures. It is *not* a CDPDNet output: the official weights cannot be
downloaded where the picture is made, and a random-weights model would only paint noise. The
caption in the image and in the README say so.

Needs a display: run it under Xvfb from the repository root:

    xvfb-run -a -s "-screen 0 1600x1250x24" python scripts/screenshot.py

Options: ``--shared DIR`` (default: ../shared beside the checkout), ``--out PATH`` (default
docs/screenshot.png).
"""

from __future__ import annotations

import argparse
import io
import sys
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
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    args = parser.parse_args(argv)
    ct_path = args.shared / "data" / "totalsegmentator" / "example_ct.nii.gz"
    seg_path = args.shared / "data" / "totalsegmentator" / "example_seg_full.nii.gz"
    for p in (ct_path, seg_path):
        if not p.exists():
            raise SystemExit(f"{p}: missing (pass --shared)")

    sys.path.insert(0, str(REPO))
    from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda

    block_triton_without_cuda()
    import napari
    import numpy as np
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_cdpdnet._gui import layers as _layers
    from napari_cdpdnet._gui.launch import dock_widgets
    from napari_cdpdnet.io.images import read_label_map
    from napari_cdpdnet.vocabulary.catalog import structure
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap

    _register_manifest()
    viewer = napari.Viewer(show=True, title="napari-cdpdnet")
    viewer.window.resize(1580, 1000)
    # The table is the tab shown: it is what the correction changes.
    seg_widget, table = dock_widgets(viewer, front="structures")
    [image] = viewer.open(str(ct_path), plugin="napari-cdpdnet")
    geometry = image.metadata["geometry"]
    reference, ref_geometry = read_label_map(seg_path)
    if not ref_geometry.same_grid(geometry):
        raise SystemExit("the label map is not on the CT's grid")
    keys = ["liver", "spleen", "right_kidney", "left_kidney", "stomach", "pancreas", "aorta",
            "inferior_vena_cava", "gallbladder"]
    structures = [structure(k) for k in keys]
    mapped = remap(reference, TOTALSEGMENTATOR_TOTAL)
    mapped[~np.isin(mapped, [s.index for s in structures])] = 0
    data, kwargs, _ = _layers.labels_layer_data(
        mapped, geometry, structures, image_layer=image.name, source_path=str(seg_path),
        request="opened from file: TotalSegmentator reference", preset="-", run=1,
    )
    kwargs["name"] = "reference label map (from file)"
    labels = viewer.add_labels(data, **kwargs)
    labels.opacity = RESULT_OPACITY
    labels.mode = "paint"
    labels.brush_size = 8
    labels.selected_label = structure("liver").index
    seg_widget.text_edit.setText("liver, spleen, kidneys, stomach, pancreas, aorta, IVC, gallbladder")
    table.labels_combo.setCurrentText(labels.name)
    table.refresh()
    if not table.rows:
        raise SystemExit(f"the structure table stayed empty: {table.status.text()}")
    z = int(np.nonzero((mapped == structure("liver").index).any(axis=(1, 2)))[0].mean())
    viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])
    viewer.layers.selection.active = labels
    overlay = viewer.canvas.overlays.text if hasattr(viewer, "canvas") else viewer.text_overlay
    overlay.visible = True
    overlay.font_size = 10
    overlay.color = "yellow"
    overlay.position = "top_left"
    overlay.text = (
        "Correcting a label map opened from file:\nTotalSegmentator's segmentation of its example CT,\n"
        "mapped to CDPDNet structures (not a CDPDNet output)"
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
