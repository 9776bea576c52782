"""The package is importable cheaply, ships its manifest/resources and napari discovers it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

import napari_cdpdnet


def test_import_is_light() -> None:
    """Importing the package (and its plugin entry modules) must not pull torch, napari or Qt."""
    code = (
        "import sys, napari_cdpdnet, napari_cdpdnet.geometry, napari_cdpdnet.errors\n"
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'PyQt6', 'transformers', 'monai', "
        "'open_clip') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_and_resources_are_package_data() -> None:
    root = resources.files("napari_cdpdnet")
    assert root.joinpath("napari.yaml").is_file()
    assert root.joinpath("resources").is_dir()


def test_npe2_discovers_plugin_from_entry_point() -> None:
    """napari finds the plugin through the installed ``napari.manifest`` entry point."""
    npe2 = pytest.importorskip("npe2")
    eps = [
        ep for ep in metadata.entry_points(group="napari.manifest") if ep.name == "napari-cdpdnet"
    ]
    if not eps:
        pytest.skip("napari-cdpdnet is not installed (pip install -e . or the wheel)")
    pm = npe2.PluginManager()
    pm.discover(include_npe1=False)
    assert "napari-cdpdnet" in pm._manifests
    manifest = pm.get_manifest("napari-cdpdnet")
    assert manifest.display_name
    # every python_name in the manifest must import and resolve
    for contrib in (
        list(manifest.contributions.readers or [])
        + list(manifest.contributions.writers or [])
        + list(manifest.contributions.widgets or [])
    ):
        command = next(c for c in manifest.contributions.commands if c.id == contrib.command)
        assert command.python_name
        command.exec if hasattr(command, "exec") else None
        mod_name, _, attr = command.python_name.partition(":")
        mod = __import__(mod_name, fromlist=[attr])
        assert callable(getattr(mod, attr)), command.python_name


def test_runs_from_the_installed_wheel_when_asked() -> None:
    """In CI the package under test is the built wheel, not the source tree."""
    if os.environ.get("CDPDNET_EXPECT_WHEEL") != "1":
        pytest.skip("only checked when CDPDNET_EXPECT_WHEEL=1 (set by tests/run.sh)")
    pkg = Path(napari_cdpdnet.__file__).resolve()
    assert "site-packages" in pkg.parts, f"imported from {pkg}, not from an installed wheel"
    assert not pkg.parent.joinpath("napari.yaml").is_symlink()
    assert metadata.version("napari-cdpdnet") == napari_cdpdnet.__version__


def test_triton_is_blocked_without_cuda_so_opengl_processes_survive() -> None:
    """Without CUDA, a GUI process must not load triton (it segfaults next to Mesa's OpenGL)."""
    code = (
        "import torch\n"
        "from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda\n"
        "blocked = block_triton_without_cuda()\n"
        "assert blocked == (not torch.cuda.is_available())\n"
        "if blocked:\n"
        "    import torch.utils._triton as t\n"
        "    assert not t.has_triton_package()\n"
        "    try:\n"
        "        import triton\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('triton imported')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modules_stay_small_enough_to_read() -> None:
    """No module over ~600 lines unless its docstring says why (docs/architecture.md)."""
    root = Path(napari_cdpdnet.__file__).parent
    long = []
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 620 and "longer than 600 lines because" not in text.lower():
            long.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
    assert not long, long
