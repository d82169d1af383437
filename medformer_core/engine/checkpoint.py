"""Atomic checkpoints: model weights in safetensors, training state loadable with weights_only=True.

A checkpoint is a directory `checkpoints/step_000120/` holding `model.safetensors` and `state.pt`.
It is written under a temporary name and renamed into place, so a killed run never leaves a
half-written checkpoint where a resume would find it; the last `keep` are kept.
"""

import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from medformer_core.api.errors import CheckpointError
from medformer_core.api.files import atomic_write

STEP_DIR = re.compile(r"^step_(\d{6,})$")
ADAPTER_KEY = re.compile(r"adapters\.(\w+?[23]d)_\d+ch\.")  # encoder.adapters.patch2d_1ch.weight -> patch2d
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict, keep: int) -> Path:
    """Write model weights and training `state` for `step`, atomically; prune to the last `keep`."""
    final = root / f"step_{step:06d}"
    with atomic_write(final) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_atomically(model: torch.nn.Module, path: Path) -> None:
    """Write `model`'s weights to the safetensors file `path`, atomically."""
    with atomic_write(path) as tmp:
        save_model(model, str(tmp))


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load weights into `model` and return the training state; a damaged file is a clear error."""
    model_file, state_file = path / MODEL_FILE, path / STATE_FILE
    for required in (model_file, state_file):
        if not required.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required.name} is missing",
                                  hint=f"delete {path} to resume from the previous checkpoint")
    try:
        missing, unexpected = load_model(model, str(model_file), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {model_file}: {exc}",
                              hint=f"delete {path} to resume from the previous checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{model_file} does not match this run's model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            hint=mismatch_hint(unexpected),
        )
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read {state_file}: {type(exc).__name__}: {exc}".splitlines()[0],
                              hint=f"delete {path} to resume from the previous checkpoint") from None


def mismatch_hint(unexpected: list[str]) -> str:
    """How to rebuild the model a checkpoint was written by: its input adapters, when they differ."""
    adapters = sorted({m.group(1) for key in unexpected if (m := ADAPTER_KEY.search(key))})
    if adapters:
        options = " ".join(f"--model-option adapter{name[-2:]}={name}" for name in adapters)
        return f"the checkpoint's input adapters are {', '.join(adapters)}: resume with {options}"
    return "resume with the same plugins, datasets and model preset as the original run"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = checkpoint_dirs(root)
    return found[-1] if found else None
