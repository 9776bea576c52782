"""One table of inputs that must be refused, each with the words a user gets, through both faces.

Every case is made from the real series in ../shared (tests/awkward_inputs.py) or written by
hand. ``cdpdnet segment`` must exit with the case's code, say the case's phrase on stderr,
print no traceback and leave no file in the output folder; the napari reader must decline it
(return None) or notify the same phrase and return napari's "nothing to add", never raise, and
answer within seconds. The awkward inputs that must *work* are in tests/test_dicom_awkward.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import awkward_inputs as A
import numpy as np
import pytest
import SimpleITK as sitk

from napari_cdpdnet._reader import napari_get_reader
from napari_cdpdnet.cli import main

pytestmark = pytest.mark.shared

#: A reader call that takes longer than this counts as a frozen viewer.
READER_SECONDS = 30.0


class Base(list):
    """The real 3-slice CT series (pydicom datasets) and the shared data folder."""

    shared: Path


@dataclass(frozen=True)
class Case:
    """``make(folder, base)`` returns the input; ``base`` is a :class:`Base`."""

    id: str
    make: Callable[[Path, list], Path]
    phrase: str
    exit_code: int = 2
    reader: str = "notify"  # "notify", "decline" (napari_get_reader returns None) or "reads"
    args: tuple[str, ...] = ()


def _folder(files: Callable[[Path], object]) -> Callable[[Path, list], Path]:
    def make(folder: Path, base: list) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        files(folder)
        return folder
    return make


def _one(name: str, ds_of: Callable[[list], object]) -> Callable[[Path, list], Path]:
    def make(folder: Path, base: list) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        ds_of(base).save_as(folder / name, enforce_file_format=True)
        return folder / name
    return make


def _seg(folder: Path, base: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(base.shared / "dcmqi" / "liver.dcm", folder / "liver.dcm"))


def _truncated_series(folder: Path, base: list) -> Path:
    paths = A.write(A.as_new_series(base), folder)
    A.truncate(paths[1], keep=0.7)
    return folder


def _headers_cut(folder: Path, base: list) -> Path:
    for p in A.write(A.as_new_series(base), folder):
        A.truncate(p, keep=0.0004)  # ~200 bytes: the marker survives, the header does not
    return folder


def _two_phases_without_uids(folder: Path, base: list) -> Path:
    A.write(A.blank_uids(A.as_new_series(base, series_number=5, description="abdomen")), folder,
            names=lambda k: f"a{k}.dcm")
    A.write(A.blank_uids(A.as_new_series(base, series_number=5, description="abdomen", hu_offset=80)), folder,
            names=lambda k: f"b{k}.dcm")
    return folder


def _undecodable(syntax: str) -> Callable[[Path, list], Path]:
    def make(folder: Path, base: list) -> Path:
        for k, ds in enumerate(A.compressed(A.as_new_series(base), A.JPEG_XL)):
            ds.file_meta.TransferSyntaxUID = syntax
            if syntax != A.JPEG_XL:  # a codestream GDCM rejects under a syntax pydicom knows
                from pydicom.encaps import encapsulate
                ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
            A.write_any_syntax(ds, folder / f"s{k}.dcm")
        return folder
    return make


def _sitk_file(name: str, array: np.ndarray, vector: bool = False, spacing=(0.8, 0.8, 2.0)) -> Callable[[Path, list], Path]:
    def make(folder: Path, base: list) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(array, isVector=vector)
        if not vector and array.ndim == 3:
            image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / name))
        return folder / name
    return make


def _dicomdir_without_files(folder: Path, base: list) -> Path:
    dicomdir = A.with_dicomdir(A.as_new_series(base), folder)
    for p in folder.rglob("*"):
        if p.is_file() and p.name != "DICOMDIR":
            p.unlink()
    return dicomdir


def _secondary_captures(folder: Path, base: list) -> Path:
    series = A.as_new_series(base)
    A.write([A.secondary_capture(ds) for ds in series], folder)
    return folder


def _modality(modality: str) -> Callable[[Path, list], Path]:
    def make(folder: Path, base: list) -> Path:
        series = A.as_new_series(base)
        for ds in series:
            ds.Modality = modality
        A.write(series, folder)
        return folder
    return make


def _blank_uid_series(folder: Path, base: list) -> Path:
    A.write(A.blank_uids(A.as_new_series(base)), folder)
    return folder


CASES = [
    Case("missing path", lambda f, b: f / "nope.nii.gz", "no such file or folder", reader="decline"),
    Case("empty folder", _folder(lambda f: None), "the folder is empty", reader="decline"),
    Case("folder of text files", _folder(lambda f: (f / "notes.txt").write_text("scan tomorrow")),
         "no DICOM files found in this folder: 0 DICOM files and 1 other file (1 × a text file)", reader="decline"),
    Case("folder of JPEG screenshots", lambda f, b: ([A.jpeg_of(d, f / f"s{k}.jpg") for k, d in enumerate(b)], f)[1],
         "3 × a JPEG image", reader="decline"),
    Case("JPEG file", lambda f, b: A.jpeg_of(b[0], f / "slice.jpg"), "(a JPEG image, not a CT volume)", reader="decline"),
    Case("JPEG named .dcm", lambda f, b: A.jpeg_of(b[0], f / "slice.dcm"),
         "not a DICOM file (no DICM marker): it is a JPEG image"),
    Case("PNG file", lambda f, b: (f.mkdir(parents=True), (f / "shot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
                                   f / "shot.png")[-1], "(a PNG image, not a CT volume)", reader="decline"),
    Case("DICOM-SEG file", _seg, "this file is Segmentation (SEG), not a CT image"),
    Case("folder holding only a DICOM-SEG", lambda f, b: _seg(f, b).parent,
         "found 1 DICOM file (1 × Segmentation (SEG)), but none forms a CT volume"),
    Case("structured report", _one("sr.dcm", lambda b: A.structured_report(b[0])),
         "this file is Comprehensive SR (SR), not a CT image: it is a structured report without image pixels"),
    Case("RT structure set", _one("rs.dcm", lambda b: A.rt_structure_set(b[0])), "RT Structure Set (RTSTRUCT)"),
    Case("RT dose grid in a folder", lambda f, b: _one("rd.dcm", lambda b: A.rt_dose(b[0]))(f, b).parent,
         "RT Dose (RTDOSE)), but none forms a CT volume"),
    Case("digital radiograph", _one("dx.dcm", lambda b: A.projection(b[0])),
         "this file is Digital X-Ray Image - For Presentation (DX), not a CT image"),
    Case("whole-slide microscopy", lambda f, b: _one("sm.dcm", lambda b: A.projection(b[0], "SM", A.WHOLE_SLIDE, 4))(f, b).parent,
         "it is a slide-microscopy image: 2-D images, not a CT volume"),
    Case("encapsulated PDF", _one("doc.dcm", lambda b: A.encapsulated_pdf(b[0])), "Encapsulated PDF (DOC)"),
    Case("secondary captures", _secondary_captures, "Secondary Capture Image (OT)"),
    Case("MR series", _modality("MR"), "no CT series here (found: MR series", reader="reads"),  # viewed, with a warning
    Case("one CT slice", lambda f, b: A.write(A.as_new_series(b[:1]), f)[0], "has a single slice"),
    Case("folder with one CT slice", lambda f, b: (A.write(A.as_new_series(b[:1]), f), f)[1],
         "2-D image: series"),
    Case("truncated slice in a series", _truncated_series, "the pixel data cannot be decoded: the file is truncated"),
    Case("every header cut short", _headers_cut, "found 3 files marked as DICOM, but none could be read"),
    Case("two phases, blank UIDs, same headers", _two_phases_without_uids,
         "nothing in the headers tells such series apart"),
    Case("JPEG XL series (no decoder)", _undecodable(A.JPEG_XL), "no installed decoder reads"),
    Case("HTJ2K GDCM cannot decode", _undecodable("1.2.840.10008.1.2.4.202"), "pip install pylibjpeg pylibjpeg-openjpeg"),
    Case("all NaN NIfTI", lambda f, b: A.non_finite_volume((f.mkdir(parents=True), f)[1] / "nan.nii.gz", float("nan")),
         "no finite voxel"),
    Case("all +inf NIfTI", lambda f, b: A.non_finite_volume((f.mkdir(parents=True), f)[1] / "inf.nii", float("inf")),
         "no finite voxel: all 256 voxels are NaN or infinite (+inf)"),
    Case("all -inf MHA", lambda f, b: A.non_finite_volume((f.mkdir(parents=True), f)[1] / "ninf.mha", float("-inf")),
         "(-inf)"),
    Case("NaN and inf NRRD", lambda f, b: A.non_finite_volume((f.mkdir(parents=True), f)[1] / "mix.nrrd",
                                                            [float("nan"), float("inf")]), "no finite voxel"),
    Case("NRRD header without its data", lambda f, b: A.detached_header(f, "nhdr", "ct.raw.gz"),
         "names its voxel data file 'ct.raw.gz', which is missing"),
    Case("MHD header without its data", lambda f, b: A.detached_header(f, "mhd", "ct.zraw"),
         "names its voxel data file 'ct.zraw', which is missing"),
    Case("folder that links to itself", lambda f, b: (A.self_link(f), f)[1],
         "the folder is empty (only links leading back into it)", reader="decline"),
    Case("link loop around a SEG", lambda f, b: (_seg(f, b), A.self_link(f), f)[-1], "1 × Segmentation (SEG)"),
    Case("DICOMDIR whose files are gone", _dicomdir_without_files, "none of them is there"),
    Case("empty NIfTI file", lambda f, b: (f.mkdir(parents=True), (f / "ct.nii.gz").write_bytes(b""), f / "ct.nii.gz")[-1],
         "the file is empty (0 bytes)"),
    Case("text file named .nii.gz", lambda f, b: (f.mkdir(parents=True), (f / "ct.nii.gz").write_text("x" * 400),
                                                  f / "ct.nii.gz")[-1], "not a readable NIfTI image"),
    Case("4-D NIfTI", _sitk_file("phases.nii.gz", np.zeros((3, 4, 5, 6), np.int16)), "4-D image with 3 volumes"),
    Case("RGB MetaImage", _sitk_file("rgb.mha", np.zeros((4, 5, 6, 3), np.uint8), vector=True), "multi-component image"),
    Case("absurd spacing", _sitk_file("tiny.nrrd", np.full((4, 5, 6), -1000, np.int16), spacing=(0.001, 1, 1)),
         "implausible voxel spacing"),
    Case("--dicom-seg on a series with blank UIDs", _blank_uid_series,
         "--dicom-seg cannot be written for this series: the source series has blank StudyInstanceUID",
         reader="reads", args=("--dicom-seg",)),
]

@pytest.fixture(scope="module")
def base(shared_path) -> Base:
    out = Base(A.load_series(shared_path("data", "dcmqi", "ct-3slice")))
    out.shared = shared_path("data")
    return out


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses_with_the_phrase_and_leaves_nothing(case: Case, base, weights, tmp_path: Path, capsys) -> None:
    source = case.make(tmp_path / "in", base)
    out_dir = tmp_path / "out"
    code = main(["segment", str(source), "-s", "liver", "-o", str(out_dir / "result.nii.gz"), *case.args,
                 "--checkpoint", str(weights[0]), "--dino", str(weights[1]), "--offline", "--no-progress"])
    err = capsys.readouterr().err
    assert code == case.exit_code, err
    assert case.phrase in err, err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.rglob("*")), list(out_dir.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_napari_reader_declines_or_notifies_never_raises(case: Case, base, tmp_path: Path, notes) -> None:
    source = case.make(tmp_path / "in", base)
    reader = napari_get_reader(str(source))
    if case.reader == "decline":
        assert reader is None
        return
    assert callable(reader)
    result: list = []

    def call() -> None:
        result.append(reader(str(source)))  # an exception here would leave result empty

    t0 = time.perf_counter()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(READER_SECONDS)
    assert not worker.is_alive(), f"the reader took over {READER_SECONDS} s"
    assert result, "the reader raised"
    if case.reader == "reads":
        [(data, kwargs, kind)] = result[0]
        assert kind == "image" and data.ndim == 3
        return
    assert result[0] == [(None,)]
    assert any(case.phrase in m for m in notes["error"]), notes["error"]
    assert time.perf_counter() - t0 < READER_SECONDS
