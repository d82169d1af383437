"""Steps to leave chance: how long a classification task of a real set sits at chance.

    python benchmarks/leave_chance.py --data-root ../shared/data/medmnist --dataset retinamnist \
        --plugin rotation --steps 600

Runs `medformer train` (the defaults: the `tiny` preset, batch 32, AdamW lr 1e-3, augmentation)
with one task on one dataset, reads its `metrics.jsonl` (per-dataset means over each 10 logged
steps) and prints one JSON line: the accuracy curve, the chance accuracy, and the first logged step
from which the accuracy stays above chance by more than `--margin` for three records in a row.

Chance: rotation 1/K (K = 4 in 2D, 24 in 3D); jigsaw 1/permutations; contrastive 1/(2B - 1);
slice-position 1/3 (the axis); supervised the majority class's share of the training labels.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHANCE = {"rotation": {2: 1 / 4, 3: 1 / 24}, "jigsaw": {2: 1 / 100, 3: 1 / 100}, "slice-position": {3: 1 / 3}}
METRIC = {"slice-position": "axis_accuracy"}


def chance_accuracy(task: str, dataset: str, spatial_dims: int, batch_size: int, data_root: str | None) -> float:
    if task == "contrastive":
        return 1 / (2 * batch_size - 1)
    if task == "supervised":  # the official MedMNIST file's training labels
        counts = np.bincount(np.load(Path(data_root) / f"{dataset}.npz")["train_labels"][:, 0])
        return float(counts.max() / counts.sum())
    return CHANCE[task][spatial_dims]


def steps_to_leave(curve: list[tuple[int, float]], chance: float, margin: float, streak: int = 3) -> int | None:
    """The first logged step from which `streak` records in a row lie above chance + margin."""
    for i in range(len(curve) - streak + 1):
        if all(accuracy > chance + margin for _, accuracy in curve[i:i + streak]):
            return curve[i][0]
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--plugin", required=True)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--task-option", action="append", default=[], metavar="TASK.OPTION=VALUE")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    name = f"{args.plugin}-{args.dataset}-s{args.seed}" + "".join(f"-{o}" for o in args.task_option)
    out = Path(args.out or tempfile.mkdtemp(prefix="leave-chance-")) / name
    command = [sys.executable, "-m", "medformer_cli.app", "train", "--plugin", args.plugin, "--dataset", args.dataset,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--knn-every", "0", "--quiet", "--out", str(out)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    for option in args.task_option:
        command += ["--task-option", option]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    metric = METRIC.get(args.plugin, "accuracy")
    curve = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        named = record.get("per_dataset", {}).get(args.plugin, {})
        if "losses" in record and named:
            values = next(iter(named.values()))
            curve.append((record["step"], round(values[metric], 3)))
    spatial_dims = 3 if "3d" in args.dataset else 2
    chance = chance_accuracy(args.plugin, args.dataset, spatial_dims, args.batch_size, args.data_root)
    print(json.dumps({"dataset": args.dataset, "task": args.plugin, "task_options": args.task_option,
                      "seed": args.seed, "chance": round(chance, 4),
                      "steps_to_leave_chance": steps_to_leave(curve, chance, args.margin),
                      "final_accuracy": curve[-1][1] if curve else None, "curve": curve}))


if __name__ == "__main__":
    main()
