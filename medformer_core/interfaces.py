"""The abstract plugin interfaces the registries hold.

Every registered object names itself, says in one line what it is, and declares which inputs it
accepts: `spatial_dims` (2 for images [B, C, H, W], 3 for volumes [B, C, D, H, W]) and `channels`
(None: any channel count).
"""

from abc import ABC, abstractmethod
from typing import ClassVar

from medformer_core.data import DatasetInfo, DatasetOptions, ImageSplit


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


class InputAdapter(PluginObject):
    """Turns an image or volume into tokens: `module(x: [B, C, *S], keep=None) -> [B, N, E]`."""

    kind = "input-adapter"

    @abstractmethod
    def build(self, *, channels: int, size: tuple[int, ...], embed_dim: int, patch: int):
        """Return an `nn.Module` for inputs of `channels` channels and spatial `size`."""


class OutputHead(PluginObject):
    """Maps output-query features [B, Q, E] to a task's prediction."""

    kind = "output-head"

    @abstractmethod
    def build(self, *, embed_dim: int, **spec):
        """Return an `nn.Module` for this head; `spec` comes from the pretext task."""


class PretextTask(PluginObject):
    """A training objective: makes (view, target) from a batch, names its head, computes its loss.

    It never owns the training loop. The methods that connect a task to the model are defined by
    the model (see `medformer_core.model`); this base only fixes identity and accepted inputs.
    """

    kind = "pretext-task"
