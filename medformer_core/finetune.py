"""Fine-tuning and linear probing on a labeled dataset, model selection on val, MedMNIST test metrics.

A fine-tune run directory holds `finetune.toml` (how it was made), `model.safetensors` (the weights
of the best epoch on val) and `results.json` (val and test AUC/ACC, per-epoch history).
"""

import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from medformer_core.augment import Augment
from medformer_core.config import _toml_value
from medformer_core.datasets import resolve_dataset
from medformer_core.errors import CheckpointError, UsageError
from medformer_core.evaluation import medmnist_metrics, predict_split
from medformer_core.model import ModelConfig, read_export_config
from medformer_core.multitask import MultitaskModel, build_multitask_model
from medformer_core.plugins import registries
from medformer_core.progress import TrainingProgress
from medformer_core.schedule import warmup_cosine
from medformer_core.trainer import resolve_device

SUPERVISED_TASK = "supervised"


@dataclass
class FinetuneConfig:
    """A fine-tune (or linear probe, or from-scratch) run on one labeled dataset."""

    dataset: str
    source: str | None = None  # a pretraining run directory or an exported encoder; None: from scratch
    linear_probe: bool = False
    label_fraction: float = 1.0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # LR factor per layer from the head down (MAE/BEiT fine-tuning); 1: off
    model: str = "tiny"  # used from scratch; a source brings its own architecture
    seed: int = 0
    data_root: str | None = None
    device: str = "auto"
    augment: bool = True
    eval_every: int | None = None  # epochs between val evaluations; default: about 20 over the run

    @property
    def mode(self) -> str:
        if self.source is None:
            return "scratch"
        return "linear-probe" if self.linear_probe else "finetune"

    def validate(self) -> "FinetuneConfig":
        if not 0.0 < self.label_fraction <= 1.0:
            raise UsageError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"--layer-decay must be in (0, 1], got {self.layer_decay}",
                             hint="0.75 is the usual value for fine-tuning a pretrained encoder; 1 turns it off")
        if self.linear_probe and self.source is None:
            raise UsageError("--linear-probe needs --from, a pretrained run or encoder",
                             hint="a linear probe of a random encoder measures nothing")
        return self


def encoder_dir(source: str) -> Path:
    """The exported encoder of a pretraining run (RUN/encoder) or an encoder directory itself."""
    path = Path(source).expanduser()
    for candidate in (path / "encoder", path):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UsageError(f"--from {source}: no exported encoder there (config.json + model.safetensors)",
                     hint="point --from at a `medformer train` run directory or its encoder/ folder")


def build_finetune_model(config: FinetuneConfig, info) -> MultitaskModel:
    """The supervised model for `info`; with a source, its encoder is loaded (and frozen for a probe)."""
    task = registries().tasks.get(SUPERVISED_TASK)
    if config.source is None:
        return build_multitask_model(config.model, [info], [task])
    source = encoder_dir(config.source)
    model = build_multitask_model(ModelConfig(**read_export_config(source)["model"]), [info], [task])
    model.load_encoder(source)
    if config.linear_probe:
        model.encoder.requires_grad_(False)
    return model


