"""Training-step benchmark: the `small` multitask model on 64^3 volumes, Triton kernels against torch.

    python benchmarks/train_step.py --json train_step.json          # a GPU; bf16 autocast as `medformer train`
    python benchmarks/train_step.py --device cpu --batch 2 --steps 2  # the harness itself, on CPU

One process builds the model once and times AdamW steps (the default tasks that take volumes: mae3d,
rotation, contrastive, on a batch of 3D phantoms) with `MEDFORMER_KERNELS=torch` and `=triton` in turn: the
dispatch reads the variable at every call, so both backends run the same weights and batches. Each
backend gets warm-up steps (compilation) and its median step is reported; rounds alternate the
backends so drift on a shared machine hits both. On CPU `triton` is not timed (the kernels need a GPU).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from medformer_core.api.data import DatasetOptions
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_kernels.backend import BACKEND_ENV

TASKS = ("mae3d", "rotation", "contrastive")  # the default tasks that take 3D input


def measure(device: torch.device, model_name: str, size: int, batch_size: int, steps: int, warmup: int,
            rounds: int) -> dict:
    """Median seconds per step for each backend, and the speedup of triton over torch."""
    datasets = registries().datasets
    options = DatasetOptions(argument=f"size={size},count={batch_size}")
    info = datasets.get("phantoms3d").info(options)
    torch.manual_seed(0)
    model = build_model(model_name, [info], [registries().tasks.get(name) for name in TASKS]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = datasets.get("phantoms3d").build("train", options).batch(range(batch_size))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(result.loss for result in model(batch, generator).values())
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    times = {name: [] for name in backends}
    for name in backends:
        os.environ[BACKEND_ENV] = name
        for _ in range(warmup):
            step()
    for _ in range(rounds):
        for name in backends:
            os.environ[BACKEND_ENV] = name
            times[name].extend(step() for _ in range(steps))
    os.environ.pop(BACKEND_ENV, None)
    result = {"model": model_name, "size": size, "batch": batch_size, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "step_s": {name: statistics.median(values) for name, values in times.items()}}
    if "triton" in result["step_s"]:
        result["speedup"] = result["step_s"]["torch"] / result["step_s"]["triton"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=64, help="volume edge (voxels)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = measure(torch.device(args.device), args.model, args.size, args.batch, args.steps, args.warmup,
                     args.rounds)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
