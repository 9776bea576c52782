"""The training loop: official recipe, official checkpoints, DDP under torchrun, AMP on CUDA.

* Model: from the official checkpoint (``init``) or from scratch; DINOv2 is frozen: its
  parameters are not given to the optimiser, it stays in eval mode and runs under ``no_grad``
  (``DinoSliceEncoder`` enforces both).
* Optimiser AdamW (lr 4e-4, weight decay 1e-5), :class:`LinearWarmupCosineAnnealingLR` stepped
  once per epoch before the epoch, as the official ``train.py`` does.
* Several GPUs: launch with ``torchrun --nproc_per_node N -m napari_cdpdnet.cli train ...``;
  ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` from the environment select the device, a
  ``DistributedSampler`` splits the data and ``DistributedDataParallel(find_unused_parameters=True)``
  wraps the network (the official model has parameters the forward never uses).
* Checkpoints ``epoch_NNNN.pth`` and ``latest.pth`` in the official format
  ``{"net", "epoch", "optimizer", "scheduler"}``: ``net`` holds the CDPDNet state dict under its
  official names, so ``cdpdnet segment --checkpoint`` and :func:`load_official_checkpoint` read it.
* Logs: ``steps.csv`` (one row per optimiser step) and ``epochs.csv`` (means per epoch).
"""

from __future__ import annotations

import csv
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from napari_cdpdnet.errors import Cancelled, InputError, WeightsError
from napari_cdpdnet.extras import import_extra
from napari_cdpdnet.training.config import TrainConfig
from napari_cdpdnet.training.loss import LossTerms, partial_label_loss
from napari_cdpdnet.training.schedule import LinearWarmupCosineAnnealingLR

if TYPE_CHECKING:
    from napari_cdpdnet.model import CDPDNetConfig

__all__ = [
    "DistInfo",
    "Trainer",
    "build_training_model",
    "train_step",
    "save_checkpoint",
    "STEP_COLUMNS",
    "EPOCH_COLUMNS",
]

logger = logging.getLogger(__name__)

