"""The port reproduces the official CDPDNet's logits (shared/cdpdnet/parity).

Weights are regenerated from key names with the reference's rule, written as an official
checkpoint file (``net`` with ``module.`` keys) and a DINOv2 safetensors file, and loaded through
the same loaders users' files go through. Full-size model: ~30-60 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_support import synthetic_state_dict, write_official_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.shared]

#: Float32 round-off, not a fudge: the official reference itself is 1.9e-4 away from the same
#: network evaluated in float64 (logits up to ~5), and CPU kernels differ between machines (AVX2 /
#: AVX-512, thread splits). Measured here: 0 on one machine, 1.4e-4..1.6e-4 on an AVX-512 one,
#: where our float32 result is 5.9e-5 from float64. Port bugs give differences of 1e-2 and more.
TOLERANCE = 3e-4


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest) -> dict:
    shared_path = request.getfixturevalue("shared_path")
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(
            shared_path("cdpdnet", "parity", "official_synthetic_seed0_task0.pt"), weights_only=True
        )


def test_official_logits_are_reproduced(reference: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from napari_cdpdnet.model import (
        build_from_official,
        load_dino_state_dict,
        load_official_checkpoint,
    )
    from napari_cdpdnet.model.lwca import relative_position_index

    meta = reference["meta"]
    integer = {k: relative_position_index(3) for k, _ in meta["cdpdnet_keys"] if k.endswith("relative_position_index")}
    integer |= {k: torch.tensor(0) for k, _ in meta["cdpdnet_keys"] if k.endswith("num_batches_tracked")}
    cnn = synthetic_state_dict("cdpdnet.", meta["cdpdnet_keys"], integer)
    dino = synthetic_state_dict("dinov2.", meta["dinov2_keys"], {})
    assert len(cnn) == 324

    ckpt = write_official_checkpoint(tmp_path / "cdpdnet.pth", cnn)
    dino_file = tmp_path / "model.safetensors"
    save_file(dino, str(dino_file))
    del cnn, dino
    model = build_from_official(load_official_checkpoint(ckpt), load_dino_state_dict(dino_file))

    full = model(reference["input"], reference["task_id"])
    assert full.shape == (1, 32, 96, 96, 96)
    diffs = {"output (stride 4)": (full[:, :, ::4, ::4, ::4] - reference["output"]).abs().max().item()}
    slices = reference["output_central_slices"]
    i0, i1, i2 = slices["index"]
    diffs["axis0"] = (full[:, :, i0] - slices["axis0"]).abs().max().item()
    diffs["axis1"] = (full[:, :, :, i1] - slices["axis1"]).abs().max().item()
    diffs["axis2"] = (full[:, :, :, :, i2] - slices["axis2"]).abs().max().item()
    assert max(diffs.values()) <= TOLERANCE, diffs
