"""The fixed CDPDNet vocabulary: 32 output structures, 11 training tasks, and pass planning.

Plain data, no torch: the GUI, the CLI, exporters and tests read names, colours and SNOMED
codes from here without loading a model. The data live in ``resources/structures.json``,
``resources/tasks.json`` and ``resources/postprocess.json`` (which structure plays which part in
the official post-processing, handed to the engine as :data:`POSTPROCESS_ROLES`). Every count is
``len(STRUCTURES)`` or ``len(TASKS)``; the official checkpoint's output and prompt counts
(``model.config``) must agree, which ``tests/test_vocabulary.py`` checks.

What a user types never changes what the network computes. CDPDNet's text conditioning is a
set of fixed constants: all 32 organ and 11 task CLIP embeddings are flattened into FiLM
parameters (SPEC §6.3), and every pass predicts all 32 channels. A request only selects which
of the 32 outputs are kept and which of the 11 task prompts runs. There is no open vocabulary.

Examples:
    >>> structure("left_kidney").channel
    2
    >>> plan_passes(["liver_tumor", "pancreas_tumor"]).describe()  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from napari_cdpdnet._resources import load_json
from napari_cdpdnet.errors import VocabularyError

__all__ = [
    "Code",
    "SegmentCoding",
    "Structure",
    "Task",
    "Pass",
    "SegmentationPlan",
    "SpecialTerm",
    "STRUCTURES",
    "TASKS",
    "SPECIAL_TERMS",
    "PROMPT_TEMPLATE",
    "TASK_PROMPT_TEMPLATE",
    "LANGUAGES",
    "GROUPS",
    "POSTPROCESS_ROLES",
    "structure",
    "structures",
    "task",
    "plan_passes",
    "required_channels",
    "FIXED_CONDITIONING_NOTE",
]

logger = logging.getLogger(__name__)

#: The three groups a structure belongs to.
GROUPS: tuple[str, ...] = ("organ", "vessel", "tumour")
_LATERALITIES = (None, "left", "right")
_TERM_KINDS = ("group", "ambiguous", "not_supported")
#: Languages of ``other_languages`` in structures.json (ISO 639-1 code -> name shown to users).
LANGUAGES: dict[str, str] = {
    "la": "Latin", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch",
}


class Code(NamedTuple):
    """A coded concept as DICOM writes it: (code value, coding scheme designator, code meaning).

    A plain tuple too, so it can be passed wherever ``(value, scheme, meaning)`` is expected.
    """

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentCoding:
    """The codes a DICOM-SEG segment description needs (category, type, modifiers, region)."""

    category: Code
    type: Code
    type_modifier: Code | None
    region: Code | None
    region_modifier: Code | None
    source: str


@dataclass(frozen=True)
class Structure:
    """One of the 32 CDPDNet outputs.

    Attributes:
        index: 1..32, the official organ number.
        key: stable identifier, e.g. ``"left_kidney"`` (use it in files and settings).
        name: display name, official typos fixed ("Aorta", "Celiac Trunk").
        official_name: the name in the official CLIP prompt list, typos kept ("Arota"): the
            checkpoint's organ embedding was computed from "A computerized tomography of a" + it.
        synonyms, abbreviations: other ways users name it (lower-case matching in the resolver).
        other_languages: (language code, phrase) pairs: its name in other languages
            (:data:`LANGUAGES`), so the resolver can say which language it read.
        part_terms: names of a part of this structure; asking for one gives the whole structure.
        laterality: "left", "right" or None (patient's side).
        group: "organ", "vessel" or "tumour" (tumours and cysts).
        color: (r, g, b) 0..255.
        snomed: DICOM-SEG coding.
    """

    index: int
    key: str
    name: str
    official_name: str
    synonyms: tuple[str, ...]
    abbreviations: tuple[str, ...]
    part_terms: tuple[str, ...]
    laterality: str | None
    group: str
    color: tuple[int, int, int]
    color_source: str
    snomed: SegmentCoding
    notes: str
    other_languages: tuple[tuple[str, str], ...] = ()

    @property
    def channel(self) -> int:
        """Output channel 0..31 of the network."""
        return self.index - 1

    @property
    def color_hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)

    @property
    def prompt(self) -> str:
        """The official CLIP prompt this structure's fixed embedding was computed from."""
        return PROMPT_TEMPLATE.format(self.official_name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Structure({self.index}, {self.key!r})"


@dataclass(frozen=True)
class Task:
    """One of the 11 training tasks (prompt channels).

    ``structures`` is the label set as structure indices (1..32), in the official template
    order: what that dataset labelled during training, and so what this task prompt was
    trained to emphasise. ``datasets`` are (key, name) pairs (MSD has six sub-datasets).
    ``prompt`` is the official TTPG sentence of row ``id`` of the task-embedding table;
    ``prompt_note`` says when that row names another dataset's structures (rows 8-10).
    """

    id: int
    key: str
    name: str
    datasets: tuple[tuple[str, str], ...]
    structures: tuple[int, ...]
    prompt: str = ""
    prompt_note: str = ""

    @property
    def dataset(self) -> str:
        return "; ".join(name for _, name in self.datasets)

    def covers(self, items: Iterable[Structure | int | str]) -> bool:
        """True when every given structure is in this task's label set."""
        wanted = {structure(s).index for s in items}
        return wanted <= set(self.structures)

    def __str__(self) -> str:
        return f"task {self.id} ({self.name})"


@dataclass(frozen=True)
class SpecialTerm:
    """A phrase that is not one structure: a group, an ambiguous word or an unsupported one."""

    term: str
    kind: str  # "group" | "ambiguous" | "not_supported"
    structures: tuple[Structure, ...]
    note: str


# --------------------------------------------------------------------------- loading
def _code(raw: Any, where: str) -> Code | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == 3 and all(isinstance(x, str) and x for x in raw)):
        raise RuntimeError(f"structures.json: {where} must be [code, scheme, meaning], got {raw!r}")
    return Code(*raw)


def _languages(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not all(
        code in LANGUAGES and isinstance(v, list) and all(isinstance(x, str) and x for x in v)
        for code, v in raw.items()
    ):
        raise RuntimeError(
            f"structures.json: {where} other_languages must map codes of {sorted(LANGUAGES)} to phrases"
        )
    return tuple((code, phrase) for code, phrases in raw.items() for phrase in phrases)


def _load_structures() -> tuple[tuple[Structure, ...], str]:
    """Parse and validate structures.json (a broken file is a packaging bug: fail loudly)."""
    data = load_json("structures.json")
    out: list[Structure] = []
    for n, raw in enumerate(data["structures"], start=1):
        where = f"structure {n}"
        if raw["index"] != n:
            raise RuntimeError(f"structures.json: {where} has index {raw['index']}, expected {n}")
        if raw["laterality"] not in _LATERALITIES or raw["group"] not in GROUPS:
            raise RuntimeError(f"structures.json: {where} has a bad laterality or group")
        color = tuple(int(c) for c in raw["color"])
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise RuntimeError(f"structures.json: {where} has a bad colour {raw['color']!r}")
        sn = raw["snomed"]
        category = _code(sn["category"], f"{where} category")
        type_ = _code(sn["type"], f"{where} type")
        assert category is not None and type_ is not None
        out.append(
            Structure(
                index=n,
                key=raw["key"],
                name=raw["name"],
                official_name=raw["official_name"],
                synonyms=tuple(raw["synonyms"]),
                abbreviations=tuple(raw["abbreviations"]),
                part_terms=tuple(raw["part_terms"]),
                laterality=raw["laterality"],
                group=raw["group"],
                color=color,  # type: ignore[arg-type]
                color_source=raw["color_source"],
                snomed=SegmentCoding(
                    category=category,
                    type=type_,
                    type_modifier=_code(sn["type_modifier"], f"{where} type modifier"),
                    region=_code(sn["region"], f"{where} region"),
                    region_modifier=_code(sn["region_modifier"], f"{where} region modifier"),
                    source=sn["source"],
                ),
                notes=raw["notes"],
                other_languages=_languages(raw.get("other_languages", {}), where),
            )
        )
    if not out:
        raise RuntimeError("structures.json lists no structures")
    keys = [s.key for s in out]
    if len(set(keys)) != len(keys):
        raise RuntimeError("structures.json: duplicate keys")
    return tuple(out), str(data["prompt_template"])


def _load_tasks(n_structures: int) -> tuple[Task, ...]:
    data = load_json("tasks.json")
    rows, notes = data["prompt_rows"], data.get("prompt_row_notes", {})
    if len(rows) != len(data["tasks"]):
        raise RuntimeError("tasks.json: prompt_rows must hold one list per task")
    out = []
    for n, raw in enumerate(data["tasks"]):
        labels = tuple(int(i) for i in raw["structures"])
        if raw["id"] != n or not labels or not all(1 <= i <= n_structures for i in labels):
            raise RuntimeError(f"tasks.json: task {n} is malformed")
        union = {int(i) for d in raw["datasets"] for i in d["structures"]}
        if union != set(labels):
            raise RuntimeError(f"tasks.json: task {n}'s label set is not the union of its datasets")
        out.append(
            Task(
                id=n,
                key=raw["key"],
                name=raw["name"],
                datasets=tuple((d["key"], d["name"]) for d in raw["datasets"]),
                structures=labels,
                prompt=str(data["task_prompt_template"]).format(rows[n]),
                prompt_note=str(notes.get(str(n), "")),
            )
        )
    if not out:
        raise RuntimeError("tasks.json lists no tasks")
    return tuple(out)


STRUCTURES, PROMPT_TEMPLATE = _load_structures()
TASKS: tuple[Task, ...] = _load_tasks(len(STRUCTURES))
#: The official TTPG sentence template (each task's ``prompt`` fills it).
TASK_PROMPT_TEMPLATE: str = str(load_json("tasks.json")["task_prompt_template"])

#: One sentence every user-facing listing repeats, so nobody mistakes the resolver for an
#: open-vocabulary model.
FIXED_CONDITIONING_NOTE = (
    f"CDPDNet always computes the same {len(STRUCTURES)} structures: its text conditioning is "
    "fixed (all organ and task embeddings are built into the model), so a typed name only selects "
    f"which outputs you get and which of the {len(TASKS)} task prompts runs; it cannot add a new "
    "structure."
)

_BY_NAME: dict[str, Structure] = {}
for _s in STRUCTURES:
    for _label in (_s.key, _s.name, _s.official_name, _s.key.replace("_", " ")):
        _BY_NAME[_label.casefold()] = _s


def _load_terms() -> tuple[SpecialTerm, ...]:
    out = []
    for raw in load_json("structures.json")["terms"]:
        if raw["kind"] not in _TERM_KINDS:
            raise RuntimeError(
                f"structures.json: term {raw['term']!r} has unknown kind {raw['kind']!r}"
            )
        members = tuple(_BY_NAME[k] for k in raw["structures"])
        out.append(SpecialTerm(raw["term"], raw["kind"], members, raw["note"]))
    return tuple(out)


#: Group words ("kidneys", "all tumors"), ambiguous words ("bowel") and named structures the
#: model cannot segment ("brain"), for the resolver.
SPECIAL_TERMS: tuple[SpecialTerm, ...] = _load_terms()


def _load_postprocess_roles() -> Mapping[str, Any]:
    """postprocess.json by structure index, with what each rule reads besides its own mask."""
    data = load_json("postprocess.json")
    by_key = {s.key: s.index for s in STRUCTURES}

    def index(key: str) -> int:
        if key not in by_key:
            raise RuntimeError(f"postprocess.json: {key!r} is not a structure key")
        return by_key[key]

    vein, pancreas = index(data["portal_vein"]["vein"]), index(data["portal_vein"]["cut_below"])
    right, left = index(data["lungs"]["right"]), index(data["lungs"]["left"])
    tumours = {
        index(t): (tuple(index(o) for o in rule["organs"]), int(rule["organ_components"]))
        for t, rule in data["tumours_in_organs"].items()
    }
    largest = frozenset(index(k) for k in data["largest_component"])
    ruled = [*largest, vein, right, left, *tumours]
    if len(ruled) != len(set(ruled)):
        raise RuntimeError("postprocess.json: a structure is named by more than one rule")
    if data["merged_last_group"] not in GROUPS:
        raise RuntimeError(f"postprocess.json: unknown group {data['merged_last_group']!r}")
    companions = {vein: frozenset([pancreas]), right: frozenset([left]), left: frozenset([right])}
    companions.update({t: frozenset(organs) for t, (organs, _) in tumours.items()})
    return MappingProxyType({
        "num_structures": len(STRUCTURES),
        "largest_component": largest,
        "portal_vein": (vein, pancreas),
        "lungs": (right, left),
        "tumour_organs": MappingProxyType(tumours),
        "lesions": frozenset(s.index for s in STRUCTURES if s.group == data["merged_last_group"]),
        "companions": MappingProxyType(companions),
    })


#: The official post-processing roles (SPEC §12) by structure index, read once from
#: ``resources/postprocess.json``: the fields of
#: :class:`napari_cdpdnet.inference.postprocess.PostprocessRules`, which the segmenter builds from
#: them (the engine never imports the vocabulary). ``companions`` maps a structure to the others
#: its rule reads (a tumour's organs, the other lung, the pancreas for the portal vein).
POSTPROCESS_ROLES: Mapping[str, Any] = _load_postprocess_roles()


# --------------------------------------------------------------------------- lookup
def structure(value: Structure | int | str) -> Structure:
    """The structure with this index (1..32), key, display name or official name.

    Exact lookup only (case-insensitive); free text such as "IVC" or "kidney left" goes through
    :func:`napari_cdpdnet.vocabulary.resolver.resolve`.

    Raises:
        VocabularyError: nothing matches exactly.
    """
    if isinstance(value, Structure):
        return value
    if isinstance(value, bool):
        raise VocabularyError(f"{value!r} is not a structure")
    if isinstance(value, int):
        if 1 <= value <= len(STRUCTURES):
            return STRUCTURES[value - 1]
        raise VocabularyError(
            f"structure index {value} is out of range: CDPDNet structures are numbered "
            f"1..{len(STRUCTURES)} (run `cdpdnet structures` for the list)"
        )
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return structure(int(text))
        found = _BY_NAME.get(text.casefold())
        if found is not None:
            return found
        raise VocabularyError(
            f"{value!r} is not a CDPDNet structure key or name; use a key such as 'left_kidney', "
            "or napari_cdpdnet.vocabulary.resolver.resolve() for free text (run `cdpdnet structures` for the list)"
        )
    raise VocabularyError(f"{value!r} is not a structure (expected an index, key or name)")


def structures(values: Iterable[Structure | int | str]) -> tuple[Structure, ...]:
    """Several structures, duplicates dropped, in the given order."""
    seen: dict[int, Structure] = {}
    for v in values:
        s = structure(v)
        seen.setdefault(s.index, s)
    return tuple(seen.values())


def task(value: Task | int | str) -> Task:
    """A task by id (0..len(TASKS)-1), key ("lits") or name ("LiTS")."""
    if isinstance(value, Task):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(TASKS):
        return TASKS[value]
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return task(int(text))
        for t in TASKS:
            if text.casefold() in (t.key.casefold(), t.name.casefold()):
                return t
    known = ", ".join(f"{t.id}={t.key}" for t in TASKS)
    raise VocabularyError(
        f"unknown task {value!r}; use an id 0..{len(TASKS) - 1} or a key ({known})"
    )


# --------------------------------------------------------------------------- planning
def required_channels(items: Iterable[Structure | int | str]) -> set[int]:
    """Network channels (0-based) that must be computed to post-process these structures.

    SPEC §12 post-processing reads companion channels: a kidney tumour is kept only inside the
    kidneys, a liver tumour inside the liver, the lungs are split from the union of both lung
    channels, and the portal/splenic vein is cut below the pancreas (``companions`` of
    :data:`POSTPROCESS_ROLES`; the engine reads the same table). The result includes the
    requested channels themselves.
    """
    wanted = {s.index for s in structures(items)}
    companions: Mapping[int, frozenset[int]] = POSTPROCESS_ROLES["companions"]
    return {i - 1 for i in wanted.union(*(companions.get(i, ()) for i in wanted))}


class Pass(NamedTuple):
    """One network pass: a task prompt and the requested structures taken from it."""

    task: Task
    structures: tuple[Structure, ...]

    @property
    def channels(self) -> set[int]:
        """Channels to post-process for this pass (requested plus companions)."""
        return required_channels(self.structures)


@dataclass(frozen=True)
class SegmentationPlan:
    """Which task prompts to run for a request, and which structures each pass provides."""

    requested: tuple[Structure, ...]
    passes: tuple[Pass, ...]

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def task_for(self, item: Structure | int | str) -> Task:
        """The task whose pass provides this structure."""
        s = structure(item)
        for p in self.passes:
            if s in p.structures:
                return p.task
        raise VocabularyError(f"{s.name} is not part of this plan")

    def describe(self) -> str:
        """Readable plan for logs, the CLI and the GUI."""
        n = len(self.passes)
        lines = [f"{n} pass{'es' if n != 1 else ''} for {len(self.requested)} structure(s):"]
        for i, p in enumerate(self.passes, start=1):
            names = ", ".join(s.name for s in p.structures)
            lines.append(f"  pass {i}: task {p.task.id} ({p.task.name}) -> {names}")
        lines.append(
            f"Each pass computes all {len(STRUCTURES)} outputs; the task prompt only selects which "
            "dataset's labelling the network imitates, so structures are taken from a task trained "
            "on them."
        )
        return "\n".join(lines)


def _specificity(t: Task) -> tuple[int, int]:
    return (len(t.structures), t.id)


def plan_passes(
    items: Iterable[Structure | int | str], *, force_task: Task | int | str | None = None
) -> SegmentationPlan:
    """Plan the fewest passes whose task label sets together cover the request.

    Tie-break (deterministic): among covers with the fewest tasks, the one with the smallest
    total label-set size (the most specific prompts: LiTS rather than AMOS for a liver tumour),
    then the lexicographically smallest task ids. Each structure is taken from the most specific
    chosen task that labelled it; passes are ordered by task id.

    Args:
        items: structures (objects, indices, keys or names).
        force_task: run this one task instead; it must cover every requested structure.

    Raises:
        VocabularyError: empty request, unknown structure, or a forced task that does not
            cover the request.
    """
    wanted = structures(items)
    if not wanted:
        raise VocabularyError(
            "no structures requested: name at least one (run `cdpdnet structures`)"
        )
    indices = {s.index for s in wanted}
    if force_task is not None:
        forced = task(force_task)
        missing = [s for s in wanted if s.index not in forced.structures]
        if missing:
            alternatives = "; ".join(
                f"{s.name}: tasks {', '.join(str(t.id) for t in TASKS if s.index in t.structures)}"
                for s in missing
            )
            raise VocabularyError(
                f"task {forced.id} ({forced.name}) was not trained on "
                f"{', '.join(s.name for s in missing)} ({alternatives}); "
                "pick another task or let the plan choose"
            )
        return SegmentationPlan(wanted, (Pass(forced, wanted),))

    best: tuple[Task, ...] | None = None
    for size in range(1, len(TASKS) + 1):
        covers = [
            combo
            for combo in itertools.combinations(TASKS, size)
            if indices <= set().union(*(t.structures for t in combo))
        ]
        if covers:
            best = min(covers, key=lambda c: (sum(len(t.structures) for t in c), [t.id for t in c]))
            break
    if best is None:  # every structure is in some task, so this is a data bug
        raise RuntimeError("tasks.json does not cover every structure")

    assigned: dict[int, list[Structure]] = {t.id: [] for t in best}
    for s in wanted:
        home = min((t for t in best if s.index in t.structures), key=_specificity)
        assigned[home.id].append(s)
    passes = tuple(
        Pass(t, tuple(assigned[t.id])) for t in sorted(best, key=lambda t: t.id) if assigned[t.id]
    )
    plan = SegmentationPlan(wanted, passes)
    logger.debug("%s", plan.describe())
    return plan
