"""Free-text resolution: a table of realistic phrasings, refusals, lists, and the CLIP path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.errors import VocabularyError, WeightsError
from napari_cdpdnet.vocabulary.catalog import LANGUAGES, STRUCTURES, structure
from napari_cdpdnet.vocabulary.resolver import (
    ClipThresholds,
    UnresolvedStructure,
    normalize,
    resolve,
    resolve_many,
)

# (typed text, expected structure key, expected method)
ACCEPTED = [
    # exact names, any case / punctuation / filler
    ("liver", "liver", "exact"),
    ("Liver", "liver", "exact"),
    ("LIVER", "liver", "exact"),
    ("the liver", "liver", "exact"),
    ("segment the liver please", "liver", "exact"),
    ("liver mask", "liver", "exact"),
    ("Spleen", "spleen", "exact"),
    ("stomach", "stomach", "exact"),
    ("pancreas", "pancreas", "exact"),
    ("duodenum", "duodenum", "exact"),
    ("rectum", "rectum", "exact"),
    ("prostate", "prostate", "exact"),
    ("colon", "colon", "exact"),
    ("aorta", "aorta", "exact"),
    ("esophagus", "esophagus", "exact"),
    ("kidney cyst", "kidney_cyst", "exact"),
    ("Hepatic Vessel Tumor", "hepatic_vessel_tumor", "exact"),
    ("portal vein and splenic vein", "portal_splenic_vein", "exact"),
    ("Portal Vein & Splenic Vein", "portal_splenic_vein", "exact"),
    ("celiac trunk", "celiac_trunk", "exact"),
    ("urinary bladder", "urinary_bladder", "exact"),
    ("bladder", "urinary_bladder", "exact"),
    ("small intestine", "small_intestine", "exact"),
    ("intestine", "small_intestine", "exact"),
    ("3", "left_kidney", "exact"),
    ("27", "liver_tumor", "exact"),
    ("left_kidney", "left_kidney", "exact"),
    # official typos still work
    ("Arota", "aorta", "exact"),
    ("Celiac Truck", "celiac_trunk", "exact"),
    ("Postcava", "inferior_vena_cava", "exact"),
    ("Gall Bladder", "gallbladder", "exact"),
    ("Left Head of Femur", "left_femoral_head", "exact"),
    # laterality in any position and any short form
    ("left kidney", "left_kidney", "exact"),
    ("L kidney", "left_kidney", "exact"),
    ("Lt kidney", "left_kidney", "exact"),
    ("kidney left", "left_kidney", "exact"),
    ("kidney, left", "left_kidney", "exact"),
    ("Kidney (L)", "left_kidney", "exact"),
    ("left renal", "left_kidney", "synonym"),
    ("renal left", "left_kidney", "synonym"),
    ("LK", "left_kidney", "synonym"),
    ("R kidney", "right_kidney", "exact"),
    ("rt. kidney", "right_kidney", "exact"),
    ("kidney right", "right_kidney", "exact"),
    ("right renal", "right_kidney", "synonym"),
    ("left adrenal", "left_adrenal_gland", "synonym"),
    ("adrenal gland, right", "right_adrenal_gland", "exact"),
    ("right suprarenal gland", "right_adrenal_gland", "synonym"),
    ("L lung", "left_lung", "exact"),
    ("lung right", "right_lung", "exact"),
    ("left femoral head", "left_femoral_head", "exact"),
    ("head of the right femur", "right_femoral_head", "exact"),
    ("right femur head", "right_femoral_head", "synonym"),
    # synonyms and abbreviations
    ("IVC", "inferior_vena_cava", "synonym"),
    ("ivc", "inferior_vena_cava", "synonym"),
    ("inferior vena cava", "inferior_vena_cava", "exact"),
    ("vena cava inferior", "inferior_vena_cava", "synonym"),
    ("gallbladder", "gallbladder", "exact"),
    ("gall-bladder", "gallbladder", "exact"),
    ("GB", "gallbladder", "synonym"),
    ("cholecyst", "gallbladder", "synonym"),
    ("small bowel", "small_intestine", "synonym"),
    ("large bowel", "colon", "synonym"),
    ("large intestine", "colon", "synonym"),
    ("celiac axis", "celiac_trunk", "synonym"),
    ("coeliac trunk", "celiac_trunk", "exact"),
    ("PSV", "portal_splenic_vein", "synonym"),
    ("hepatic vessels", "hepatic_vessel", "synonym"),
    ("liver vessels", "hepatic_vessel", "synonym"),
    ("gastric", "stomach", "synonym"),
    ("pancreatic", "pancreas", "synonym"),
    ("prostate gland", "prostate", "synonym"),
    # British spellings
    ("oesophagus", "esophagus", "exact"),
    ("liver tumour", "liver_tumor", "exact"),
    ("kidney tumour", "kidney_tumor", "exact"),
    ("colon tumours", "colon_tumor", "fuzzy"),
    ("coeliac axis", "celiac_trunk", "synonym"),
    # lesions, cancers, clinical abbreviations
    ("liver lesion", "liver_tumor", "synonym"),
    ("hepatic metastases", "liver_tumor", "synonym"),
    ("liver mets", "liver_tumor", "synonym"),
    ("HCC", "liver_tumor", "synonym"),
    ("hepatocellular carcinoma", "liver_tumor", "synonym"),
    ("renal mass", "kidney_tumor", "synonym"),
    ("RCC", "kidney_tumor", "synonym"),
    ("renal cyst", "kidney_cyst", "synonym"),
    ("pancreatic cancer", "pancreas_tumor", "synonym"),
    ("PDAC", "pancreas_tumor", "synonym"),
    ("lung nodule", "lung_tumor", "synonym"),
    ("NSCLC", "lung_tumor", "synonym"),
    ("colon cancer", "colon_tumor", "synonym"),
    ("colorectal cancer", "colon_tumor", "synonym"),
    # other languages
    ("rein gauche", "left_kidney", "synonym"),
    ("linke Niere", "left_kidney", "synonym"),
    ("riñón derecho", "right_kidney", "synonym"),
    ("foie", "liver", "synonym"),
    ("Leber", "liver", "synonym"),
    ("Milz", "spleen", "synonym"),
    ("vésicule biliaire", "gallbladder", "synonym"),
    ("Bauchspeicheldrüse", "pancreas", "synonym"),
    # parts of a structure give the whole structure
    ("portal vein", "portal_splenic_vein", "synonym"),
    ("splenic vein", "portal_splenic_vein", "synonym"),
    ("abdominal aorta", "aorta", "synonym"),
    ("sigmoid colon", "colon", "synonym"),
    ("caecum", "colon", "synonym"),
    ("ileum", "small_intestine", "synonym"),
    ("left lower lobe", "left_lung", "synonym"),
    ("hepatic veins", "hepatic_vessel", "synonym"),
    # typos
    ("pancraes", "pancreas", "fuzzy"),
    ("pancrease", "pancreas", "fuzzy"),
    ("spleeen", "spleen", "fuzzy"),
    ("livr", "liver", "fuzzy"),
    ("gallblader", "gallbladder", "fuzzy"),
    ("esophagous", "esophagus", "fuzzy"),
    ("prostrate", "prostate", "fuzzy"),
    ("duodenem", "duodenum", "fuzzy"),
    ("left kidny", "left_kidney", "fuzzy"),
    ("rigth lung", "right_lung", "fuzzy"),
    ("stomache", "stomach", "fuzzy"),
    ("aortha", "aorta", "fuzzy"),
]

# (typed text, refusal kind, structures the refusal must suggest)
REFUSED = [
    ("brain", "not_supported", []),
    ("heart", "not_supported", []),
    ("trachea", "not_supported", []),
    ("thyroid gland", "not_supported", []),
    ("spinal cord", "not_supported", []),
    ("vertebrae", "not_supported", []),
    ("ribs", "not_supported", []),
    ("superior vena cava", "not_supported", []),
    ("lymph nodes", "not_supported", []),
    ("appendix", "not_supported", []),
    ("brian", "not_supported", []),  # a typo of something unsupported is still unsupported
    ("femur", "not_supported", ["right_femoral_head", "left_femoral_head"]),
    ("hip", "not_supported", ["right_femoral_head", "left_femoral_head"]),
    ("lung lobes", "not_supported", ["right_lung", "left_lung"]),
    ("liver cyst", "not_supported", ["liver_tumor", "kidney_cyst"]),
    ("kidney", "ambiguous", ["right_kidney", "left_kidney"]),
    ("renal", "ambiguous", ["right_kidney", "left_kidney"]),
    ("kidny", "ambiguous", ["right_kidney", "left_kidney"]),
    ("lung", "ambiguous", ["right_lung", "left_lung"]),
    ("adrenal gland", "ambiguous", ["right_adrenal_gland", "left_adrenal_gland"]),
    ("femoral head", "ambiguous", ["left_femoral_head", "right_femoral_head"]),
    ("tumour", "ambiguous", ["kidney_tumor", "liver_tumor"]),
    ("lesion", "ambiguous", ["liver_tumor", "kidney_cyst"]),
    ("bowel", "ambiguous", ["small_intestine", "colon"]),
    ("vein", "ambiguous", ["inferior_vena_cava", "portal_splenic_vein"]),
    ("cyst", "ambiguous", ["kidney_cyst"]),
    ("kidneys", "group", ["right_kidney", "left_kidney"]),
    ("both lungs", "group", ["right_lung", "left_lung"]),
    ("bilateral adrenal gland", "group", ["right_adrenal_gland", "left_adrenal_gland"]),
    ("left right kidney", "conflicting_laterality", []),
    ("xyzzy", "unknown", []),
    ("left liver", "unknown", []),
    ("33", "unknown", []),
    ("", "empty", []),
    ("the", "empty", []),
]


def test_table_is_large_and_covers_every_structure() -> None:
    assert len(ACCEPTED) + len(REFUSED) >= 100
    assert {key for _, key, _ in ACCEPTED} == {s.key for s in STRUCTURES}


@pytest.mark.parametrize(("text", "key", "method"), ACCEPTED, ids=[t for t, _, _ in ACCEPTED])
def test_accepted(text: str, key: str, method: str) -> None:
    r = resolve(text)
    assert (r.structure.key, r.method) == (key, method)
    assert 0.8 <= r.confidence <= 1.0
    assert r.reason
    if method == "exact":
        assert r.confidence == 1.0


@pytest.mark.parametrize(
    ("text", "kind", "suggested"), REFUSED, ids=[t or "<empty>" for t, _, _ in REFUSED]
)
def test_refused(text: str, kind: str, suggested: list[str]) -> None:
    with pytest.raises(UnresolvedStructure) as err:
        resolve(text)
    assert isinstance(err.value, VocabularyError) and err.value.exit_code == 5
    assert err.value.kind == kind
    assert set(suggested) <= {s.key for s in err.value.suggestions}
    if kind == "not_supported":
        assert "is not one of the 32 structures" in str(err.value)


def test_unknown_text_gets_nearest_suggestions_and_the_reason() -> None:
    with pytest.raises(UnresolvedStructure) as err:
        resolve("splean tumor thing")
    msg = str(err.value)
    assert "Nearest:" in msg and "< 0.80" in msg and "cdpdnet structures" in msg
    assert err.value.suggestions


def test_threshold_controls_fuzzy_acceptance() -> None:
    assert resolve("pancraes").confidence < 0.9
    with pytest.raises(UnresolvedStructure):
        resolve("pancraes", threshold=0.95)
    # below the fixed floor string similarity is noise, whatever the threshold
    with pytest.raises(UnresolvedStructure):
        resolve("zzqv blob", threshold=0.0)


def test_laterality_is_never_swapped_by_fuzzy_matching() -> None:
    assert resolve("left kidny").structure.key == "left_kidney"
    assert resolve("rigth kidny").structure.key == "right_kidney"
    assert resolve("left adrenall").structure.key == "left_adrenal_gland"


def test_normalize() -> None:
    assert normalize("Kidney (L)") == normalize("left kidney") == "left kidney"
    assert normalize("Oesophageal TUMOUR") == "esophageal tumor"
    assert normalize("Riñón  izquierdo") == "left rinon"


def test_every_phrase_in_the_data_resolves_to_its_structure() -> None:
    """An alias is one line of resources/structures.json; every listed one reaches its structure."""
    for s in STRUCTURES:
        for phrase in (*s.synonyms, *s.abbreviations, *s.part_terms):
            assert resolve(phrase).structure == s, phrase
        names = {normalize(s.name), normalize(s.official_name)}
        for code, phrase in s.other_languages:  # and says which language it read
            r = resolve(phrase)
            if normalize(phrase) in names:  # "pancréas" without its accent is the name itself
                assert (r.structure, r.source) == (s, "name"), phrase
                continue
            assert (r.structure, r.source) == (s, "language"), phrase
            assert LANGUAGES[code] in r.language and r.language in r.reason, phrase


def test_word_lists_are_read_from_terms_json() -> None:
    from napari_cdpdnet._resources import load_json

    words = load_json("terms.json")
    for side in ("left", "right"):
        for w in words[side]:
            assert normalize(f"kidney {w}") == f"{side} kidney", w
    for w in words["filler"]:
        assert normalize(f"{w} liver") == "liver", w
    for british, american in words["spellings"].items():
        assert normalize(british) == american
    for w in words["list_words"]:
        assert [r.structure.key for r in resolve_many(f"liver {w} spleen")] == ["liver", "spleen"], w


# --------------------------------------------------------------------------- lists
@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("liver, left kidney and spleen", ["liver", "left_kidney", "spleen"]),
        ("portal vein and splenic vein, pancreas", ["portal_splenic_vein", "pancreas"]),
        ("left and right kidney", ["left_kidney", "right_kidney"]),
        ("kidney left and right", ["left_kidney", "right_kidney"]),
        ("kidneys + spleen", ["right_kidney", "left_kidney", "spleen"]),
        ("liver; LIVER; the liver", ["liver"]),
        ("kidney, left", ["left_kidney"]),
        ("IVC & aorta\ncoeliac axis", ["inferior_vena_cava", "aorta", "celiac_trunk"]),
        ("rein gauche et foie", ["left_kidney", "liver"]),
        (["IVC", "liver lesion"], ["inferior_vena_cava", "liver_tumor"]),
    ],
)
def test_resolve_many(text, keys: list[str]) -> None:
    assert [r.structure.key for r in resolve_many(text)] == keys


def test_resolve_many_groups() -> None:
    assert [r.structure.group for r in resolve_many("all tumours")] == ["tumour"] * 7
    assert len(resolve_many("all")) == 32
    assert {r.structure.key for r in resolve_many("both kidneys and lungs")} == {
        "right_kidney",
        "left_kidney",
        "right_lung",
        "left_lung",
    }


def test_resolve_many_reports_every_failure_at_once() -> None:
    with pytest.raises(UnresolvedStructure) as err:
        resolve_many("brain, spleen, kidny and heart")
    msg = str(err.value)
    assert "3 of 4 names" in msg and "'brain'" in msg and "'kidny'" in msg and "'heart'" in msg
    assert {"right_kidney", "left_kidney"} <= {s.key for s in err.value.suggestions}
    with pytest.raises(UnresolvedStructure, match="no structure"):
        resolve_many(" , ; ")


# --------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def random_clip():
    """A randomly initialised open_clip ViT-B-32 and organ embeddings made by that same model
    from the official prompts, standing in for the real CLIP weights and checkpoint buffer."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.inference_mode():
        organ = model.encode_text(tokenizer([s.prompt for s in STRUCTURES])).numpy()
    return model, tokenizer, organ


