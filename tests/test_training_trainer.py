"""Trainer: one real step on a synthetic CT, frozen DINO, official checkpoints, resume, logs, CLI."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import Cancelled
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import write_image, write_label_map
from napari_cdpdnet.model import build_from_official, load_dino_state_dict, load_official_checkpoint
from napari_cdpdnet.training.config import parse_config
from napari_cdpdnet.training.schedule import epoch_lr
from napari_cdpdnet.training.trainer import EPOCH_COLUMNS, STEP_COLUMNS, Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40³ synthetic CT at 3 mm: air, a soft-tissue body, a 'liver' and a 'spleen' block."""
    root = tmp_path_factory.mktemp("case")
    g = Geometry((3.0, 3.0, 3.0), (-60.0, -60.0, 0.0), np.eye(3).ravel(), (40, 40, 40))
    zz, yy, xx = np.mgrid[:40, :40, :40]
    body = (yy - 20) ** 2 + (xx - 20) ** 2 < 17**2
    ct = np.where(body, 40, -1000).astype(np.int16)
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[10:30, 12:22, 8:20] = 6
    lab[10:25, 22:30, 24:32] = 1
    ct[lab == 6] = 60
    ct[lab == 1] = 45
    write_image(root / "ct.nii.gz", ct, g)
    write_label_map(root / "lab.nii.gz", lab, g)
    return root


def _config(case: Path, out: Path, **over) -> dict:
    d = {
        "output_dir": str(out), "model": "tiny", "epochs": 2, "warmup_epochs": 1, "lr": 1e-3,
        "spacing": 6.0, "samples_per_volume": 1, "batch_size": 1, "num_workers": 0,
        "checkpoint_every": 1, "cache": True,
        "datasets": [{"name": "synthetic", "labelled": ["liver"],  # spleen present but unlabelled
                      "cases": [{"image": str(case / "ct.nii.gz"), "label": str(case / "lab.nii.gz")}]}],
    }
    d.update(over)
    return d


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_checkpoint_round_trip_and_resume(case: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = parse_config(_config(case, out))
    trainer = Trainer(cfg, device="cpu", progress=False)
    trainer.setup()
    model = trainer.model_plain
    dino_before = {k: v.clone() for k, v in model.dino.state_dict().items()}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.dino.parameters())
    assert all(id(p) in in_optimizer for p in model.net.parameters() if p.requires_grad)
    net_before = {k: v.clone() for k, v in model.net.state_dict().items()}

    # one sample as the loader gives it: 96³ image, 32-channel target, mask of the liver only
    batch = next(iter(trainer.loader))
    assert tuple(batch["image"].shape) == (1, 1, 96, 96, 96)
    assert tuple(batch["target"].shape) == (1, 32, 96, 96, 96)
    assert batch["labelled"][0].nonzero().reshape(-1).tolist() == [5]
    assert batch["target"][0, 5].sum() > 0 and batch["target"][0, 0].sum() == 0  # spleen dropped

    trainer.fit()
    assert not model.dino.training
    for k, v in model.dino.state_dict().items():
        assert torch.equal(v, dino_before[k]), f"DINO changed: {k}"
    changed = [k for k, v in model.net.state_dict().items() if not torch.equal(v, net_before[k])]
    assert changed

    steps, epochs = _csv(out / "steps.csv"), _csv(out / "epochs.csv")
    assert tuple(steps[0]) == STEP_COLUMNS and tuple(epochs[0]) == EPOCH_COLUMNS
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert float(epochs[0]["lr"]) == pytest.approx(epoch_lr(0, 1e-3, 1, 2))
    assert all(np.isfinite(float(r["loss"])) and int(r["pairs"]) == 1 for r in steps)

    # official format, read by the official loader and the segment path
    ckpt = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"net", "epoch", "optimizer", "scheduler"} and ckpt["epoch"] == 1
    assert (out / "epoch_0001.pth").is_file() and (out / "epoch_0002.pth").is_file()
    rebuilt = build_from_official(load_official_checkpoint(out / "latest.pth"),
                                  load_dino_state_dict(out / "dino.safetensors"))
    x = torch.rand(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.equal(rebuilt(x, 0), model(x, 0))
    # what `cdpdnet segment --checkpoint latest.pth --dino dino.safetensors` loads
    from napari_cdpdnet.inference.segmenter import Segmenter

    seg_model = Segmenter(checkpoint=out / "latest.pth", dino=out / "dino.safetensors",
                          allow_download=False).model()
    assert torch.equal(seg_model(x, 0), model(x, 0))

    # resume from epoch 1 of 2: only epoch 2 is trained, with restored optimizer and schedule
    resumed = Trainer(replace(cfg, resume=out / "epoch_0001.pth", dino=out / "dino.safetensors"),
                      device="cpu", progress=False)
    resumed.setup()
    assert resumed.start_epoch == 1
    first = torch.load(out / "epoch_0001.pth", map_location="cpu", weights_only=True)
    assert resumed.scheduler.last_epoch == first["scheduler"]["last_epoch"] == 1
    state = resumed.optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], first["optimizer"]["state"][0]["exp_avg"])
    resumed.fit()
    epochs = _csv(out / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 2]  # appended, not rewritten
    assert float(epochs[-1]["lr"]) == pytest.approx(epoch_lr(1, 1e-3, 1, 2))


