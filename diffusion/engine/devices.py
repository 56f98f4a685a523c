"""Which device a command runs on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, refused with the fix when it can't be."""

from __future__ import annotations

import torch

from diffusion.errors import ConfigError


def resolve_device(device: str, local_rank: int = 0, setting: str = "device") -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU), else the CPU; ``setting`` names the config key in
    the error for a device this machine does not have."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{setting}={device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={device}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}): "
                         f"use {setting}=cpu, or {setting}=auto to take a GPU only where there is one")
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return resolved
