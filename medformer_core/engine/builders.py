"""Models built with the loaded plugins' input adapters and output heads.

The model modules take their adapter and head registries as arguments (building a model loads no
plugins); the engine, benchmarks and tests build through here, which passes `registries()`.
"""

from medformer_core.api.data import DatasetInfo
from medformer_core.api.interfaces import PretextTask
from medformer_core.api.plugins import registries
from medformer_core.model.medformer import ModelConfig
from medformer_core.model.multitask import MultitaskModel, build_multitask_model


def build_model(preset: "str | ModelConfig", datasets: list[DatasetInfo], tasks: list[PretextTask],
                **overrides) -> MultitaskModel:
    """`build_multitask_model` with the registered input adapters and output heads."""
    regs = registries()
    return build_multitask_model(preset, datasets, tasks, regs.input_adapters, regs.output_heads, **overrides)