class Finetuner:
    """Trains the supervised head (and the encoder unless probing), keeps the best epoch on val."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, quiet: bool = False):
        self.config = config.validate()
        self.run_dir = run_dir
        self.quiet = quiet

    def _load_splits(self):
        config = self.config
        factory, options = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed,
                                           labeled=True, label_fraction=config.label_fraction)
        train = factory.build("train", options)
        full = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed, labeled=True)
        val, test = (full[0].build(split, full[1]) for split in ("val", "test"))
        if train.labels is None or train.info.task == "none":
            raise UsageError(f"dataset '{train.info.name}' has no labels to fine-tune on",
                             hint="choose a labeled dataset, e.g. a MedMNIST one")
        return train, val, test

    def run(self) -> dict:
        config = self.config
        torch.manual_seed(config.seed)
        device = resolve_device(config.device)
        train, val, test = self._load_splits()
        model = build_finetune_model(config, train.info).to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = layer_decay_groups(model, config.lr, config.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
        total = steps_per_epoch * config.epochs
        scheduler = warmup_cosine(optimizer, min(total // 10, 5 * steps_per_epoch), total)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        order_rng = np.random.default_rng(config.seed)
        augment = Augment(train.info.spatial_dims, rot90=False, crop_scale=(0.8, 1.0), blur_prob=0.0)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_finetune_config(config, self.run_dir / "finetune.toml")
        best, history = None, []
        start = time.perf_counter()
        with TrainingProgress(total, 0, disable=self.quiet) as progress:
            for epoch in range(1, config.epochs + 1):
                model.train()
                if config.linear_probe:
                    model.encoder.eval()  # frozen features: no dropout or stochastic depth
                order = order_rng.permutation(len(train))
                losses = []
                for step in range(steps_per_epoch):
                    batch = train.batch(order[step * config.batch_size:(step + 1) * config.batch_size])
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    if config.augment:
                        batch["image"] = augment(batch["image"], generator)
                    loss = model(batch, generator)[SUPERVISED_TASK].loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.item())
                    progress.update((epoch - 1) * steps_per_epoch + step + 1, {"loss": float(np.mean(losses))}, 0.0)
                every = config.eval_every or max(1, config.epochs // 20)
                if epoch % every and epoch != config.epochs:
                    continue
                val_metrics = medmnist_metrics(*predict_split(model, val, device), val.info.task)
                history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val_metrics})
                if best is None or _better(val_metrics, best["val"]):
                    best = {"epoch": epoch, "val": val_metrics}
                    save_model(model, str(self.run_dir / "model.safetensors"))
        load_model(model, str(self.run_dir / "model.safetensors"))
        test_metrics = medmnist_metrics(*predict_split(model, test, device), test.info.task)
        results = {
            "dataset": train.info.name, "task": train.info.task, "mode": config.mode, "source": config.source,
            "label_fraction": config.label_fraction, "train_samples": len(train), "seed": config.seed,
            "epochs": config.epochs, "best_epoch": best["epoch"], "val": best["val"], "test": test_metrics,
            "seconds": time.perf_counter() - start, "history": history,
        }
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        return results


def layer_decay_groups(model: MultitaskModel, lr: float, decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay over the trainable parameters.

    Layers count from the input side: 0 is the input adapters, dataset embeddings, latents and
    the Input Adaptformer; body block i is i + 1; the final norm and the output heads are
    depth + 1 and train at `lr`. Layer k trains at lr * decay ** (depth + 1 - k).
    """
    depth = len(model.encoder.body)
    by_layer: dict[int, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            by_layer.setdefault(_layer_of(name, depth), []).append(parameter)
    return [{"params": params, "lr": lr * decay ** (depth + 1 - layer)} for layer, params in sorted(by_layer.items())]


def _layer_of(name: str, depth: int) -> int:
    """The layer index of parameter `name` for layer-wise LR decay (see `layer_decay_groups`)."""
    parts = name.split(".")
    if parts[0] != "encoder" or parts[1] == "norm":
        return depth + 1
    if parts[1] == "body":
        return int(parts[2]) + 1
    return 0


def _better(candidate: dict, incumbent: dict) -> bool:
    """Model selection: higher val AUC, then higher val ACC (NaN AUC counts as lowest)."""
    key = lambda m: (-math.inf if math.isnan(m["auc"]) else m["auc"], m["acc"])  # noqa: E731
    return key(candidate) > key(incumbent)


def write_finetune_config(config: FinetuneConfig, path: Path) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in asdict(config).items() if v is not None]
    path.write_text("\n".join(lines) + "\n")


def read_finetune_config(path: Path) -> FinetuneConfig:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not a fine-tune run (no finetune.toml)",
                         hint="point at a directory written by `medformer finetune`")
    values = tomllib.loads(path.read_text())
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in values.items() if k in known})


def evaluate_run(run_dir: Path, split: str = "test", data_root: str | None = None, device: str = "auto") -> dict:
    """Rebuild a fine-tuned model from its run directory and compute MedMNIST metrics on `split`."""
    config = read_finetune_config(run_dir / "finetune.toml")
    if data_root is not None:
        config.data_root = data_root
    factory, options = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed, labeled=True)
    data = factory.build(split, options)
    model = build_finetune_model(config, data.info)
    weights = run_dir / "model.safetensors"
    try:
        load_model(model, str(weights))
    except Exception as exc:
        raise CheckpointError(f"cannot load {weights}: {exc}".splitlines()[0]) from None
    target = resolve_device(device)
    metrics = medmnist_metrics(*predict_split(model.to(target), data, target), data.info.task)
    return {"dataset": data.info.name, "split": split, "mode": config.mode, **metrics}
