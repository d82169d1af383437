"""Fine-tuning, linear probing and from-scratch training on one labeled dataset, on the engine.

A fine-tune is a run of the same loop as pretraining (`medformer_core.engine.loop`) with one dataset,
one task (`supervised` for classification, `segmentation` for masks) and a validation on val every
`eval_every` epochs that keeps the best weights (highest AUC, or highest mean Dice). Each epoch
is a seeded permutation of the labeled train split in full batches. Every validation is
checkpointed, so `--resume` continues a killed fine-tune exactly. A run directory holds
`finetune.toml` (how it was made), `model.safetensors` (the weights of the best validation),
`results.json` (val and test AUC/ACC or per-class Dice, per-validation history), `metrics.jsonl`,
`plots/` and `checkpoints/`.
"""

import copy
import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import CheckpointError, RunStopped, UsageError
from medformer_core.api.plugins import registries
from medformer_core.engine.augment import Augment
from medformer_core.engine.builders import build_model
from medformer_core.engine.checkpoint import save_model_atomically
from medformer_core.engine.config import write_toml
from medformer_core.engine.devices import resolve_device
from medformer_core.engine.evaluation import medmnist_metrics, predict_split, segmentation_metrics
from medformer_core.engine.loop import Engine, LoopSettings
from medformer_core.engine.sampling import MultiDatasetSampler
from medformer_core.engine.schedule import head_then_whole, warmup_cosine
from medformer_core.engine.weighting import make_weighting
from medformer_core.model.medformer import ModelConfig, read_export_config
from medformer_core.model.multitask import MultitaskModel

SUPERVISED_TASK = "supervised"
SEGMENTATION_TASK = "segmentation"
TASKS = {"classification": SUPERVISED_TASK, "segmentation": SEGMENTATION_TASK}  # --task -> the task plugin
# Epochs and batch size when not given: segmentation learns from every voxel, so fewer, smaller batches do.
TASK_DEFAULTS = {SUPERVISED_TASK: {"epochs": 30, "batch_size": 64}, SEGMENTATION_TASK: {"epochs": 8, "batch_size": 16}}
FINETUNE_LR = 1e-3  # the default learning rate of a fine-tune or from-scratch run (ablation_model.md, section 9)
PROBE_LR = 1e-2  # the default learning rate of a linear probe (only the head trains)
# The default layer-wise LR decay when fine-tuning a pretrained encoder. Chosen on val in 2D, in 3D
# (the MedMNIST recipe) and for segmentation (the atlas check): it won in all three, and without it
# few-label fine-tunes can wreck the pretrained features (docs/results.md).
PRETRAINED_LAYER_DECAY = 0.75
WEIGHTS_FILE = "model.safetensors"