STEP_COLUMNS = ("epoch", "step", "lr", "loss", "bce", "dice", "pairs", "seconds")
EPOCH_COLUMNS = ("epoch", "lr", "loss", "bce", "dice", "steps", "seconds")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``."""
        from napari_cdpdnet.inference.devices import torchrun_position

        return cls(*torchrun_position())


def build_training_model(
    config: TrainConfig, architecture: CDPDNetConfig | None = None,
) -> tuple[torch.nn.Module, bool]:
    """The model to train and whether its DINO weights are random (then they must be saved).

    From ``config.init`` (official checkpoint + DINO weights, strict) or from scratch (official or
    tiny architecture; DINO from ``config.dino`` when given). ``architecture`` replaces the named
    from-scratch architecture (experiments such as the training demo; not a user setting).
    """
    from napari_cdpdnet.model import (
        CDPDNetConfig,
        build_from_official,
        build_model,
        load_dino_state_dict,
        load_official_checkpoint,
    )
    from napari_cdpdnet.model.convert import dino_hub_to_transformers, normalise_dino_keys
    from napari_cdpdnet.model.text import load_text_embedding_tables

    if config.init is not None:
        if config.dino is None:
            raise InputError("training config: dino: required with an official checkpoint in 'init'")
        model = build_from_official(load_official_checkpoint(config.init), load_dino_state_dict(config.dino))
        return model, False
    if architecture is not None:
        arch = architecture
    else:
        arch = CDPDNetConfig.tiny() if config.model == "tiny" else CDPDNetConfig.official()
    model = build_model(arch, seed=config.seed)
    if config.text_embeddings is not None:
        organ, task = load_text_embedding_tables(config.text_embeddings)
        try:
            model.net.set_text_embeddings(organ, task)
        except ValueError as exc:
            raise InputError(f"text_embeddings: {exc}") from None
    elif config.model == "official":
        logger.warning("training from scratch with random text embeddings; set text_embeddings "
                       "to the official CLIP tables to match the official model")
    random_dino = config.dino is None
    if not random_dino:
        sd = dino_hub_to_transformers(normalise_dino_keys(load_dino_state_dict(config.dino)))
        try:
            model.dino.vit.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"DINOv2 weights {config.dino} do not fit the {config.model} model: {exc}") from None
    else:
        logger.warning("no DINOv2 weights given: the frozen slice encoder is random (experiments only)")
    model.dino.vit.requires_grad_(False)
    return model, random_dino


def _net(model: torch.nn.Module) -> Any:
    """The CDPDNetModel inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    loss_name: str = "partial",
    scaler: torch.amp.GradScaler | None = None,
    autocast: bool = False,
    naive_channels: torch.Tensor | None = None,
) -> LossTerms:
    """Forward + loss + backward for one batch (no optimiser step); returns the loss terms.

    ``loss_name="naive"`` scores every channel of ``naive_channels`` (``[32]`` bool, default
    all; the trainer passes the union of the datasets' labelled structures) in every sample,
    unlabelled ones as background.

    The network reads only ``task_id[0]`` (SPEC §9), so crops with different task prompts are
    run as separate groups, each backward weighted by its share of the (sample, structure)
    pairs: the gradient equals that of one mean over all pairs of the batch. Under DDP the
    gradient all-reduce happens once, on the last group.
    """
    import contextlib

    device = _net(model).device
    image = batch["image"].to(device, torch.float32, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    labelled = batch["labelled"].to(device).bool()
    if loss_name == "naive":
        chans = torch.ones(labelled.shape[1], dtype=torch.bool) if naive_channels is None else naive_channels
        labelled = chans.to(device=device, dtype=torch.bool).reshape(1, -1).expand_as(labelled)
    task_ids = torch.as_tensor(batch["task_id"]).reshape(-1)
    groups = sorted(set(task_ids.tolist()))
    total_pairs = int(labelled.sum())
    loss_sum = bce_sum = dice_sum = 0.0
    for g, t in enumerate(groups):
        idx = (task_ids == t).nonzero().reshape(-1).to(device)
        last = g == len(groups) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, enabled=autocast):
                logits = model(image[idx], torch.full((len(idx),), t, dtype=torch.int64))
            terms = partial_label_loss(logits.float(), target[idx], labelled[idx])
            weight = terms.pairs / total_pairs if total_pairs else 1.0 / len(groups)
            scaled = terms.total * weight
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += float(scaled.detach())
        bce_sum += terms.bce * weight
        dice_sum += terms.dice * weight
    return LossTerms(torch.tensor(loss_sum), bce_sum, dice_sum, total_pairs)


