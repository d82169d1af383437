"""Train the MedMNIST v2 ResNet-18 baseline on a MedMNIST dataset, in medformer's data and metrics harness.

    python benchmarks/cnn_baselines.py --dataset retinamnist --data-root ../shared/data/medmnist
    python benchmarks/cnn_baselines.py --dataset adrenalmnist3d --label-fraction 0.1 --seed 1 --epochs 100

Protocol of the paper (Yang et al. 2023) and its official experiment scripts: Adam lr 1e-3, batch
128, lr x0.1 after 50% and after 75% of the epochs, 100 epochs; val evaluated after every epoch,
the epoch with the best val AUC kept (ties keep the earlier epoch) and test evaluated once, on it.
No augmentation. 2D images are scaled to [-1, 1] (the paper's Normalize(0.5, 0.5)); 3D volumes
stay in [0, 1], as the paper's 3D loader gives them. (The official 3D script defaults to batch 32;
pass --batch-size 32 to match it.)

Losses per MedMNIST task type, as in the paper: multi-label -> binary cross-entropy on L logits
(sigmoid scores); binary, multi-class and ordinal-regression -> cross-entropy over the K classes
(softmax scores). The paper treats ordinal regression as multi-class, so this baseline does too,
where medformer's `supervised` task uses CORAL; the scores reach `medmnist_metrics` as [N, K].

The train split is `resolve_dataset(name, seed=seed, labeled=True, label_fraction=f)`: the same
stratified, seeded label subset medformer's fine-tuning sees. Val and test are complete.
A run directory holds `results.json` (the keys of a fine-tune run's results, mode "resnet18") and
`model.safetensors` (the best epoch's weights); a finished run is reused, not retrained.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from resnet import resnet18_for
from safetensors.torch import save_file
from torch import nn

from medformer_core.api.data import DatasetInfo, ImageSplit
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import MedformerError, UsageError
from medformer_core.engine.devices import resolve_device
from medformer_core.engine.evaluation import medmnist_metrics, predict_split
from medformer_plugins.task_supervised import MULTI_LABEL

MODE = "resnet18"
LR = 1e-3
MILESTONES = (0.5, 0.75)  # fractions of the epochs after which the lr is multiplied by 0.1


class Classifier(nn.Module):
    """ResNet-18 with the paper's input scaling and the task's scores; `predict` serves `predict_split`."""

    def __init__(self, info: DatasetInfo):
        super().__init__()
        self.spatial_dims = info.spatial_dims
        self.task = info.task
        self.net = resnet18_for(info.spatial_dims, info.channels, info.num_classes, info.size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: [B, C, *S] in [0, 1] -> logits [B, K]"""
        if self.spatial_dims == 2:
            image = image * 2.0 - 1.0  # Normalize(mean=0.5, std=0.5)
        return self.net(image)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits [B, K], labels [B, L] int64 -> BCE (multi-label) or cross-entropy (all other tasks)."""
        if self.task == MULTI_LABEL:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels[:, 0])

    def predict(self, batch: dict, task: str | None = None) -> torch.Tensor:
        """Scores [B, K] for MedMNIST's evaluator: sigmoid (multi-label) or softmax. `task` is unused."""
        logits = self(batch["image"])
        return torch.sigmoid(logits) if self.task == MULTI_LABEL else torch.softmax(logits, dim=1)


def load_splits(dataset: str, label_fraction: float, seed: int, data_root) -> tuple[ImageSplit, ImageSplit, ImageSplit]:
    """(train with the seeded label subset, full val, full test), as medformer's fine-tuning builds them."""
    factory, options = resolve_dataset(dataset, data_root=data_root, seed=seed, labeled=True,
                                       label_fraction=label_fraction)
    train = factory.build("train", options)
    if train.labels is None or train.info.task == "none":
        raise UsageError(f"dataset '{train.info.name}' has no labels to train on", hint="choose a MedMNIST dataset")
    full_factory, full = resolve_dataset(dataset, data_root=data_root, seed=seed, labeled=True)
    return train, full_factory.build("val", full), full_factory.build("test", full)


def learning_rate(epoch: int, epochs: int) -> float:
    """The lr of 1-based `epoch`: LR, x0.1 once 50% of the epochs are done, x0.01 once 75% are."""
    done = epoch - 1
    return LR / 10 ** sum(done >= fraction * epochs for fraction in MILESTONES)


