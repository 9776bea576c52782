"""The fixed vocabulary: 32 structures, 11 tasks, pass planning, and `cdpdnet structures`."""

from __future__ import annotations

import csv
import itertools
import json
import random
import subprocess
import sys

import pytest

from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import VocabularyError
from napari_cdpdnet.vocabulary.catalog import (
    STRUCTURES,
    TASKS,
    plan_passes,
    required_channels,
    structure,
    structures,
    task,
)

#: The official CLIP prompt names (clip_embedding.py, SPEC §6.1-6.2), typos included.
OFFICIAL_NAMES = [
    "Spleen", "Right Kidney", "Left Kidney", "Gall Bladder", "Esophagus", "Liver", "Stomach",
    "Arota", "Postcava", "Portal Vein and Splenic Vein", "Pancreas", "Right Adrenal Gland",
    "Left Adrenal Gland", "Duodenum", "Hepatic Vessel", "Right Lung", "Left Lung", "Colon",
    "Intestine", "Rectum", "Bladder", "Prostate", "Left Head of Femur", "Right Head of Femur",
    "Celiac Truck", "Kidney Tumor", "Liver Tumor", "Pancreas Tumor", "Hepatic Vessel Tumor",
    "Lung Tumor", "Colon Tumor", "Kidney Cyst",
]  # fmt: skip

#: SPEC §7 TEMPLATE per task id (MSD = union of its six sub-datasets).
SPEC_TASKS = {
    0: set(range(1, 15)),
    1: {1, 3, 4, 5, 6, 7, 11, 14},
    2: {6},
    3: {6, 27},
    4: {2, 3, 26, 32},
    5: {6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24},
    6: {6, 2, 3, 1, 11},
    7: {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22},
    8: {6, 27, 30, 11, 28, 15, 29, 1, 31},
    9: {6, 21, 16, 17, 2, 3},
    10: {6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25},
}

#: Our key -> the TotalSegmentator structure whose codes and colour we take.
TOTALSEG = {
    "spleen": "spleen", "right_kidney": "kidney_right", "left_kidney": "kidney_left",
    "gallbladder": "gallbladder", "esophagus": "esophagus", "liver": "liver", "stomach": "stomach",
    "aorta": "aorta", "inferior_vena_cava": "inferior_vena_cava",
    "portal_splenic_vein": "portal_vein_and_splenic_vein", "pancreas": "pancreas",
    "right_adrenal_gland": "adrenal_gland_right", "left_adrenal_gland": "adrenal_gland_left",
    "duodenum": "duodenum", "colon": "colon", "small_intestine": "small_bowel",
    "urinary_bladder": "urinary_bladder", "prostate": "prostate", "liver_tumor": "liver_tumor",
}  # fmt: skip


def test_structures_in_official_channel_order_with_fixed_display_names() -> None:
    assert [s.official_name for s in STRUCTURES] == OFFICIAL_NAMES
    assert [s.index for s in STRUCTURES] == list(range(1, 33))
    assert [s.channel for s in STRUCTURES] == list(range(32))
    assert len({s.key for s in STRUCTURES}) == 32 and len({s.name for s in STRUCTURES}) == 32
    assert structure("aorta").name == "Aorta" and structure(25).name == "Celiac Trunk"
    # the stored prompt keeps the typo: that is what the checkpoint's embedding was made from
    assert structure("aorta").prompt == "A computerized tomography of a Arota"
    assert structure("celiac_trunk").prompt.endswith("Celiac Truck")


