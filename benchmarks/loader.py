"""Is the data loader the bottleneck? Samples/s of the input pipeline (read, collate, augment) beside
the training samples/s of the `tiny` Medformer on the same batches, for 28^2, 28^3 and 64^3 inputs.

    python benchmarks/loader.py --data-root ../shared/data/medmnist [--batch-size 32] [--steps 5]

Reads the real MedMNIST files when present (retinamnist, adrenalmnist3d, adrenalmnist3d_64; the 64^3
images are memory-mapped from the extraction cache) and synthetic phantoms of the same shape
otherwise. The pipeline is the engine's: `MultiDatasetSampler` -> `ImageSplit.batch` -> `Augment`,
timed both with the engine's light augmentation and with every augmentation on. The model step is
forward, backward and AdamW over the default pretext tasks that accept the input, in one process
on the CPU threads torch uses (the engine loads batches in the training process too).
"""

import argparse
import time
from pathlib import Path

import torch

from medformer_core.api.datasets import default_data_root, resolve_dataset
from medformer_core.api.plugins import registries
from medformer_core.engine.augment import Augment
from medformer_core.engine.builders import build_model
from medformer_core.engine.config import DEFAULT_TASKS
from medformer_core.engine.sampling import MultiDatasetSampler
from medformer_core.engine.trainer import base_augment

CASES = [  # (label, MedMNIST file, phantom stand-in with the same shape)
    ("28^2", "retinamnist", "phantoms2d:size=28,channels=3,count=1024"),
    ("28^3", "adrenalmnist3d", "phantoms3d:size=28,count=512"),
    ("64^3", "adrenalmnist3d_64", "phantoms3d:size=64,count=256"),
]


def load(name: str, stand_in: str, root: Path):
    ref = name if (root / f"{name}.npz").is_file() else stand_in
    factory, options = resolve_dataset(ref, data_root=root, labeled=False)
    return ref, factory.build("train", options)


def loader_rate(split, augment: Augment, batch_size: int, batches: int) -> float:
    """Samples/s of sampler + batch gather (uint8 -> float) + augmentation."""
    sampler = MultiDatasetSampler({split.info.name: split}, batch_size, seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: page cache, allocator
        augment(split.batch(next(sampler)[1])["image"], generator)
    start = time.perf_counter()
    for _ in range(batches):
        _, indices = next(sampler)
        batch = split.batch(indices)
        batch["image"] = augment(batch["image"], generator)
    return batches * batch_size / (time.perf_counter() - start)


def model_rate(split, batch_size: int, steps: int) -> tuple[float, list[str]]:
    """Samples/s of a training step of the tiny model over the default tasks accepting the input."""
    info = split.info
    tasks = [t for t in (registries().tasks.get(n) for n in DEFAULT_TASKS) if t.reject_reason(info, [info]) is None]
    torch.manual_seed(0)
    model = build_model("tiny", [info], tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = split.batch(range(batch_size))

    def step():
        results = model(batch, generator)
        loss = sum(r.loss for r in results.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start), [t.name for t in tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="loader batches timed per case")
    parser.add_argument("--steps", type=int, default=3, help="model steps timed per case")
    args = parser.parse_args()
    root = default_data_root(args.data_root)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, data root {root}")
    header = (f"{'input':6} {'dataset':20} {'loader (engine aug)':>20} {'loader (all aug)':>17} "
              f"{'model step':>11} {'ratio':>7}  tasks")
    print(header)
    for label, name, stand_in in CASES:
        ref, split = load(name, stand_in, root)
        dims = split.info.spatial_dims
        light = loader_rate(split, base_augment(dims), args.batch_size, args.batches)
        heavy = loader_rate(split, Augment(dims), args.batch_size, args.batches)
        model, tasks = model_rate(split, args.batch_size, args.steps)
        print(f"{label:6} {ref.split(':')[0]:20} {light:16.0f} s/s {heavy:13.0f} s/s {model:7.1f} s/s "
              f"{min(light, heavy) / model:6.1f}x  {', '.join(tasks)}", flush=True)
    print("s/s = samples per second; ratio = slower loader / model step (target >= 3x)")


if __name__ == "__main__":
    main()
