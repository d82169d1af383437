"""medformer core, in layers: `api` (the plugin contract), `reporting`, `model`, `engine`, `downstream`.

Plugin authors import everything they need from here:

    from medformer_core import hookimpl, PretextTask, View, TaskResult, OutputSpec, TaskContext
"""

import sys

from medformer_core.api import data, errors, hookspecs, interfaces
from medformer_core.api.context import TaskContext
from medformer_core.api.crops import CropSplit, Volume
from medformer_core.api.data import DatasetInfo, DatasetOptions, ImageSplit, stratified_subset
from medformer_core.api.errors import DataError, MedformerError, UnknownNameError, UsageError
from medformer_core.api.files import atomic_write
from medformer_core.api.hookspecs import hookimpl
from medformer_core.api.interfaces import (
    Chance,
    DatasetFactory,
    InputAdapter,
    InputSpec,
    NoOptions,
    OutputHead,
    OutputSpec,
    PretextTask,
    TaskResult,
    View,
    classification_chance,
    classification_result,
)
from medformer_core.api.options import parse_options, split_pairs

# The modules plugins imported before the core had layers keep working under their old names.
sys.modules.update({f"{__name__}.{module.__name__.rpartition('.')[2]}": module
                    for module in (data, errors, hookspecs, interfaces)})

__all__ = [
    "Chance", "CropSplit", "DataError", "DatasetFactory", "DatasetInfo", "DatasetOptions", "ImageSplit",
    "InputAdapter", "InputSpec", "MedformerError", "NoOptions", "OutputHead", "OutputSpec", "PretextTask",
    "TaskContext", "TaskResult", "UnknownNameError", "UsageError", "View", "Volume", "atomic_write",
    "classification_chance", "classification_result", "hookimpl", "parse_options", "split_pairs", "stratified_subset",
]