@dataclass
class FinetuneConfig:
    """A fine-tune (or linear probe, or from-scratch) run on one labeled dataset."""

    dataset: str
    task: str = "auto"  # classification | segmentation | auto (classification when labeled, else masks)
    source: str | None = None  # a pretraining run directory or an exported encoder; None: from scratch
    linear_probe: bool = False
    label_fraction: float = 1.0
    epochs: int | None = None  # None: the task's default (TASK_DEFAULTS)
    batch_size: int | None = None
    lr: float | None = None  # None: PROBE_LR for a linear probe, else FINETUNE_LR
    weight_decay: float = 0.05
    layer_decay: float | None = None  # LR factor per layer from the head down (MAE/BEiT); 1: off;
    # None: PRETRAINED_LAYER_DECAY when fine-tuning a pretrained encoder, else 1
    head_epochs: int = 0  # epochs that train the head alone at PROBE_LR (the encoder frozen) before
    # the whole model trains for `epochs` (LP-FT); 0: off
    model: str = "tiny"  # used from scratch; a source brings its own architecture
    model_options: dict = field(default_factory=dict)  # overrides of the model, e.g. {"latent_pool": False}
    seed: int = 0
    data_root: str | None = None
    device: str = "auto"
    augment: bool = True
    eval_every: int | None = None  # epochs between val evaluations; default: about 20 over the run
    label_smoothing: float = 0.0  # of the supervised targets (see plugins/task_supervised.py); 0: off
    head_batch_norm: bool = False  # a batch norm before the classifier (see plugins/heads.py)
    ema: float = 0.0  # decay of an EMA of the weights, validated and saved instead of them; 0: off
    mixup: float = 0.0  # mixup alpha: pairs mixed with weight ~ Beta(alpha, alpha); 0: off
    tensorboard: bool = False

    @property
    def effective_lr(self) -> float:
        """The learning rate this run trains with: as given, else the default for its mode."""
        if self.lr is not None:
            return self.lr
        return PROBE_LR if self.linear_probe else FINETUNE_LR

    @property
    def effective_layer_decay(self) -> float:
        """The layer decay this run trains with: as given, else the default for its mode."""
        if self.layer_decay is not None:
            return self.layer_decay
        return PRETRAINED_LAYER_DECAY if self.mode == "finetune" else 1.0

    @property
    def mode(self) -> str:
        if self.source is None:
            return "scratch"
        return "linear-probe" if self.linear_probe else "finetune"

    def validate(self) -> "FinetuneConfig":
        if self.task not in ("auto", *TASKS):
            raise UsageError(f"--task must be auto, classification or segmentation, got '{self.task}'")
        if not 0.0 < self.label_fraction <= 1.0:
            raise UsageError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if (self.epochs or 1) < 1 or (self.batch_size or 1) < 1 or (self.lr is not None and self.lr <= 0):
            raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"--layer-decay must be in (0, 1], got {self.layer_decay}",
                             hint="0.75 is the usual value for fine-tuning a pretrained encoder; 1 turns it off")
        if self.linear_probe and self.source is None:
            raise UsageError("--linear-probe needs --from, a pretrained run or encoder",
                             hint="a linear probe of a random encoder measures nothing")
        if self.head_epochs < 0:
            raise UsageError(f"--head-epochs must be >= 0, got {self.head_epochs}", hint="0 turns it off")
        if self.head_epochs and self.mode != "finetune":
            raise UsageError("--head-epochs trains the head of a pretrained encoder alone before fine-tuning it",
                             hint="use it with --from and without --linear-probe")
        if self.eval_every is not None and self.eval_every < 1:
            raise UsageError(f"--eval-every must be >= 1 epoch, got {self.eval_every}",
                             hint="omit it for about 20 validations per run")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
                             hint="0.1 is usual; 0 turns it off")
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"--ema must be in [0, 1), got {self.ema}",
                             hint="a decay such as 0.999 averages about the last 1000 steps; 0 turns it off")
        if self.mixup < 0.0:
            raise UsageError(f"--mixup must be >= 0, got {self.mixup}",
                             hint="it is the Beta(alpha, alpha) parameter, e.g. 0.2; 0 turns it off")
        return self


def encoder_dir(source: str) -> Path:
    """The exported encoder of a pretraining run (RUN/encoder) or an encoder directory itself."""
    path = Path(source).expanduser()
    for candidate in (path / "encoder", path):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UsageError(f"--from {source}: no exported encoder there (config.json + model.safetensors)",
                     hint="point --from at a `medformer train` run directory or its encoder/ folder")


def task_for(config: FinetuneConfig, info) -> str:
    """The task plugin a fine-tune of `info` trains: `config.task`, or with "auto" classification
    when the dataset has class labels and segmentation when it has only masks."""
    name = config.task
    if name == "auto":
        name = "classification" if info.task != "none" or not info.has_masks else "segmentation"
    if name == "segmentation" and not info.has_masks:
        raise UsageError(f"dataset '{info.name}' has no segmentation masks",
                         hint="choose a dataset with masks, e.g. phantoms3d or an MSD folder (imagesTr/labelsTr)")
    if name == "segmentation" and (config.mixup or config.label_smoothing or config.head_batch_norm):
        raise UsageError("--mixup, --label-smoothing and --head-batch-norm apply to classification only",
                         hint="drop them for --task segmentation")
    if name == "classification" and info.task == "none":
        raise UsageError(f"dataset '{info.name}' has no labels to fine-tune on",
                         hint="choose a labeled dataset, e.g. a MedMNIST one"
                              + (", or --task segmentation" if info.has_masks else ""))
    return TASKS[name]


