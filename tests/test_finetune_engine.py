"""Fine-tuning on the training engine: data order, exact resume, head-only epochs (LP-FT), EMA, mixup
and label smoothing."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medformer_core.api.data import DatasetInfo
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import CheckpointError
from medformer_core.api.interfaces import View
from medformer_core.api.plugins import registries
from medformer_core.downstream.finetune import (
    PROBE_LR,
    FinetuneConfig,
    Finetuner,
    WeightEMA,
    build_finetune_model,
    epoch_sampler,
    load_finetuned,
    mixup,
    read_finetune_config,
)
from medformer_core.engine.builders import build_model
from medformer_core.model.medformer import ModelConfig
from medformer_plugins.heads import LabelHead

DATASET = "phantoms2d:size=16,count=40"  # train 40 (2 batches of 20), val 10, test 10
# 1 head-only epoch, then 3 epochs of the whole model, each of 2 steps; a validation (and a checkpoint)
# after each epoch; every option that has state.
RUN = ["--dataset", DATASET, "--head-epochs", "1", "--epochs", "3", "--batch-size", "20", "--eval-every", "1",
       "--device", "cpu", "--ema", "0.8", "--mixup", "0.4", "--label-smoothing", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny exported encoder (untrained) to fine-tune from."""
    factory, options = resolve_dataset(DATASET, labeled=True)
    info = factory.build("train", options).info
    config = ModelConfig(embed_dim=32, depth=1, heads=2, latents=8)
    model = build_model(config, [info], [registries().tasks.get("supervised")])
    return str(model.encoder.save_pretrained(tmp_path_factory.mktemp("encoder")))


def results_without_time(run) -> dict:
    results = json.loads((run / "results.json").read_text())
    results.pop("seconds")
    return results


def records(run) -> list[dict]:
    found = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "step_seconds")} for r in found]


def assert_same_run(got, expected) -> None:
    """Same results (val, test, best epoch, history), same saved weights, same metrics records."""
    assert results_without_time(got) == results_without_time(expected)
    ours, theirs = load_file(str(got / "model.safetensors")), load_file(str(expected / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert records(got) == records(expected)


# data order


def test_each_epoch_is_a_permutation_in_full_batches():
    sampler = epoch_sampler("x", 128, 64, seed=3)
    epoch = [next(sampler)[1] for _ in range(2)]
    assert [len(b) for b in epoch] == [64, 64]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(128))
    assert not np.array_equal(np.concatenate(epoch), np.concatenate([next(sampler)[1] for _ in range(2)]))


def test_a_tail_is_spread_over_even_batches():
    sampler = epoch_sampler("x", 66, 64, seed=0)
    assert sampler.steps_per_epoch() == 2
    epoch = [next(sampler)[1] for _ in range(2)]
    assert [len(b) for b in epoch] == [33, 33]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(66))
    assert [len(next(sampler)[1]) for _ in range(3)] == [33, 33, 33]


def test_a_set_smaller_than_a_batch_is_one_batch_of_everything():
    sampler = epoch_sampler("x", 30, 64, seed=0)
    assert sampler.steps_per_epoch() == 1
    assert sorted(next(sampler)[1].tolist()) == list(range(30))


def test_ranks_read_disjoint_shards():
    ranks = [epoch_sampler("x", 130, 64, seed=0, rank=r, world_size=2) for r in (0, 1)]
    first, second = ([next(s)[1] for _ in range(2)] for s in ranks)  # 65 per rank: batches of 32 and 33
    assert [len(b) for b in first] == [len(b) for b in second] == [32, 33]
    assert not set(np.concatenate(first).tolist()) & set(np.concatenate(second).tolist())


# exact resume


@pytest.fixture(scope="module")
def uninterrupted(encoder, tmp_path_factory):
    """The reference: RUN without interruption."""
    config = FinetuneConfig(dataset=DATASET, source=encoder, head_epochs=1, epochs=3, batch_size=20, eval_every=1,
                            device="cpu", ema=0.8, mixup=0.4, label_smoothing=0.1)
    run = tmp_path_factory.mktemp("uninterrupted")
    Finetuner(config, run, quiet=True).run()
    return run


