"""The CDPDNet port: shapes, official-format loading and its errors, semantics kept from the
official code, and the efficient path equal to the straightforward one. Tiny models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_support import write_official_checkpoint, write_tiny_weights

from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.model import (
    CDPDNetConfig,
    CDPDNetModel,
    build_from_official,
    build_model,
    load_dino_state_dict,
    load_official_checkpoint,
    official_state_dicts,
)
from napari_cdpdnet.model.convert import dino_hub_to_transformers


@pytest.fixture(scope="module")
def tiny() -> CDPDNetModel:
    return build_model(CDPDNetConfig.tiny(), seed=0).eval()


@pytest.fixture(scope="module")
def patch() -> torch.Tensor:
    return torch.rand(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(1))


def test_logits_shape_and_dtype(tiny: CDPDNetModel, patch: torch.Tensor) -> None:
    y = tiny(patch, torch.tensor([0]))
    assert y.shape == (1, 32, 96, 96, 96) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_official_key_set_matches_the_checkpoint_listing(shared_path) -> None:
    """All 324 official entries, with their shapes, exist in the full-size model (built on meta)."""
    listing = json.loads(shared_path("cdpdnet", "state_dict_shapes.json").read_text())
    expected = {k: v["shape"] for k, v in listing["cdpdnet_state_dict"].items()}
    with torch.device("meta"):
        model = CDPDNetModel(CDPDNetConfig.official())
    ours = {k: list(v.shape) for k, v in model.net.state_dict().items()}
    assert len(expected) == 324
    assert ours == expected
    dino = dino_hub_to_transformers({k: torch.empty(0) for k in listing["dinov2_state_dict"]})
    assert set(dino) == set(model.dino.vit.state_dict())


def test_official_files_round_trip_with_and_without_module_prefix(
    tiny: CDPDNetModel, patch: torch.Tensor, tmp_path: Path
) -> None:
    ckpt, dino, model = write_tiny_weights(tmp_path / "a", seed=0)
    loaded = build_from_official(load_official_checkpoint(ckpt), load_dino_state_dict(dino))
    assert not loaded.training
    expected = tiny(patch, torch.tensor([3]))
    torch.testing.assert_close(loaded(patch, torch.tensor([3])), expected, rtol=0, atol=1e-5)

    cnn, _ = official_state_dicts(model)
    bare = write_official_checkpoint(tmp_path / "bare.pth", cnn, module_prefix=False)
    sd = load_official_checkpoint(bare)
    assert set(sd) == set(cnn)
    # the text-embedding buffers come from the file, not from the constructor
    torch.testing.assert_close(loaded.net.organ_embedding, cnn["organ_embedding"])


def test_dino_weights_in_hub_or_transformers5_names_and_bin_files(tmp_path: Path, patch: torch.Tensor) -> None:
    ckpt, dino_file, model = write_tiny_weights(tmp_path, seed=2)
    hub = load_dino_state_dict(dino_file)
    assert any(".attention.attention.query." in k for k in hub)
    tf5 = dino_hub_to_transformers(hub)
    torch.save(tf5, tmp_path / "pytorch_model.bin")
    cnn = load_official_checkpoint(ckpt)
    a = build_from_official(cnn, hub)(patch, torch.tensor([0]))
    b = build_from_official(cnn, load_dino_state_dict(tmp_path / "pytorch_model.bin"))(patch, torch.tensor([0]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dino_depth_follows_the_state_dict(tmp_path: Path) -> None:
    config = CDPDNetConfig.tiny().replace(dino_num_layers=4)
    ckpt, dino_file, _ = write_tiny_weights(tmp_path, config=config)
    dino = load_dino_state_dict(dino_file)
    assert build_from_official(load_official_checkpoint(ckpt), dino).config.dino_num_layers == 4
    three = {k: v for k, v in dino.items() if not k.startswith("encoder.layer.3.")}
    model = build_from_official(load_official_checkpoint(ckpt), three)
    assert model.config.dino_num_layers == 3
    assert model(torch.rand(1, 1, 96, 96, 96), torch.tensor([0])).shape[1] == 32


def test_wrong_files_are_explained(tmp_path: Path) -> None:
    ckpt, dino_file, _ = write_tiny_weights(tmp_path)
    cnn = load_official_checkpoint(ckpt)
    dino = load_dino_state_dict(dino_file)

    broken = dict(cnn)
    del broken["tu.0.weight"]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys: tu\.0\.weight.*unexpected keys: extra\.weight"):
        build_from_official(broken, dino)

    bad_shape = dict(cnn)
    bad_shape["crossatt.1.transformer.norm0.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"crossatt\.1\.transformer\.norm0\.weight \(file \[3\]"):
        build_from_official(bad_shape, dino)

    with pytest.raises(WeightsError, match="swapped"):
        build_from_official(dino, cnn)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="truncated.pth"):
        load_official_checkpoint(truncated)
    with pytest.raises(WeightsError, match="nothing.pth"):
        load_official_checkpoint(tmp_path / "nothing.pth")


def test_only_the_first_task_id_selects_the_prompt(tiny: CDPDNetModel, patch: torch.Tensor) -> None:
    batch = torch.cat([patch, patch.flip(-1)])
    y_a = tiny(batch, torch.tensor([2, 7]))
    y_b = tiny(batch, torch.tensor([2, 2]))
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(y_a[:1], tiny(patch, torch.tensor([2])), rtol=0, atol=1e-4)
    assert (tiny(patch, torch.tensor([7])) - y_a[:1]).abs().max() > 1e-4  # the prompt matters


def test_position_interpolation_flag_changes_the_result(tmp_path: Path, patch: torch.Tensor) -> None:
    ckpt, dino_file, _ = write_tiny_weights(tmp_path)
    cnn, dino = load_official_checkpoint(ckpt), load_dino_state_dict(dino_file)
    new = build_from_official(cnn, dino)(patch, torch.tensor([0]))
    legacy = build_from_official(cnn, dino, legacy_pos_interp=True)(patch, torch.tensor([0]))
    assert (new - legacy).abs().max() > 1e-5


def test_efficient_path_equals_the_straightforward_one(tiny: CDPDNetModel, patch: torch.Tensor) -> None:
    from napari_cdpdnet.model.speedups import Speedups

    fast = tiny(patch, torch.tensor([4]))
    tiny.speedups = Speedups.bit_exact()
    exact_kernels = tiny(patch, torch.tensor([4]))
    tiny.efficient = False
    try:
        slow = tiny(patch, torch.tensor([4]))
    finally:
        tiny.efficient = True
        tiny.speedups = Speedups()
    torch.testing.assert_close(exact_kernels, slow, rtol=0, atol=1e-5)
    # the fast norm and the channels-last CNN sum in another order: float32 round-off, as between CPUs
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_training_reaches_the_cnn_and_text_params_never_dino(patch: torch.Tensor) -> None:
    model = build_model(CDPDNetConfig.tiny(), seed=3).train()
    model(patch, torch.tensor([0])).mean().backward()
    assert model.net.conv_blocks_context[0].blocks[0].conv_1.weight.grad is not None
    assert model.net.deep_film_block[0].gamma.weight.grad is not None
    assert all(p.grad is None for p in model.dino.parameters())
    assert not model.dino.vit.training


def test_bad_inputs_are_refused(tiny: CDPDNetModel) -> None:
    with pytest.raises(InputError, match="96"):
        tiny(torch.rand(1, 1, 64, 96, 96), torch.tensor([0]))
    with pytest.raises(InputError, match="task_id 11"):
        tiny(torch.rand(1, 1, 96, 96, 96), torch.tensor([11]))


# --------------------------------------------------------------------------- checkpoint reader
def test_read_checkpoint_unwraps_and_keeps_the_training_state(tmp_path: Path) -> None:
    from napari_cdpdnet.model.checkpoint import read_checkpoint

    t = torch.arange(3.0)
    trained = tmp_path / "latest.pth"
    torch.save({"net": {"module.a": t}, "epoch": 4, "optimizer": {"lr": 0.1}}, trained)
    sd, rest = read_checkpoint(trained)
    assert list(sd) == ["a"] and torch.equal(sd["a"], t)
    assert rest == {"epoch": 4, "optimizer": {"lr": 0.1}}
    bare = tmp_path / "bare.pth"
    torch.save({"a": t}, bare)
    assert read_checkpoint(bare)[1] == {}
    with pytest.raises(WeightsError, match="is a folder"):
        read_checkpoint(tmp_path)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": {"a": t}, "epoch": 1}, foreign)
    with pytest.raises(WeightsError, match="no 'net' entry"):
        read_checkpoint(foreign)


# --------------------------------------------------------------------------- text side
def test_official_text_embedding_tables(shared_path, tmp_path: Path) -> None:
    from napari_cdpdnet.model.text import load_organ_embeddings, load_text_embedding_tables

    folder = shared_path("cdpdnet", "text_embeddings")
    organ, task = load_text_embedding_tables(folder)
    assert organ.shape == (32, 512) and task.shape == (11, 512)
    assert organ.dtype == task.dtype == torch.float32
    assert load_organ_embeddings(folder / "txt_encoding.pth") == pytest.approx(organ.numpy())
    (tmp_path / "txt_encoding.pth").write_bytes((folder / "txt_encoding.pth").read_bytes())
    with pytest.raises(InputError, match="txt_task_encoding.pth not found"):
        load_text_embedding_tables(tmp_path)


@pytest.mark.slow
def test_clip_text_tower_from_a_path_feeds_the_scorer(tmp_path: Path) -> None:
    """The one CLIP loader: a weights file given by path (random weights stand in for OpenAI's)."""
    open_clip = pytest.importorskip("open_clip")
    from napari_cdpdnet.model.text import ClipScorer, load_clip_text_tower
    from napari_cdpdnet.vocabulary import STRUCTURES

    torch.manual_seed(0)  # QuickGELU, as the OpenAI weights (and so the loader) use
    reference = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    tower = load_clip_text_tower(path)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.inference_mode():
        expected = reference.encode_text(tokenizer(["liver", "left kidney"])).numpy()
    np_encoded = tower.encode(["liver", "left kidney"])
    assert np_encoded.shape == (2, 512)
    torch.testing.assert_close(torch.as_tensor(np_encoded), torch.as_tensor(expected))
    assert tower.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    organ = tower.encode([s.prompt for s in STRUCTURES])
    scorer = ClipScorer(clip_weights=path, organ_embeddings=organ)
    aorta = next(s for s in STRUCTURES if s.key == "aorta")
    assert int(scorer.similarities(aorta.official_name).argmax()) == aorta.channel