def _encode(model, tokenizer, text: str):
    import torch

    with torch.inference_mode():
        return model.encode_text(tokenizer([f"A computerized tomography of a {text}"])).numpy()[0]


@pytest.mark.slow
def test_clip_scores_against_the_checkpoint_embeddings(random_clip) -> None:
    from napari_cdpdnet.model.text import ClipScorer

    model, tokenizer, organ = random_clip
    query = "zzqv blob"  # no name, synonym or typo matches this
    target = structure("hepatic_vessel")
    organ = organ.copy()
    organ[target.channel] = _encode(model, tokenizer, query) * 3.0  # norm does not matter: cosine
    scorer = ClipScorer(model, organ, tokenizer=tokenizer)
    cos = scorer.similarities(query)
    assert cos.shape == (32,) and int(cos.argmax()) == target.channel
    assert cos[target.channel] == pytest.approx(1.0, abs=1e-5)
    probs = scorer.probabilities(query)
    assert probs.sum() == pytest.approx(1.0) and int(probs.argmax()) == target.channel
    assert scorer.logit_scale == pytest.approx(
        1 / 0.07, rel=1e-4
    )  # an untrained model's temperature

    r = resolve(query, clip_scorer=scorer)
    assert (r.structure, r.method, r.source) == (target, "clip", "CLIP")
    runner_up = float(np.sort(cos)[-2])
    assert r.confidence == pytest.approx(1.0, abs=1e-3) and r.cosine == pytest.approx(1.0, abs=1e-5)
    assert r.margin == pytest.approx(1.0 - runner_up, abs=1e-5)
    assert [s for s, _ in r.alternatives] == [STRUCTURES[i] for i in np.argsort(-cos)[1:4]]
    assert "A computerized tomography of a Hepatic Vessel" in r.reason
    # a margin the ranking does not reach: refused as ambiguous, CLIP's pick first
    with pytest.raises(UnresolvedStructure) as err:
        resolve(query, clip_scorer=scorer, clip_thresholds=ClipThresholds(0.5, 1.0 - runner_up + 0.01))
    assert err.value.kind == "ambiguous" and err.value.suggestions[0] == target
    assert "CLIP cannot tell" in str(err.value)
    # an untrained model's ordinary text: its best cosine barely beats the next, so it is refused
    with pytest.raises(UnresolvedStructure) as err:
        resolve("zzqv blob", clip_scorer=ClipScorer(model, random_clip[2], tokenizer=tokenizer))
    assert "CLIP" in str(err.value) and err.value.clip is not None


