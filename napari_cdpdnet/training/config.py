"""The training config file (YAML or JSON) and its validation.

A run is described by one file so that it can be repeated, resumed and reviewed. Every key is
checked before any data is read; an error names the key (``datasets[1].labelled[2]``) and what is
wrong with it. Relative paths are relative to the config file's folder.

Example (YAML)::

    output_dir: runs/liver_ft
    init: /weights/cdpdnet.pth        # or "scratch"
    dino: /weights/dinov2-base        # DINOv2 weights (file or snapshot folder); frozen
    epochs: 100
    warmup_epochs: 10
    datasets:
      - name: site_a
        images: site_a/images/*.nii.gz          # folder pattern ...
        labels: site_a/labels/{name}.nii.gz     # ... {name} = image file name without suffix
        labelled: [liver, spleen]
        label_values: {1: liver, 2: spleen}     # label value -> structure (or "cdpdnet")
      - name: corrected_in_napari
        label_values: cdpdnet                   # the plugin writes structure indices 1..32
        cases:
          - {image: ct1.nii.gz, label: ct1_labels.nii.gz, label_table: ct1_labels.csv}

With a ``label_table`` (the CSV the plugin exports beside a label map) the structures whose
``reviewed`` column is true are the labelled set of that case; the others are unknown.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import InputError, VocabularyError
from napari_cdpdnet.extras import import_extra

__all__ = [
    "CaseSpec",
    "DatasetSpec",
    "TrainConfig",
    "load_config",
    "parse_config",
    "reviewed_structures",
    "default_task_for",
]

logger = logging.getLogger(__name__)

_TOP_KEYS = {
    "output_dir", "init", "dino", "model", "epochs", "lr", "weight_decay", "warmup_epochs",
    "warmup_start_lr", "eta_min", "crop", "samples_per_volume", "batch_size", "spacing",
    "num_workers", "seed", "checkpoint_every", "resume", "amp", "uniform_sample", "cache",
    "datasets", "log_every", "max_steps_per_epoch", "loss", "text_embeddings",
}
_DATASET_KEYS = {"name", "cases", "images", "labels", "labelled", "label_values", "label_table", "task"}
_CASE_KEYS = {"image", "label", "label_table", "labelled"}


@dataclass(frozen=True)
class CaseSpec:
    """One training volume: image, label map, and the structure indices (1..32) labelled in it."""

    image: Path
    label: Path
    labelled: frozenset[int]


@dataclass(frozen=True)
class DatasetSpec:
    """A set of cases sharing a label numbering and a task prompt.

    Attributes:
        name: free text (logs, checkpoints).
        cases: the volumes.
        label_values: label-map value -> structure index (1..32); other values are background.
        task: the task id (0..10) the network is prompted with for this dataset's samples.
    """

    name: str
    cases: tuple[CaseSpec, ...]
    label_values: Mapping[int, int]
    task: int


@dataclass(frozen=True)
class TrainConfig:
    """A validated training run. Defaults are the official recipe (SPEC §13)."""

    output_dir: Path
    datasets: tuple[DatasetSpec, ...]
    init: Path | None = None  # None = from scratch
    dino: Path | None = None  # None = random DINO (only for experiments with a tiny model)
    model: str = "official"  # architecture when training from scratch: "official" | "tiny"
    epochs: int = 1000
    lr: float = 4e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 50
    warmup_start_lr: float = 0.0
    eta_min: float = 0.0
    crop: int = 96
    samples_per_volume: int = 2
    batch_size: int = 1
    spacing: float = 1.5
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 10
    resume: Path | None = None
    amp: bool | None = None  # None = on CUDA only
    uniform_sample: bool = True
    cache: bool = False
    log_every: int = 1
    max_steps_per_epoch: int | None = None
    loss: str = "partial"  # "partial" (official masked loss) | "naive" (unlabelled = background)
    text_embeddings: Path | None = None  # folder with txt_encoding.pth + txt_task_encoding.pth
    source: Path | None = field(default=None, compare=False)

    @property
    def num_cases(self) -> int:
        return sum(len(d.cases) for d in self.datasets)


# --------------------------------------------------------------------------- helpers
def _err(where: str, problem: str) -> InputError:
    return InputError(f"training config: {where}: {problem}")


def _path(value: Any, where: str, base: Path, *, must_exist: bool = True) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _err(where, f"expected a path, got {value!r}")
    p = Path(os.path.expanduser(str(value)))
    if not p.is_absolute():
        p = base / p
    if must_exist and not p.exists():
        raise _err(where, f"{p} does not exist")
    return p


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise _err(where, f"must be >= {minimum}, got {value}")
    return value


def _float(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(where, f"expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise _err(where, f"must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"expected true or false, got {value!r}")
    return value


def _unknown(d: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise _err(where, f"unknown key(s) {extra}; known keys: {sorted(known)}")


def _structure_index(value: Any, where: str) -> int:
    from napari_cdpdnet.vocabulary.catalog import structure

    try:
        return structure(value).index
    except VocabularyError as exc:
        raise _err(where, str(exc)) from None


def reviewed_structures(table: str | os.PathLike[str]) -> frozenset[int]:
    """Structure indices whose ``reviewed`` column is true in a label table CSV (labeltable.COLUMNS).

    Raises:
        InputError: unreadable file, missing ``value``/``reviewed`` columns, bad values.
    """
    p = Path(table)
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"label table {p}: cannot be read ({exc})") from None
    missing = {"reviewed"} - columns
    if rows and ({"value", "key"} & columns) == set():
        missing |= {"value or key"}
    if missing:
        raise InputError(f"label table {p}: missing column(s) {sorted(missing)}")
    out = set()
    for n, row in enumerate(rows, start=2):
        flag = (row.get("reviewed") or "").strip().lower()
        if flag not in ("true", "false", "1", "0", "yes", "no", ""):
            raise InputError(f"label table {p}, line {n}: reviewed must be true/false, got {flag!r}")
        if flag in ("true", "1", "yes"):
            ref = (row.get("key") or "").strip() or (row.get("value") or "").strip()
            out.add(_structure_index(ref, f"label table {p}, line {n}"))
    if not out:
        logger.warning("label table %s marks no structure as reviewed: that case teaches nothing", p)
    return frozenset(out)


def default_task_for(labelled: set[int] | frozenset[int]) -> int:
    """The task prompt for a dataset labelling ``labelled``: the smallest task covering it all,
    else the task covering most of it (ties: the smaller label set, then the lower id)."""
    from napari_cdpdnet.vocabulary.catalog import TASKS

    def score(t: Any) -> tuple[int, int, int]:
        return (-len(set(labelled) & set(t.structures)), len(t.structures), t.id)

    covering = [t for t in TASKS if set(labelled) <= set(t.structures)]
    return min(covering or TASKS, key=score).id


def _label_values(value: Any, where: str) -> dict[int, int]:
    if value is None or value == "cdpdnet":
        from napari_cdpdnet.vocabulary.catalog import STRUCTURES

        return {s.index: s.index for s in STRUCTURES}
    if not isinstance(value, Mapping) or not value:
        raise _err(where, f'expected "cdpdnet" or a mapping {{label value: structure}}, got {value!r}')
    out: dict[int, int] = {}
    for k, v in value.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            raise _err(f"{where}[{k!r}]", "label values must be whole numbers > 0") from None
        if key <= 0:
            raise _err(f"{where}[{k!r}]", "label values must be > 0 (0 is background)")
        out[key] = _structure_index(v, f"{where}[{k!r}]")
    return out


def _cases_from_pattern(d: Mapping[str, Any], where: str, base: Path) -> list[tuple[Path, Path]]:
    from napari_cdpdnet.fileutil import full_suffix

    images, labels = d.get("images"), d.get("labels")
    if not isinstance(images, str) or not isinstance(labels, str):
        raise _err(where, "give either 'cases' or both 'images' (a glob) and 'labels' (a pattern with {name})")
    if "{name}" not in labels:
        raise _err(f"{where}.labels", f"must contain {{name}} (the image name without suffix), got {labels!r}")
    pattern = images if os.path.isabs(images) else str(base / images)
    found = sorted(glob.glob(pattern))
    if not found:
        raise _err(f"{where}.images", f"no file matches {pattern}")
    pairs = []
    for img in found:
        ip = Path(img)
        suffix = full_suffix(ip)
        name = ip.name[: -len(suffix)] if suffix else ip.stem
        lab = _path(labels.format(name=name), f"{where}.labels (for {ip.name})", base)
        pairs.append((ip, lab))
    return pairs


def _dataset(d: Any, i: int, base: Path) -> DatasetSpec:
    where = f"datasets[{i}]"
    if not isinstance(d, Mapping):
        raise _err(where, f"expected a mapping, got {type(d).__name__}")
    _unknown(d, _DATASET_KEYS, where)
    name = d.get("name", f"dataset{i}")
    if not isinstance(name, str) or not name.strip():
        raise _err(f"{where}.name", f"expected a non-empty name, got {name!r}")
    values = _label_values(d.get("label_values"), f"{where}.label_values")
    labelled_default: frozenset[int] | None = None
    if "labelled" in d:
        raw = d["labelled"]
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise _err(f"{where}.labelled", f"expected a non-empty list of structures, got {raw!r}")
        labelled_default = frozenset(
            _structure_index(v, f"{where}.labelled[{j}]") for j, v in enumerate(raw)
        )
    if "label_table" in d:
        if labelled_default is not None:
            raise _err(where, "give 'labelled' or 'label_table', not both")
        labelled_default = reviewed_structures(_path(d["label_table"], f"{where}.label_table", base))

    if "cases" in d:
        if "images" in d or "labels" in d:
            raise _err(where, "give either 'cases' or 'images'+'labels', not both")
        raw_cases = d["cases"]
        if not isinstance(raw_cases, Sequence) or isinstance(raw_cases, str) or not raw_cases:
            raise _err(f"{where}.cases", "expected a non-empty list of {image, label}")
        cases = []
        for j, c in enumerate(raw_cases):
            cw = f"{where}.cases[{j}]"
            if not isinstance(c, Mapping):
                raise _err(cw, f"expected a mapping with image and label, got {c!r}")
            _unknown(c, _CASE_KEYS, cw)
            for k in ("image", "label"):
                if k not in c:
                    raise _err(cw, f"missing '{k}'")
            img = _path(c["image"], f"{cw}.image", base)
            lab = _path(c["label"], f"{cw}.label", base)
            if "label_table" in c and "labelled" in c:
                raise _err(cw, "give 'labelled' or 'label_table', not both")
            if "label_table" in c:
                labelled = reviewed_structures(_path(c["label_table"], f"{cw}.label_table", base))
            elif "labelled" in c:
                raw = c["labelled"]
                if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
                    raise _err(f"{cw}.labelled", f"expected a non-empty list, got {raw!r}")
                labelled = frozenset(_structure_index(v, f"{cw}.labelled[{k}]") for k, v in enumerate(raw))
            elif labelled_default is not None:
                labelled = labelled_default
            else:
                raise _err(cw, "which structures are labelled? give 'labelled' or 'label_table' "
                               "(for the case or the dataset); unlabelled is not background")
            cases.append(CaseSpec(img, lab, labelled))
    else:
        if labelled_default is None:
            raise _err(where, "which structures are labelled? give 'labelled' or 'label_table'")
        cases = [CaseSpec(img, lab, labelled_default) for img, lab in _cases_from_pattern(d, where, base)]

    mapped = set(values.values())
    for j, c in enumerate(cases):
        not_in_map = sorted(c.labelled - mapped)
        if not_in_map:
            raise _err(f"{where}.cases[{j}]", f"labelled structure(s) {not_in_map} have no value in label_values")
    every = frozenset().union(*(c.labelled for c in cases))
    if "task" in d:
        from napari_cdpdnet.vocabulary.catalog import task

        try:
            task_id = task(d["task"]).id
        except VocabularyError as exc:
            raise _err(f"{where}.task", str(exc)) from None
    else:
        task_id = default_task_for(every)
    return DatasetSpec(name.strip(), tuple(cases), values, task_id)


def parse_config(data: Mapping[str, Any], base: str | os.PathLike[str] = ".") -> TrainConfig:
    """Validate a config mapping (already parsed from YAML/JSON); paths relative to ``base``."""
    base = Path(base)
    if not isinstance(data, Mapping):
        raise _err("top level", f"expected a mapping of keys, got {type(data).__name__}")
    _unknown(data, _TOP_KEYS, "top level")
    if "output_dir" not in data:
        raise _err("output_dir", "missing (where checkpoints and the loss log go)")
    if "datasets" not in data:
        raise _err("datasets", "missing (at least one dataset with cases and a labelled set)")
    raw = data["datasets"]
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise _err("datasets", "expected a non-empty list")
    datasets = tuple(_dataset(d, i, base) for i, d in enumerate(raw))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise _err("datasets", f"dataset names must be unique, got {names}")

    kw: dict[str, Any] = {}
    init = data.get("init", "scratch")
    kw["init"] = None if init in (None, "scratch") else _path(init, "init", base)
    if data.get("dino") is not None:
        kw["dino"] = _path(data["dino"], "dino", base)
    model = data.get("model", "official")
    if model not in ("official", "tiny"):
        raise _err("model", f'expected "official" or "tiny", got {model!r}')
    kw["model"] = model
    if kw["init"] is not None and "model" in data:
        logger.info("model: %s ignored, the architecture comes from the checkpoint %s", model, kw["init"])
    loss = data.get("loss", "partial")
    if loss not in ("partial", "naive"):
        raise _err("loss", f'expected "partial" or "naive", got {loss!r}')
    kw["loss"] = loss
    if data.get("text_embeddings") is not None:
        kw["text_embeddings"] = _path(data["text_embeddings"], "text_embeddings", base)
    for k in ("epochs", "samples_per_volume", "batch_size", "checkpoint_every", "log_every"):
        if k in data:
            kw[k] = _int(data[k], k, 1)
    for k in ("warmup_epochs", "num_workers", "seed"):
        if k in data:
            kw[k] = _int(data[k], k, 0)
    if data.get("max_steps_per_epoch") is not None:
        kw["max_steps_per_epoch"] = _int(data["max_steps_per_epoch"], "max_steps_per_epoch", 1)
    for k, pos in (("lr", True), ("weight_decay", False), ("warmup_start_lr", False),
                   ("eta_min", False), ("spacing", True)):
        if k in data:
            kw[k] = _float(data[k], k, positive=pos)
    if "crop" in data:
        from napari_cdpdnet.model.cdpdnet import PATCH_SIZE

        kw["crop"] = _int(data["crop"], "crop", 8)
        if kw["crop"] > PATCH_SIZE[0]:
            raise _err("crop", f"at most {PATCH_SIZE[0]} (the network takes {PATCH_SIZE[0]}³ patches), got {kw['crop']}")
    for k in ("uniform_sample", "cache"):
        if k in data:
            kw[k] = _bool(data[k], k)
    if "amp" in data and data["amp"] not in (None, "auto"):
        kw["amp"] = _bool(data["amp"], "amp")
    if data.get("resume") is not None:
        kw["resume"] = _path(data["resume"], "resume", base)
    epochs = kw.get("epochs", TrainConfig.epochs)
    warm = kw.get("warmup_epochs", TrainConfig.warmup_epochs)
    if warm > epochs:
        raise _err("warmup_epochs", f"{warm} is more than epochs={epochs}")
    out = _path(data["output_dir"], "output_dir", base, must_exist=False)
    return TrainConfig(output_dir=out, datasets=datasets, **kw)


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read and validate a ``.yaml``/``.yml``/``.json`` training config."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"training config {p} does not exist")
    text = p.read_text(encoding="utf-8")
    yaml = None if p.suffix.lower() == ".json" else import_extra("yaml", "train", f"the YAML training config {p}")
    try:
        data = json.loads(text) if yaml is None else yaml.safe_load(text)
    except (ValueError, Exception) as exc:  # yaml.YAMLError or json.JSONDecodeError
        raise InputError(f"training config {p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {exc}") from None
    cfg = parse_config(data if data is not None else {}, p.parent.resolve())
    return TrainConfig(**{**cfg.__dict__, "source": p})
