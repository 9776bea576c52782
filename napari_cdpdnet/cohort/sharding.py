"""Who does which case: this process's place in a torchrun job and in a split cohort, and the split.

Two levels, both deterministic so that every process computes the same answer on its own:

* **Jobs** (``--shard K/N``, or a Slurm job array's ``SLURM_ARRAY_TASK_ID`` /
  ``SLURM_ARRAY_TASK_COUNT``): independent runs that never talk to each other. The *whole*
  cohort is split, finished cases included, so the parts stay disjoint and covering however far
  each job has got.
* **Ranks** of one torchrun job (``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``, as
  :class:`napari_cdpdnet.training.trainer.DistInfo` reads them for training): rank 0 splits the
  job's *remaining* cases and broadcasts the split, so a resumed run balances what is left.

Both split by estimated work, not by count (:func:`balanced_partition`): greedy "longest first"
onto the least-loaded part, which is within 4/3 of the best possible makespan and needs no
library. No torch here (the runner feeds the parts to ``torch.utils.data.DataLoader``).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from napari_cdpdnet.errors import InputError

__all__ = ["JobPosition", "parse_shard", "slurm_shard", "balanced_partition"]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (K from 1 to N) → ``(K - 1, N)``.

    Raises:
        InputError: not of that form, or K outside 1…N.
    """
    try:
        k_text, n_text = str(text).split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard {text!r}: give K/N, e.g. 2/8 for the second of eight parts") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text!r}: K must be between 1 and N (N ≥ 1)")
    return k - 1, n


def slurm_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This Slurm array task's part ``(index, count)``, or None outside a job array.

    Task ids need not start at 0 or be consecutive (``--array=1-8``, ``--array=0-30:10``): the
    index is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = max(1, int(env.get("SLURM_ARRAY_TASK_STEP", "1")))
    except ValueError as exc:
        raise InputError(f"bad Slurm array environment: {exc}") from None
    index = (task - low) // step
    if count < 1 or not 0 <= index < count:
        raise InputError(
            f"Slurm array task {task} (min {low}, step {step}) is not one of {count} tasks; "
            "give --shard K/N explicitly")
    return index, count


@dataclass(frozen=True)
class JobPosition:
    """Where this process sits: rank of a torchrun job, and part of a split cohort.

    Attributes:
        rank, local_rank, world_size: torchrun's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``.
        shard, shards: this job's part of the cohort (0-based) and the number of parts.
        shard_source: ``"--shard"``, ``"Slurm array"`` or ``""`` (not split).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    shard: int = 0
    shards: int = 1
    shard_source: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def split(self) -> bool:
        """True when this job does only a part of the cohort."""
        return self.shards > 1

    def describe(self) -> str:
        """``rank 1 of 4, shard 3/8 (Slurm array)``: ranks counted from 0 as torchrun does,
        shards from 1 as ``--shard`` takes them."""
        parts = []
        if self.distributed:
            parts.append(f"rank {self.rank} of {self.world_size}")
        if self.split:
            parts.append(f"shard {self.shard + 1}/{self.shards} ({self.shard_source})")
        return ", ".join(parts) or "one process"

    @classmethod
    def detect(cls, shard: str | None = None, environ: Mapping[str, str] | None = None) -> JobPosition:
        """From torchrun's environment and ``--shard`` (else the Slurm array, else whole)."""
        from napari_cdpdnet.inference.devices import torchrun_position

        env = os.environ if environ is None else environ
        rank, local, world = torchrun_position(env)
        if shard is not None:
            index, count = parse_shard(shard)
            source = "--shard"
        elif (found := slurm_shard(env)) is not None:
            (index, count), source = found, "Slurm array"
        else:
            index, count, source = 0, 1, ""
        return cls(rank, local, world, index, count, source if count > 1 else "")


def balanced_partition(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` lists of about equal total cost (deterministic).

    Longest-processing-time-first: items by decreasing cost (ties by index) each go to the part
    with the least cost so far (ties by part number). Every index lands in exactly one part; each
    part lists its indices in increasing order.
    """
    if parts < 1:
        raise ValueError("parts must be at least 1")
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    heap = [(0.0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + max(float(costs[i]), 0.0), p))
    return [sorted(part) for part in out]