def train_epoch(model: Classifier, train: ImageSplit, optimizer: torch.optim.Optimizer, order: np.ndarray,
                batch_size: int, device: torch.device) -> float:
    """One pass over `train` in `order` (the last batch may be smaller); the mean batch loss."""
    model.train()
    losses = []
    for start in range(0, len(order), batch_size):
        batch = train.batch(order[start:start + batch_size])
        image, label = batch["image"].to(device), batch["label"].to(device)  # [B, C, *S], [B, L]
        loss = model.loss(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def val_score(metrics: dict) -> float:
    """Model selection on val AUC; an undefined (NaN) AUC ranks lowest."""
    return -math.inf if math.isnan(metrics["auc"]) else metrics["auc"]


def reuse(path: Path, label_fraction: float, seed: int, epochs: int, batch_size: int) -> dict:
    """A finished run's results, if it was made with these settings."""
    results = json.loads(path.read_text())
    made = (results["label_fraction"], results["seed"], results["epochs"], results["batch_size"])
    if made != (label_fraction, seed, epochs, batch_size):
        raise UsageError(f"{path.parent} holds a run with (label fraction, seed, epochs, batch size) = {made}, "
                         f"not {(label_fraction, seed, epochs, batch_size)}", hint="choose another run directory")
    return results


def train_resnet(dataset: str, label_fraction: float, seed: int, epochs: int, data_root, run_dir,
                 device: str = "auto", batch_size: int = 128, quiet: bool = True) -> dict:
    """Train ResNet-18 on `dataset` with the MedMNIST v2 protocol; returns (and writes) results.json.

    A `run_dir` that already holds results.json is reused without training.
    """
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return reuse(run_dir / "results.json", label_fraction, seed, epochs, batch_size)
    torch.manual_seed(seed)
    target = resolve_device(device)
    train, val, test = load_splits(dataset, label_fraction, seed, data_root)
    model = Classifier(train.info).to(target)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    order_rng = np.random.default_rng(seed)
    best, best_state, history = None, None, []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, epochs)
        loss = train_epoch(model, train, optimizer, order_rng.permutation(len(train)), batch_size, target)
        train_seconds = time.perf_counter() - epoch_start
        val_metrics = medmnist_metrics(*predict_split(model, val, target), val.info.task)
        history.append({"epoch": epoch, "lr": learning_rate(epoch, epochs), "train_loss": loss, "val": val_metrics,
                        "train_seconds": train_seconds, "seconds": time.perf_counter() - epoch_start})
        if best is None or val_score(val_metrics) > val_score(best["val"]):
            best = {"epoch": epoch, "val": val_metrics}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if not quiet:
            print(f"epoch {epoch}/{epochs}: loss {loss:.4f}, val AUC {val_metrics['auc']:.3f} "
                  f"ACC {val_metrics['acc']:.3f}, {history[-1]['seconds']:.1f} s", flush=True)
    model.load_state_dict(best_state)
    test_metrics = medmnist_metrics(*predict_split(model, test, target), test.info.task)
    results = {
        "dataset": train.info.name, "task": train.info.task, "mode": MODE, "source": None,
        "label_fraction": label_fraction, "train_samples": len(train), "seed": seed, "epochs": epochs,
        "batch_size": batch_size, "best_epoch": best["epoch"], "val": best["val"], "test": test_metrics,
        "seconds": time.perf_counter() - start,
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])), "history": history,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(best_state, str(run_dir / "model.safetensors"))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a MedMNIST name, e.g. retinamnist, adrenalmnist3d")
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-root", default=None, help="default: $MEDFORMER_DATA_ROOT or ~/.medmnist")
    parser.add_argument("--out", default="runs/cnn-baselines", help="parent of the run directories (resumable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if not 0.0 < args.label_fraction <= 1.0 or args.epochs < 1 or args.batch_size < 1:
        parser.error("--label-fraction must be in (0, 1], --epochs and --batch-size >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.out) / f"{args.dataset}-{MODE}-{args.label_fraction:g}-seed{args.seed}-{args.epochs}ep"
    try:
        results = train_resnet(args.dataset, args.label_fraction, args.seed, args.epochs, args.data_root, run_dir,
                               device=args.device, batch_size=args.batch_size, quiet=False)
    except MedformerError as exc:
        sys.exit(f"error: {exc}")
    print(f"{run_dir}: test AUC {results['test']['auc']:.3f} ACC {results['test']['acc']:.3f} "
          f"(best epoch {results['best_epoch']}), {results['seconds_per_epoch']:.1f} s per epoch")


if __name__ == "__main__":
    main()
