"""The online kNN monitor: weighted kNN scores on hand-made features, each MedMNIST task type's
layout, the monitor on a tiny Medformer over fake MedMNIST files, and its plot."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.plugins import registries
from medformer_core.engine.evaluation import medmnist_metrics
from medformer_core.engine.knn import KnnMonitor, encode_split, knn_scores
from medformer_core.reporting.plots import plot_knn

TASK_SHAPES = [  # task type, K (classes or labels), label columns
    ("multi-class", 4, 1),
    ("binary-class", 2, 1),
    ("ordinal-regression", 5, 1),
    ("multi-label, binary-class", 3, 3),
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def random_bank(n: int, task: str, classes: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random unit features [n, 16] and labels [n, columns] of `task`."""
    generator = torch.Generator().manual_seed(seed)
    features = unit(torch.randn(n, 16, generator=generator))
    high = 2 if task.startswith("multi-label") else classes
    labels = np.random.default_rng(seed).integers(0, high, (n, columns))
    return features, labels


@pytest.mark.parametrize("task", ["multi-class", "binary-class", "ordinal-regression"])
def test_two_separated_clusters_are_classified_perfectly(task):
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:2] * 10  # class 0 around e0, class 1 around e1
    train_labels = np.repeat([0, 1], 10)[:, None]  # [20, 1]
    val_labels = np.repeat([0, 1], 5)[:, None]  # [10, 1]
    train = unit(centres[train_labels[:, 0]] + torch.randn(20, 8, generator=generator))
    val = unit(centres[val_labels[:, 0]] + torch.randn(10, 8, generator=generator))
    scores = knn_scores(train, train_labels, val, task, num_classes=2, k=5)
    assert medmnist_metrics(val_labels, scores, task) == {"auc": 1.0, "acc": 1.0}


