"""Can the Medformer fit its own training set? A model preset on the first N labeled train images of a
dataset, full batch, real labels, no augmentation: the training loss against the label prior's
entropy, and the gradient that reaches the encoder.

    python benchmarks/fit_check.py --dataset adrenalmnist3d --data-root ../shared/data/medmnist
    python benchmarks/fit_check.py --dataset adrenalmnist3d --data-root ../shared/data/medmnist \
        --head-batch-norm

AdamW (lr 1e-3, weight decay 0.05), 10 warmup steps then cosine, the `supervised` task's loss.
`--head-batch-norm` adds the label head's batch norm (`medformer finetune --head-batch-norm`). Prints one JSON
line: the prior's entropy, the loss at the first step and every 10th, the median of the last 5, and
the encoder's gradient norm at steps 0, 10 and the last.
"""

import argparse
import json
import math
import sys

import numpy as np
import torch

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import MedformerError
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.engine.schedule import warmup_cosine
from medformer_plugins.task_supervised import MULTI_LABEL, ORDINAL


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def prior_entropy(labels: np.ndarray, task: str, classes: int) -> float:
    """The loss of a model that predicts the label prior: labels [N, L]."""
    if task == MULTI_LABEL:
        return float(binary_entropy(labels.mean(0)).mean())
    if task == ORDINAL:  # CORAL: one BCE per threshold k, on P(y > k)
        return float(binary_entropy(np.array([(labels[:, 0] > k).mean() for k in range(classes - 1)])).mean())
    frequencies = np.bincount(labels[:, 0], minlength=classes) / len(labels)
    return float(-sum(f * math.log(f) for f in frequencies if f > 0))


def encoder_gradient(model: torch.nn.Module) -> float:
    return math.sqrt(sum(p.grad.square().sum().item() for p in model.encoder.parameters() if p.grad is not None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--head-batch-norm", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        factory, options = resolve_dataset(args.dataset, data_root=args.data_root, labeled=True)
        train = factory.build("train", options)
    except MedformerError as error:
        sys.exit(f"error: {error}")
    info = train.info
    batch = {**train.batch(range(min(args.samples, len(train)))), "dataset": info.name}
    torch.manual_seed(0)
    task = registries().tasks.get("supervised").with_options(batch_norm=args.head_batch_norm)
    model = build_model(args.model, [info], [task])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, 10, args.steps)
    generator = torch.Generator().manual_seed(0)
    losses, gradients = [], {}
    for step in range(args.steps):
        loss = model(batch, generator)["supervised"].loss
        optimizer.zero_grad()
        loss.backward()
        if step in (0, 10, args.steps - 1):
            gradients[step] = round(encoder_gradient(model), 6)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    print(json.dumps({
        "dataset": info.name, "model": args.model, "samples": len(batch["label"]), "steps": args.steps,
        "head_batch_norm": args.head_batch_norm,
        "prior_entropy": round(prior_entropy(batch["label"].numpy(), info.task, info.num_classes), 4),
        "loss_every_10": [round(v, 4) for v in losses[::10]], "final_loss": round(float(np.median(losses[-5:])), 4),
        "encoder_gradient": gradients,
    }))


if __name__ == "__main__":
    main()
