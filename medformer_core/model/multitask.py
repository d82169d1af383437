"""One shared Medformer encoder with each pretext task's Output Adaptformer and head per dataset.

The training engine's boundary:

    check_tasks_accept(tasks, datasets)                       # UsageError before training
    model = build_multitask_model("tiny", datasets, tasks, input_adapters, output_heads, latents=64)
    results = model(batch, generator)                         # {task name: TaskResult}
    scores = model.predict(batch)                             # supervised scores [B, L]
    model.save_pictures(batch, generator, run_dir / "pictures", step)
    model.encoder.save_pretrained(path); model.load_encoder(path)

A task runs on every batch whose dataset it accepts (`PretextTask.reject_reason` is None); tasks
with `needs_labels` skip batches without a "label", those with `needs_masks` batches without a
"mask". Every task draws its randomness from the `generator` passed in, so a run seeded the same way
makes the same views; parameter initialisation and stochastic depth use torch's global generator
(seed it with torch.manual_seed). The generator may live on the CPU while the batch is on a GPU:
tasks draw on the generator's device and move.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medformer_core.api.data import DatasetInfo
from medformer_core.api.errors import CheckpointError, UsageError
from medformer_core.api.interfaces import InputAdapter, InputSpec, OutputHead, OutputSpec, PretextTask, TaskResult
from medformer_core.api.registry import Registry
from medformer_core.model.medformer import (
    Medformer,
    ModelConfig,
    OutputAdaptformer,
    load_encoder_weights,
    modality_key,
    model_config,
    module_key,
    read_export_config,
)
from medformer_core.model.patches import grid_shape, patchify, unpatchify
from medformer_core.reporting.pictures import save_picture_grid

ENCODER_ONLY_FIELDS = ("drop_path", "decoder_depth")  # config fields an exported encoder need not share
SHARED_OUTPUT = "all-datasets"  # the key of a task output shared by every dataset (OutputSpec.shared)


def check_tasks_accept(tasks: list[PretextTask], datasets: list[DatasetInfo]) -> None:
    """Raise a UsageError naming the task and the datasets when a task accepts none of them, or
    when a task leaves out a method it must implement."""
    names = [t.name for t in tasks]
    for name in set(names):
        if names.count(name) > 1:
            raise UsageError(f"task '{name}' is requested twice", hint="give each task once")
    for task in tasks:
        missing = task.unimplemented()
        if missing:
            raise UsageError(f"task '{task.name}' cannot train: it does not implement {', '.join(missing)}",
                             hint="see medformer_core.api.interfaces.PretextTask")
        reasons = [(info.name, task.reject_reason(info, datasets)) for info in datasets]
        if all(reason is not None for _, reason in reasons):
            listed = "; ".join(f"{name} ({reason})" for name, reason in reasons)
            raise UsageError(f"task '{task.name}' accepts none of the run's datasets: {listed}",
                             hint=f"add a dataset it accepts, or drop --plugin {task.name}")


def build_multitask_model(preset: "str | ModelConfig", datasets: list[DatasetInfo], tasks: list[PretextTask],
                          input_adapters: Registry[InputAdapter], output_heads: Registry[OutputHead],
                          **overrides) -> "MultitaskModel":
    """The model for a run: `preset` ("tiny", "small", "base" or a ModelConfig) with `overrides`,
    its adapters and heads built from `input_adapters` and `output_heads`."""
    config = model_config(preset, **overrides)
    check_tasks_accept(tasks, datasets)
    return MultitaskModel(config, datasets, tasks, input_adapters, output_heads)


@dataclass
class EncoderLoadReport:
    """What `MultitaskModel.load_encoder` did: tensors loaded, kept as initialised, ignored."""

    path: Path
    loaded: int
    missing: list[str] = field(default_factory=list)  # in this model, not in the export: kept as initialised
    unexpected: list[str] = field(default_factory=list)  # in the export, not in this model: ignored

    def __str__(self) -> str:
        text = f"loaded {self.loaded} encoder tensors from {self.path}"
        if self.missing:
            text += f"; kept as initialised (not in the export): {', '.join(self.missing)}"
        if self.unexpected:
            text += f"; ignored (not in this model): {', '.join(self.unexpected)}"
        return text


class TaskOutput(nn.Module):
    """A task's Output Adaptformer and head for one dataset: latents [B, M, E] -> prediction."""

    def __init__(self, adaptformer: OutputAdaptformer, head: nn.Module):
        super().__init__()
        self.adaptformer = adaptformer
        self.head = head

    def forward(self, latents: torch.Tensor, positions: torch.Tensor | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        features = self.adaptformer(latents, positions)
        return self.head(features) if image is None else self.head(features, image)


class ModelTaskContext:
    """The `TaskContext` of `task` on a batch of dataset `info`, backed by `model`."""

    def __init__(self, model: "MultitaskModel", task: PretextTask, info: DatasetInfo):
        self.model = model
        self.task = task
        self.info = info
        self.run = model.dataset_infos
        self.output: TaskOutput = model.output_for(task, info)

    def encode(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """image [B, C, *S] (any modality the model embeds) -> latents [B, M, E]."""
        return self.model.encoder(image, self.info.name, keep)

    def decode(self, latents: torch.Tensor, positions: torch.Tensor | None = None,
               image: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, M, E] -> the task head's prediction (dense: [B, Q, C * prod(patch)]); `image`
        [B, C, *S] goes to a head that takes the input as a skip (segment)."""
        return self.output(latents, positions, image)

    def patch_size(self, image: torch.Tensor) -> tuple[int, ...]:
        """The patch size of the input adapter of `image` [B, C, *S]."""
        return tuple(self.model.encoder.adapter_for(image).patch_size)

    def num_patches(self, image: torch.Tensor) -> int:
        """The number of patches of `image` [B, C, *S] (its padded grid)."""
        return math.prod(grid_shape(tuple(image.shape[2:]), self.patch_size(image)))

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, C, *S] -> patches [B, N, C * prod(patch)], in the dense head's layout."""
        return patchify(image, self.patch_size(image))

    def unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """patches [B, N, C * prod(patch)] -> an image shaped like `like` [B, C, *S]."""
        return unpatchify(patches, self.patch_size(like), like.shape[1], tuple(like.shape[2:]))


class MultitaskModel(nn.Module):
    """The shared encoder (`.encoder`) plus `outputs[task][dataset]`, a TaskOutput per pair (or
    `outputs[task]["all-datasets"]` for a task whose output is shared).

    input_adapters and output_heads: where the encoder's adapters and the tasks' heads are built
    from by name (the plugins' registries).
    """

    def __init__(self, config: ModelConfig, datasets: list[DatasetInfo], tasks: list[PretextTask],
                 input_adapters: Registry[InputAdapter], output_heads: Registry[OutputHead]):
        super().__init__()
        names = [info.name for info in datasets]
        if len(set(names)) != len(names) or not names:
            raise UsageError(f"a run needs distinct datasets, got {names}")
        self.config = config
        self.dataset_infos = list(datasets)
        self.tasks = {task.name: task for task in tasks}
        self.accepted = {info.name: [t for t in tasks if t.reject_reason(info, datasets) is None]
                         for info in datasets}
        inputs = []
        for info in datasets:
            inputs.append(InputSpec(info.spatial_dims, info.channels, tuple(info.size)))
            for task in self.accepted[info.name]:
                inputs += task.extra_inputs(info)
        self.encoder = Medformer(config, inputs, names, input_adapters)
        self.outputs = nn.ModuleDict({module_key(task.name): nn.ModuleDict() for task in tasks})
        for task in tasks:
            shared_spec = None
            for info in [i for i in datasets if task in self.accepted[i.name]]:
                spec = task.output_spec(info, datasets)
                head = output_heads.get(spec.head)
                outputs = self.outputs[module_key(task.name)]
                if not spec.shared:
                    outputs[module_key(info.name)] = self.build_output(task, info, spec, head)
                elif shared_spec is None:
                    shared_spec, outputs[SHARED_OUTPUT] = spec, self.build_output(task, info, spec, head)
                elif spec != shared_spec:
                    raise UsageError(f"task '{task.name}' shares one output across datasets but asks for "
                                     f"{spec} on '{info.name}' and {shared_spec} on another")

    def output_for(self, task: PretextTask, info: DatasetInfo) -> "TaskOutput":
        outputs = self.outputs[module_key(task.name)]
        return outputs[SHARED_OUTPUT] if SHARED_OUTPUT in outputs else outputs[module_key(info.name)]

    def build_output(self, task: PretextTask, info: DatasetInfo, spec: OutputSpec, head: OutputHead) -> TaskOutput:
        """The Output Adaptformer and `head` (registered as `spec.head`) of `spec`, for `task` on `info`."""
        if spec.queries == "patches" and spec.shared:
            raise UsageError(f"task '{task.name}' asks for a shared dense output",
                             hint="dense outputs follow each dataset's grid; drop shared=True")
        if spec.queries == "patches":
            adapter_name, _ = self.config.adapter_for(info.spatial_dims)
            patch = tuple(self.encoder.adapters[modality_key(adapter_name, info.channels)].patch_size)
            adaptformer = OutputAdaptformer(self.config, grid=grid_shape(tuple(info.size), patch))
            options = {"channels": info.channels, "patch_size": patch, **spec.options}
        elif isinstance(spec.queries, int) and spec.queries >= 1:
            adaptformer = OutputAdaptformer(self.config, num_queries=spec.queries)
            options = dict(spec.options)
        else:
            raise UsageError(f"task '{task.name}' asks for queries={spec.queries!r}",
                             hint="use a positive number of learned queries or 'patches'")
        return TaskOutput(adaptformer, head.build(embed_dim=self.config.embed_dim, **options))

    def dataset_info(self, batch: dict) -> DatasetInfo:
        """The DatasetInfo of `batch["dataset"]`, after checking the image's layout against it."""
        name = batch["dataset"]
        info = next((i for i in self.dataset_infos if i.name == name), None)
        if info is None:
            raise UsageError(f"this model was not built for dataset '{name}'",
                             hint=f"it knows: {', '.join(i.name for i in self.dataset_infos)}")
        image = batch["image"]
        expected = [info.channels, *info.size]
        if list(image.shape[1:]) != expected:
            raise UsageError(f"batch of '{name}' has images {list(image.shape)}, the model expects [B, "
                             f"{', '.join(map(str, expected))}]", hint="rebuild the model for this dataset's size")
        return info

    def tasks_for(self, dataset: str) -> list[PretextTask]:
        """The tasks that run on batches of `dataset`, in the run's order."""
        return self.accepted[dataset]

    def forward(self, batch: dict, generator: torch.Generator) -> dict[str, TaskResult]:
        """Every accepting task's unweighted loss and metrics on `batch` (one dataset)."""
        info = self.dataset_info(batch)
        results = {}
        for task in self.accepted[info.name]:
            missing = [key for key, needed in (("label", task.needs_labels), ("mask", task.needs_masks))
                       if needed and batch.get(key) is None]
            if missing:
                continue
            results[task.name] = task.forward(ModelTaskContext(self, task, info), batch, generator)
        return results

    def predict(self, batch: dict, task: str = "supervised") -> torch.Tensor:
        """Scores of `task` on the clean `batch`, as MedMNIST's evaluator takes them.

        supervised: multi-class and ordinal -> class probabilities [B, K]; binary -> [B, 2]
        (softmax; the evaluator reads the last column); multi-label -> sigmoid [B, L].
        Call under torch.no_grad() and model.eval() for evaluation.
        """
        info = self.dataset_info(batch)
        chosen = self.tasks.get(task)
        if chosen is None or chosen not in self.accepted[info.name]:
            raise UsageError(f"this model has no '{task}' output for dataset '{info.name}'",
                             hint=f"tasks on it: {', '.join(t.name for t in self.accepted[info.name]) or 'none'}")
        return chosen.predict(ModelTaskContext(self, chosen, info), batch)

    @torch.no_grad()
    def save_pictures(self, batch: dict, generator: torch.Generator, out_dir: Path, step: int,
                      max_samples: int = 8) -> list[Path]:
        """PNG grids (input, corrupted/masked view, reconstruction) of the first `max_samples`
        samples for each picture-making task on this batch's dataset; 3D as three middle slices.

        Pictures draw from `generator`: pass a separate one to keep the training stream unchanged.
        """
        info = self.dataset_info(batch)
        sample = {k: v[:max_samples] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        was_training = self.training
        self.eval()
        written = []
        try:
            for task in self.accepted[info.name]:
                columns = task.pictures(ModelTaskContext(self, task, info), sample, generator)
                if columns:
                    path = Path(out_dir) / f"{task.name}-{info.name}-step{step:06d}.png"
                    written.append(save_picture_grid(columns, path))
        finally:
            self.train(was_training)
        return written

    def load_encoder(self, directory: "str | Path") -> EncoderLoadReport:
        """Load an exported encoder (`Medformer.save_pretrained`) into this model's encoder.

        Adapters and dataset embeddings this run has but the export lacks keep their
        initialisation and are reported as missing; the export's others are reported as
        unexpected and ignored. A different architecture or a damaged file is a CheckpointError.
        """
        directory = Path(directory)
        exported = read_export_config(directory)
        theirs = exported.get("model", {})
        ours = {k: v for k, v in vars(self.config).items() if k not in ENCODER_ONLY_FIELDS}
        differ = [f"{k} {theirs.get(k)!r} != {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise CheckpointError(f"the encoder in {directory} has another architecture: {'; '.join(differ)}",
                                  hint="build the model with the exported encoder's settings")
        missing, unexpected = load_encoder_weights(self.encoder, directory)
        core = [k for k in missing if not k.startswith(("adapters.", "dataset_embed.", "intensity."))]
        if core:
            raise CheckpointError(f"{directory} lacks encoder tensors {core[:5]}", hint="export the encoder again")
        loaded = len(self.encoder.state_dict()) - len(missing)
        return EncoderLoadReport(directory, loaded, missing, unexpected)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
