"""Launch configurations: pinned per shape class, cached, tuned only when asked.

A kernel call looks its config up by a shape-class key (kernel, card, dtype, head dim, lengths rounded
up to a power of two) and launches directly: no per-call autotune dispatch. The first candidate of
each list is the pinned default. With `MEDFORMER_AUTOTUNE=1` (or `medformer bench --autotune`) a
cache miss on a GPU times every candidate once and writes the winner to the cache file
(`MEDFORMER_KERNEL_CACHE`, default `~/.cache/medformer/kernel_configs.json`), which later runs read.
Under the Triton interpreter every kernel gets one tiny config, so CPU tests stay fast.
"""

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medformer_core.api.files import atomic_write

AUTOTUNE_ENV = "MEDFORMER_AUTOTUNE"
CACHE_ENV = "MEDFORMER_KERNEL_CACHE"


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes (constexpr name -> value), warps and pipeline stages of one kernel launch."""

    blocks: tuple[tuple[str, int], ...]
    warps: int
    stages: int

    @classmethod
    def of(cls, warps: int, stages: int, **blocks: int) -> "LaunchConfig":
        return cls(tuple(blocks.items()), warps, stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def launch_options(self) -> dict:
        """Keyword arguments for `kernel[grid](...)`."""
        return {**dict(self.blocks), "num_warps": self.warps, "num_stages": self.stages}

    def to_json(self) -> dict:
        return {"blocks": dict(self.blocks), "warps": self.warps, "stages": self.stages}

    @classmethod
    def from_json(cls, data: dict) -> "LaunchConfig":
        return cls.of(int(data["warps"]), int(data["stages"]), **{k: int(v) for k, v in data["blocks"].items()})

    def label(self) -> str:
        blocks = ",".join(f"{name}={value}" for name, value in self.blocks)
        return f"{blocks},warps={self.warps},stages={self.stages}"


def length_class(n: int) -> int:
    """A sequence length rounded up to a power of two, at least 16: one config serves each class."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "").strip() not in ("", "0")


def cache_path() -> Path:
    default = Path.home() / ".cache" / "medformer" / "kernel_configs.json"
    return Path(os.environ.get(CACHE_ENV) or default)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def shape_key(kernel: str, device: torch.device, dtype: torch.dtype, **sizes: int) -> str:
    """'attention_fwd|NVIDIA_H200|bfloat16|d=64|nq=64|nk=4096': the cache key of a shape class."""
    card = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    parts = [kernel, card, str(dtype).removeprefix("torch."), *(f"{k}={v}" for k, v in sizes.items())]
    return "|".join(parts)


class ConfigCache:
    """Chosen configs in memory, backed by a JSON file read once and rewritten atomically on change."""

    def __init__(self):
        self._chosen: dict[str, LaunchConfig] = {}
        self._file: dict[str, LaunchConfig] | None = None
        self.plans: dict[tuple, object] = {}  # per-shape launch plans built from the chosen configs

    def _stored(self) -> dict[str, LaunchConfig]:
        if self._file is None:
            self._file = {}
            path = cache_path()
            if path.is_file():
                try:
                    raw = json.loads(path.read_text())
                    self._file = {key: LaunchConfig.from_json(value) for key, value in raw.items()}
                except (ValueError, KeyError, TypeError, AttributeError):
                    self._file = {}  # a damaged cache is ignored and rewritten by the next tuning
        return self._file

    def choose(self, key: str, candidates: list[LaunchConfig],
               run: Callable[[LaunchConfig], object] | None = None) -> LaunchConfig:
        """The config for `key`: chosen before, stored in the file, tuned now (autotune mode), or the default."""
        config = self._chosen.get(key)
        if config is not None:
            return config
        config = self._stored().get(key)
        if config is None and run is not None and autotune_enabled() and len(candidates) > 1:
            config = _fastest(candidates, run)
            self._stored()[key] = config
            self._save()
        self._chosen[key] = config = config or candidates[0]
        return config

    def _save(self) -> None:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({key: value.to_json() for key, value in sorted(self._stored().items())}, indent=1)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(text + "\n")

    def clear(self) -> None:
        """Forget every choice (tests; after the cache file or the environment changed)."""
        self._chosen.clear()
        self._file = None
        self.plans.clear()


def _fastest(candidates: list[LaunchConfig], run: Callable[[LaunchConfig], object]) -> LaunchConfig:
    """The candidate whose `run` is fastest (median of CUDA-event timings); ones that fail to launch lose."""
    from triton.testing import do_bench

    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            ms = do_bench(lambda config=config: run(config), warmup=5, rep=25, return_mode="median")
        except Exception:  # out of resources (shared memory, registers) on this card: not a candidate here
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best


CACHE = ConfigCache()
