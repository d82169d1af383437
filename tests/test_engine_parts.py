"""The engine's building blocks: config files, checkpoints, loss weighting, LR schedule."""

from pathlib import Path

import pytest
import torch

from medformer_core.api.errors import CheckpointError, UsageError
from medformer_core.engine.checkpoint import latest_checkpoint, load_checkpoint, mismatch_hint, save_checkpoint
from medformer_core.engine.config import RunConfig, load_config, write_config
from medformer_core.engine.loop import MetricWindow, step_losses
from medformer_core.engine.schedule import head_then_whole, warmup_cosine
from medformer_core.engine.weighting import FixedWeighting, UncertaintyWeighting, make_weighting


def test_config_round_trips_through_toml(tmp_path):
    config = RunConfig(plugins=["mae"], tasks={"mae": {"mask_ratio": 0.8}}, task_weights={"mae": 2.0}, lr=3e-4)
    write_config(config, tmp_path / "run.toml")
    assert load_config(tmp_path / "run.toml", {}) == config


def test_command_line_overrides_the_file(tmp_path):
    (tmp_path / "run.toml").write_text('steps = 7\nplugins = ["rotation"]\n')
    config = load_config(tmp_path / "run.toml", {"steps": 9, "lr": None})
    assert (config.steps, config.plugins, config.lr) == (9, ["rotation"], RunConfig().lr)


def test_unknown_config_key_names_the_file_and_a_fix(tmp_path):
    (tmp_path / "run.toml").write_text("step = 7\n")
    with pytest.raises(UsageError, match=r"run.toml: unknown key 'step'; did you mean 'steps'"):
        load_config(tmp_path / "run.toml", {})


def test_invalid_toml_and_values_are_usage_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", {})
    with pytest.raises(UsageError, match="'batch_size' must be >= 1"):
        load_config(None, {"batch_size": 0})
    with pytest.raises(UsageError, match="device"):
        load_config(None, {"device": "tpu"})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_checkpoint_round_trip_and_pruning(tmp_path):
    model = _model()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model, {"step": step, "rng": torch.get_rng_state()}, keep=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_000020", "step_000030"]
    restored = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = load_checkpoint(latest_checkpoint(tmp_path), restored)
    assert state["step"] == 30
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_half_written_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 10, _model(), {"step": 10}, keep=3)
    (tmp_path / ".tmp-step_000020-123").mkdir()  # what a run killed mid-write leaves
    assert latest_checkpoint(tmp_path).name == "step_000010"


@pytest.mark.parametrize("damage", ["truncate-model", "garbage-state", "missing-state"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    path = save_checkpoint(tmp_path, 10, _model(), {"step": 10}, keep=1)
    if damage == "truncate-model":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage-state":
        (path / "state.pt").write_bytes(b"not a checkpoint")
    else:
        (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=str(path)) as info:
        load_checkpoint(path, _model())
    assert "delete" in info.value.hint


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), {}, keep=1)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(3, 4)))


def test_a_checkpoint_with_other_input_adapters_names_the_option_that_rebuilds_them():
    assert mismatch_hint(["encoder.adapters.patch2d_1ch.weight", "encoder.adapters.patch2d_1ch.bias"]) == \
        "the checkpoint's input adapters are patch2d: resume with --model-option adapter2d=patch2d"
    assert "same plugins" in mismatch_hint(["heads.rotation.weight"])


def test_state_with_pickled_objects_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), {"step": 1}, keep=1)
    torch.save({"payload": Path("/etc/passwd")}, path / "state.pt")  # an arbitrary object, not tensors
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path, _model())


def test_fixed_weighting_is_a_weighted_sum():
    weighting = FixedWeighting({"a": 1.0, "b": 0.5})
    total = weighting({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
    assert total.item() == pytest.approx(4.0)


def test_uncertainty_weighting_learns_to_down_weight_the_larger_loss():
    weighting = UncertaintyWeighting({"small": 1.0, "large": 1.0})
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        weighting({"small": torch.tensor(0.1), "large": torch.tensor(10.0)}).backward()
        optimizer.step()
    weights = weighting.current_weights()
    assert weights["small"] > 5 * weights["large"]  # optimum: weight = 1 / loss
    assert weights["small"] == pytest.approx(10.0, rel=0.1)


def test_unknown_weighting_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown loss weighting 'magic'"):
        make_weighting("magic", {})


def test_warmup_then_cosine():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=20, min_ratio=0.1)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert rates[-1] == pytest.approx(0.1, abs=0.02)


def test_head_phase_then_a_fresh_warmup_for_the_whole_model():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = head_then_whole(optimizer, head_steps=10, head_scale=10.0, warmup_steps=4, total_steps=30)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(10.0)  # one warmup step (a tenth of 10), at the head's scale
    assert all(a >= b for a, b in zip(rates[:9], rates[1:10])) and rates[9] < 1.0
    assert rates[10:14] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the whole model warms up afresh
    assert all(a >= b for a, b in zip(rates[13:], rates[14:]))
    assert rates[-1] == pytest.approx(0.01, abs=0.01)


def test_metric_window_means_per_task_and_per_dataset():
    window = MetricWindow()
    window.add(("flat", {"rotation": {"loss": 1.0, "accuracy": 0.5}, "mae": {"loss": 0.2}}))
    window.add(("cube", {"rotation": {"loss": 3.0, "accuracy": 0.1}}))
    window.add(("flat", {"rotation": {"loss": 2.0, "accuracy": 1.0}}))
    assert window.losses() == {"mae": 0.2, "rotation": 2.0}
    assert window.overall()["rotation"] == pytest.approx({"loss": 2.0, "accuracy": 1.6 / 3})
    assert window.per_dataset() == {"mae": {"flat": {"loss": 0.2}},
                                    "rotation": {"cube": {"loss": 3.0, "accuracy": 0.1},
                                                 "flat": {"loss": 1.5, "accuracy": 0.75}}}
    restored = MetricWindow()
    restored.load_state_dict(window.state_dict())
    assert restored.per_dataset() == window.per_dataset()


def test_the_window_counts_each_task_and_datasets_batches():
    window = MetricWindow()
    for loss in (4.0, 3.0):
        window.add(("flat", {"rotation": {"loss": loss, "accuracy": 0.5}}))
    window.add(("cube", {"rotation": {"loss": 9.0}, "mae": {"loss": 1.0}}))
    assert window.batches() == {"mae": {"cube": 1}, "rotation": {"cube": 1, "flat": 2}}


def test_step_losses_average_the_batches_a_task_ran_on():
    outcomes = [("flat", {"mae": {"loss": 1.0}, "rotation": {"loss": 2.0}}), ("cube", {"rotation": {"loss": 4.0}})]
    assert step_losses(outcomes) == {"mae": 1.0, "rotation": 3.0}