def test_laterality_group_and_codes_are_consistent() -> None:
    for s in STRUCTURES:
        side = (
            "left" if s.name.startswith("Left") else "right" if s.name.startswith("Right") else None
        )
        assert s.laterality == side, s
        modifier = s.snomed.type_modifier
        assert (modifier.meaning.lower() if modifier else None) == side, s
        assert s.snomed.category.scheme == s.snomed.type.scheme == "SCT"
        assert s.snomed.type.value.isdigit()
        if s.group == "tumour":
            assert s.snomed.category.value == "49755003" and s.snomed.region is not None, s
        else:
            assert s.snomed.category.value == "123037004", s
    assert {s.key for s in STRUCTURES if s.group == "vessel"} == {
        "aorta",
        "inferior_vena_cava",
        "portal_splenic_vein",
        "hepatic_vessel",
        "celiac_trunk",
    }
    assert [s.index for s in STRUCTURES if s.group == "tumour"] == list(range(26, 33))
    # a Code is a plain (value, scheme, meaning) tuple, as DICOM-SEG code triples are
    assert tuple(structure("liver").snomed.type) == ("10200004", "SCT", "Liver")


def test_colours_are_distinct_and_valid() -> None:
    colours = [s.color for s in STRUCTURES]
    assert len(set(colours)) == 32
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    assert structure("liver").color_hex == "#288c28"


def test_codes_and_colours_match_the_totalsegmentator_table(shared_path) -> None:
    path = shared_path("data", "totalsegmentator", "totalsegmentator_snomed_mapping.csv")
    rows = {r["Structure"]: r for r in csv.DictReader(path.open(encoding="utf-8"))}
    p = "SegmentedProperty"
    for key, ts in TOTALSEG.items():
        s, row = structure(key), rows[ts]
        assert s.snomed.category == (
            row[f"{p}CategoryCodeSequence.CodeValue"],
            "SCT",
            row[f"{p}CategoryCodeSequence.CodeMeaning"],
        ), key
        assert s.snomed.type == (
            row[f"{p}TypeCodeSequence.CodeValue"],
            "SCT",
            row[f"{p}TypeCodeSequence.CodeMeaning"],
        ), key
        mod = row[f"{p}TypeModifierCodeSequence.CodeValue"]
        assert (s.snomed.type_modifier.value if s.snomed.type_modifier else "") == mod, key
        region = row["AnatomicRegionSequence.CodeValue"]
        assert (s.snomed.region.value if s.snomed.region else "") == region, key
        assert s.color == tuple(int(v) for v in row["DicomRGBColor"].split(",")), key
    # lobes and femurs lend laterality codes and colours to the whole lungs / femoral heads
    assert structure("left_femoral_head").color == (248, 212, 62)
    assert (
        structure("kidney_cyst").snomed.type.value
        == rows["kidney_cyst_left"][f"{p}TypeCodeSequence.CodeValue"]
    )


def test_totalsegmentator_mapping_names_match_totalsegmentator(shared_path) -> None:
    """resources/label_mappings.json names each source value as TotalSegmentator does."""
    from napari_cdpdnet._resources import load_json
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL

    names = json.loads(shared_path("data", "totalsegmentator", "label_map_total.json").read_text())
    rows = load_json("label_mappings.json")["mappings"]["totalsegmentator"]["values"]
    assert {r["value"]: r["name"] for r in rows} == {v: names["total"][str(v)] for v in TOTALSEGMENTATOR_TOTAL}
    assert TOTALSEGMENTATOR_TOTAL[5] == structure("liver").index
    assert [v for v, s in TOTALSEGMENTATOR_TOTAL.items() if s == structure("right_lung").index] == [12, 13, 14]


def test_label_values_of_mappings() -> None:
    from napari_cdpdnet.errors import InputError
    from napari_cdpdnet.vocabulary.labelmaps import label_value, parse_label_values

    assert label_value("7") == 7 and label_value(" liver ") == 6 and label_value("Left Kidney") == 3
    for bad in ("0", "-2", ""):
        with pytest.raises(InputError):
            label_value(bad)
    with pytest.raises(VocabularyError):
        label_value("kidneys")
    assert parse_label_values("5=liver,1=1") == {5: 6, 1: 1}
    with pytest.raises(InputError, match="totalsegmentator"):
        parse_label_values("5=brain")


