"""Pretraining on the engine: one Medformer, several datasets and pretext tasks.

Each step the multitask sampler picks one dataset, the engine augments the batch, every task that
accepts that dataset computes its loss, and the weighting combines them. Besides what the engine
writes (`metrics.jsonl`, loss plots, checkpoints), the run directory holds the resolved config,
task pictures and the exported encoder. SIGINT/SIGTERM finish the step, checkpoint and exit;
`--resume` continues exactly.
"""

import math
from dataclasses import replace
from pathlib import Path

import torch

from medformer_core.api.data import DatasetInfo, ImageSplit
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import UsageError
from medformer_core.api.files import atomic_write
from medformer_core.api.interfaces import PretextTask
from medformer_core.api.lookup import unknown_name
from medformer_core.api.plugins import registries
from medformer_core.engine.augment import Augment
from medformer_core.engine.builders import build_model
from medformer_core.engine.config import DEFAULT_TASKS, RunConfig, write_config
from medformer_core.engine.knn import KnnMonitor
from medformer_core.engine.loop import METRICS_FILE, Engine, LoopSettings
from medformer_core.engine.sampling import MultiDatasetSampler
from medformer_core.engine.schedule import warmup_cosine
from medformer_core.engine.weighting import make_weighting
from medformer_core.model.multitask import MultitaskModel, check_tasks_accept
from medformer_core.reporting.plots import plot_knn
from medformer_core.reporting.progress import print_note

PICTURE_SAMPLES = 4
KNN_MAX_TRAIN = 2000  # train samples in the kNN monitor's memory bank (a stratified subset)


def base_augment(spatial_dims: int) -> Augment:
    """The engine's light augmentation before every task: crops and intensity only. No flips or
    90-degree turns: they would make the rotation and jigsaw targets ambiguous; tasks that want
    heavy views (contrastive) augment on their own."""
    return Augment(spatial_dims, flip_prob=0.0, rot90=False, crop_scale=(0.7, 1.0), intensity=0.1,
                   noise_std=0.0, blur_prob=0.0)


def configured_tasks(config: RunConfig) -> list[PretextTask]:
    """The run's pretext tasks (`config.plugins`, else every default task) with their options and
    weights applied, each option checked and converted to its type."""
    registered = registries().tasks
    names = config.plugins or list(DEFAULT_TASKS)
    tasks = [registered.get(name) for name in names]
    for name in list(config.tasks) + list(config.task_weights):
        if name not in registered:
            raise unknown_name(f"options given for unknown task '{name}'", name, registered.names(),
                               hint="see all with `medformer plugins list --kind pretext-task`")
        if name not in names:
            raise UsageError(f"options given for task '{name}', which is not in this run",
                             hint=f"add --plugin {name}, or remove its options")
        if not isinstance(config.tasks.get(name, {}), dict):
            raise UsageError(f"the options of task '{name}' must be a table, got {config.tasks[name]!r}",
                             hint=f"e.g. [tasks.{name}] in the config file, or --task-option {name}.OPTION=VALUE")
    return [task.with_options(config.task_weights.get(task.name), **config.tasks.get(task.name, {})) for task in tasks]


def accepting_defaults(tasks: list[PretextTask], infos: list[DatasetInfo],
                       config: RunConfig) -> tuple[list[PretextTask], str]:
    """Of the default `tasks`, those that accept at least one dataset of `infos`, and a line saying
    which it chose and which it left out, and why. A task given options must accept one."""
    chosen, left_out = [], []
    for task in tasks:
        reasons = [(info.name, reason) for info in infos if (reason := task.reject_reason(info, infos))]
        if len(reasons) < len(infos):
            chosen.append(task)
        elif task.name in config.tasks or task.name in config.task_weights:
            listed = "; ".join(f"{name} ({reason})" for name, reason in reasons)
            raise UsageError(f"options given for task '{task.name}', which accepts none of the run's datasets: "
                             f"{listed}", hint="add a dataset it accepts, or remove its options")
        else:
            left_out.append(f"{task.name} ({'; '.join(f'{name}: {reason}' for name, reason in reasons)})")
    if not chosen:
        raise UsageError(f"none of the default tasks accepts the run's datasets: {', '.join(left_out)}",
                         hint="choose tasks with --plugin (see `medformer plugins list --kind pretext-task`)")
    names = ", ".join(task.name for task in chosen)
    if not left_out:
        return chosen, f"Tasks: {names} (the defaults; choose others with --plugin)."
    return chosen, (f"Tasks: {names}, the defaults that accept the run's datasets, without {', '.join(left_out)}. "
                    "Choose others with --plugin.")


