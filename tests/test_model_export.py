"""Encoder export: safetensors + config.json round trips exactly; loading into a new multitask
model reports what it kept and ignored; damaged or mismatched exports are clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medformer_core.api.errors import CheckpointError
from medformer_core.api.plugins import registries
from medformer_core.model.medformer import Medformer

PATCH_ADAPTERS = {"adapter2d": "patch2d", "adapter3d": "patch3d"}  # few, stable adapter tensor names


@pytest.fixture
def exported(tmp_path, tiny_model):
    model = tiny_model([registries().tasks.get("rotation")], **PATCH_ADAPTERS)
    model.encoder.save_pretrained(tmp_path / "encoder")
    return model, tmp_path / "encoder"


def test_export_round_trips_exactly(exported, phantom_batch):
    model, path = exported
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Medformer.from_pretrained(path, registries().input_adapters)
    ours, theirs = model.encoder.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.eval()
    for info in model.dataset_infos:
        x = phantom_batch(info)["image"]
        assert torch.equal(model.encoder(x, info.name), loaded(x, info.name))


def test_export_key_names_are_stable(exported):
    _, path = exported
    keys = set(load_file(str(path / "model.safetensors")))
    expected = {"adapters.patch2d_1ch.weight", "adapters.patch3d_1ch.bias", "dataset_embed.phantoms2d", "latents",
                "input_adaptformer.attn.kv.weight", "body.0.attn.qkv.weight", "body.0.mlp.0.weight", "norm.weight"}
    assert expected <= keys
    assert not any(k.startswith("outputs.") for k in keys)  # heads stay out of the encoder export
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "medformer-encoder" and config["model"]["embed_dim"] == 32


def test_load_encoder_reports_missing_and_unexpected_keys(exported, tiny_model, phantom_info):
    model, path = exported
    rgb = phantom_info(2, channels=3)  # a modality the export has no adapter for
    target = tiny_model([registries().tasks.get("rotation")], [rgb], seed=1, **PATCH_ADAPTERS)
    report = target.load_encoder(path)
    assert report.missing == ["adapters.patch2d_3ch.bias", "adapters.patch2d_3ch.weight",
                              "intensity.phantoms2d_3ch.count", "intensity.phantoms2d_3ch.mean",
                              "intensity.phantoms2d_3ch.square"]
    assert "adapters.patch3d_1ch.weight" in report.unexpected and "dataset_embed.phantoms3d" in report.unexpected
    assert "kept as initialised" in str(report) and "ignored" in str(report)
    assert torch.equal(target.encoder.body[0].attn.qkv.weight, model.encoder.body[0].attn.qkv.weight)
    assert torch.equal(target.encoder.latents, model.encoder.latents)


def test_load_encoder_into_the_same_run_loads_everything(exported, tiny_model):
    model, path = exported
    same = tiny_model([registries().tasks.get("rotation")], seed=3, **PATCH_ADAPTERS)
    report = same.load_encoder(path)
    assert (report.missing, report.unexpected) == ([], [])
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in same.encoder.state_dict().items())


def test_another_architecture_is_refused(exported, tiny_model):
    _, path = exported
    wider = tiny_model([registries().tasks.get("rotation")], embed_dim=64, **PATCH_ADAPTERS)
    with pytest.raises(CheckpointError, match="embed_dim 32 != 64"):
        wider.load_encoder(path)


def test_damaged_exports_are_clear_errors(exported):
    _, path = exported
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        Medformer.from_pretrained(path, registries().input_adapters)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Medformer.from_pretrained(path, registries().input_adapters)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Medformer.from_pretrained(path, registries().input_adapters)


def test_a_tensor_of_the_wrong_shape_is_named(exported, tmp_path):
    model, path = exported
    config = json.loads((path / "config.json").read_text())
    config["model"]["patch2d"] = 2  # the file's patch weights are 4x4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'adapters.patch2d_1ch.weight' has shape \[32, 1, 4, 4\]"):
        Medformer.from_pretrained(path, registries().input_adapters)
