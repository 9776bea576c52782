"""``cdpdnet train``: train or fine-tune CDPDNet on partially labelled data from a config file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune on partially labelled data (config file)",
        description=(
            "Train CDPDNet with the official recipe (AdamW 4e-4, warm-up + cosine, 96³ crops, "
            "masked BCE + Dice: only the structures each dataset labels count, unlabelled is not "
            "background). Start from the official checkpoint or from scratch; DINOv2 stays frozen. "
            "Checkpoints are in the official format (cdpdnet segment --checkpoint reads them). "
            "Several GPUs: torchrun --nproc_per_node N -m napari_cdpdnet.cli train --config FILE. "
            "See docs/training.md for the config keys."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  cdpdnet train --config finetune.yaml\n"
            "  cdpdnet train --config finetune.yaml --resume runs/ft/latest.pth\n"
            "  torchrun --nproc_per_node 4 -m napari_cdpdnet.cli train --config full.yaml\n"
        ),
    )
    p.add_argument("--config", type=Path, required=True, help="training config (.yaml, .yml or .json)")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint written by a previous run")
    p.add_argument("--device", default="auto", help="auto (the rank's CUDA device, else CPU), cpu, cuda:N")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class _StopOnInterrupt:
    """First Ctrl-C: stop after the current step and write a resumable checkpoint; second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (press Ctrl-C again to abort without a checkpoint)", flush=True)

    def __enter__(self) -> _StopOnInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_cdpdnet.errors import InputError
    from napari_cdpdnet.training.config import load_config
    from napari_cdpdnet.training.trainer import Trainer

    cfg = load_config(args.config)
    if args.resume is not None:
        if not args.resume.is_file():
            raise InputError(f"--resume {args.resume}: no such checkpoint")
        cfg = replace(cfg, resume=args.resume)
    if args.epochs is not None:
        if args.epochs < 1 or args.epochs < cfg.warmup_epochs:
            raise InputError(f"--epochs {args.epochs}: must be >= 1 and >= warmup_epochs ({cfg.warmup_epochs})")
        cfg = replace(cfg, epochs=args.epochs)
    stop = _StopOnInterrupt()
    trainer = Trainer(cfg, device=args.device, progress=not args.no_progress, should_stop=stop)
    with stop:
        latest = trainer.fit()
    if trainer.dist.main:
        print(f"trained to epoch {cfg.epochs}; checkpoint {latest}")
        print(f"losses: {cfg.output_dir / 'steps.csv'}, {cfg.output_dir / 'epochs.csv'}")
        if trainer.random_dino:
            print(f"DINO weights (random, needed with this checkpoint): {cfg.output_dir / 'dino.safetensors'}")
    return 0
