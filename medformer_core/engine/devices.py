"""The torch device a run asks for by name: auto, cpu, cuda or cuda:N."""

import torch

from medformer_core.api.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without it is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)
