"""The ResNet-18 baseline: 2D/3D shapes, the paper's protocol pieces, and a tiny end-to-end run."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medformer_core.api.data import DatasetInfo, stratified_subset
from medformer_core.api.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from cnn_baselines import Classifier, learning_rate, train_resnet  # noqa: E402
from resnet import ResNet18, resnet18_for  # noqa: E402

COUNTS = {"train": 12, "val": 5, "test": 5}  # every one of the 5 classes in val and test
RESULT_KEYS = {"dataset", "task", "mode", "label_fraction", "seed", "epochs", "best_epoch", "val", "test",
               "seconds", "train_samples"}


@pytest.mark.parametrize("spatial_dims, channels, size, small_input", [
    (2, 5, 12, True), (2, 3, 40, False), (3, 1, 8, True), (3, 7, 17, False),
])
def test_forward_backward_shapes(spatial_dims, channels, size, small_input):
    torch.manual_seed(0)
    model = ResNet18(spatial_dims, channels, num_outputs=4, small_input=small_input)
    x = torch.randn(2, channels, *(size,) * spatial_dims)  # [B, C, *S]
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_counts_match_the_reference_resnet18():
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ResNet18(2, 3, 1000, small_input=False)) == 11_689_512  # torchvision resnet18
    assert count(ResNet18(2, 3, 10, small_input=True)) == 11_173_962  # kuangliu/pytorch-cifar ResNet18


def test_stem_follows_the_input_size():
    assert resnet18_for(2, 1, 2, (28, 28)).stem[0].kernel_size == (3, 3)
    assert resnet18_for(3, 1, 2, (28, 28, 28)).stem[0].stride == (1, 1, 1)
    large = resnet18_for(3, 1, 2, (64, 64, 64))
    assert large.stem[0].kernel_size == (7, 7, 7) and isinstance(large.stem[-1], torch.nn.MaxPool3d)


def test_learning_rate_drops_after_half_and_three_quarters():
    assert [learning_rate(e, 100) for e in (1, 50, 51, 75, 76, 100)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    assert learning_rate(1, 1) == 1e-3 and [learning_rate(e, 2) for e in (1, 2)] == pytest.approx([1e-3, 1e-4])


@pytest.mark.parametrize("task, labels", [
    ("ordinal-regression", torch.tensor([[0], [4]])),
    ("multi-label, binary-class", torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]])),
])
def test_losses_and_scores_per_task(task, labels):
    info = DatasetInfo("fake", 2, 1, (12, 12), task, {i: str(i) for i in range(5)})
    model = Classifier(info).eval()
    image = torch.rand(2, 1, 12, 12)
    assert torch.isfinite(model.loss(model(image), labels))
    scores = model.predict({"image": image})  # [B, 5]
    assert scores.shape == (2, 5) and ((scores >= 0) & (scores <= 1)).all()
    if task == "ordinal-regression":  # the paper's multi-class treatment: softmax over the classes
        assert torch.allclose(scores.sum(dim=1), torch.ones(2))


def test_train_resnet_writes_results_and_reuses_them(tmp_path, fake_arrays):
    data_root = tmp_path / "data"
    data_root.mkdir()
    arrays = fake_arrays("retinamnist", counts=COUNTS)
    np.savez_compressed(data_root / "retinamnist.npz", **arrays)
    run_dir = tmp_path / "run"
    results = train_resnet("retinamnist", 0.5, 1, 2, data_root, run_dir, device="cpu", batch_size=8)

    saved = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(saved) and saved["mode"] == "resnet18" and saved["task"] == "ordinal-regression"
    assert saved["train_samples"] == len(stratified_subset(arrays["train_labels"].astype(np.int64), 0.5, 1))
    assert saved["best_epoch"] in (1, 2) and len(saved["history"]) == 2
    assert all(math.isfinite(saved[split][metric]) for split in ("val", "test") for metric in ("auc", "acc"))
    assert (run_dir / "model.safetensors").stat().st_size > 0

    written = (run_dir / "results.json").stat().st_mtime_ns
    assert train_resnet("retinamnist", 0.5, 1, 2, data_root, run_dir, device="cpu", batch_size=8) == results
    assert (run_dir / "results.json").stat().st_mtime_ns == written
    with pytest.raises(UsageError, match="another run directory"):
        train_resnet("retinamnist", 0.5, 1, 3, data_root, run_dir, device="cpu", batch_size=8)