def build_finetune_model(config: FinetuneConfig, info) -> MultitaskModel:
    """The model of `info`'s fine-tune task; with a source, its encoder is loaded (and frozen for a probe)."""
    task = registries().tasks.get(task_for(config, info))
    if task.name == SUPERVISED_TASK:
        task = task.with_options(label_smoothing=config.label_smoothing, batch_norm=config.head_batch_norm)
    if config.source is None:
        return build_model(config.model, [info], [task], **config.model_options)
    source = encoder_dir(config.source)
    exported = ModelConfig(**read_export_config(source)["model"])
    model = build_model(exported, [info], [task], **config.model_options)
    model.load_encoder(source)
    if config.linear_probe:
        model.encoder.requires_grad_(False)
    return model


def epoch_sampler(name: str, size: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> MultiDatasetSampler:
    """Batches of one dataset of `size` samples: each epoch a seeded permutation (this rank's shard
    of it) in ceil(shard / batch_size) batches of near-equal size, so every labeled sample counts
    once per epoch and no small tail batch weighs like a full one (100 samples, batch 64: 50 + 50)."""
    shard = size // world_size
    if shard < 1:
        raise UsageError(f"dataset '{name}' has {size} training samples, fewer than the {world_size} processes",
                         hint="run fewer processes")
    return MultiDatasetSampler({name: size}, min(batch_size, shard), seed=seed, rank=rank, world_size=world_size,
                              drop_last=False)


def mixup(batch: dict, partner: torch.Tensor, weight: float) -> dict:
    """Mix each sample with sample `partner` [B] int64: image weight * x + (1 - weight) * x[partner]
    ([B, C, *S], 2D or 3D); `batch["mixup"]` tells the supervised task to mix the targets alike."""
    image = batch["image"]
    return {**batch, "image": weight * image + (1.0 - weight) * image[partner], "mixup": (partner, weight)}


class WeightEMA:
    """An exponential moving average of a model's weights: after each step
    ema = decay * ema + (1 - decay) * weights. `model` is the averaged copy (eval mode, frozen),
    starting from the weights it was made from."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        live = model.state_dict()
        for name, average in self.model.state_dict().items():
            if average.is_floating_point():
                average.lerp_(live[name], 1.0 - self.decay)
            else:
                average.copy_(live[name])


class Finetuner(Engine):
    """Trains the supervised head (and the encoder unless probing), keeps the best validation, and
    evaluates those weights on test. `run()` returns the results dict it writes to results.json."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, quiet: bool = False, *, resume: bool = False):
        self.config = config.validate()
        settings = LoopSettings(seed=config.seed, device=config.device, grad_clip=1.0, augment=config.augment,
                                tensorboard=config.tensorboard)
        super().__init__(run_dir, settings, resume=resume, quiet=quiet)

    def save_config(self) -> None:
        write_finetune_config(self.config, self.run_dir / "finetune.toml")

    def _load_splits(self):
        config = self.config
        factory, options = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed,
                                           labeled=True, label_fraction=config.label_fraction)
        train = factory.build("train", options)
        full = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed, labeled=True)
        val, test = (full[0].build(split, full[1]) for split in ("val", "test"))
        self.task_name = task_for(config, train.info)
        for name, split in (("val", val), ("test", test)):
            if len(split) == 0:
                raise UsageError(f"dataset '{train.info.name}' has an empty {name} split: fine-tuning picks its "
                                 "epoch on val and reports test", hint="give it val and test samples, e.g. "
                                 "folder:PATH,val=0.1,test=0.1 or val/ and test/ subfolders")
        if self.task_name == SUPERVISED_TASK and train.labels is None:
            raise UsageError(f"dataset '{train.info.name}' has no labels to fine-tune on",
                             hint="choose a labeled dataset, e.g. a MedMNIST one")
        return train, val, test

    def build(self) -> None:
        config = self.config
        self.train_split, self.val, self.test = self._load_splits()
        defaults = TASK_DEFAULTS[self.task_name]
        config = self.config = replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None},
                                       lr=config.effective_lr, layer_decay=config.effective_layer_decay)
        info = self.train_split.info
        self.splits = {info.name: self.train_split}
        self.model = build_finetune_model(config, info).to(self.device)
        self.weighting = make_weighting("fixed", {self.task_name: 1.0})
        groups = layer_decay_groups(self.model, config.lr, config.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = epoch_sampler(info.name, len(self.train_split), config.batch_size, config.seed,
                                     self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        self.total_epochs = config.head_epochs + config.epochs
        self.head_steps = self.steps_per_epoch * config.head_epochs
        self.total_steps = self.steps_per_epoch * self.total_epochs
        whole_steps = self.total_steps - self.head_steps
        warmup = min(whole_steps // 10, 5 * self.steps_per_epoch)
        if self.head_steps:
            self.scheduler = head_then_whole(self.optimizer, self.head_steps, PROBE_LR / config.lr, warmup,
                                             self.total_steps)
        else:
            self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps)
        dims = info.spatial_dims
        if self.task_name == SEGMENTATION_TASK:  # intensity only: the masks keep their geometry
            self.augment = {dims: Augment(dims, flip_prob=0.0, rot90=False, crop_scale=None, blur_prob=0.0)}
        else:
            self.augment = {dims: Augment(dims, rot90=False, crop_scale=(0.8, 1.0), blur_prob=0.0)}
        self.eval_every = config.eval_every or max(1, self.total_epochs // 20)
        self.settings = replace(self.settings, log_every=self.steps_per_epoch,
                                checkpoint_every=self.steps_per_epoch * self.eval_every)
        self.ema = WeightEMA(self.model, config.ema) if config.ema else None
        self.best: dict | None = None  # {"epoch": e, "val": metrics} of the best validation
        self.best_weights: dict[str, torch.Tensor] = {}  # its weights (CPU)
        self.history: list[dict] = []
        self.epoch_loss = [0.0, 0]  # sum and count of the step losses of the current epoch
        self.seconds_before = 0.0  # training time before a resume

    @property
    def eval_model(self) -> MultitaskModel:
        """The weights that are validated and saved: the EMA when on."""
        return self.model if self.ema is None else self.ema.model

    def train_mode(self) -> None:
        super().train_mode()
        if self.config.linear_probe:
            self.model.encoder.eval()  # frozen features: no dropout or stochastic depth
        elif self.head_steps:
            head_only = self.step < self.head_steps
            self.model.encoder.requires_grad_(not head_only)
            if head_only:
                self.model.encoder.eval()

    def prepare_batch(self, batch: dict) -> dict:
        """Augment, then mixup with a partner order and weight drawn from (seed, rank, step)."""
        batch = super().prepare_batch(batch)
        if not self.config.mixup:
            return batch
        rng = np.random.default_rng([self.config.seed, self.dist.rank, self.step])
        partner = torch.from_numpy(rng.permutation(len(batch["image"]))).to(batch["image"].device)
        return mixup(batch, partner, float(rng.beta(self.config.mixup, self.config.mixup)))

    def after_step(self, losses: dict[str, float]) -> None:
        if self.ema is not None:
            self.ema.update(self.model)
        self.epoch_loss = [self.epoch_loss[0] + losses[self.task_name], self.epoch_loss[1] + 1]
        if self.step % self.steps_per_epoch:
            return
        epoch = self.step // self.steps_per_epoch
        train_loss, self.epoch_loss = self.epoch_loss[0] / self.epoch_loss[1], [0.0, 0]
        if epoch % self.eval_every == 0 or epoch == self.total_epochs:
            self.validate(epoch, train_loss)

    def evaluate(self, model: MultitaskModel, split) -> dict:
        """The task's metrics of `model` on `split`: AUC/ACC, or per-class and mean Dice."""
        return split_metrics(model, split, self.task_name, self.device)

    def validate(self, epoch: int, train_loss: float) -> None:
        """Val metrics into the history and metrics.jsonl; a new best is kept and written to
        RUN/model.safetensors."""
        model = self.eval_model
        val = self.evaluate(model, self.val)
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val": val})
        scalars = {f"val/{k}": v for k, v in val.items() if isinstance(v, float)}
        self.write_record({"step": self.step, "epoch": epoch, "val": val}, scalars)
        if self.best is None or _better(val, self.best["val"]):
            self.best = {"epoch": epoch, "val": val}
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if self.dist.is_main:
                save_model_atomically(model, self.run_dir / WEIGHTS_FILE)

    def seconds(self) -> float:
        """Training time of the run, over every session."""
        return self.seconds_before + time.perf_counter() - self.started

    def extra_state(self) -> dict:
        state = {"best": self.best, "best_weights": self.best_weights, "history": self.history,
                 "epoch_loss": self.epoch_loss, "seconds": self.seconds()}
        if self.ema is not None:
            state["ema"] = self.ema.model.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.best, self.best_weights, self.history = state["best"], state["best_weights"], state["history"]
        self.epoch_loss, self.seconds_before = list(state["epoch_loss"]), state["seconds"]
        if self.ema is not None:
            if "ema" not in state:
                raise UsageError("cannot resume with --ema: the checkpoint holds no EMA weights",
                                 hint="resume with the options the run was started with")
            self.ema.model.load_state_dict(state["ema"])

    def run(self) -> dict:
        """Train (or resume), then evaluate the best weights on test; returns the results, also
        written to RUN/results.json. A run stopped by a signal raises RunStopped."""
        self.started = time.perf_counter()
        summary = super().run()
        if summary.stopped_by is not None:
            raise RunStopped(summary.stopped_by, summary.steps)
        self.model.load_state_dict(self.best_weights)
        if self.dist.is_main:
            save_model_atomically(self.model, self.run_dir / WEIGHTS_FILE)
        test_metrics = self.evaluate(self.model, self.test)
        config, train = self.config, self.train_split
        task = SEGMENTATION_TASK if self.task_name == SEGMENTATION_TASK else train.info.task
        results = {
            "dataset": train.info.name, "task": task, "mode": config.mode, "source": config.source,
            "label_fraction": config.label_fraction, "train_samples": len(train), "seed": config.seed,
            "epochs": config.epochs, "head_epochs": config.head_epochs, "lr": config.lr,
            "layer_decay": config.layer_decay,
            "best_epoch": self.best["epoch"], "val": self.best["val"], "test": test_metrics,
            "seconds": self.seconds(), "history": self.history,
        }
        if self.dist.is_main:
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


def split_metrics(model: MultitaskModel, split, task: str, device: torch.device) -> dict:
    """`task`'s metrics on `split`: MedMNIST AUC/ACC (supervised) or per-class Dice (segmentation)."""
    if task == SEGMENTATION_TASK:
        return segmentation_metrics(model, split, device)
    return medmnist_metrics(*predict_split(model, split, device), split.info.task)


def _better(candidate: dict, incumbent: dict) -> bool:
    """Model selection: higher val AUC, then higher val ACC; for segmentation higher mean Dice
    (NaN counts as lowest)."""
    score = lambda v: -math.inf if math.isnan(v) else v  # noqa: E731
    key = lambda m: (score(m["mean_dice"]),) if "mean_dice" in m else (score(m["auc"]), m["acc"])  # noqa: E731
    return key(candidate) > key(incumbent)


def write_finetune_config(config: FinetuneConfig, path: Path) -> None:
    write_toml(asdict(config), path)


def read_finetune_config(path: Path) -> FinetuneConfig:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not a fine-tune run (no finetune.toml)",
                         hint="point at a directory written by `medformer finetune`")
    values = tomllib.loads(path.read_text())
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in values.items() if k in known})


