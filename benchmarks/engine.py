"""Engine overhead: `Trainer.train_step` against a bare torch loop over the same model and batches.

    python benchmarks/engine.py [--steps 30] [--rounds 3]

Both loops draw the same (dataset, indices) sequence, apply the same augmentation and losses and
take an AdamW step with clipping; the engine adds weighting, finiteness checks, bookkeeping,
scheduling and the progress/metrics path. Reports samples/s of each (best of `rounds`) and the
engine's overhead; the goal is <= 5%.
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from medformer_core.engine.config import RunConfig
from medformer_core.engine.trainer import Trainer


def bare_step(model, optimizer, split_batches, augment, generator, weights) -> int:
    """One plain-torch step; returns the samples it used."""
    dataset, batch = split_batches
    batch = dict(batch)
    batch["image"] = augment[batch["spatial_dims"]](batch["image"], generator)
    results = model(batch, generator)
    loss = sum(weights[name] * r.loss for name, r in results.items())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch["image"].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = RunConfig(steps=10_000, checkpoint_every=10_000, picture_every=10_000, log_every=10, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run", quiet=True)
        trainer.setup()
        sampler_state = trainer.sampler.state_dict()
        draws = [next(trainer.sampler) for _ in range(args.steps)]
        trainer.sampler.load_state_dict(sampler_state)
        batches = [(name, trainer.splits[name].batch(idx)) for name, idx in draws]
        bare_model = copy.deepcopy(trainer.model)
        bare_optimizer = torch.optim.AdamW(bare_model.parameters(), lr=config.lr)
        weights = {t.name: t.weight for t in trainer.tasks}
        engine_rates, bare_rates = [], []
        for _ in range(args.rounds):
            start, samples = time.perf_counter(), 0
            for b in batches:
                samples += bare_step(bare_model, bare_optimizer, b, trainer.augment, torch.Generator().manual_seed(0),
                                     weights)
            bare_rates.append(samples / (time.perf_counter() - start))
            trainer.sampler.load_state_dict(sampler_state)
            start, before = time.perf_counter(), trainer.samples
            for _ in range(args.steps):
                trainer.train_step()
            engine_rates.append((trainer.samples - before) / (time.perf_counter() - start))
    bare, engine = max(bare_rates), max(engine_rates)
    print(f"bare loop: {bare:.1f} samples/s; engine: {engine:.1f} samples/s; "
          f"engine overhead {100 * (bare / engine - 1):+.1f}% ({args.steps} steps, best of {args.rounds}, "
          f"{torch.get_num_threads()} threads, default run: {', '.join(trainer.config.plugins)} "
          f"on {', '.join(config.datasets)})")


if __name__ == "__main__":
    main()