def test_structure_lookup_exact_only() -> None:
    assert structure(3) is structure("3") is structure("left_kidney") is structure("Left Kidney")
    assert structure("left kidney") is structure("LEFT_KIDNEY")
    assert structure("Arota").key == "aorta" and structure("Postcava").key == "inferior_vena_cava"
    assert structure(structure(1)) is STRUCTURES[0]
    for bad in (0, 33, -1, "brain", "IVC", True, 2.0):
        with pytest.raises(VocabularyError):
            structure(bad)  # type: ignore[arg-type]
    assert [s.index for s in structures(["liver", 6, "spleen"])] == [6, 1]


def test_tasks_match_the_spec() -> None:
    assert [t.id for t in TASKS] == list(range(11))
    assert {t.id: set(t.structures) for t in TASKS} == SPEC_TASKS
    assert [k for k, _ in task("msd").datasets] == [
        "10_03",
        "10_06",
        "10_07",
        "10_08",
        "10_09",
        "10_10",
    ]
    assert task("LiTS") is task(3) is task("3")
    assert set().union(*SPEC_TASKS.values()) == set(range(1, 33))
    with pytest.raises(VocabularyError):
        task(11)


def _min_passes(indices: set[int]) -> int:
    for k in range(1, 12):
        if any(
            indices <= set().union(*(SPEC_TASKS[t] for t in c))
            for c in itertools.combinations(range(11), k)
        ):
            return k
    raise AssertionError


def test_single_task_requests_take_the_most_specific_task() -> None:
    assert [p.task.name for p in plan_passes(["liver_tumor"])] == ["LiTS"]
    assert [p.task.name for p in plan_passes(["kidney_tumor", "kidney cyst"])] == ["KiTS"]
    plan = plan_passes(["spleen", "left_kidney", "liver"])
    assert len(plan) == 1 and plan.passes[0].task.name == "AbdomenCT-1K"
    assert plan.task_for("spleen").name == "AbdomenCT-1K"
    assert [p.task.name for p in plan_passes(["celiac_trunk", "aorta"])] == ["FLARE22"]


def test_request_no_task_covers_is_split_into_fewest_passes() -> None:
    plan = plan_passes(["kidney_tumor", "liver_tumor", "prostate"])
    assert [(p.task.id, [s.key for s in p.structures]) for p in plan] == [
        (3, ["liver_tumor"]),
        (4, ["kidney_tumor"]),
        (7, ["prostate"]),
    ]
    everything = plan_passes(range(1, 33))
    assert len(everything) == 7 == _min_passes(set(range(1, 33)))
    text = everything.describe()
    assert "7 passes for 32 structure(s)" in text and "all 32 outputs" in text
    for p in everything:
        assert f"task {p.task.id} ({p.task.name})" in text


def test_plans_are_minimal_complete_and_deterministic() -> None:
    rng = random.Random(7)
    for _ in range(150):
        request = rng.sample(range(1, 33), rng.randint(1, 8))
        plan = plan_passes(request)
        assert len(plan) == _min_passes(set(request)), request
        got = [s.index for p in plan for s in p.structures]
        assert sorted(got) == sorted(request), request  # each structure exactly once
        for p in plan:
            assert {s.index for s in p.structures} <= set(p.task.structures)
        assert plan_passes(list(reversed(request))).passes[0].task == plan.passes[0].task
        assert [p.task.id for p in plan] == sorted(p.task.id for p in plan)


def test_forced_task_and_bad_requests() -> None:
    plan = plan_passes(["liver", "spleen"], force_task="word")
    assert [p.task.id for p in plan] == [5]
    with pytest.raises(VocabularyError, match=r"task 2 \(CHAOS\) was not trained on Spleen"):
        plan_passes(["liver", "spleen"], force_task=2)
    with pytest.raises(VocabularyError, match="no structures"):
        plan_passes([])
    with pytest.raises(VocabularyError):
        plan_passes(["liver", "brain"])


