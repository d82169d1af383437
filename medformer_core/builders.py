"""Models built with the loaded plugins' input adapters and output heads.

The model modules take their adapter and head registries as arguments (building a model loads no
plugins); the engine, benchmarks and tests build through here, which passes `registries()`.
"""

from medformer_core.data import DatasetInfo
from medformer_core.interfaces import PretextTask
from medformer_core.model import ModelConfig
from medformer_core.multitask import MultitaskModel, build_multitask_model
from medformer_core.plugins import registries


def build_model(preset: "str | ModelConfig", datasets: list[DatasetInfo], tasks: list[PretextTask],
                **overrides) -> MultitaskModel:
    """`build_multitask_model` with the registered input adapters and output heads."""
    regs = registries()
    return build_multitask_model(preset, datasets, tasks, regs.input_adapters, regs.output_heads, **overrides)
