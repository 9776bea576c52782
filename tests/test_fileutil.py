"""atomic_output: no partial files, no silent overwrites, suffix kept for format-sniffing writers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from napari_cdpdnet.errors import InputError, OutputExistsError
from napari_cdpdnet.fileutil import atomic_output, full_suffix


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("scan.nii.gz", ".nii.gz"),
        ("Liver.SEG.NRRD", ".seg.nrrd"),
        ("patient.1.2.nrrd", ".nrrd"),
        ("table.csv", ".csv"),
        ("README", ""),
        (".nii.gz", ".gz"),
    ],
)
def test_full_suffix(name: str, suffix: str) -> None:
    assert full_suffix(name) == suffix


def test_success_publishes_under_the_real_name_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "labels.nii.gz"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".tmp-")
        assert tmp != target and not target.exists()
        tmp.write_bytes(b"payload")
    assert target.read_bytes() == b"payload"
    assert _listing(tmp_path) == ["labels.nii.gz"]


def test_error_inside_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "labels.nrrd"
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk full")
    assert _listing(tmp_path) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "a.mha") as tmp:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_existing_file_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    target = tmp_path / "mine.csv"
    target.write_text("precious")
    entered = False
    with pytest.raises(OutputExistsError, match="mine.csv already exists"), atomic_output(target):
        entered = True
    assert not entered
    assert target.read_text() == "precious"
    assert _listing(tmp_path) == ["mine.csv"]


def test_overwrite_replaces_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "mine.csv"
    target.write_text("old")
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["mine.csv"]


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "mine.csv"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["mine.csv"]


def test_file_appearing_while_writing_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "race.txt"
    with pytest.raises(OutputExistsError, match="created by something else"), atomic_output(target) as tmp:
        tmp.write_text("ours")
        target.write_text("theirs")
    assert target.read_text() == "theirs"
    assert _listing(tmp_path) == ["race.txt"]


def test_parent_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.nii"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"1")
    assert target.read_bytes() == b"1"


def test_folder_as_target_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"), atomic_output(tmp_path, overwrite=True):
        pass


def test_unwritable_folder_is_an_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write"), atomic_output(blocker / "sub" / "x.csv"):
        pass


def test_result_has_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "p.csv") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p.csv").stat().st_mode) == 0o644
