"""Layer-wise LR decay for fine-tuning: which parameter trains at which rate."""

import pytest

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import UsageError
from medformer_core.api.plugins import registries
from medformer_core.downstream.finetune import (
    FINETUNE_LR,
    PRETRAINED_LAYER_DECAY,
    PROBE_LR,
    FinetuneConfig,
    layer_decay_groups,
)
from medformer_core.engine.builders import build_model
from medformer_core.model.medformer import ModelConfig


@pytest.fixture
def model():
    factory, options = resolve_dataset("phantoms2d:size=16,count=8", labeled=True)
    info = factory.build("train", options).info
    config = ModelConfig(embed_dim=16, depth=2, heads=2, latents=4)
    return build_model(config, [info], [registries().tasks.get("supervised")])


def lr_by_name(model, groups) -> dict[str, float]:
    ids = {id(p): group["lr"] for group in groups for p in group["params"]}
    return {name: ids[id(p)] for name, p in model.named_parameters() if id(p) in ids}


def test_each_layer_gets_decay_to_the_power_of_its_distance_from_the_head(model):
    rates = lr_by_name(model, layer_decay_groups(model, lr=1.0, decay=0.5))
    assert len(rates) == len(list(model.parameters()))  # every parameter, once
    for name, rate in rates.items():
        if name.startswith("outputs.") or name.startswith("encoder.norm."):
            assert rate == 1.0, name
        elif name.startswith("encoder.body.1."):
            assert rate == 0.5, name
        elif name.startswith("encoder.body.0."):
            assert rate == 0.25, name
        else:  # adapters, dataset embeddings, latents, Input Adaptformer
            assert rate == 0.125, name
    assert any(name.startswith("encoder.adapters.") for name in rates)


def test_no_decay_gives_one_rate_and_a_frozen_encoder_no_groups(model):
    assert set(lr_by_name(model, layer_decay_groups(model, lr=3e-4, decay=1.0)).values()) == {3e-4}
    model.encoder.requires_grad_(False)
    rates = lr_by_name(model, layer_decay_groups(model, lr=3e-4, decay=0.75))
    assert rates and all(name.startswith("outputs.") for name in rates)
    assert set(rates.values()) == {3e-4}


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
def test_layer_decay_out_of_range_is_a_usage_error(decay):
    with pytest.raises(UsageError, match="--layer-decay"):
        FinetuneConfig(dataset="phantoms2d", layer_decay=decay).validate()


def test_finetune_cli_takes_layer_decay(tmp_path, run_cli):
    data = ["--dataset", "phantoms2d:size=16,count=48", "--epochs", "1", "--batch-size", "8", "--quiet"]
    code, _, err = run_cli("finetune", *data, "--layer-decay", "0.75", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "layer_decay = 0.75" in (tmp_path / "run" / "finetune.toml").read_text()
    code, _, err = run_cli("finetune", *data, "--layer-decay", "0", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--layer-decay must be in (0, 1]" in err


def test_a_pretrained_finetune_defaults_to_layer_decay_and_scratch_does_not():
    pretrained = FinetuneConfig(dataset="phantoms2d", source="runs/pretrain")
    assert pretrained.effective_layer_decay == PRETRAINED_LAYER_DECAY == 0.75
    assert FinetuneConfig(dataset="phantoms2d").effective_layer_decay == 1.0
    assert FinetuneConfig(dataset="phantoms2d", source="runs/pretrain", linear_probe=True).effective_layer_decay == 1.0
    assert FinetuneConfig(dataset="phantoms2d", source="runs/pretrain", layer_decay=1.0).effective_layer_decay == 1.0


def test_the_default_learning_rate_follows_the_mode():
    assert FinetuneConfig(dataset="phantoms2d", source="runs/pretrain").effective_lr == FINETUNE_LR == 1e-3
    assert FinetuneConfig(dataset="phantoms2d").effective_lr == FINETUNE_LR
    assert FinetuneConfig(dataset="phantoms2d", source="runs/pretrain", linear_probe=True).effective_lr == PROBE_LR
    assert FinetuneConfig(dataset="phantoms2d", source="runs/pretrain", lr=5e-4).effective_lr == 5e-4
