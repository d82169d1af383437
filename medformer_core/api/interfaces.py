"""The abstract plugin interfaces the registries hold.

Every registered object names itself, says in one line what it is, and declares which inputs it
accepts: `spatial_dims` (2 for images [B, C, H, W], 3 for volumes [B, C, D, H, W]) and `channels`
(None: any channel count).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from medformer_core.api.data import DatasetInfo, DatasetOptions, ImageSplit
from medformer_core.api.errors import UsageError
from medformer_core.api.lookup import unknown_name
from medformer_core.api.options import convert, describe, settings_of

if TYPE_CHECKING:
    import torch

    from medformer_core.api.context import TaskContext


class PluginObject(ABC):
    """What every registered object has: a name, a description, the inputs it accepts."""

    kind: ClassVar[str] = "object"
    name: str = ""
    description: str = ""
    spatial_dims: tuple[int, ...] = (2, 3)
    channels: int | None = None

    def accepts(self, spatial_dims: int, channels: int) -> bool:
        """True when this object works on inputs of `spatial_dims` with `channels` channels."""
        return spatial_dims in self.spatial_dims and self.channels in (None, channels)


class DatasetFactory(PluginObject):
    """Builds the splits of one dataset (or of a family selected by an argument, `name:ARG`)."""

    kind = "dataset"
    takes_argument: bool = False

    @abstractmethod
    def info(self, options: DatasetOptions) -> DatasetInfo:
        """What the dataset holds (shape, task, labels), without loading its images."""

    @abstractmethod
    def build(self, split: str, options: DatasetOptions) -> ImageSplit:
        """Load `split` ("train", "val" or "test") as arrays."""

    def scale_intensities(self, array: np.ndarray, options: DatasetOptions) -> np.ndarray:
        """A whole scan [C, *S] in its file's units -> [0, 1] float32, as this dataset scales its
        samples (`medformer predict` reads new scans through it). The default: 8-bit values / 255,
        values already in [0, 1] as they are, CT (reaching -900 HU) through -1000..1000 HU, anything
        else clipped to its 0.5..99.5 percentiles per channel. NaN and infinite voxels take no part
        in the choice or the percentiles, and end at 0."""
        x = array.astype(np.float32)
        if array.dtype == np.uint8:
            return x / 255.0
        finite = np.isfinite(x)
        values = x[finite]
        if values.size == 0:
            return np.zeros_like(x)
        if values.min() >= 0.0 and values.max() <= 1.0:
            out = x
        elif values.min() <= -900:
            out = np.clip((x + 1000.0) / 2000.0, 0.0, 1.0)
        else:
            out = np.empty_like(x)
            for c in range(x.shape[0]):
                channel = x[c][finite[c]]
                low, high = np.percentile(channel, [0.5, 99.5]) if channel.size else (0.0, 0.0)
                out[c] = np.clip((x[c] - low) / (high - low), 0.0, 1.0) if high > low else 0.0
        return np.where(finite, out, 0.0).astype(np.float32)


class InputAdapter(PluginObject):
    """Turns an image or volume into tokens: `module(x: [B, C, *S], keep=None) -> [B, N, E]`.

    The module holds `patch_size` (a tuple, one entry per spatial axis); `keep` [B, n_keep] int64
    selects which patches (row-major over the padded grid) to embed. The model shares one module
    between the datasets of one modality (same adapter and channel count), so it should accept any
    spatial size of at least one patch.
    """

    kind = "input-adapter"

    @abstractmethod
    def build(self, *, channels: int, size: tuple[int, ...], embed_dim: int, patch: int):
        """Return an `nn.Module` for inputs of `channels` channels (native spatial `size`)."""


class OutputHead(PluginObject):
    """Maps output-query features [B, Q, E] to a task's prediction.

    `example_spec` is a spec its `build` accepts (the registry's smoke test builds every head with it);
    `example_inputs` names the shapes of extra forward inputs that go with features [2, 5, E] in that
    test (e.g. {"image": (2, 1, 2, 10)} for a head that takes the image as a skip);
    `prediction` says what the built module returns, e.g. "logits [B, num_outputs]".
    """

    kind = "output-head"
    example_spec: ClassVar[dict] = {}
    example_inputs: ClassVar[dict] = {}
    prediction: str = ""

    @abstractmethod
    def build(self, *, embed_dim: int, **spec):
        """Return an `nn.Module` for this head; `spec` comes from the pretext task."""

    def spec_parameters(self) -> list[inspect.Parameter]:
        """The keys of the `spec` that `build` takes (a task's `OutputSpec.options`), with defaults."""
        return [p for p in inspect.signature(self.build).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name != "embed_dim"]


@dataclass(frozen=True)
class InputSpec:
    """An input the model must embed: 2D or 3D, its channel count and native size.

    spatial_dims: 2 for images [B, C, H, W], 3 for volumes [B, C, D, H, W].
    channels:     C.
    size:         the native spatial size, (H, W) or (D, H, W).

    The model embeds every dataset's own input; a task that feeds the encoder another kind of input
    (e.g. 2D slices of a 3D dataset) declares it in `PretextTask.extra_inputs`, so the model builds
    an input adapter for it.
    """

    spatial_dims: int
    channels: int
    size: tuple[int, ...]


@dataclass(frozen=True)
class OutputSpec:
    """What a task needs from the Output Adaptformer for one dataset (`PretextTask.output_spec`).

    head:    a registered output head; it decides what `ctx.decode` returns (the task's
             `prediction`). Built-ins: "label" -> logits [B, num_outputs] (queries pooled;
             batch_norm=True batch-normalises them; with ordinal=True, CORAL cumulative
             logits), "dense" -> pixels [B, Q, C * prod(patch)],
             "embedding" -> [B, out_dim] (queries pooled, then a projection MLP).
    queries: the number of learned queries (1 for a label or an embedding), or "patches": one
             query per patch of the dataset's grid, built from the position embeddings (dense
             outputs; the model then passes `channels` and `patch_size` to the head, and
             `View.positions` picks which patches are queried).
    options: keyword arguments for the head's `build`, e.g. {"num_outputs": 4} for "label",
             {"out_dim": 128} for "embedding".
    shared:  one output for every dataset the task runs on (their specs must agree), e.g. a
             domain classifier; otherwise each (task, dataset) pair gets its own.

    E.g. `OutputSpec("label", queries=1, options={"num_outputs": 4})` for a 4-class task,
    `OutputSpec("dense", queries="patches")` for a reconstruction.
    """

    head: str
    queries: int | str = 1
    options: dict = field(default_factory=dict)
    shared: bool = False


@dataclass
class View:
    """What a task feeds the model (`make_view`), and what its `loss` compares the prediction with.

    image:     [B', C, *S] float, the input view the encoder sees: shaped like the batch's
               dataset (or like an input the task declares in `extra_inputs`). B' may differ from
               the batch's B, e.g. two views concatenated to [2B, C, *S].
    target:    anything the task's `loss` needs (class indices [B'], the clean image, ...); the
               model never reads it.
    keep:      [B', n_keep] int64 indices of the patches to embed, row-major over the padded
               patch grid (the order of `ctx.patchify`), e.g. MAE's visible patches; None embeds
               every patch.
    positions: [B', Q] int64 patches the dense queries sit at (same indexing); the dense
               prediction is then [B', Q, C * prod(patch)]. None queries every patch (Q = N).
               Only for outputs with queries="patches".
    """

    image: torch.Tensor
    target: Any = None
    keep: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass
class TaskResult:
    """One task's outcome on one batch (what `loss` and `forward` return).

    loss:    a 0-dim tensor that carries the gradient, unweighted: the engine applies the task's
             `weight` and the run's loss weighting, and ends the run on a non-finite loss.
    metrics: name -> float for this batch (e.g. {"accuracy": 0.75}; use `.item()`), logged beside
             the loss in the progress table and `metrics.jsonl`.

    `classification_result(logits, target)` builds one for a cross-entropy task.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Chance:
    """What a task scores when it has learned nothing about the image (`PretextTask.chance`).

    loss:   the loss of the best guess that ignores the image, e.g. ln K for K equally likely classes.
    metric: the name of one of the task's metrics (its `TaskResult.metrics` key), e.g. "accuracy".
    value:  that metric's value at chance, e.g. 1 / K.
    higher_is_better: whether a learning task moves the metric above `value` (else below).

    The engine compares each (task, dataset)'s logged loss and metric with these: the end-of-run
    verdict (learning, at chance, diverging), the warning when a task stays at chance, the plots'
    chance lines.
    """

    loss: float
    metric: str | None = None
    value: float | None = None
    higher_is_better: bool = True


def classification_chance(num_classes: int) -> Chance:
    """Chance of a task that draws one of `num_classes` classes uniformly and scores it with
    `classification_result`: loss ln K, accuracy 1 / K."""
    return Chance(loss=math.log(num_classes), metric="accuracy", value=1.0 / num_classes)


def classification_result(logits: torch.Tensor, target: torch.Tensor) -> TaskResult:
    """The cross-entropy of `logits` [B, K] against class indices `target` [B], with the top-1
    "accuracy" as its metric."""
    import torch.nn.functional as F  # torch loads with the first task that runs, not with the plugin list

    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return TaskResult(F.cross_entropy(logits, target), {"accuracy": accuracy.item()})


def option_text(value: Any) -> str:
    """A task option's value as text, as `--task-option` gives it: true/false, none, A:B for a tuple."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ":".join(map(option_text, value))
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class NoOptions:
    """A task without options."""


class PretextTask(PluginObject):
    """A training objective: makes (view, target) from a batch, names its head, computes its loss.

    It never owns the training loop. A task implements `output_spec`, `make_view` and `loss`; the
    default `forward` runs make_view -> ctx.encode -> ctx.decode -> loss, and a task whose flow
    differs (several encodes, a gradient reversal) overrides `forward` instead of the last two.
    `ctx` is a `medformer_core.api.context.TaskContext`.

    Options are a frozen dataclass `Options` (typed fields with defaults; range checks in
    `__post_init__` raise ValueError); `task.with_options(weight=2.0, mask_ratio=0.8)` returns a
    configured copy, each value checked and converted to its field's type (int, float, bool, str,
    tuples, Literal choices), from text too ("0.8", "true", "0:2"). `weight` scales the
    task's loss in the engine's weighting; `loss` itself is always unweighted. All randomness
    comes from the `generator` passed in, so a seeded run is reproducible.
    """

    kind = "pretext-task"
    Options: ClassVar[type] = NoOptions
    needs_labels: ClassVar[bool] = False  # skipped on batches without a "label"
    needs_masks: ClassVar[bool] = False  # skipped on batches without a segmentation "mask"

    def __init__(self, weight: float = 1.0, **options):
        self.weight = float(weight)
        self.options = self._make_options(options)

    def _make_options(self, options: dict, base: Any = None):
        """`base` (an `Options`; None: the defaults) with `options` replaced, each checked and
        converted to its field's type (values may be given as text, e.g. "0.8" or "true")."""
        known = settings_of(self.Options)
        kinds = typing.get_type_hints(self.Options)
        typed = {}
        for key, value in options.items():
            if key not in known:
                raise unknown_name(f"task '{self.name}' has no option '{key}'", key, known)
            try:
                typed[key] = convert(option_text(value), kinds[key])
            except ValueError:
                raise UsageError(f"task '{self.name}': option '{key}' must be {describe(kinds[key])}, got '{value}'",
                                 hint=self._options_hint(key)) from None
        try:
            return dataclasses.replace(base, **typed) if base is not None else self.Options(**typed)
        except ValueError as exc:  # a range check in the options' __post_init__
            raise UsageError(f"task '{self.name}': {exc}", hint=self._options_hint()) from None

    def _options_hint(self, key: str | None = None) -> str:
        """Where the user sees this task's options (and the default of option `key`)."""
        default = f"the default is {option_text(getattr(self.Options(), key))}; " if key else ""
        return f"{default}see the options with `medformer plugins show {self.name}`"

    def with_options(self, weight: float | None = None, **options) -> PretextTask:
        """A copy with `weight` and options replaced (the others keep their values)."""
        task = copy.copy(self)
        if weight is not None:
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise UsageError(f"task '{self.name}': weight must be a number, got '{weight}'") from None
            if weight < 0:
                raise UsageError(f"task '{self.name}': weight must be >= 0, got {weight}")
            task.weight = weight
        task.options = self._make_options(options, self.options)
        return task

    def reject_reason(self, info: DatasetInfo, run: list[DatasetInfo]) -> str | None:
        """Why this task cannot train on dataset `info` in a run over `run`; None when it can."""
        if info.spatial_dims not in self.spatial_dims:
            wanted = " or ".join(f"{d}D" for d in self.spatial_dims)
            return f"{info.spatial_dims}D, {self.name} needs {wanted} input"
        if self.channels is not None and info.channels != self.channels:
            return f"{info.channels} channels, {self.name} needs {self.channels}"
        return None

    def extra_inputs(self, info: DatasetInfo) -> list[InputSpec]:
        """Inputs besides the dataset's own that the task feeds the encoder (e.g. 2D slices of 3D)."""
        return []

    def output_spec(self, info: DatasetInfo, run: list[DatasetInfo]) -> OutputSpec:
        """The output head and queries this task needs for dataset `info`."""
        raise NotImplementedError(f"task '{self.name}' does not implement output_spec")

    def make_view(self, ctx: TaskContext, batch: dict, generator: torch.Generator) -> View:
        """Make the input view and the target from `batch`."""
        raise NotImplementedError(f"task '{self.name}' does not implement make_view")

    def loss(self, ctx: TaskContext, prediction: torch.Tensor, view: View) -> TaskResult:
        """Compare the head's `prediction` with `view.target`."""
        raise NotImplementedError(f"task '{self.name}' does not implement loss")

    def forward(self, ctx: TaskContext, batch: dict, generator: torch.Generator) -> TaskResult:
        """One training step's loss on `batch`."""
        view = self.make_view(ctx, batch, generator)
        latents = ctx.encode(view.image, keep=view.keep)
        return self.loss(ctx, ctx.decode(latents, view.positions), view)

    def chance(self, data: ImageSplit, batch_size: int) -> Chance | None:
        """This task's chance level on `data` (a training split: its `info`, and its `labels` when it
        has them) at `batch_size` samples a batch; None when the task has none (e.g. a
        reconstruction): its verdict then comes from the trend of its loss."""
        return None

    def predict(self, ctx: TaskContext, batch: dict) -> torch.Tensor:
        """Scores for the clean `batch` (the supervised task's class probabilities)."""
        raise UsageError(f"task '{self.name}' makes no predictions", hint="predict with task 'supervised'")

    def pictures(self, ctx: TaskContext, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Columns of a picture grid, e.g. {"input": x, "masked": v, "reconstruction": r}, each
        [B, C, *S] in [0, 1]; None for tasks that make no pictures."""
        return None

    def unimplemented(self) -> list[str]:
        """The required methods this task's class leaves out (checked before training)."""
        required = ["output_spec"]
        if type(self).forward is PretextTask.forward:
            required += ["make_view", "loss"]
        return [m for m in required if getattr(type(self), m) is getattr(PretextTask, m)]
