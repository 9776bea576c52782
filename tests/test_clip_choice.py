"""Typed text through CLIP: the modes (auto/on/off), the one note, the fake-hub download, the CLI.

Rankings that must make sense come from a stub scorer (tests/clip_support.py); the real loading
code (registry, download from a loopback fake hub, checksums, open_clip, tokenizer, scoring)
runs on a tiny random open_clip model. Nothing touches the network; where weights are local, a
download attempt fails the test.
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clip_support import TINY_ARCH, StubScorer, tiny_clip_files
from test_weights import FakeHub

from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.inference.clip_choice import clip_scorer_for
from napari_cdpdnet.vocabulary.catalog import plan_passes, structure
from napari_cdpdnet.vocabulary.clip_stage import ClipThresholds, ClipUnavailable
from napari_cdpdnet.vocabulary.explain import resolution_line, understanding_lines
from napari_cdpdnet.vocabulary.resolver import UnresolvedStructure, resolve, resolve_many
from napari_cdpdnet.weights.store import read_manifest

CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
NOTE = "CLIP text matching is unavailable"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weights anywhere (empty caches, no weights folder)."""
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("CDPDNET_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("open_clip")
    return tiny_clip_files(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def tiny_arch(tiny_clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader builds the tiny architecture instead of ViT-B/32 (the only difference)."""
    monkeypatch.setattr("napari_cdpdnet.model.text.CLIP_ARCH", TINY_ARCH)


@pytest.fixture
def online(no_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads not switched off (huggingface_hub reads HF_HUB_OFFLINE at import: patched too);
    the hub is loopback's discard port unless a test starts a fake one."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def clip_hub(tiny_clip: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Downloads allowed, from a loopback hub serving the tiny CLIP file under CLIP's real name."""
    server = FakeHub({(CLIP_REPO, CLIP_FILE): tiny_clip.read_bytes()})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.close()


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every download attempt: the weights are local, nothing may be fetched.
    The test asserts the returned list stays empty."""
    attempts: list[str] = []

    def refuse(repo_id: str, filename: str, *_a: object, **_k: object) -> None:
        attempts.append(f"{repo_id}/{filename}")
        raise AssertionError("a download was attempted although the weights are local")

    monkeypatch.setattr("napari_cdpdnet.weights.download.hf_downloader", refuse)
    return attempts


# --------------------------------------------------------------------------- the resolver's CLIP stage
def test_names_the_lexicon_knows_never_reach_clip() -> None:
    stub = StubScorer()
    found = resolve_many("liver, IVC, Milz, pancraes, portal vein, kidneys", clip_scorer=stub)
    assert stub.calls == []
    sources = {r.text: r.source for r in found}
    assert sources == {"liver": "name", "IVC": "abbreviation", "Milz": "language", "pancraes": "typo",
                       "portal vein": "part", "kidneys": "synonym"}
    assert next(r for r in found if r.text == "Milz").language == "German"


def test_clip_resolves_what_the_lexicon_does_not_and_says_how() -> None:
    r = resolve("main artery of the abdomen", clip_scorer=StubScorer())
    assert (r.structure.key, r.source, r.method) == ("aorta", "CLIP", "clip")
    assert r.cosine == pytest.approx(0.931) and r.margin == pytest.approx(0.029)
    assert [(s.key, round(c, 3)) for s, c in r.alternatives] == [
        ("celiac_trunk", 0.902), ("inferior_vena_cava", 0.884), ("hepatic_vessel", 0.871)]
    assert resolution_line(r) == (
        "'main artery of the abdomen' -> Aorta [CLIP: cosine 0.931, margin 0.029 over Celiac Trunk]; "
        "alternatives: Celiac Trunk 0.902, Inferior Vena Cava 0.884, Hepatic Vessel 0.871")
    lines = understanding_lines([r], plan_passes([r.structure]))
    assert any("only chooses which of the 32" in line for line in lines)
    assert any('task prompt: "A task of segmenting' in line for line in lines)


def test_a_typed_side_is_respected_and_a_mirror_tie_is_asked() -> None:
    # the stub scores Left Lung highest, but "right" was typed: only right or unsided structures
    r = resolve("the big organ under the right ribs", clip_scorer=StubScorer())
    assert r.structure.key == "liver" and "only right-sided" in r.reason
    with pytest.raises(UnresolvedStructure) as err:  # 0.912 vs 0.909: CLIP cannot tell
        resolve("bean shaped organ", clip_scorer=StubScorer())
    assert err.value.kind == "ambiguous"
    assert [s.key for s in err.value.suggestions[:2]] == ["right_kidney", "left_kidney"]
    assert "margin 0.003 < 0.010" in str(err.value)


def test_the_thresholds_are_settings() -> None:
    with pytest.raises(UnresolvedStructure) as err:
        resolve("main artery of the abdomen", clip_scorer=StubScorer(),
                clip_thresholds=ClipThresholds(min_cosine=0.95))
    assert err.value.suggestions[0] == structure("aorta") and "0.931 < 0.950" in str(err.value)
    with pytest.raises(UnresolvedStructure):  # unknown text: flat scores, refused at the defaults
        resolve("zzqv blob", clip_scorer=StubScorer())
    with pytest.raises(InputError, match="cosine"):
        ClipThresholds(min_cosine=3.0)


# --------------------------------------------------------------------------- modes
def test_modes_and_scorers() -> None:
    stub = StubScorer()
    assert clip_scorer_for("off") is None and clip_scorer_for(None) is None
    assert clip_scorer_for(stub) is stub
    with pytest.raises(InputError, match="auto, on, off"):
        clip_scorer_for("sometimes")


def test_auto_without_weights_offline_stays_lexical_with_one_note(
    no_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDPDNET_OFFLINE", "1")
    scorer = clip_scorer_for("auto")
    assert [r.structure.key for r in resolve_many("liver, IVC", clip_scorer=scorer)] == [
        "liver", "inferior_vena_cava"]
    with pytest.raises(UnresolvedStructure) as err:
        resolve_many("liver, main artery of the abdomen, the big organ under the right ribs", clip_scorer=scorer)
    text = str(err.value)
    assert text.count(NOTE) == 1 and "CDPDNET_OFFLINE=1" in text and "2 of 3 names" in text
    assert err.value.clip_unavailable is not None and not err.value.clip_unavailable.downloadable
    assert [r.structure.key for r in err.value.resolved] == ["liver"]
    with pytest.raises(ClipUnavailable) as again:  # remembered: no second look, same note
        scorer.similarities("anything")
    assert again.value is err.value.clip_unavailable


def test_auto_loads_nothing_heavy_when_clip_cannot_help(no_weights: Path) -> None:
    """Offline and without CLIP's weights, a refusal costs no torch or open_clip import."""
    code = (
        "import sys\n"
        "from napari_cdpdnet.inference.segmenter import parse_request\n"
        "from napari_cdpdnet.vocabulary.resolver import UnresolvedStructure\n"
        "try:\n"
        "    parse_request('main artery of the abdomen', clip_scorer='auto')\n"
        "except UnresolvedStructure as exc:\n"
        "    assert 'CLIP text matching is unavailable' in str(exc), exc\n"
        "assert not [m for m in ('torch', 'open_clip') if m in sys.modules]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_offers_the_download_where_downloading_is_possible(online: None) -> None:
    scorer = clip_scorer_for("auto", allow_download=False)  # the dock: never downloads on its own
    with pytest.raises(UnresolvedStructure) as err:
        resolve("main artery of the abdomen", clip_scorer=scorer)
    assert err.value.clip_unavailable is not None and err.value.clip_unavailable.downloadable


def test_on_without_weights_or_extra_is_a_clear_error(no_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsError) as err:
        clip_scorer_for("on", allow_download=False)
    assert CLIP_FILE in str(err.value) and "--clip-weights PATH" in str(err.value)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(InputError, match=r"napari-cdpdnet\[clip\]"):
        clip_scorer_for("on", allow_download=False)


@pytest.mark.slow
def test_first_need_downloads_through_the_hub_checksummed_then_stays_local(
    clip_hub: FakeHub, tiny_clip: Path, tiny_arch: None, no_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = clip_scorer_for("auto")  # downloads allowed: fetched on the first phrase that needs it
    assert clip_hub.requests == []  # nothing fetched until CLIP is needed
    assert resolve("liver", clip_scorer=scorer).source == "name" and clip_hub.requests == []
    cos = scorer.similarities("Arota")  # the official name scores 1.0 against its own prompt
    assert int(max(range(32), key=lambda i: cos[i])) == structure("aorta").channel
    assert max(cos) == pytest.approx(1.0, abs=1e-5)
    assert scorer.organ_source == "computed by CLIP from the official prompts"
    assert any(m == "GET" and CLIP_FILE in p for m, p in clip_hub.requests)
    cached = no_weights / "cache" / "weights" / "clip-vit-b-32" / CLIP_FILE
    assert cached.read_bytes() == tiny_clip.read_bytes()
    record = read_manifest(cached.parent.parent)[f"clip-vit-b-32/{CLIP_FILE}"]
    assert record["sha256"] == hashlib.sha256(tiny_clip.read_bytes()).hexdigest()

    # from now on the local copy is used: no request at all, even with downloads allowed
    clip_hub.requests.clear()
    attempts = _forbid_downloads(monkeypatch)
    again = clip_scorer_for("on")
    r = resolve("zzqv blob", clip_scorer=again, clip_thresholds=ClipThresholds(-1.0, 0.0))
    assert r.source == "CLIP" and clip_hub.requests == [] and attempts == []


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def small_ct(shared_path) -> Path:
    return shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz")


_BOX = ["--box", "-30", "-30", "-1000", "30", "30", "1000", "--preset", "fast"]


def _segment(ct: Path, out: Path, *args: str) -> int:
    return main(["segment", str(ct), "-o", str(out), "--no-progress", *args])


@pytest.mark.shared
def test_cli_clip_modes_exit_codes_and_the_one_note(
    small_ct: Path, no_weights: Path, capsys: pytest.CaptureFixture
) -> None:
    out = no_weights / "o.nii.gz"
    unknown = ["-s", "main artery of the abdomen", "-s", "the big organ under the right ribs"]
    # off: lexicon only, refused (exit 5) with no CLIP note
    assert _segment(small_ct, out, *unknown, "--clip", "off", "--offline") == 5
    err = capsys.readouterr().err
    assert "'main artery of the abdomen' is not one of" in err and NOTE not in err
    # auto, CLIP absent and offline: still refused, and the note says why, once
    assert _segment(small_ct, out, *unknown, "--offline") == 5
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1 and "cdpdnet weights download" in err
    # auto, a name the lexicon knows: never a CLIP error (stops at the missing model weights)
    assert _segment(small_ct, out, "-s", "liver", "--offline") == 4
    err = capsys.readouterr().err
    assert "cdpdnet.pth" in err and "CLIP" not in err and CLIP_FILE not in err
    # on, CLIP absent: a clear weights error (exit 4) before anything else is needed
    assert _segment(small_ct, out, "-s", "liver", "--clip", "on", "--offline") == 4
    err = capsys.readouterr().err
    assert CLIP_FILE in err and "--clip-weights PATH" in err and "cdpdnet.pth" not in err
    assert _segment(small_ct, out, "-s", "liver", "--clip-weights", str(no_weights / "none.safetensors")) == 4
    assert "--clip-weights" in capsys.readouterr().err
    assert _segment(small_ct, out, "-s", "liver", "--clip", "off", "--clip-weights", "x") == 2
    assert "contradict" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.shared
@pytest.mark.slow
def test_cli_segment_runs_the_structure_clip_chose_and_prints_how(
    small_ct: Path, weights, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = StubScorer()
    monkeypatch.setattr("napari_cdpdnet.inference.clip_choice.clip_scorer_for",
                        lambda choice, **_kw: None if choice == "off" else stub)
    out = tmp_path / "aorta.nii.gz"
    code = _segment(small_ct, out, "-s", "liver, main artery of the abdomen", *_BOX, "--checkpoint",
                    str(weights[0]), "--dino", str(weights[1]), "--offline")
    assert code == 0
    err = capsys.readouterr().err
    assert "'liver' -> Liver [name]" in err
    assert ("'main artery of the abdomen' -> Aorta [CLIP: cosine 0.931, margin 0.029 over Celiac Trunk]; "
            "alternatives: Celiac Trunk 0.902, Inferior Vena Cava 0.884, Hepatic Vessel 0.871") in err
    assert 'task prompt: "A task of segmenting' in err and "only chooses which of the 32" in err
    with open(out.with_suffix("").with_suffix(".csv"), newline="") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == ["liver", "aorta"]


@pytest.mark.shared
@pytest.mark.slow
def test_cli_real_clip_loading_with_local_weights_touches_no_network(
    small_ct: Path, weights, tiny_clip: Path, tiny_arch: None, clip_hub: FakeHub, tmp_path: Path,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny open_clip model in a weights folder, downloads allowed but forbidden to happen:
    the phrase goes through open_clip for real and the run segments what it chose."""
    from napari_cdpdnet.model.text import ClipScorer

    site = tmp_path / "site"
    (site / "clip-vit-b-32").mkdir(parents=True)
    (site / "clip-vit-b-32" / CLIP_FILE).write_bytes(tiny_clip.read_bytes())
    monkeypatch.setenv("CDPDNET_WEIGHTS_DIR", str(site))
    attempts = _forbid_downloads(monkeypatch)
    loose = ClipThresholds(-1.0, 0.0)  # a random model is never confident: accept its top-1
    expected = resolve("zzqv blob", clip_scorer=ClipScorer(clip_weights=site / "clip-vit-b-32" / CLIP_FILE),
                       clip_thresholds=loose).structure
    out = tmp_path / "clip.nii.gz"
    code = _segment(small_ct, out, "-s", "zzqv blob", "--clip", "on", "--clip-threshold", "-1",
                    "--clip-margin", "0", *_BOX, "--checkpoint", str(weights[0]), "--dino", str(weights[1]))
    assert code == 0, capsys.readouterr().err
    assert f"'zzqv blob' -> {expected.name} [CLIP: cosine" in capsys.readouterr().err
    with open(out.with_suffix("").with_suffix(".csv"), newline="") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == [expected.key]
    assert clip_hub.requests == [] and attempts == []


@pytest.mark.shared
def test_cli_segment_by_example_takes_words_too(
    small_ct: Path, no_weights: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = no_weights / "x.nii.gz"
    base = ["segment-by-example", str(small_ct), "--click", "-5", "-162.8", "139.3", "-o", str(out), "--offline"]
    assert main([*base, "-s", "liver, spleen"]) == 2
    assert "names 2 structures" in capsys.readouterr().err
    assert main([*base, "-s", "main artery of the abdomen", "--clip", "off"]) == 5
    assert main([*base, "-s", "main artery of the abdomen"]) == 5
    assert capsys.readouterr().err.count(NOTE) == 1
    assert main([*base, "-s", "liver", "--clip", "on"]) == 4
    assert CLIP_FILE in capsys.readouterr().err
    stub = StubScorer()
    monkeypatch.setattr("napari_cdpdnet.inference.clip_choice.clip_scorer_for",
                        lambda choice, **_kw: None if choice == "off" else stub)
    assert main([*base, "-s", "main artery of the abdomen"]) == 4  # understood; the model is missing
    err = capsys.readouterr().err
    assert "-> Aorta [CLIP: cosine 0.931" in err and "cdpdnet.pth" in err
    assert not out.exists()


@pytest.mark.shared
@pytest.mark.slow
def test_cli_segment_by_example_segments_the_named_structure(
    small_ct: Path, weights, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = StubScorer()
    monkeypatch.setattr("napari_cdpdnet.inference.clip_choice.clip_scorer_for",
                        lambda choice, **_kw: None if choice == "off" else stub)
    out = tmp_path / "named.nii.gz"
    code = main(["segment-by-example", str(small_ct), "--click", "-5", "-162.8", "139.3", "-o", str(out),
                 "-s", "main artery of the abdomen", "--context", "30", "--preset", "fast", "--no-progress",
                 "--checkpoint", str(weights[0]), "--dino", str(weights[1]), "--offline"])
    assert code == 0
    captured = capsys.readouterr()
    assert "segmented Aorta as named (-s)" in captured.out and "-> Aorta [CLIP" in captured.err
    with open(out.with_suffix("").with_suffix(".csv"), newline="") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == ["aorta"]
