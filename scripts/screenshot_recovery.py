"""Screenshot of the restore offer: a CT with autosaved, unexported edits is opened again.

    xvfb-run -a -s "-screen 0 1600x1200x24" python scripts/screenshot_recovery.py OUT.png [CT]

CT defaults to ../shared/data/dcmqi/ct-3slice. A copy of an edited label map is put in a
temporary recovery folder first (as the dock's autosave would have), then napari opens the CT
the way ``cdpdnet view`` does; the whole screen is grabbed while the question is up, and the
question is answered "Not now".
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "restore_offer.png")
    repo = Path(__file__).resolve().parent.parent
    ct_path = Path(sys.argv[2]) if len(sys.argv) > 2 else repo.parent / "shared" / "data" / "dcmqi" / "ct-3slice"
    os.environ["CDPDNET_RECOVERY_DIR"] = tempfile.mkdtemp(prefix="recovery-")

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    from napari_cdpdnet._gui.launch import PLUGIN, dock_widgets
    from napari_cdpdnet.export.recovery import RecoveryStore, ct_fingerprint, new_entry_id
    from napari_cdpdnet.io import read_ct

    ct = read_ct(ct_path)
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 180:300, 150:280] = 6
    labels[:, 80:140, 330:400] = 1
    store = RecoveryStore(os.environ["CDPDNET_RECOVERY_DIR"])
    for name in ("CDPDNet: liver, spleen", "CDPDNet: liver #2"):
        store.save(ct_fingerprint(ct.array, ct.geometry), new_entry_id(), labels, ct.geometry, layer_name=name,
                   metadata={"cdpdnet": {"structures": ["liver", "spleen"], "run": 1}})

    viewer = napari.Viewer(title="napari-cdpdnet")
    viewer.window._qt_window.resize(1400, 900)
    dock_widgets(viewer)

    def grab_and_answer(seen: int = 0) -> None:
        box = next((w for w in QApplication.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible()), None)
        if box is None or seen < 5:  # up, and painted (a few rounds of the event loop)
            QTimer.singleShot(200, lambda: grab_and_answer(seen + (box is not None)))
            return
        box.repaint()
        QApplication.primaryScreen().grabWindow(0).save(str(out))
        print(f"saved {out}: {box.text()}")
        next(b for b in box.buttons() if b.text() == "Not now").click()
        QTimer.singleShot(300, viewer.close)

    QTimer.singleShot(1500, lambda: viewer.open(str(ct_path), plugin=PLUGIN))
    QTimer.singleShot(2000, grab_and_answer)
    napari.run()
    return 0 if out.is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