@pytest.mark.parametrize("task, classes, columns", TASK_SHAPES)
def test_a_query_equal_to_a_training_point_gets_its_label_with_k1(task, classes, columns):
    features, labels = random_bank(30, task, classes, columns)
    scores = knn_scores(features, labels, features[[3, 17, 25]], task, classes, k=1)
    if task.startswith("multi-label"):
        expected = labels[[3, 17, 25]]
    else:
        expected = np.eye(classes)[labels[[3, 17, 25], 0]]
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    train = unit(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    query = unit(torch.tensor([[2.0, 1.0]]))  # similarity 2/sqrt(5) to class 0, 1/sqrt(5) to class 1
    scores = knn_scores(train, np.array([[0], [1]]), query, "multi-class", num_classes=3, k=2, temperature=0.5)
    w0, w1 = math.exp(2 / math.sqrt(5) / 0.5), math.exp(1 / math.sqrt(5) / 0.5)
    np.testing.assert_allclose(scores, [[w0 / (w0 + w1), w1 / (w0 + w1), 0.0]], rtol=1e-5)


@pytest.mark.parametrize("task, classes, columns", TASK_SHAPES)
def test_each_task_type_gets_medmnists_score_layout(task, classes, columns):
    features, labels = random_bank(40, task, classes, columns)
    queries, _ = random_bank(7, task, classes, columns, seed=1)
    scores = knn_scores(features, labels, queries, task, classes, k=10)
    assert scores.shape == (7, classes)
    assert np.all(scores >= 0) and np.all(scores <= 1 + 1e-6)
    if not task.startswith("multi-label"):
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    metrics = medmnist_metrics(labels[:7], scores, task)
    assert 0.0 <= metrics["acc"] <= 1.0


@pytest.mark.parametrize("task, classes, columns", TASK_SHAPES)
def test_k_beyond_the_train_set_uses_every_sample(task, classes, columns):
    features, labels = random_bank(3, task, classes, columns)
    queries, _ = random_bank(5, task, classes, columns, seed=1)
    scores = knn_scores(features, labels, queries, task, classes, k=20)
    np.testing.assert_allclose(scores, knn_scores(features, labels, queries, task, classes, k=3))


def test_unlabeled_task_types_and_mismatched_labels_are_refused():
    features, labels = random_bank(4, "multi-label, binary-class", 2, 3)
    with pytest.raises(ValueError, match="labeled task type"):
        knn_scores(features, labels, features, "none", 2)
    with pytest.raises(ValueError, match="3 columns"):
        knn_scores(features, labels, features, "multi-label, binary-class", 2)


@pytest.fixture
def fake_splits(tmp_path, fake_arrays):
    """fake_splits(name, train=40, val=24): labeled train and val splits of a fake MedMNIST file
    `name` (every class in val)."""

    def splits(name: str, train: int = 40, val: int = 24):
        np.savez(tmp_path / f"{name}.npz", **fake_arrays(name, counts={"train": train, "val": val, "test": 2}))
        factory, options = resolve_dataset(name, data_root=tmp_path, labeled=True)
        return factory.build("train", options), factory.build("val", options)

    return splits


@pytest.fixture
def rotation_model(tiny_model):
    """rotation_model(info): a tiny rotation model on dataset `info`."""
    return lambda info: tiny_model([registries().tasks.get("rotation")], [info])


@pytest.mark.parametrize("name", ["retinamnist", "chestmnist", "adrenalmnist3d"])  # ordinal, multi-label, 3D binary
def test_monitor_gives_finite_metrics_and_keeps_the_encoders_mode(name, fake_splits, rotation_model):
    train, val = fake_splits(name)
    model = rotation_model(train.info)
    monitor = KnnMonitor(train, val, max_train=20, k=5)
    model.train()
    metrics = monitor.evaluate(model.encoder, torch.device("cpu"))
    assert set(metrics) == {"auc", "acc"} and all(math.isfinite(v) for v in metrics.values())
    assert all(module.training for module in model.encoder.modules())
    model.eval()
    assert monitor.evaluate(model.encoder, torch.device("cpu")) == metrics
    assert not any(module.training for module in model.encoder.modules())


def test_monitor_recognises_its_own_train_samples_with_k1(fake_splits, rotation_model):
    """Val = train and k = 1: each sample's nearest neighbour is itself, so labels and features align."""
    train, _ = fake_splits("retinamnist")
    monitor = KnnMonitor(train, train, k=1)
    assert monitor.evaluate(rotation_model(train.info).encoder, torch.device("cpu"))["acc"] == 1.0


def test_monitor_subsamples_the_train_split_the_same_way_every_time(fake_splits):
    train, val = fake_splits("retinamnist")
    first, second = KnnMonitor(train, val, max_train=20), KnnMonitor(train, val, max_train=20)
    assert 15 <= len(first.train) <= 25
    np.testing.assert_array_equal(first.train.index, second.train.index)
    assert set(first.train.labels[:, 0]) == set(train.labels[:, 0])  # stratified: every class kept
    assert len(KnnMonitor(train, val, max_train=5000).train) == len(train)


def test_encode_split_gives_unit_features_without_gradients(fake_splits, rotation_model):
    train, _ = fake_splits("retinamnist", train=10)
    encoder = rotation_model(train.info).encoder
    features = encode_split(encoder, train, torch.device("cpu"), batch_size=4)
    assert features.shape == (10, encoder.config.embed_dim) and not features.requires_grad
    np.testing.assert_allclose(features.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_monitor_refuses_unlabeled_splits(fake_splits):
    train, val = fake_splits("retinamnist")
    with pytest.raises(ValueError, match="labeled"):
        KnnMonitor(train, val.subset(np.arange(0)))
    with pytest.raises(ValueError, match="labeled"):
        KnnMonitor(type(train)(train.info, train.images), val)


def test_plot_knn_draws_the_records_that_carry_knn(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 50, "losses": {"mae": 1.0}},
               {"step": 100, "knn": {"retinamnist": {"auc": 0.71, "acc": 0.5}}},
               {"step": 200, "knn": {"retinamnist": {"auc": float("nan"), "acc": 0.55}}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_knn(path, tmp_path / "plots")
    assert written == [tmp_path / "plots" / "knn.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text(json.dumps(records[0]) + "\n")
    assert plot_knn(path, tmp_path / "empty") == [] and not (tmp_path / "empty").exists()