def load_finetuned(run_dir: Path, info, config: FinetuneConfig | None = None) -> MultitaskModel:
    """The fine-tuned model of a run directory (its best weights), built for dataset `info`."""
    config = config or read_finetune_config(run_dir / "finetune.toml")
    model = build_finetune_model(config, info)
    weights = run_dir / WEIGHTS_FILE
    try:
        missing, unexpected = (sorted(keys) for keys in load_model(model, str(weights), strict=False))
    except Exception as exc:
        raise CheckpointError(f"cannot load {weights}: {exc}".splitlines()[0]) from None
    if missing or unexpected:
        what = f"it lacks {missing[0]}" if missing else f"it holds {unexpected[0]}, which this model lacks"
        raise CheckpointError(f"cannot load {weights}: {what}",
                              hint="it was fine-tuned by another medformer version: fine-tune again")
    return model


def evaluate_run(run_dir: Path, split: str = "test", data_root: str | None = None, device: str = "auto") -> dict:
    """Rebuild a fine-tuned model from its run directory and compute its task's metrics on `split`."""
    config = read_finetune_config(run_dir / "finetune.toml")
    if data_root is not None:
        config.data_root = data_root
    factory, options = resolve_dataset(config.dataset, data_root=config.data_root, seed=config.seed, labeled=True)
    data = factory.build(split, options)
    target = resolve_device(device)
    model = load_finetuned(run_dir, data.info, config).to(target)
    metrics = split_metrics(model, data, task_for(config, data.info), target)
    return {"dataset": data.info.name, "split": split, "mode": config.mode, **metrics}