def resolved_config(config: RunConfig, tasks: list[PretextTask]) -> RunConfig:
    """`config` naming the run's `tasks`, with their options and weights as typed values."""
    by_name = {task.name: task for task in tasks}
    options = {name: {key: getattr(by_name[name].options, key) for key in given}
               for name, given in config.tasks.items()}
    weights = {name: by_name[name].weight for name in config.task_weights}
    return replace(config, plugins=list(by_name), tasks=options, task_weights=weights)


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


class Trainer(Engine):
    """Runs one pretraining run described by a `RunConfig` into `run_dir`."""

    def __init__(self, config: RunConfig, run_dir: Path, *, resume: bool = False, quiet: bool = False):
        self.config = config
        settings = LoopSettings(
            seed=config.seed, device=config.device, accumulate=config.accumulate, grad_clip=config.grad_clip,
            augment=config.augment, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
            keep_checkpoints=config.keep_checkpoints, tensorboard=config.tensorboard,
            chance_patience=config.chance_patience,
        )
        super().__init__(run_dir, settings, resume=resume, quiet=quiet)

    def save_config(self) -> None:
        write_config(self.config, self.run_dir / "config.toml")

    def build(self) -> None:
        config = self.config
        tasks = configured_tasks(config)
        self.splits = load_train_splits(config, labeled=any(t.needs_labels or t.needs_masks for t in tasks))
        infos = [split.info for split in self.splits.values()]
        if not config.plugins:
            tasks, note = accepting_defaults(tasks, infos, config)
            if self.dist.is_main:
                print_note(note)
        check_tasks_accept(tasks, infos)
        self.tasks = tasks
        self.config = config = resolved_config(config, tasks)  # the engine writes it: the chosen tasks, typed options
        self.model: MultitaskModel = build_model(config.model, infos, self.tasks,
                                                 **config.model_options).to(self.device)
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
        self.augment = {dims: base_augment(dims) for dims in {info.spatial_dims for info in infos}}
        self.monitors = self.knn_monitors()

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

    def knn_monitors(self) -> list[KnnMonitor]:
        """A kNN monitor for every dataset of the run with labeled train and val splits (rank 0)."""
        config = self.config
        if not config.knn_every or not self.dist.is_main:
            return []
        monitors = []
        for ref in config.datasets:
            factory, options = resolve_dataset(ref, data_root=config.data_root, seed=config.seed, labeled=True)
            info = factory.info(options)
            if info.task == "none" or not info.split_sizes.get("val"):
                continue
            train, val = factory.build("train", options), factory.build("val", options)
            if train.labels is not None and val.labels is not None and len(train):
                monitors.append(KnnMonitor(train, val, max_train=KNN_MAX_TRAIN))
        return monitors

    def after_step(self, losses: dict[str, float]) -> None:
        last = self.step == self.total_steps
        if self.dist.is_main and (self.step % self.config.picture_every == 0 or last):
            self._pictures()
        if self.monitors and (self.step % self.config.knn_every == 0 or last):
            self._knn(last)

    def _knn(self, last: bool) -> None:
        """Log the kNN val AUC/ACC of every monitored dataset; plot them at the end of the run."""
        scores = {monitor.name: monitor.evaluate(self.model.encoder, self.device) for monitor in self.monitors}
        scalars = {f"knn/{name}/{metric}": value for name, s in scores.items() for metric, value in s.items()}
        self.write_record({"step": self.step, "knn": scores}, scalars)
        if last:
            plot_knn(self.run_dir / METRICS_FILE, self.run_dir / "plots")

    def save(self) -> Path | None:
        """Checkpoint, then export the encoder beside it (rank 0)."""
        path = super().save()
        if path is not None:
            with atomic_write(self.run_dir / "encoder") as tmp:
                self.model.encoder.save_pretrained(tmp)
        return path

    def _pictures(self) -> None:
        """Task pictures on the first few training samples of each dataset (own RNG: no effect on training)."""
        generator = torch.Generator().manual_seed(self.config.seed + self.step)
        self.model.eval()
        with torch.no_grad():
            for split in self.splits.values():
                batch = self._to_device(split.batch(range(min(PICTURE_SAMPLES, len(split)))))
                self.model.save_pictures(batch, generator, self.run_dir / "pictures", self.step)
