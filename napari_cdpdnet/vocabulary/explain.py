"""How a typed request was understood, in the words the CLI prints and the dock shows.

One place writes these lines so every face says the same thing: for each phrase its source
(name, synonym, abbreviation, part, language, typo or CLIP, with CLIP's cosine and margin over
the runner-up), the alternatives, and for the plan the TTPG task prompt sentence each pass runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from napari_cdpdnet.vocabulary.catalog import STRUCTURES, SegmentationPlan, Structure, Task
from napari_cdpdnet.vocabulary.resolver import Resolution, UnresolvedStructure

__all__ = [
    "CLIP_SCOPE_NOTE",
    "how",
    "resolution_line",
    "alternatives_text",
    "task_prompt_line",
    "understanding_lines",
    "refusal_lines",
]

#: Said wherever a CLIP match is shown, so nobody reads it as an open vocabulary.
CLIP_SCOPE_NOTE = (
    f"CLIP only chooses which of the {len(STRUCTURES)} fixed structures the words mean; it does "
    "not add a structure or change what the network computes."
)


def how(r: Resolution) -> str:
    """The source of a resolution with its evidence: "synonym", "language: German",
    "typo: similarity 0.89", "CLIP: cosine 0.912, margin 0.034 over Gallbladder"."""
    if r.source == "CLIP":
        runner = f" over {r.alternatives[0][0].name}" if r.alternatives else ""
        return f"CLIP: cosine {r.cosine or r.confidence:.3f}, margin {r.margin or 0.0:.3f}{runner}"
    if r.source == "typo":
        return f"typo: similarity {r.confidence:.2f}"
    if r.source == "language":
        return f"language: {r.language}"
    return r.source


def alternatives_text(items: Sequence[tuple[Structure, float]]) -> str:
    """ "Gallbladder 0.878, Right Kidney 0.861" """
    return ", ".join(f"{s.name} {score:.3f}" for s, score in items)


def resolution_line(r: Resolution) -> str:
    """One phrase, one line: ``'IVC' -> Inferior Vena Cava [abbreviation]``, plus alternatives."""
    line = f"'{r.text}' -> {r.structure.name} [{how(r)}]"
    if r.alternatives:
        line += f"; alternatives: {alternatives_text(r.alternatives)}"
    return line


def task_prompt_line(task: Task) -> str:
    """The TTPG prompt a pass runs: the official sentence of its task's row."""
    note = f" ({task.prompt_note})" if task.prompt_note else ""
    return f'task prompt: "{task.prompt}"{note}'


def understanding_lines(
    resolutions: Sequence[Resolution], plan: SegmentationPlan, *, reasons: bool = False
) -> list[str]:
    """Every line of "how the request was understood": each phrase (with its reason, indented,
    when ``reasons``), then the plan with the task prompt sentence of each pass (the lines of
    ``plan.describe()``, prompts added)."""
    lines = []
    for r in resolutions:
        lines.append(resolution_line(r))
        if reasons:
            lines.append(f"    {r.reason}")
    if any(r.source == "CLIP" for r in resolutions):
        lines.append(CLIP_SCOPE_NOTE)
    described = plan.describe().splitlines()
    lines.append(described[0])
    for p, line in zip(plan.passes, described[1 : 1 + len(plan.passes)], strict=True):
        lines += [line, f"    {task_prompt_line(p.task)}"]
    lines += described[1 + len(plan.passes) :]
    return lines


def refusal_lines(exc: UnresolvedStructure) -> list[str]:
    """What the refused phrases were close to (CLIP's cosines when it was asked)."""
    lines = []
    for f in exc.failures:
        if f.clip is not None:
            lines.append(f"'{f.text}': CLIP's nearest: {alternatives_text(f.clip.top(3))}")
    return lines
