"""The training engine: one Medformer, several datasets and pretext tasks, one loop.

Each step the multitask sampler picks one dataset, the engine augments the batch, every task that
accepts that dataset computes its loss, and the weighting combines them. The run directory holds
the resolved config, `metrics.jsonl`, loss plots, task pictures, checkpoints and the exported
encoder. SIGINT/SIGTERM finish the step, checkpoint and exit; `--resume` continues exactly.
"""

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from medformer_core.augment import Augment
from medformer_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from medformer_core.config import RunConfig, write_config
from medformer_core.data import ImageSplit
from medformer_core.datasets import resolve_dataset
from medformer_core.distributed import DistInfo, any_rank, init_distributed, shutdown_distributed
from medformer_core.errors import TrainingError, UsageError
from medformer_core.multitask import MultitaskModel, build_multitask_model, check_tasks_accept
from medformer_core.plots import plot_task_losses
from medformer_core.plugins import registries
from medformer_core.progress import TrainingProgress
from medformer_core.sampling import MultiDatasetSampler
from medformer_core.schedule import warmup_cosine
from medformer_core.weighting import make_weighting

PICTURE_SAMPLES = 4


@dataclass
class RunSummary:
    """What a finished (or interrupted) run did."""

    run_dir: Path
    steps: int  # the step reached
    samples: int  # samples seen in this session (not before a resume)
    seconds: float
    first_losses: dict[str, float] = field(default_factory=dict)
    last_losses: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None


class LossWindow:
    """Running means of each task's loss since the last log line."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in sorted(self.sums)}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


def base_augment(spatial_dims: int) -> Augment:
    """The engine's light augmentation before every task: crops and intensity only. No flips or
    90-degree turns: they would make the rotation and jigsaw targets ambiguous; tasks that want
    heavy views (contrastive) augment on their own."""
    return Augment(spatial_dims, flip_prob=0.0, rot90=False, crop_scale=(0.7, 1.0), intensity=0.1,
                   noise_std=0.0, blur_prob=0.0)


def export_atomically(encoder, directory: Path) -> None:
    """`encoder.save_pretrained(directory)` through a temporary directory and renames."""
    tmp, old = directory.with_name(f".{directory.name}-tmp"), directory.with_name(f".{directory.name}-old")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)


def configured_tasks(config: RunConfig) -> list:
    """The run's pretext tasks with their options and weights applied."""
    tasks = []
    for name in config.plugins:
        task = registries().tasks.get(name)
        options = dict(config.tasks.get(name, {}))
        if name in config.task_weights:
            options["weight"] = config.task_weights[name]
        tasks.append(task.with_options(**options) if options else task)
    for name in list(config.tasks) + list(config.task_weights):
        if name not in config.plugins:
            raise UsageError(f"options given for task '{name}', which is not in this run",
                             hint=f"add --plugin {name}, or remove its options")
    return tasks


def load_train_splits(config: RunConfig, labeled: bool, rank: int = 0, split: str = "train") -> dict[str, ImageSplit]:
    """Build the `split` of every dataset of the run, keyed by dataset name."""
    splits: dict[str, ImageSplit] = {}
    for ref in config.datasets:
        factory, options = resolve_dataset(ref, data_root=config.data_root, seed=config.seed, labeled=labeled)
        data = factory.build(split, options)
        if data.info.name in splits:
            raise UsageError(f"dataset '{data.info.name}' is given twice", hint="list each dataset once")
        splits[data.info.name] = data
    return splits