@pytest.mark.slow
def test_clip_is_only_asked_when_names_fail_and_ranks_unsupported_terms(random_clip) -> None:
    from napari_cdpdnet.model.text import ClipScorer

    model, tokenizer, organ = random_clip
    scorer = ClipScorer(model, organ, tokenizer=tokenizer)
    assert resolve("IVC", clip_scorer=scorer, threshold=0.0).method == "synonym"
    assert resolve("pancraes", clip_scorer=scorer, threshold=0.0).method == "fuzzy"
    assert scorer._cache == {}  # no CLIP forward pass for names the lexicon knows
    with pytest.raises(UnresolvedStructure) as err:
        resolve("brain", clip_scorer=scorer, threshold=0.0)  # refused before CLIP can pick
    assert err.value.kind == "not_supported" and "Nearest by CLIP" in str(err.value)
    assert len(err.value.suggestions) == 3
    # the official name reproduces its own embedding exactly (same template, same model)
    cos = scorer.similarities("Arota")
    assert int(cos.argmax()) == structure("aorta").channel and cos.max() == pytest.approx(
        1.0, abs=1e-5
    )


def test_clip_scorer_is_lazy_and_names_missing_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    from napari_cdpdnet.model.text import ClipScorer

    scorer = ClipScorer()  # constructing loads and downloads nothing
    assert resolve("liver", clip_scorer=scorer).method == "exact"
    with pytest.raises(WeightsError, match="open_clip_model.safetensors"):
        resolve("zzqv blob", clip_scorer=scorer)


def test_load_organ_embedding_from_checkpoint_formats(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from napari_cdpdnet.model.text import load_organ_embeddings

    emb = torch.randn(32, 512)
    official = tmp_path / "official.pth"
    torch.save(
        {"net": {"module.organ_embedding": emb.half(), "module.x": torch.zeros(1)}, "epoch": 3},
        official,
    )
    plain = tmp_path / "plain.pth"
    torch.save({"organ_embedding": emb}, plain)
    assert load_organ_embeddings(official) == pytest.approx(emb.half().float().numpy())
    assert load_organ_embeddings(plain) == pytest.approx(emb.numpy())
    bad = tmp_path / "bad.pth"
    torch.save({"net": {"module.task_embedding": torch.zeros(11, 512)}}, bad)
    with pytest.raises(WeightsError, match="no organ_embedding"):
        load_organ_embeddings(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"organ_embedding": torch.zeros(31, 512)}, wrong)
    with pytest.raises(WeightsError, match="shape"):
        load_organ_embeddings(wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        load_organ_embeddings(junk)