def save_checkpoint(
    path: Path, model: torch.nn.Module, epoch: int,
    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``{"net", "epoch", "optimizer", "scheduler"}`` atomically (official names in ``net``)."""
    from napari_cdpdnet.fileutil import atomic_output
    from napari_cdpdnet.model import official_state_dicts

    cnn, _ = official_state_dicts(_net(model))
    payload: dict[str, Any] = {
        "net": {k: v.detach().cpu() for k, v in cnn.items()},
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    if extra:
        payload.update(extra)
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return path


class _CsvLog:
    """Append-only CSV (header written once), flushed every row so a killed run keeps its log."""

    def __init__(self, path: Path, columns: Iterable[str]) -> None:
        self.columns = tuple(columns)
        new = not path.exists() or path.stat().st_size == 0
        self._fh = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._w = csv.writer(self._fh)
        if new:
            self._w.writerow(self.columns)
            self._fh.flush()

    def row(self, **values: Any) -> None:
        self._w.writerow(
            [f"{values[c]:.6g}" if isinstance(values[c], float) else values[c] for c in self.columns]
        )
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class Trainer:
    """Runs a :class:`TrainConfig`: ``Trainer(config).fit()``.

    Args:
        config: the validated run.
        device: ``"auto"`` (CUDA rank device, else CPU), or a torch device string.
        progress: show a tqdm bar (main rank only).
        should_stop: polled after every step; True stops after writing ``latest.pth``
            and raises :class:`Cancelled`.
        architecture: a from-scratch architecture other than ``config.model`` (experiments;
            ignored with ``config.init``, whose checkpoint fixes the architecture).
    """

    def __init__(
        self, config: TrainConfig, *, device: str = "auto", progress: bool = True,
        should_stop: Callable[[], bool] | None = None, architecture: CDPDNetConfig | None = None,
    ) -> None:
        self.config = config
        self.architecture = architecture
        self.dist = DistInfo.from_env()
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        from napari_cdpdnet.inference.devices import resolve_device

        # "auto": this rank's own GPU under torchrun; CPU without CUDA (MPS is not used to train)
        self.device = (
            resolve_device("cuda", local_rank=self.dist.local_rank)
            if device == "auto" and torch.cuda.is_available()
            else torch.device("cpu" if device == "auto" else device)
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp = config.amp if config.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            logger.warning("amp: only used on CUDA; training in float32 on %s", self.device)
            self.amp = False
        self.start_epoch = 0
        self.global_step = 0

    # ---------------------------------------------------------------- setup
    def _init_distributed(self) -> None:
        if self.dist.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def _loader(self) -> tuple[Any, Any]:
        from monai.data import DataLoader, list_data_collate

        from napari_cdpdnet.training.data import UniformDataset, build_dataset

        parts = [build_dataset(d, self.config) for d in self.config.datasets]
        if self.config.uniform_sample:
            dataset: torch.utils.data.Dataset = UniformDataset(parts)
        else:
            dataset = torch.utils.data.ConcatDataset(parts)
        sampler = None
        if self.dist.distributed:
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                shuffle=True, seed=self.config.seed,
            )
        loader = DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=sampler is None,
            sampler=sampler, num_workers=self.config.num_workers, collate_fn=list_data_collate,
            pin_memory=self.device.type == "cuda",
        )
        return loader, sampler

    def setup(self) -> None:
        """Build model, optimiser, scheduler and data; load ``resume`` when set."""
        import_extra("monai", "train", "training (cdpdnet train)")
        from monai.utils import set_determinism

        self._init_distributed()
        set_determinism(seed=self.config.seed + self.dist.rank)  # torch, numpy, random, MONAI
        if self.device.type == "cuda":  # seeded, but keep cuDNN's fast (non-deterministic) kernels
            torch.backends.cudnn.deterministic = False
            torch.backends.cudnn.benchmark = True
        model, random_dino = build_training_model(self.config, self.architecture)
        model.to(self.device).train()
        self.random_dino = random_dino
        self.union = torch.zeros(model.num_classes, dtype=torch.bool)  # one per output channel
        for d in self.config.datasets:
            for c in d.cases:
                self.union[[i - 1 for i in c.labelled]] = True
        self.trainable = [p for n, p in model.named_parameters() if p.requires_grad]
        frozen = [n for n, p in model.named_parameters() if n.startswith("dino.") and p.requires_grad]
        if frozen:  # pragma: no cover - guarded by DinoSliceEncoder
            raise RuntimeError(f"DINO parameters would be trained: {frozen[:3]}")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.scheduler = LinearWarmupCosineAnnealingLR(
            self.optimizer, warmup_epochs=self.config.warmup_epochs, max_epochs=self.config.epochs,
            warmup_start_lr=self.config.warmup_start_lr, eta_min=self.config.eta_min,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        if self.config.resume is not None:
            self._resume(model, self.config.resume)
        self.model_plain = model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=True
            )
        else:
            self.model = model
        self.loader, self.sampler = self._loader()

    def _resume(self, model: torch.nn.Module, path: Path) -> None:
        from napari_cdpdnet.model.checkpoint import read_checkpoint

        sd, ckpt = read_checkpoint(path)
        try:
            model.net.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"resume: {path} does not fit this model: {exc}") from None
        if ckpt.get("optimizer") is None or ckpt.get("scheduler") is None:
            raise WeightsError(f"resume: {path} has no optimizer/scheduler state (not a training checkpoint)")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt.get("global_step", 0))
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ---------------------------------------------------------------- run
    def _save(self, epoch: int) -> Path:
        out = self.config.output_dir
        extra = {"global_step": self.global_step, "loss": self.config.loss}
        latest = save_checkpoint(out / "latest.pth", self.model, epoch, self.optimizer, self.scheduler, extra)
        if (epoch + 1) % self.config.checkpoint_every == 0 or epoch + 1 == self.config.epochs:
            save_checkpoint(out / f"epoch_{epoch + 1:04d}.pth", self.model, epoch, self.optimizer, self.scheduler, extra)
        return latest

    def _save_dino(self) -> None:
        from safetensors.torch import save_file

        from napari_cdpdnet.model import official_state_dicts

        _, dino = official_state_dicts(self.model_plain)
        save_file({k: v.detach().cpu().contiguous() for k, v in dino.items()},
                  str(self.config.output_dir / "dino.safetensors"))

    def fit(self) -> Path:
        """Train from ``start_epoch`` to ``epochs``; returns the path of ``latest.pth``."""
        if not hasattr(self, "model"):
            self.setup()
        cfg = self.config
        main = self.dist.main
        steps_log = epochs_log = None
        if main:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            if self.random_dino:
                self._save_dino()
            steps_log = _CsvLog(cfg.output_dir / "steps.csv", STEP_COLUMNS)
            epochs_log = _CsvLog(cfg.output_dir / "epochs.csv", EPOCH_COLUMNS)
        latest = cfg.output_dir / "latest.pth"
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                latest = self._epoch(epoch, steps_log, epochs_log)
        finally:
            for log in (steps_log, epochs_log):
                if log is not None:
                    log.close()
        return latest

    def _epoch(self, epoch: int, steps_log: _CsvLog | None, epochs_log: _CsvLog | None) -> Path:
        cfg = self.config
        before = self.scheduler.state_dict()
        with warnings.catch_warnings():  # torch warns about stepping before optimizer.step()
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()  # official: once per epoch, before training it
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.model.train()
        n_steps = len(self.loader)
        if cfg.max_steps_per_epoch:
            n_steps = min(n_steps, cfg.max_steps_per_epoch)
        bar = None
        if self.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "bce": 0.0, "dice": 0.0}
        done = 0
        for batch in self.loader:
            if done >= n_steps:
                break
            ts = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            terms = train_step(self.model, batch, cfg.loss, self.scaler, self.amp, self.union)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            loss = float(terms.total)
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at epoch {epoch + 1}, step {done + 1}; lower lr or check the labels")
            done += 1
            self.global_step += 1
            for k, v in (("loss", loss), ("bce", terms.bce), ("dice", terms.dice)):
                sums[k] += v
            if steps_log is not None and self.global_step % cfg.log_every == 0:
                steps_log.row(epoch=epoch + 1, step=self.global_step, lr=lr, loss=loss, bce=terms.bce,
                              dice=terms.dice, pairs=terms.pairs, seconds=time.perf_counter() - ts)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if self.should_stop():
                if self.dist.main:  # resuming repeats this unfinished epoch
                    self.scheduler.load_state_dict(before)
                    save_checkpoint(cfg.output_dir / "latest.pth", self.model, epoch - 1, self.optimizer,
                                    self.scheduler, {"global_step": self.global_step, "loss": cfg.loss})
                raise Cancelled(f"training stopped in epoch {epoch + 1} after {done} step(s); "
                                f"resume from {cfg.output_dir / 'latest.pth'} repeats that epoch")
        if bar is not None:
            bar.close()
        means = {k: v / max(done, 1) for k, v in sums.items()}
        latest = cfg.output_dir / "latest.pth"
        if epochs_log is not None:
            epochs_log.row(epoch=epoch + 1, lr=lr, steps=done, seconds=time.perf_counter() - t0, **means)
            latest = self._save(epoch)
            logger.info("epoch %d/%d lr %.3g loss %.4f (bce %.4f dice %.4f)", epoch + 1, cfg.epochs,
                        lr, means["loss"], means["bce"], means["dice"])
        return latest