class Trainer:
    """Runs one pretraining run described by a `RunConfig` into `run_dir`."""

    def __init__(self, config: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False):
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.quiet = quiet
        self.stop_requested: str | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.device = resolve_device(config.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._check_run_dir()
        torch.manual_seed(config.seed)
        self.tasks = configured_tasks(config)
        needs_labels = any(task.needs_labels for task in self.tasks)
        self.splits = load_train_splits(config, labeled=needs_labels)
        infos = [split.info for split in self.splits.values()]
        check_tasks_accept(self.tasks, infos)
        self.model: MultitaskModel = build_multitask_model(config.model, infos, self.tasks, **config.model_options).to(self.device)
        self.weighting = make_weighting(config.weighting, {t.name: t.weight for t in self.tasks}).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
        self.total_steps = self._total_steps()
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, self.total_steps, config.min_lr_ratio)
        self.sampler = MultiDatasetSampler(
            self.splits, config.batch_size,
            temperature=config.temperature, seed=config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        # Task and augmentation randomness (CPU generator: the same stream on any device).
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.dist.rank)
        self.augment = {dims: base_augment(dims) for dims in {info.spatial_dims for info in infos}}
        self.forward_model = self.model
        if self.dist.enabled:
            self.forward_model = DistributedDataParallel(self.model, find_unused_parameters=True)
        self.step = 0
        self.samples = 0
        if self.resume:
            self._restore()
        self.writer = self._tensorboard() if self.dist.is_main else None

    def _check_run_dir(self) -> None:
        has_checkpoint = latest_checkpoint(self.checkpoint_root) is not None
        if self.resume and not has_checkpoint:
            raise UsageError(f"--resume: no checkpoint in {self.checkpoint_root}",
                             hint="start without --resume, or point --out at the run to continue")
        if not self.resume and has_checkpoint:
            raise UsageError(f"run directory {self.run_dir} already holds checkpoints",
                             hint="pass --resume to continue it, or choose another --out")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.config, self.run_dir / "config.toml")

    def _param_groups(self) -> list[dict]:
        """No weight decay on biases, norms, embeddings and latent/query tokens (1-D or named so)."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            plain = param.ndim <= 1 or "embed" in name or "latent" in name or "query" in name
            (no_decay if plain else decay).append(param)
        no_decay += list(self.weighting.parameters())
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _total_steps(self) -> int:
        config = self.config
        if config.epochs is None:
            return config.steps
        samples = sum(len(split) for split in self.splits.values())
        per_step = config.batch_size * config.accumulate * self.dist.world_size
        return max(1, math.ceil(config.epochs * samples / per_step))

    def _tensorboard(self):
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package",
                             hint="pip install 'medformer[tensorboard]'") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- checkpoints ------------------------------------------------------------------------------

    def _training_state(self) -> dict:
        state = {
            "step": self.step,
            "samples": self.samples,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = save_checkpoint(self.checkpoint_root, self.step, self.model, self._training_state(),
                               keep=self.config.keep_checkpoints)
        export_atomically(self.model.encoder, self.run_dir / "encoder")
        return path

    def _restore(self) -> None:
        path = latest_checkpoint(self.checkpoint_root)
        state = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.samples = state["step"], state["samples"]

    # -- the loop ---------------------------------------------------------------------------------

    def train_step(self) -> tuple[str, dict[str, float]]:
        """One optimizer step over `accumulate` batches; returns the dataset and each task's loss."""
        self.forward_model.train()
        losses_out: dict[str, float] = {}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for micro in range(self.config.accumulate):
            dataset, indices = next(self.sampler)
            batch = self._to_device(self.splits[dataset].batch(indices))
            if self.config.augment:
                batch["image"] = self.augment[batch["spatial_dims"]](batch["image"], self.generator)
            with autocast:
                results = self.forward_model(batch, self.generator)
            losses = {name: result.loss.float() for name, result in results.items()}
            self._check_finite(losses, dataset)
            total = self.weighting(losses) / self.config.accumulate
            total.backward()
            for name, loss in losses.items():
                losses_out[name] = losses_out.get(name, 0.0) + loss.item() / self.config.accumulate
            self.samples += len(indices) * self.dist.world_size
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dataset, losses_out

    def _check_finite(self, losses: dict[str, torch.Tensor], dataset: str) -> None:
        bad = {name: float(loss.detach()) for name, loss in losses.items() if not torch.isfinite(loss)}
        if any_rank(bool(bad), self.dist, self.device):
            name, value = next(iter(bad.items())) if bad else ("(another rank)", float("nan"))
            last = latest_checkpoint(self.checkpoint_root)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"task '{name}' gave a non-finite loss ({value}) at step {self.step + 1} on dataset '{dataset}'",
                hint=f"{kept}; lower --lr or check the data",
            )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _handle_signal(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> RunSummary:
        self.setup()
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.close()
            shutdown_distributed(self.dist)

    def _loop(self) -> RunSummary:
        config = self.config
        window, first, last = LossWindow(), {}, {}
        metrics = (self.run_dir / "metrics.jsonl").open("a") if self.dist.is_main else None
        progress = TrainingProgress(self.total_steps, self.step, disable=self.quiet or not self.dist.is_main)
        start, start_samples = time.perf_counter(), self.samples
        try:
            with progress:
                while self.step < self.total_steps:
                    tick = time.perf_counter()
                    dataset, losses = self.train_step()
                    window.add(losses)
                    for name, value in losses.items():
                        first.setdefault(name, value)
                        last[name] = value
                    rate = (self.samples - start_samples) / max(1e-9, time.perf_counter() - start)
                    progress.update(self.step, window.means(), rate)
                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        self._log(metrics, dataset, window.means(), rate, time.perf_counter() - tick)
                        window.clear()
                    if self.dist.is_main and (self.step % config.picture_every == 0 or self.step == self.total_steps):
                        self._pictures()
                    stop = any_rank(self.stop_requested is not None, self.dist, self.device)
                    if stop or self.step % config.checkpoint_every == 0 or self.step == self.total_steps:
                        self.save()
                    if stop:
                        break
        finally:
            if metrics is not None:
                metrics.close()
        if self.dist.is_main:
            plot_task_losses(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        return RunSummary(self.run_dir, self.step, self.samples - start_samples, time.perf_counter() - start,
                          first, last, stopped_by=self.stop_requested)

    def _log(self, metrics, dataset: str, losses: dict[str, float], rate: float, step_seconds: float) -> None:
        if metrics is None:
            return
        record = {
            "step": self.step,
            "samples": self.samples,
            "lr": self.scheduler.get_last_lr()[0],
            "dataset": dataset,
            "losses": losses,
            "weights": self.weighting.current_weights(),
            "samples_per_s": rate,
            "step_seconds": step_seconds,
        }
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if self.writer is not None:
            for name, value in losses.items():
                self.writer.add_scalar(f"loss/{name}", value, self.step)
            self.writer.add_scalar("lr", record["lr"], self.step)
            self.writer.add_scalar("samples_per_s", rate, self.step)

    def _pictures(self) -> None:
        """Task pictures on the first few training samples of each dataset (own RNG: no effect on training)."""
        generator = torch.Generator().manual_seed(self.config.seed + self.step)
        self.model.eval()
        with torch.no_grad():
            for split in self.splits.values():
                batch = self._to_device(split.batch(range(min(PICTURE_SAMPLES, len(split)))))
                self.model.save_pictures(batch, generator, self.run_dir / "pictures", self.step)
