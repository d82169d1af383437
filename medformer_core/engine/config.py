"""Run configuration: defaults, then a TOML file, then command-line options; written back resolved."""

import math
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

from medformer_core.api.errors import UsageError
from medformer_core.api.interfaces import option_text
from medformer_core.api.lookup import unknown_name

DEFAULT_TASKS = ("mae", "mae3d", "rotation", "contrastive")
DEFAULT_DATASETS = ("phantoms2d", "phantoms3d")


@dataclass
class RunConfig:
    """Everything that defines a pretraining run. Names match the CLI options and the TOML keys."""

    plugins: list[str] = field(default_factory=list)  # empty: those of DEFAULT_TASKS that accept a dataset of the run
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    data_root: str | None = None
    model: str = "tiny"
    model_options: dict[str, float] = field(default_factory=dict)  # overrides of the preset, e.g. {"depth": 2}
    steps: int = 120
    epochs: float | None = None  # when set, overrides `steps`: epochs over the summed train splits
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_steps: int = 10
    grad_clip: float = 1.0
    accumulate: int = 1
    weighting: str = "fixed"
    task_weights: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)  # per-task options, e.g. {"mae": {"mask_ratio": 0.8}}
    temperature: float = 2.0  # dataset sampling: p ~ size ** (1 / temperature)
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    picture_every: int = 100
    log_every: int = 10
    knn_every: int = 200  # steps between kNN evaluations on the labeled datasets' val splits; 0: off
    chance_patience: int = 50  # warn when a task is still at chance after this many of its batches; 0: never
    tensorboard: bool = False

    def validate(self) -> "RunConfig":
        self._check_types()
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"option 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}",
                             hint="the final learning rate as a share of --lr, e.g. 0.01")
        for name in ("warmup_steps", "grad_clip", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                raise UsageError(f"option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise UsageError(f"option 'keep_checkpoints' must be >= 1, got {self.keep_checkpoints}")
        positive = ("steps", "batch_size", "accumulate", "checkpoint_every", "picture_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.chance_patience < 0:
            raise UsageError(f"option 'chance_patience' must be >= 0 (0: never warn), got {self.chance_patience}")
        if self.knn_every < 0:
            raise UsageError(f"option 'knn_every' must be >= 0 (0 turns the kNN monitor off), got {self.knn_every}")
        if self.lr <= 0 or self.temperature <= 0:
            raise UsageError("options 'lr' and 'temperature' must be > 0")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError(f"option 'epochs' must be > 0, got {self.epochs}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"option 'device' must be auto, cpu or cuda[:N], got '{self.device}'")
        if not self.datasets:
            raise UsageError("no dataset selected", hint="pass --dataset NAME (see `medformer datasets list`)")
        return self


    def _check_types(self) -> None:
        """Each value has its field's type (a number written as text, 1.5 for a count, NaN or an
        infinite number, "no" for a switch are refused in one line naming the option)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            members = [m for m in typing.get_args(kind) if m is not type(None)] \
                if isinstance(kind, types.UnionType) else [kind]
            if value is None and len(members) < len(typing.get_args(kind)):
                continue
            base = (typing.get_origin(members[0]) or members[0]).__name__
            checks = {
                "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                "bool": lambda v: isinstance(v, bool),
                "str": lambda v: isinstance(v, str),
                "list": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
                "dict": lambda v: isinstance(v, dict),
            }
            if base in checks and not checks[base](value):
                wanted = {"int": "a whole number", "float": "a finite number", "bool": "true or false",
                          "str": "text", "list": "a list of names", "dict": "a table"}[base]
                raise UsageError(f"option '{f.name}' must be {wanted}, got {value!r}",
                                 hint=None if f.default is MISSING else f"the default is {option_text(f.default)}")


def load_config(path: Path | None, overrides: dict) -> RunConfig:
    """Defaults <- TOML file at `path` <- `overrides` (None values are ignored)."""
    values: dict = {}
    if path is not None:
        values.update(_read_toml(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**values).validate()


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    known = [f.name for f in fields(RunConfig)]
    for key in values:
        if key not in known:
            raise unknown_name(f"config file {path}: unknown key '{key}'", key, known)
    return values


def write_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as TOML."""
    write_toml(asdict(config), path)


def write_toml(values: dict, path: Path) -> None:
    """Write `values` as a TOML file; None values are left out (TOML has no null)."""
    path.write_text(tomli_w.dumps({k: v for k, v in values.items() if v is not None}))