def test_cancel_saves_a_resumable_checkpoint(case: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = parse_config(_config(case, out, loss="naive", epochs=3))
    trainer = Trainer(cfg, device="cpu", progress=False, should_stop=lambda: True)
    with pytest.raises(Cancelled, match="repeats that epoch"):
        trainer.fit()
    ckpt = torch.load(out / "latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == -1 and ckpt["scheduler"]["last_epoch"] == 0  # epoch 1 runs again
    steps = _csv(out / "steps.csv")
    assert int(steps[0]["pairs"]) == 1  # naive: union of labelled structures (liver) per sample


def test_cli_train_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("output_dir: x\ndatasets: []\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "datasets: expected a non-empty list" in capsys.readouterr().err


def test_first_ctrl_c_requests_a_graceful_stop_second_aborts() -> None:
    import os
    import signal

    from napari_cdpdnet.commands.train import _StopOnInterrupt

    before = signal.getsignal(signal.SIGINT)
    stop = _StopOnInterrupt()
    with stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_dist_info_from_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_cdpdnet.training.trainer import DistInfo

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert DistInfo.from_env() == DistInfo(0, 0, 1) and not DistInfo.from_env().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.main) == (3, 1, 4, False)


def test_train_step_under_ddp_with_two_task_groups(tmp_path: Path) -> None:
    """DDP (gloo, one process) with find_unused_parameters, crops of two tasks in one batch."""
    import torch.distributed as dist

    from napari_cdpdnet.model import CDPDNetConfig, build_model
    from napari_cdpdnet.training.loss import partial_label_loss
    from napari_cdpdnet.training.trainer import train_step

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(CDPDNetConfig.tiny()).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        g = torch.Generator().manual_seed(0)
        image = torch.rand(2, 1, 96, 96, 96, generator=g)
        target = (torch.rand(2, 32, 96, 96, 96, generator=g) > 0.9).to(torch.uint8)
        labelled = torch.zeros(2, 32, dtype=torch.bool)
        labelled[0, [0, 5]] = True
        labelled[1, 5] = True
        batch = {"image": image, "target": target, "labelled": labelled, "task_id": torch.tensor([0, 3])}
        terms = train_step(ddp, batch)
        assert terms.pairs == 3
        grads = [p.grad for p in model.net.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(x).all() for x in grads)
        assert all(p.grad is None for p in model.dino.parameters())
        # the loss is the mean over all 3 pairs: pair-weighted mean of the two task groups
        with torch.no_grad():
            t0 = partial_label_loss(model(image[:1], 0), target[:1], labelled[:1])
            t3 = partial_label_loss(model(image[1:], 3), target[1:], labelled[1:])
        assert float(terms.total) == pytest.approx((2 * float(t0.total) + float(t3.total)) / 3, rel=1e-4)
    finally:
        dist.destroy_process_group()


def test_architecture_override_builds_that_network(case: Path, tmp_path: Path) -> None:
    """``Trainer(architecture=...)`` (the training demo's wider tiny model) replaces ``model: tiny``."""
    from napari_cdpdnet.model import CDPDNetConfig
    from napari_cdpdnet.training.trainer import build_training_model

    cfg = parse_config(_config(case, tmp_path / "run"))
    wide = CDPDNetConfig.tiny().replace(widths=(8, 16, 24, 32, 40, 40))
    model, random_dino = build_training_model(cfg, wide)
    assert random_dino and model.net.config.widths == wide.widths
    assert model.net.seg_outputs[4].in_channels == 8
    default, _ = build_training_model(cfg)
    assert default.net.config.widths == CDPDNetConfig.tiny().widths
    assert not any(p.requires_grad for p in model.dino.vit.parameters())