def test_required_channels_include_post_processing_companions() -> None:
    assert required_channels(["liver"]) == {5}
    assert required_channels(["liver_tumor"]) == {26, 5}
    assert required_channels(["kidney_tumor"]) == {25, 1, 2}
    assert required_channels(["left_lung"]) == {16, 15}
    assert required_channels(["portal_splenic_vein"]) == {9, 10}
    assert required_channels(["pancreas_tumor", "colon_tumor"]) == {27, 30}
    assert plan_passes(["liver_tumor", "prostate"]).passes[0].channels == {26, 5}


def test_counts_match_the_official_checkpoint() -> None:
    """The vocabulary owns the counts; the checkpoint's architecture must agree with them."""
    pytest.importorskip("torch")
    from napari_cdpdnet.model.config import CDPDNetConfig

    official = CDPDNetConfig.official()
    assert official.num_classes == official.num_organs == len(STRUCTURES)
    assert official.num_tasks == len(TASKS)


def test_vocabulary_is_torch_free() -> None:
    code = (
        "import sys, napari_cdpdnet.vocabulary.catalog as v, napari_cdpdnet.vocabulary.resolver as r\n"
        "r.resolve('IVC'); r.resolve_many('liver, kidneys'); v.plan_passes(range(1, 33))\n"
        "assert not [m for m in ('torch', 'open_clip', 'huggingface_hub', 'numpy') if m in sys.modules]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- CLI
def test_cli_structures_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["structures"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 32
    assert "IVC" in rows[8]
    # The authors' misspelt prompt names are not offered as our synonyms, only explained once.
    assert not any("Arota" in r or "Truck" in r for r in rows)
    assert "Aorta = 'Arota'" in out and "sic" in out
    assert "cdpdnet structures --tasks" in out
    assert "fixed" in out and "cannot add a new structure" in out


def test_cli_structures_json_and_tasks(capsys: pytest.CaptureFixture) -> None:
    assert main(["structures", "--json", "--tasks"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["key"] for s in data["structures"]] == [s.key for s in STRUCTURES]
    assert data["structures"][2]["snomed"]["type_modifier"] == ["7771000", "SCT", "Left"]
    assert data["structures"][0]["tasks"] == [0, 1, 5, 6, 7, 8, 10]
    assert {t["id"]: set(t["structures"]) for t in data["tasks"]} == SPEC_TASKS
    assert main(["structures", "--tasks"]) == 0
    assert "LiTS" in capsys.readouterr().out


def test_cli_structures_resolve_shows_matches_and_plan(capsys: pytest.CaptureFixture) -> None:
    assert main(["structures", "--resolve", "IVC, kidney left and liver lesion"]) == 0
    out = capsys.readouterr().out
    assert "Inferior Vena Cava" in out and "Left Kidney" in out and "Liver Tumor" in out
    assert "2 passes" in out
    assert main(["structures", "--resolve", "liver lesion", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["resolved"][0]["key"] == "liver_tumor" and data["required_channels"] == [5, 26]
    assert main(["structures", "--resolve", "brain, liver"]) == 5
    assert "'brain' is not one of the 32 structures" in capsys.readouterr().err


def test_each_task_carries_its_official_ttpg_sentence() -> None:
    """The 11 sentences of txt_task_encoding.pth, row = task id (SPEC §6.2), rows 8-10 flagged."""
    from napari_cdpdnet.vocabulary.catalog import TASK_PROMPT_TEMPLATE

    assert TASK_PROMPT_TEMPLATE == "A task of segmenting {} in computerized tomography"
    assert TASKS[3].prompt == "A task of segmenting Liver, Liver Tumor in computerized tomography"
    assert TASKS[4].prompt == (
        "A task of segmenting Right Kidney, Left Kidney, Kidney Tumor, Kidney Cyst in computerized tomography")
    assert "Celiac Truck" in TASKS[9].prompt and "Right Lung" in TASKS[8].prompt  # the official order
    assert [t.id for t in TASKS if t.prompt_note] == [8, 9, 10]
    assert all(t.prompt.startswith("A task of segmenting ") for t in TASKS)