# Runs the CLI, but SIGKILLs itself when asked to write the checkpoint of step $KILL_AT_STEP.
KILLED_RUN = """
import os, signal, sys
from medformer_core.engine import loop as engine
write = engine.save_checkpoint
def write_or_die(root, step, *args, **kwargs):
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(root, step, *args, **kwargs)
engine.save_checkpoint = write_or_die
from medformer_cli.app import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_same_results(tmp_path, run_cli, encoder, uninterrupted):
    run = tmp_path / "run"
    env = {**os.environ, "KILL_AT_STEP": "4", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "finetune", *RUN, "--from", encoder,
                             "--out", str(run)], env=env, capture_output=True, text=True, timeout=300)
    # Killed after validating epoch 2, before its checkpoint: the last one is epoch 1's, the head-only
    # epoch, so the resumed run must unfreeze the encoder where the uninterrupted one did.
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (run / "results.json").exists()
    code, _, err = run_cli("finetune", "--resume", "--out", str(run))  # the rest comes from finetune.toml
    assert code == 0, err
    assert_same_run(run, uninterrupted)


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, run_cli, encoder, uninterrupted, monkeypatch):
    run = tmp_path / "run"
    after_step = Finetuner.after_step

    def terminate_at_step_3(self, losses):
        after_step(self, losses)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Finetuner, "after_step", terminate_at_step_3)
    code, _, err = run_cli("finetune", *RUN, "--from", encoder, "--out", str(run))
    assert code == 143
    assert "Stopped by SIGTERM at step 3" in err and "--resume" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step_000003").is_dir()
    monkeypatch.setattr(Finetuner, "after_step", after_step)
    code, _, err = run_cli("finetune", "--resume", "--out", str(run))
    assert code == 0, err
    assert_same_run(run, uninterrupted)


def test_a_pretrained_finetune_records_its_default_lr_and_layer_decay(uninterrupted):
    results = json.loads((uninterrupted / "results.json").read_text())
    assert (results["lr"], results["layer_decay"]) == (1e-3, 0.75)


def test_a_finetune_writes_metrics_and_the_loss_plot(uninterrupted):
    found = records(uninterrupted)
    assert [r["step"] for r in found if "losses" in r] == [2, 4, 6, 8]  # one train record per epoch
    assert [r["epoch"] for r in found if "val" in r] == [1, 2, 3, 4]
    results = json.loads((uninterrupted / "results.json").read_text())
    assert [h["val"] for h in results["history"]] == [r["val"] for r in found if "val" in r]
    assert results["val"] == results["history"][results["best_epoch"] - 1]["val"]
    assert (uninterrupted / "plots" / "losses.png").is_file()


# head-only epochs (LP-FT)


def test_head_epochs_train_the_head_alone_then_the_whole_model(tmp_path, encoder):
    config = FinetuneConfig(dataset=DATASET, source=encoder, head_epochs=1, epochs=1, batch_size=20, eval_every=1,
                            device="cpu")
    finetuner = Finetuner(config, tmp_path, quiet=True)
    results = finetuner.run()
    factory, options = resolve_dataset(DATASET, labeled=True)
    loaded = build_finetune_model(config, factory.build("train", options).info).state_dict()
    after_head, after_whole = (load_file(str(tmp_path / "checkpoints" / f"step_00000{step}" / "model.safetensors"))
                               for step in (2, 4))
    # The encoder's weights; the intensity statistics of a dataset new to it are set by its first batch.
    encoder_keys = [k for k in loaded if k.startswith("encoder.") and not k.startswith("encoder.intensity.")]
    head_keys = [k for k in loaded if k.startswith("outputs.")]
    assert encoder_keys and head_keys
    assert all(torch.equal(after_head[k], loaded[k]) for k in encoder_keys)
    assert not all(torch.equal(after_head[k], loaded[k]) for k in head_keys)
    assert not all(torch.equal(after_whole[k], after_head[k]) for k in encoder_keys)
    assert (results["head_epochs"], results["epochs"], len(results["history"])) == (1, 1, 2)
    assert all(p.requires_grad for p in finetuner.model.parameters())


def test_head_epochs_train_the_head_at_the_linear_probe_lr(tmp_path, encoder):
    config = FinetuneConfig(dataset=DATASET, source=encoder, head_epochs=2, epochs=3, batch_size=20, device="cpu")
    finetuner = Finetuner(config, tmp_path, quiet=True)
    finetuner.setup()
    assert max(group["lr"] for group in finetuner.optimizer.param_groups) == pytest.approx(PROBE_LR)
    assert finetuner.total_steps == 2 * (2 + 3)


# EMA


def test_weight_ema_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.5)
    for value, expected in ((3.0, 2.0), (5.0, 3.5)):  # 0.5 * 1 + 0.5 * 3 = 2; 0.5 * 2 + 0.5 * 5 = 3.5
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        assert ema.model.weight.item() == expected
    assert model.weight.item() == 5.0 and not ema.model.weight.requires_grad


def test_validation_and_the_saved_model_use_the_ema_weights(tmp_path, encoder):
    config = FinetuneConfig(dataset=DATASET, source=encoder, epochs=1, batch_size=20, device="cpu", ema=0.5)
    results = Finetuner(config, tmp_path, quiet=True).run()
    checkpoint = tmp_path / "checkpoints" / "step_000002"
    state = torch.load(checkpoint / "state.pt", weights_only=True)["run"]
    saved, live = load_file(str(tmp_path / "model.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert results["best_epoch"] == 1 and state["best"]["epoch"] == 1
    assert all(torch.equal(saved[k], state["ema"][k]) for k in saved)
    assert not all(torch.equal(saved[k], live[k]) for k in saved)  # the EMA, not the trained weights


def test_weights_that_do_not_fit_the_model_name_a_missing_key(tmp_path, uninterrupted):
    factory, options = resolve_dataset(DATASET, labeled=True)
    info = factory.build("train", options).info
    shutil.copytree(uninterrupted, tmp_path / "run")
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    key = next(k for k in weights if k.endswith("head.linear.weight"))  # as from a model built otherwise
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"it lacks {key}"):
        load_finetuned(tmp_path / "run", info)


def test_head_batch_norm_reaches_the_label_head():
    factory, options = resolve_dataset(DATASET, labeled=True)
    info = factory.build("train", options).info
    head = lambda **flags: build_finetune_model(FinetuneConfig(dataset=DATASET, **flags), info).outputs[  # noqa: E731
        "supervised"][info.name].head
    assert head().center is None
    assert isinstance(head(head_batch_norm=True).center, torch.nn.BatchNorm1d)


def test_the_head_batch_norm_takes_a_batch_of_one_with_its_running_statistics():
    head = LabelHead(8, 3, batch_norm=True).train()
    head(torch.randn(4, 2, 8))  # features [B, Q, E]: updates the running statistics
    one = torch.randn(1, 2, 8)
    trained = head(one)
    assert torch.allclose(trained, head.eval()(one))


# mixup and label smoothing


@pytest.mark.parametrize("spatial", [(2, 2), (2, 2, 2)])
def test_mixup_mixes_images_with_their_partner(spatial):
    image = torch.stack([torch.zeros(1, *spatial), torch.ones(1, *spatial)])  # [2, 1, *S]: 0s and 1s
    mixed = mixup({"image": image, "label": torch.tensor([[0], [1]])}, torch.tensor([1, 0]), 0.75)
    assert torch.allclose(mixed["image"][0], torch.full((1, *spatial), 0.25))
    assert torch.allclose(mixed["image"][1], torch.full((1, *spatial), 0.75))
    assert mixed["mixup"][1] == 0.75 and torch.equal(mixed["label"], torch.tensor([[0], [1]]))


def supervised_loss(kind: str, logits, labels, mix=None, label_smoothing: float = 0.0) -> float:
    task = registries().tasks.get("supervised").with_options(label_smoothing=label_smoothing)
    ctx = SimpleNamespace(info=DatasetInfo("d", 2, 1, (8, 8), kind, {0: "a", 1: "b"}))
    return task.loss(ctx, torch.tensor(logits), View(None, target=(torch.tensor(labels), mix))).loss.item()


def test_mixup_mixes_the_cross_entropy_targets():
    # Targets [0.75, 0.25] and [0.25, 0.75]: loss = -(0.75 * log p0 + 0.25 * log p1) for logits [2, 0],
    # where log p0 = 2 - L, log p1 = -L, L = log(e^2 + 1); the second row (logits 0) costs log 2.
    lse = math.log(math.exp(2.0) + 1.0)
    expected = (-(0.75 * (2.0 - lse) + 0.25 * -lse) + math.log(2.0)) / 2
    got = supervised_loss("multi-class", [[2.0, 0.0], [0.0, 0.0]], [[0], [1]], (torch.tensor([1, 0]), 0.75))
    assert got == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_of_the_cross_entropy():
    # eps 0.2 over 2 classes: target [0.9, 0.1]; loss = -(0.9 * (2 - L) + 0.1 * -L) = L - 1.8.
    lse = math.log(math.exp(2.0) + 1.0)
    smoothed = supervised_loss("binary-class", [[2.0, 0.0]], [[0]], label_smoothing=0.2)
    assert smoothed == pytest.approx(lse - 1.8, rel=1e-6)
    assert supervised_loss("binary-class", [[2.0, 0.0]], [[0]]) == pytest.approx(lse - 2.0, rel=1e-6)


def test_label_smoothing_of_bce_targets_goes_toward_one_half():
    # eps 0.2: a positive becomes 0.9, a negative 0.1, for each label column.
    logits, labels = [[2.0, -1.0]], [[1, 0]]
    expected = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor([[0.9, 0.1]])).item()
    assert supervised_loss("multi-label, binary-class", logits, labels, label_smoothing=0.2) == pytest.approx(expected)
    by_hand = -(0.9 * math.log(1 / (1 + math.exp(-2))) + 0.1 * math.log(1 - 1 / (1 + math.exp(-2))))
    by_hand += -(0.1 * math.log(1 / (1 + math.exp(1))) + 0.9 * math.log(1 - 1 / (1 + math.exp(1))))
    assert expected == pytest.approx(by_hand / 2, rel=1e-6)


@pytest.mark.parametrize("option, value, message", [
    ("--label-smoothing", "1", "--label-smoothing must be in [0, 1), got 1.0 (0.1 is usual"),
    ("--ema", "1.5", "--ema must be in [0, 1), got 1.5 (a decay such as 0.999"),
    ("--mixup", "-0.2", "--mixup must be >= 0, got -0.2 (it is the Beta(alpha, alpha) parameter"),
    ("--head-epochs", "2", "--head-epochs trains the head of a pretrained encoder alone before fine-tuning it "
                           "(use it with --from and without --linear-probe)"),
])
def test_bad_finetune_options_are_one_line_errors(tmp_path, run_cli, option, value, message):
    code, out, err = run_cli("finetune", "--dataset", DATASET, f"{option}={value}", "--out", str(tmp_path / "run"))
    assert code == 2 and message in err and "Traceback" not in err + out


def test_resume_needs_a_checkpoint_and_a_dataset_is_required(tmp_path, run_cli):
    code, _, err = run_cli("finetune", "--epochs", "1")
    assert code == 2 and "--dataset is required" in err
    code, _, err = run_cli("finetune", "--resume", "--out", str(tmp_path))
    assert code == 2 and "is not a fine-tune run (no finetune.toml)" in err


def test_model_options_shape_a_from_scratch_model_and_are_read_back(tmp_path, run_cli):
    run = tmp_path / "run"
    options = ["--model-option", "adapter2d=patch2d", "--model-option", "latent_pool=false",
               "--model-option", "embed_dim=32", "--model-option", "heads=2", "--model-option", "depth=1"]
    code, _, err = run_cli("finetune", "--dataset", DATASET, "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                           "--quiet", *options, "--out", str(run))
    assert code == 0, err
    config = read_finetune_config(run / "finetune.toml")
    assert config.model_options == {"adapter2d": "patch2d", "latent_pool": False, "embed_dim": 32, "heads": 2,
                                    "depth": 1}
    weights = load_file(str(run / "model.safetensors"))
    assert "encoder.adapters.patch2d_1ch.weight" in weights and weights["encoder.latents"].shape[1] == 32
    code, _, err = run_cli("eval", str(run), "--split", "val", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("finetune", "--dataset", DATASET, "--model-option", "latent_poool=false",
                           "--out", str(tmp_path / "bad"))
    assert code == 2 and "unknown model option 'latent_poool'" in err and "latent_pool" in err
