"""A held-out corpus of real and awkward inputs, and a run of ``cdpdnet segment`` and the napari
reader over it that prints one line per input.

    python scripts/dicom_corpus.py build [/tmp/dicom-corpus]   # make it (outside the repository)
    python scripts/dicom_corpus.py run   [/tmp/dicom-corpus]   # run the CLI and the reader, print the table

The corpus is made from ../shared data (``$CDPDNET_SHARED_DIR``) with tests/awkward_inputs.py, but
with other parameters than tests/test_bad_inputs.py and tests/test_dicom_awkward.py use (other
series, offsets, spacings, syntaxes, combinations), plus the real series as they are. It is never
committed. Each input is either a volume (checked against the source slices read independently
with pydicom: every source slice must appear unchanged at the array index its ImagePositionPatient
maps to) or a refusal (exit 2 with a phrase). For every input: ``cdpdnet segment`` in a subprocess
(a tiny random model, so a volume's run is quick; killed after a timeout) must exit as expected,
print no traceback, leave the label map and its table for a volume and nothing at all for a
refusal; the napari reader must read the volume, or decline/notify, never raise or hang.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import awkward_inputs as A  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless  # noqa: E402

DEFAULT = Path(tempfile.gettempdir()) / "dicom-corpus"
CLI_TIMEOUT = 600
READER_TIMEOUT = 60


def shared() -> Path:
    env = os.environ.get("CDPDNET_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


# ============================================================================ build
def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))


def _volume(datasets, *, offset: float = 0.0) -> dict:
    """Expected: each source slice (HU, read by pydicom here) at its position."""
    return {"kind": "volume", "slices": [(_hu(d) + offset).tolist() for d in datasets],
            "positions": [[float(v) for v in d.ImagePositionPatient] for d in datasets]}


def build(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    data = shared() / "data"
    ct3 = A.load_series(data / "dcmqi" / "ct-3slice")
    monai = A.load_series(data / "monai_ct_dicom")
    cases: list[dict] = []

    def add(name: str, make: Callable[[Path], Path], expect: dict) -> None:
        folder = root / "inputs" / name
        folder.mkdir(parents=True)
        path = make(folder)
        if "slices" in expect:  # keep the manifest small: the expected slices go to .npy
            np.save(root / "inputs" / f"{name}.npy", np.asarray(expect.pop("slices"), np.float64))
            expect["slices"] = f"inputs/{name}.npy"
        cases.append({"id": name, "input": str(path.relative_to(root)), **expect})

    def refuse(phrase: str) -> dict:
        return {"kind": "refuse", "phrase": phrase}

    def copy_tree(src: Path) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            shutil.copytree(src, folder, dirs_exist_ok=True)
            return folder
        return make

    # --- the real data as it is
    add("real GE series (3 slices)", copy_tree(data / "dcmqi" / "ct-3slice"), _volume(ct3))
    add("real GE slice given for its series", lambda f: copy_tree(data / "dcmqi" / "ct-3slice")(f) / "02.dcm",
        _volume(ct3))
    add("real MONAI series (uneven gaps)", copy_tree(data / "monai_ct_dicom"), _volume(monai))
    add("real DICOM-SEG", lambda f: Path(shutil.copy(data / "dcmqi" / "liver.dcm", f)), refuse("Segmentation (SEG)"))
    add("real NIfTI CT", lambda f: Path(shutil.copy(data / "totalsegmentator" / "example_ct_sm.nii.gz", f)),
        {"kind": "volume"})

    # --- de-identified, regrouped
    add("MONAI, UIDs and frame of reference removed",
        lambda f: (A.write(A.blank_uids(monai, tags=A.UID_TAGS, delete=True), f, names=lambda k: f"{k:08d}"), f)[1],
        _volume(monai))
    add("GE, blank UIDs, random names, nested", lambda f: (
        A.write(A.blank_uids(ct3), f, names=lambda k: f"x{(k * 7919) % 97:03d}", nested=True), f)[1], _volume(ct3))
    add("three blank-UID phases told apart by description", lambda f: (
        [A.write(A.blank_uids(A.as_new_series(ct3, series_number=7, description=d, hu_offset=o)), f,
                 names=lambda k, d=d: f"{d}{k}") for d, o in (("a-native", 0), ("b-arterial", 25), ("c-venous", 50))],
        f)[1], _volume(ct3))
    add("one UID over a GE and a MONAI stack", lambda f: (
        A.write(A.as_new_series(ct3, series_uid="1.2.826.0.1.3680043.8.498.31337"), f / "ge"),
        A.write(A.as_new_series(monai, series_uid="1.2.826.0.1.3680043.8.498.31337"), f / "monai"), f)[-1],
        _volume(monai))

    def acquisitions(f: Path) -> Path:
        for acq in (3, 1, 2):
            part = A.as_new_series(ct3, series_uid="1.2.826.0.1.3680043.8.498.555", hu_offset=10 * acq)
            for d in part:
                d.AcquisitionNumber = acq
            A.write(part, f, names=lambda k, acq=acq: f"acq{acq}-{k}")
        return f
    add("three acquisitions at the same positions", acquisitions, _volume(ct3, offset=10))
    add("two blank-UID MONAI phases, identical headers", lambda f: (
        A.write(A.blank_uids(A.as_new_series(monai, series_number=1, description="x")), f, names=lambda k: f"p{k}"),
        A.write(A.blank_uids(A.as_new_series(monai, series_number=1, description="x", hu_offset=9)), f,
                names=lambda k: f"q{k}"), f)[-1], refuse("lie at the same slice position"))

    # --- multi-frame
    add("MONAI as one enhanced CT (uneven frames)", lambda f: (A.enhanced(monai).save_as(f / "EN0001"), f)[1],
        _volume(monai))
    add("GE legacy-converted enhanced, nested, no extension", lambda f: (
        (f / "a" / "b").mkdir(parents=True),
        A.enhanced(ct3, sop_class="1.2.840.10008.5.1.4.1.1.2.2").save_as(f / "a" / "b" / "frames"), f)[-1],
        _volume(ct3))

    def enhanced_rle(f: Path) -> Path:
        mf = A.enhanced(ct3)
        mf.compress(RLELossless)
        mf.save_as(f / "mf_rle.dcm")
        return f / "mf_rle.dcm"
    add("GE enhanced CT, RLE-compressed frames", enhanced_rle, _volume(ct3))

    # --- media and file naming
    add("MONAI on a DICOMDIR medium", lambda f: A.with_dicomdir(monai, f).parent, _volume(monai))
    add("GE DICOMDIR given as the file", lambda f: A.with_dicomdir(ct3, f), _volume(ct3))
    add("MONAI as old preamble-less files", lambda f: (
        [A.implicit_no_preamble(d, f / f"{k}.IMA") for k, d in enumerate(monai)], f)[1], _volume(monai))
    add("GE with two link loops", lambda f: (A.write(ct3, f / "series"), A.self_link(f), A.self_link(f / "series", "again"),
                                             f)[-1], _volume(ct3))
    add("GE next to a SEG, an SR and a PDF", lambda f: (
        A.write(ct3, f), shutil.copy(data / "dcmqi" / "liver.dcm", f / "seg.dcm"),
        A.structured_report(ct3[0]).save_as(f / "sr.dcm"), A.encapsulated_pdf(ct3[0]).save_as(f / "doc.dcm"), f)[-1],
        _volume(ct3))
    add("GE with a duplicate copy of one slice", lambda f: (
        A.write(ct3, f), shutil.copy(f / "IM0002.dcm", f / "IM0002 (copy).dcm"), f)[-1], _volume(ct3))

    def localizer(f: Path) -> Path:
        A.write(ct3, f)
        scout = copy.deepcopy(ct3[0])
        scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.save_as(f / "scout.dcm")
        return f
    add("GE with a localizer in the series", localizer, _volume(ct3))

    # --- geometry
    add("GE tilted 20 degrees over 5 slices", lambda f: (
        A.write(A.restack(ct3, [0, 2, 4, 6, 8], drift_mm_per_mm=(0, -0.364, 0), gantry_tilt=20.0), f), f)[1],
        {"kind": "tilted", "degrees": 20.0, "shape": [5, 512, 512]})
    uneven = A.restack(ct3, [0, 1.5, 3, 6, 7.5])
    add("GE with one slice missing", lambda f: (A.write(uneven, f), f)[1], _volume(uneven))

    # --- compression
    for syntax, label in ((JPEGLSLossless, "JPEG-LS"), (JPEG2000Lossless, "JPEG 2000"), (RLELossless, "RLE")):
        series = A.compressed(monai, syntax)
        add(f"MONAI in {label}", lambda f, s=series: (A.write(s, f), f)[1], _volume(monai))
    add("MONAI in JPEG XL (no decoder here)", lambda f: (
        [A.write_any_syntax(d, f / f"{k}.dcm") for k, d in enumerate(A.compressed(monai, A.JPEG_XL))], f)[1],
        refuse("no installed decoder reads"))

    def htj2k(f: Path) -> Path:
        from pydicom.encaps import encapsulate
        for k, d in enumerate(A.compressed(monai, A.JPEG_XL)):
            d.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.203"
            d.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(32)])
            A.write_any_syntax(d, f / f"{k}.dcm")
        return f
    add("HTJ2K that GDCM cannot decode", htj2k, refuse("pylibjpeg-openjpeg"))

    # --- damaged
    add("MONAI with one slice's header cut", lambda f: (A.truncate(A.write(monai, f)[2], keep=0.5), f)[1],
        refuse("could not be read and were skipped"))
    add("GE with one slice's pixel data cut", lambda f: (A.truncate(A.write(ct3, f)[1], keep=0.8), f)[1],
        refuse("the file is truncated or damaged"))
    add("GE with every header cut", lambda f: ([A.truncate(p, keep=0.0003) for p in A.write(ct3, f)], f)[1],
        refuse("none could be read"))

    # --- not CT volumes
    add("SEG, SR and RT structure set together", lambda f: (
        shutil.copy(data / "dcmqi" / "liver.dcm", f), A.structured_report(ct3[1]).save_as(f / "sr"),
        A.rt_structure_set(ct3[1]).save_as(f / "rtss"), f)[-1], refuse("none forms a CT volume"))
    add("two radiographs", lambda f: ([A.projection(d).save_as(f / f"dx{k}.dcm") for k, d in enumerate(ct3[:2])], f)[1],
        refuse("digital X-ray radiograph"))
    add("slide microscopy, 6 tiles", lambda f: (A.projection(ct3[0], "SM", A.WHOLE_SLIDE, 6).save_as(f / "wsi.dcm"),
                                                f / "wsi.dcm")[-1], refuse("slide-microscopy"))
    add("RT dose grid given alone", lambda f: (A.rt_dose(ct3[0], frames=5).save_as(f / "dose.dcm"), f / "dose.dcm")[-1],
        refuse("RT Dose (RTDOSE)"))
    add("PDF report among JPEG screenshots", lambda f: (
        A.encapsulated_pdf(ct3[0]).save_as(f / "report.dcm"), A.jpeg_of(ct3[0], f / "a.jpeg"),
        A.jpeg_of(ct3[1], f / "b.jpeg"), f)[-1], refuse("Encapsulated PDF (DOC)"))
    add("JPEG screenshot (.jpeg)", lambda f: A.jpeg_of(ct3[2], f / "slice.jpeg", level=400, width=2000),
        refuse("a JPEG image, not a CT volume"))

    def tiff_as_dcm(f: Path) -> Path:
        from PIL import Image
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(f / "scan.dcm", format="TIFF")
        return f / "scan.dcm"
    add("TIFF named .dcm", tiff_as_dcm, refuse("it is a TIFF image"))
    add("zipped series", lambda f: Path(shutil.make_archive(str(f / "series"), "zip", data / "dcmqi" / "ct-3slice")),
        refuse("a ZIP archive"))

    # --- volume files
    add("NaN-only NIfTI (uncompressed)", lambda f: A.non_finite_volume(f / "nan.nii", float("nan"), (3, 5, 7)),
        refuse("no finite voxel"))
    add("+inf-only NRRD", lambda f: A.non_finite_volume(f / "inf.nrrd", float("inf"), (6, 4, 4)),
        refuse("no finite voxel"))

    def nan_border(f: Path) -> Path:
        import SimpleITK as sitk
        image = sitk.ReadImage(str(data / "totalsegmentator" / "example_ct_sm.nii.gz"), sitk.sitkFloat32)
        a = sitk.GetArrayFromImage(image)
        a[:, :5, :] = np.nan
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(f / "padded.nii.gz"))
        return f / "padded.nii.gz"
    add("real NIfTI CT with a NaN border", nan_border, {"kind": "volume", "warning": "NaN or infinite"})
    add("NRRD header, data file gone", lambda f: A.detached_header(f, "nhdr", "volume.raw"), refuse("which is missing"))
    add("MetaImage header, data file gone", lambda f: A.detached_header(f, "mhd", "volume.raw"), refuse("which is missing"))
    add("folder with only a link to itself", lambda f: (A.self_link(f, "me"), f)[1], refuse("the folder is empty"))
    add("blank UIDs asked for a DICOM-SEG", lambda f: (A.write(A.blank_uids(monai), f), f)[1],
        {**refuse("cannot be written for this series"), "args": ["--dicom-seg"], "reader": "reads", "core": "reads"})

    (root / "manifest.json").write_text(json.dumps({"cases": cases}, indent=1))
    print(f"built {len(cases)} inputs in {root}")


# ============================================================================ run
def _check_volume(case: dict, root: Path, ct) -> str | None:
    """None when the volume is right, else what is wrong."""
    kind = case["kind"]
    if kind == "tilted":
        if not ct.info.get("gantry_tilt_corrected") or abs(ct.info["gantry_tilt_deg"] - case["degrees"]) > 0.1:
            return f"tilt not corrected: {ct.info.get('gantry_tilt_deg')}"
        if list(ct.array.shape) != case["shape"]:
            return f"shape {ct.array.shape}"
        return None if np.allclose(ct.geometry.direction_matrix @ ct.geometry.direction_matrix.T, np.eye(3)) else "not orthogonal"
    if "warning" in case and not any(case["warning"] in w for w in ct.warnings):
        return f"no warning with {case['warning']!r}"
    if "slices" not in case:
        return None if np.isfinite(ct.array).all() else "non-finite voxels left"
    slices = np.load(root / case["slices"])
    for hu, pos in zip(slices, case["positions"], strict=True):
        zyx = ct.geometry.world_to_index(np.asarray(pos))
        k = int(round(float(zyx[0])))
        if np.abs(zyx - [k, 0, 0]).max() > 1e-2 or not 0 <= k < ct.array.shape[0]:
            return f"a source slice at {pos} maps to {np.round(zyx, 3)}, not onto a slice"
        if not np.array_equal(ct.array[k], hu):
            return f"slice {k} differs from its source in {int((ct.array[k] != hu).sum())} voxels"
    return None


def _reader(path: Path) -> tuple[str, str]:
    """What the napari reader did: ("read"|"declined"|"notified"|"RAISED"|"HUNG", detail)."""
    import napari_cdpdnet._gui.notify as notify
    from napari_cdpdnet._reader import napari_get_reader

    said: list[str] = []
    saved = notify.show_error
    notify.show_error = said.append
    try:
        reader = napari_get_reader(str(path))
        if reader is None:
            return "declined", ""
        out: list = []
        error: list = []

        def call() -> None:
            try:
                out.append(reader(str(path)))
            except BaseException as exc:  # noqa: BLE001 - what we are looking for
                error.append(exc)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(READER_TIMEOUT)
        if worker.is_alive():
            return "HUNG", ""
        if error:
            return "RAISED", f"{type(error[0]).__name__}: {error[0]}"
        if len(out[0]) == 1 and out[0][0][0] is None:  # napari's "nothing to add"
            return "notified", said[-1] if said else ""
        return "read", f"{len(out[0])} layer(s)"
    finally:
        notify.show_error = saved


def run(root: Path, only: str | None = None) -> int:
    import warnings

    from model_support import write_tiny_weights

    from napari_cdpdnet.errors import CdpdnetError
    from napari_cdpdnet.io import read_ct

    warnings.simplefilter("ignore")
    cases = json.loads((root / "manifest.json").read_text())["cases"]
    if only:
        cases = [c for c in cases if only.lower() in c["id"].lower()]
    work = Path(tempfile.mkdtemp(prefix="dicom-corpus-run-"))
    ckpt, dino, _ = write_tiny_weights(work / "weights")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               CDPDNET_RECOVERY_DIR=str(work / "recovery"), HF_HUB_OFFLINE="1")
    rows, ok = [], 0
    for n, case in enumerate(cases, 1):
        path = root / case["input"]
        expect_volume = case["kind"] != "refuse"
        problems = []
        box = ["-30", "-30", "-1000", "30", "30", "1000"]
        # the core, for the volume check
        try:
            ct = read_ct(path)
            centre = ct.geometry.index_to_world((np.asarray(ct.array.shape) - 1) / 2.0)
            box = [f"{v:.1f}" for v in (centre[0] - 30, centre[1] - 30, -1e4, centre[0] + 30, centre[1] + 30, 1e4)]
            if not expect_volume and case.get("core") != "reads":
                problems.append("read although it should be refused")
            elif (bad := _check_volume(case, root, ct)) is not None:
                problems.append(bad)
        except CdpdnetError as exc:
            if expect_volume or case["phrase"] not in str(exc):
                problems.append(f"core: {exc}"[:200])
        except Exception as exc:  # noqa: BLE001 - a traceback is a failure
            problems.append(f"core raised {type(exc).__name__}: {exc}"[:200])
        # the CLI, in its own process
        out = work / "out" / f"{n:02d}"
        cmd = [sys.executable, "-m", "napari_cdpdnet.cli", "segment", str(path), "-s", "liver", "-o",
               str(out / "result.nii.gz"), "--checkpoint", str(ckpt), "--dino", str(dino), "--offline",
               "--no-progress", "--preset", "fast", "--box", *box, *case.get("args", [])]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
            code, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            code, err = "HUNG", ""
        seconds = time.perf_counter() - t0
        left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        message = next((ln.split("error: ", 1)[1] for ln in err.splitlines() if "cdpdnet segment: error:" in ln), "")
        if "Traceback" in err:
            problems.append("traceback on stderr")
        if expect_volume:
            if code != 0:
                problems.append(f"exit {code}: {message[:120]}")
            elif left != ["result.csv", "result.nii.gz"]:
                problems.append(f"files left: {left}")
        else:
            if code != 2 or case["phrase"] not in message:
                problems.append(f"exit {code}: {message[:160]}")
            if left:
                problems.append(f"partial output: {left}")
        # the napari reader
        reader, detail = _reader(path)
        wanted = case.get("reader", "read" if expect_volume else "declined|notified")
        if reader not in wanted.replace("reads", "read").split("|"):
            problems.append(f"reader {reader} {detail[:120]}")
        elif reader == "notified" and case["phrase"] not in detail:
            problems.append(f"reader said {detail[:120]}")
        ok += not problems
        print(f"{n:>2} {case['id']}: {problems or 'ok'}", file=sys.stderr, flush=True)
        said = message.replace(str(path), "…").replace(str(root / "inputs"), "…") if message else (
            "label map and table written" if code == 0 else "")
        rows.append((n, case["id"], "volume" if expect_volume else "refuse", code, reader,
                     "ok" if not problems else "FAIL", f"{seconds:.0f}s", said, problems))
    width = max(len(r[1]) for r in rows)
    print(f"{'#':>2}  {'input':<{width}}  expect  cli  reader    result  time  what the CLI said")
    for n, name, expect, code, reader, result, seconds, said, _ in rows:
        print(f"{n:>2}  {name:<{width}}  {expect:<6}  {code!s:>3}  {reader:<8}  {result:<6}  {seconds:>4}  {said[:120]}")
    for n, name, *_, problems in rows:
        if problems:
            print(f"{n:>2} {name}: " + "; ".join(problems))
    print(f"{ok} of {len(rows)} inputs handled as expected")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == len(rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("build", "run", "all"))
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--only", help="run the inputs whose name contains this text")
    args = parser.parse_args()
    if args.step in ("build", "all"):
        build(args.folder)
    if args.step in ("run", "all"):
        return run(args.folder, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
