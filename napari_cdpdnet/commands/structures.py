"""``cdpdnet structures``: the 32 structures, the 11 tasks, and what a typed request resolves to."""

from __future__ import annotations

import argparse
import json

from napari_cdpdnet.commands._clip import add_clip_options, clip_settings
from napari_cdpdnet.vocabulary.catalog import (
    FIXED_CONDITIONING_NOTE,
    STRUCTURES,
    TASKS,
    Structure,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "structures",
        help="list the 32 structures CDPDNet segments (and resolve typed names)",
        description=(
            "List the 32 structures in output-channel order with names, synonyms, colours and "
            "SNOMED-CT codes, or check how typed names are understood (--resolve): each name's "
            "source (name, synonym, abbreviation, part, language, typo or CLIP, with CLIP's cosine "
            "and margin over the runner-up), the alternatives, and the task prompt sentence each "
            "pass runs. Wording the lexicon does not know is matched by CLIP ViT-B/32, which only "
            "chooses among the 32 structures. " + FIXED_CONDITIONING_NOTE
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tasks", action="store_true", help="list the 11 training tasks and their label sets"
    )
    p.add_argument(
        "--resolve",
        metavar="TEXT",
        help='resolve free text, e.g. "IVC, kidney left and liver lesion": how each name was '
        "understood, and the plan with its task prompts",
    )
    p.add_argument("--offline", action="store_true", help="with --resolve: never download CLIP's weights")
    add_clip_options(p, bare_flag_means_on=True)
    p.set_defaults(func=run)


def _structure_dict(s: Structure) -> dict:
    sn = s.snomed
    return {
        "index": s.index,
        "channel": s.channel,
        "key": s.key,
        "name": s.name,
        "official_name": s.official_name,
        "laterality": s.laterality,
        "group": s.group,
        "color": list(s.color),
        "synonyms": list(s.synonyms),
        "other_languages": [{"language": code, "phrase": phrase} for code, phrase in s.other_languages],
        "abbreviations": list(s.abbreviations),
        "part_terms": list(s.part_terms),
        "snomed": {
            "category": list(sn.category),
            "type": list(sn.type),
            "type_modifier": list(sn.type_modifier) if sn.type_modifier else None,
            "region": list(sn.region) if sn.region else None,
            "region_modifier": list(sn.region_modifier) if sn.region_modifier else None,
        },
        "tasks": [t.id for t in TASKS if s.index in t.structures],
    }


def _print_structures() -> None:
    print(
        f"{'#':>2}  {'key':<21} {'name':<29} {'side':<5} {'group':<6} {'colour':<7} {'SNOMED':<10} also matches"
    )
    for s in STRUCTURES:
        also = [*s.abbreviations, *s.synonyms[:3]]
        print(
            f"{s.index:>2}  {s.key:<21} {s.name:<29} {s.laterality or '':<5} {s.group:<6} "
            f"{s.color_hex:<7} {s.snomed.type.value:<10} {', '.join(also)}"
        )


def _print_official_names() -> None:
    """The official prompt names that differ from ours, spelled as the authors spelled them."""
    differ = [s for s in STRUCTURES if s.official_name != s.name]
    if differ:
        print()
        print(
            "The model's own prompts name some structures differently (spelling as in the official "
            "code, sic; these names are accepted too): "
            + "; ".join(f"{s.name} = '{s.official_name}'" for s in differ)
        )


def _print_tasks() -> None:
    print(f"{'id':>2}  {'key':<13} {'name':<13} structures")
    for t in TASKS:
        names = ", ".join(STRUCTURES[i - 1].name for i in t.structures)
        print(f"{t.id:>2}  {t.key:<13} {t.name:<13} {names}")


def run(args: argparse.Namespace) -> int:
    if args.resolve is not None:
        from napari_cdpdnet.inference.segmenter import Segmenter

        settings = clip_settings(args)
        _, found, plan = Segmenter(allow_download=not args.offline, **settings).plan(args.resolve)
        if args.json:
            print(
                json.dumps(
                    {
                        "resolved": [
                            {
                                "text": r.text,
                                "key": r.structure.key,
                                "name": r.structure.name,
                                "confidence": r.confidence,
                                "method": r.method,
                                "source": r.source,
                                "language": r.language or None,
                                "cosine": r.cosine,
                                "margin": r.margin,
                                "alternatives": [
                                    {"key": s.key, "score": round(score, 4)} for s, score in r.alternatives
                                ],
                                "reason": r.reason,
                            }
                            for r in found
                        ],
                        "passes": [
                            {
                                "task": p.task.id,
                                "task_name": p.task.name,
                                "task_prompt": p.task.prompt,
                                "structures": [s.key for s in p.structures],
                            }
                            for p in plan
                        ],
                        "required_channels": sorted({c for p in plan for c in p.channels}),
                    },
                    indent=2,
                )
            )
            return 0
        from napari_cdpdnet.vocabulary.explain import understanding_lines

        print("\n".join(understanding_lines(found, plan, reasons=True)))
        return 0
    if args.json:
        payload = {
            "structures": [_structure_dict(s) for s in STRUCTURES],
            "note": FIXED_CONDITIONING_NOTE,
        }
        if args.tasks:
            payload["tasks"] = [
                {
                    "id": t.id,
                    "key": t.key,
                    "name": t.name,
                    "datasets": [n for _, n in t.datasets],
                    "structures": list(t.structures),
                }
                for t in TASKS
            ]
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    if args.tasks:
        _print_tasks()
    else:
        _print_structures()
        _print_official_names()
        print("\nThe 11 task prompts and the structures each was trained on: cdpdnet structures --tasks")
    print()
    print(FIXED_CONDITIONING_NOTE)
    return 0
