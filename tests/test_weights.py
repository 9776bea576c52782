"""Weights: resolution order, checksums, offline errors and downloads from a local fake hub.

No test touches the network: downloads come from a loopback HTTP server that speaks the
Hugging Face "resolve" protocol, or from an injected downloader.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from napari_cdpdnet import weights as w
from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import OutputExistsError, WeightsError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- tiny real files
def _pth_bytes(seed: int = 0) -> bytes:
    import torch

    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save(
        {"net": {"module.organ_embedding": torch.randn(32, 512, generator=g)}, "epoch": 1}, buf
    )
    return buf.getvalue()


def _safetensors_bytes(n: int = 64, seed: int = 0) -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    return save({"weight": torch.randn(n, n, generator=g)})


@pytest.fixture(scope="module")
def payloads() -> dict[tuple[str, str], bytes]:
    """What the fake hub serves, by (repo, filename): small but well-formed files."""
    return {
        ("jwu2009/CDPDNet", "cdpdnet.pth"): _pth_bytes(),
        ("facebook/dinov2-base", "config.json"): json.dumps(
            {"model_type": "dinov2", "hidden_size": 768}
        ).encode(),
        ("facebook/dinov2-base", "model.safetensors"): _safetensors_bytes(96),
        (
            "timm/vit_base_patch32_clip_224.openai",
            "open_clip_model.safetensors",
        ): _safetensors_bytes(32, 1),
    }


class FakeHub:
    """A loopback Hugging Face endpoint: HEAD/GET /{repo}/resolve/{revision}/{file}."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files = dict(files)
        self.lie_about: set[str] = set()  # filenames whose served bytes differ from the ETag
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _lookup(self) -> tuple[bytes, str] | None:
                hub.requests.append((self.command, self.path))
                if "/resolve/" not in self.path:
                    return None
                repo, _, rest = self.path.lstrip("/").partition("/resolve/")
                _revision, _, filename = rest.partition("/")
                data = hub.files.get((repo, filename))
                if data is None:
                    return None
                if filename.endswith(".json"):  # small files: git blob id, like the hub
                    etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324
                else:  # LFS files: sha256 of the content
                    etag = hashlib.sha256(data).hexdigest()
                if filename in hub.lie_about:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                return data, etag

            def _headers(self, found: tuple[bytes, str] | None) -> None:
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, etag = found
                self.send_response(200)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                self._headers(self._lookup())

            def do_GET(self) -> None:  # noqa: N802
                found = self._lookup()
                self._headers(found)
                if found is not None:
                    self.wfile.write(found[0])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated cache folders; no weights folder; offline (as conftest sets it)."""
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("CDPDNET_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


@pytest.fixture
def online(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed. huggingface_hub reads HF_HUB_OFFLINE once, at import, so its module
    constant is patched as well as the environment (monkeypatch restores both)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: never a real hub


@pytest.fixture
def hub(
    payloads: dict[tuple[str, str], bytes], online: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """A fake hub on loopback, and huggingface_hub pointed at it."""
    server = FakeHub(payloads)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.close()


def _place(folder: Path, component: str, filename: str, data: bytes) -> Path:
    path = folder / component / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _fill(folder: Path, payloads: dict[tuple[str, str], bytes]) -> None:
    """A hand-made weights folder (no manifest), as an offline site might copy in."""
    for (repo, filename), data in payloads.items():
        comp = next(s.name for s in w.REGISTRY if s.repo_id == repo)
        _place(folder, comp, filename, data)


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(".") or p.suffix == ".part"
    )


# --------------------------------------------------------------------------- offline
def test_import_does_not_load_huggingface_hub_or_read_the_environment() -> None:
    code = (
        "import os, sys; os.environ['CDPDNET_CACHE_DIR'] = '/nonexistent/before'\n"
        "import napari_cdpdnet.weights as w, napari_cdpdnet.vocabulary.resolver, napari_cdpdnet.vocabulary.catalog\n"
        "assert not [m for m in ('huggingface_hub', 'torch', 'open_clip') if m in sys.modules]\n"
        "os.environ['CDPDNET_CACHE_DIR'] = '/elsewhere'\n"
        "assert str(w.weights_cache_dir()) == '/elsewhere/weights', w.weights_cache_dir()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_offline_error_names_every_missing_file_with_source_and_destination(env: Path) -> None:
    with pytest.raises(WeightsError) as err:
        w.resolve_weights()
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg
    for url, dest in [
        ("https://huggingface.co/jwu2009/CDPDNet/resolve/main/cdpdnet.pth", "cdpdnet/cdpdnet.pth"),
        (
            "https://huggingface.co/facebook/dinov2-base/resolve/main/config.json",
            "dinov2-base/config.json",
        ),
        (
            "https://huggingface.co/facebook/dinov2-base/resolve/main/model.safetensors",
            "dinov2-base/model.safetensors",
        ),
    ]:
        assert url in msg
        assert str(env / "cache" / "weights" / dest) in msg
    assert "cdpdnet weights download --to DIR" in msg and "CDPDNET_WEIGHTS_DIR" in msg
    assert err.value.exit_code == 4


def test_allow_download_false_never_downloads(hub: FakeHub) -> None:
    with pytest.raises(WeightsError, match="downloading was not allowed"):
        w.resolve_weights(allow_download=False)
    assert hub.requests == []


def test_weights_dir_is_used_offline_and_put_it_at_points_there(
    env: Path, payloads: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = env / "site-weights"
    _fill(site, payloads)
    (site / "dinov2-base" / "config.json").unlink()
    monkeypatch.setenv("CDPDNET_WEIGHTS_DIR", str(site))
    with pytest.raises(WeightsError) as err:
        w.resolve_weights()
    assert str(site / "dinov2-base" / "config.json") in str(err.value)
    assert "cdpdnet.pth" not in str(err.value).split("Missing:")[1]  # present files are not listed
    _place(site, "dinov2-base", "config.json", payloads[("facebook/dinov2-base", "config.json")])
    found = w.resolve_weights()
    assert found.checkpoint == site / "cdpdnet" / "cdpdnet.pth"
    assert found.dino_weights == site / "dinov2-base" / "model.safetensors"
    assert found.dino_config == site / "dinov2-base" / "config.json"
    assert set(found.sources.values()) == {"CDPDNET_WEIGHTS_DIR"}


def test_resolution_order_explicit_then_env_then_cache(
    env: Path, payloads: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = w.weights_cache_dir()
    _fill(cache, payloads)
    assert w.resolve_weights().sources["checkpoint"] == "cache"
    site = env / "site"
    _fill(site, payloads)
    monkeypatch.setenv("CDPDNET_WEIGHTS_DIR", str(site))
    assert w.resolve_weights().checkpoint == site / "cdpdnet" / "cdpdnet.pth"
    mine = _place(env / "mine", "x", "my.pth", _pth_bytes(5))
    found = w.resolve_weights(checkpoint=mine, dino=cache / "dinov2-base")
    assert found.checkpoint == mine and found.sources["checkpoint"] == "explicit"
    assert found.dino_weights == cache / "dinov2-base" / "model.safetensors"
    assert found.dino_config == cache / "dinov2-base" / "config.json"
    # a bare DINOv2 weights file without a config beside it is accepted (config implied)
    bare = _place(
        env / "bare",
        "d",
        "model.safetensors",
        payloads[("facebook/dinov2-base", "model.safetensors")],
    )
    assert w.resolve_weights(dino=bare).dino_config is None


def test_alternative_file_names_are_accepted(env: Path, payloads: dict) -> None:
    cache = w.weights_cache_dir()
    _fill(cache, payloads)
    st = cache / "dinov2-base" / "model.safetensors"
    bin_path = cache / "dinov2-base" / "pytorch_model.bin"
    st.unlink()
    bin_path.write_bytes(_pth_bytes(3))
    assert w.resolve_weights().dino_weights == bin_path


def test_explicit_paths_that_are_wrong_name_the_argument(env: Path, payloads: dict) -> None:
    with pytest.raises(WeightsError, match=r"--checkpoint .*no such file"):
        w.resolve_weights(checkpoint=env / "nope.pth")
    broken = _place(env, "x", "cdpdnet.pth", _pth_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"--checkpoint .*damaged"):
        w.resolve_weights(checkpoint=broken)
    with pytest.raises(WeightsError, match=r"--dino .*model.safetensors"):
        w.resolve_weights(checkpoint=_place(env, "y", "cdpdnet.pth", _pth_bytes()), dino=env / "x")


@pytest.mark.parametrize(
    ("filename", "damage"),
    [
        ("model.safetensors", lambda b: b[: len(b) // 2]),  # truncated copy
        ("model.safetensors", lambda b: b + b"junk"),
        ("cdpdnet.pth", lambda b: b[:-10]),  # zip central directory cut off
        ("cdpdnet.pth", lambda b: b"not a checkpoint at all"),
        ("config.json", lambda b: b"{ truncated"),
    ],
)
def test_damaged_files_without_checksums_are_never_used(
    env: Path, payloads: dict, filename: str, damage
) -> None:
    cache = w.weights_cache_dir()
    _fill(cache, payloads)
    path = next(cache.rglob(filename))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError) as err:
        w.resolve_weights()
    assert f"{path} is damaged" in str(err.value)


def test_hf_cache_copy_is_used_offline_and_checked_by_blob_id(
    hub: FakeHub, payloads: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, hf_hub_download

    for repo, filename in payloads:
        if repo != "timm/vit_base_patch32_clip_224.openai":
            hf_hub_download(repo, filename, cache_dir=os.environ["HF_HUB_CACHE"], endpoint=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    found = w.resolve_weights()
    assert set(found.sources.values()) == {"huggingface cache"}
    assert found.checkpoint.read_bytes() == payloads[("jwu2009/CDPDNet", "cdpdnet.pth")]
    # a blob whose content no longer matches its sha256 name is refused
    blob = Path(os.path.realpath(found.dino_weights))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        w.resolve_weights()


# --------------------------------------------------------------------------- downloads
def test_first_use_downloads_verifies_records_then_stays_offline(
    hub: FakeHub, payloads: dict
) -> None:
    seen: list[tuple[int, int | None, str]] = []
    found = w.resolve_weights(progress=lambda done, total, label: seen.append((done, total, label)))
    cache = w.weights_cache_dir()
    assert found.checkpoint == cache / "cdpdnet" / "cdpdnet.pth"
    assert found.checkpoint.read_bytes() == payloads[("jwu2009/CDPDNet", "cdpdnet.pth")]
    assert (
        found.dino_config is not None
        and json.loads(found.dino_config.read_text())["model_type"] == "dinov2"
    )
    assert set(found.sources.values()) == {"downloaded"}
    manifest = json.loads((cache / w.MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == {
        "cdpdnet/cdpdnet.pth",
        "dinov2-base/config.json",
        "dinov2-base/model.safetensors",
    }
    for key, rec in manifest.items():
        data = (cache / key).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    # progress reached each file's full size
    for (repo, filename), data in payloads.items():
        if repo != "timm/vit_base_patch32_clip_224.openai":
            assert (len(data), len(data), filename) in seen
    assert _leftovers(cache) == []
    n = len(hub.requests)
    again = w.resolve_weights()
    assert set(again.sources.values()) == {"cache"} and len(hub.requests) == n


def test_recorded_checksum_catches_same_size_corruption_and_download_repairs_it(
    hub: FakeHub, payloads: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    found = w.resolve_weights()
    data = bytearray(found.dino_weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep in the tensor data: structure still fine
    found.dino_weights.write_bytes(bytes(data))
    assert w.verify().ok is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="SHA-256"):
        w.resolve_weights()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repaired = w.resolve_weights()
    assert repaired.sources["dino_weights"] == "downloaded"
    assert (
        repaired.dino_weights.read_bytes()
        == payloads[("facebook/dinov2-base", "model.safetensors")]
    )
    assert w.verify().ok


def test_corruption_in_transit_is_discarded(hub: FakeHub) -> None:
    hub.lie_about.add("cdpdnet.pth")
    with pytest.raises(WeightsError, match=r"damaged .*discarded"):
        w.resolve_checkpoint()
    folder = w.weights_cache_dir()
    assert not (folder / "cdpdnet" / "cdpdnet.pth").exists()
    assert _leftovers(folder) == []
    assert not (folder / w.MANIFEST_NAME).exists()


def test_interrupted_download_leaves_no_half_file(hub: FakeHub) -> None:
    def interrupt(done: int, total: int | None, label: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        w.resolve_weights(progress=interrupt)
    folder = w.weights_cache_dir()
    assert not (folder / "cdpdnet" / "cdpdnet.pth").exists()
    assert _leftovers(folder) == []
    assert not (folder / w.MANIFEST_NAME).exists()


def test_failing_downloader_becomes_one_clear_error_and_leaves_nothing(online: None) -> None:
    def half_then_fail(repo_id: str, filename: str, revision: str, dest: Path, progress) -> None:
        dest.write_bytes(b"PK\x03\x04 half a file")
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(WeightsError) as err:
        w.resolve_weights(downloader=half_then_fail)
    msg = str(err.value)
    assert "https://huggingface.co/jwu2009/CDPDNet/resolve/main/cdpdnet.pth" in msg
    assert "ConnectionResetError" in msg and "put it at" in msg
    assert _leftovers(w.weights_cache_dir()) == []
    assert not list(w.weights_cache_dir().rglob("cdpdnet.pth"))


def test_missing_file_on_the_hub_is_a_weights_error(hub: FakeHub) -> None:
    del hub.files[("jwu2009/CDPDNet", "cdpdnet.pth")]
    with pytest.raises(WeightsError, match="cdpdnet.pth"):
        w.resolve_checkpoint()


def test_portable_folder_round_trip(
    hub: FakeHub, env: Path, payloads: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    portable = env / "usb"
    results = w.download_all(portable)
    assert {c.status for c in results} == {"ok"} and len(results) == 4
    assert (portable / "clip-vit-b-32" / "open_clip_model.safetensors").is_file()
    assert w.verify(portable).ok
    # second run downloads nothing
    n = len(hub.requests)
    w.download_all(portable)
    assert len(hub.requests) == n
    # the offline site: only the copied folder, no network
    site = env / "hospital"
    import shutil

    shutil.copytree(portable, site)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("CDPDNET_WEIGHTS_DIR", str(site))
    found = w.resolve_weights()
    assert found.checkpoint == site / "cdpdnet" / "cdpdnet.pth"
    assert w.resolve_clip() == site / "clip-vit-b-32" / "open_clip_model.safetensors"
    assert len(hub.requests) == n


def test_download_does_not_overwrite_a_damaged_file_it_did_not_make(
    hub: FakeHub, env: Path, payloads: dict
) -> None:
    folder = env / "dl"
    theirs = _place(folder, "cdpdnet", "cdpdnet.pth", b"someone's notes")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        w.download_all(folder, components=["cdpdnet"])
    assert theirs.read_bytes() == b"someone's notes"
    w.download_all(folder, components=["cdpdnet"], overwrite=True)
    assert theirs.read_bytes() == payloads[("jwu2009/CDPDNet", "cdpdnet.pth")]


def test_download_offline_names_the_target_folder(env: Path) -> None:
    with pytest.raises(WeightsError) as err:
        w.download_all(env / "usb", components=["clip-vit-b-32"])
    assert str(env / "usb" / "clip-vit-b-32" / "open_clip_model.safetensors") in str(err.value)


def test_verify_and_record_a_hand_copied_folder(env: Path, payloads: dict) -> None:
    site = env / "site"
    _fill(site, payloads)
    report = w.verify(site)
    assert report.ok and {c.status for c in report.checks} == {"unrecorded"}
    recorded = w.record_checksums(site)
    assert {c.status for c in recorded} == {"ok"}
    assert {c.status for c in w.verify(site).checks} == {"ok"}
    path = site / "cdpdnet" / "cdpdnet.pth"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    bad = w.verify(site)
    assert not bad.ok
    assert [c.status for c in bad.checks if c.filename == "cdpdnet.pth"] == ["corrupted"]


# --------------------------------------------------------------------------- CLI
def test_cli_info_shows_order_terms_and_locations(
    env: Path, payloads: dict, capsys: pytest.CaptureFixture
) -> None:
    _fill(w.weights_cache_dir(), payloads)
    assert main(["weights", "info"]) == 0
    out = capsys.readouterr().out
    assert "CDPDNET_WEIGHTS_DIR" in out and "downloads are disabled (HF_HUB_OFFLINE=1)" in out
    assert str(w.weights_cache_dir() / "cdpdnet" / "cdpdnet.pth") in out
    assert "No licence is stated" in out and "Apache-2.0" in out


def test_cli_download_and_verify(hub: FakeHub, env: Path, capsys: pytest.CaptureFixture) -> None:
    target = env / "portable"
    assert main(["weights", "download", "--to", str(target), "--without-clip"]) == 0
    out = capsys.readouterr().out
    assert "CDPDNET_WEIGHTS_DIR" in out and "Third-party" in out
    assert not (target / "clip-vit-b-32").exists()
    assert main(["weights", "verify", str(target)]) == 0
    assert "ok" in capsys.readouterr().out
    path = target / "dinov2-base" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    assert main(["weights", "verify", str(target)]) == 4
    captured = capsys.readouterr()
    assert "corrupted" in captured.out and "Problems found" in captured.err


def test_cli_offline_download_exit_code_and_message(
    env: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["weights", "download"]) == 4
    err = capsys.readouterr().err
    assert "cdpdnet weights: error:" in err and "get it from" in err
