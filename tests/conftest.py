"""Shared fixtures: composing the real configs in a temporary run directory; the ``gpu`` tier skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from diffusion.config import CONFIG_DIR, register_resolvers

register_resolvers()
REPO = Path(__file__).resolve().parent.parent
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False here"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are collected everywhere and skipped, saying why, where PyTorch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


def compose_config(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the command line would, writing into ``output_dir``."""
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, *extra])


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def smoke_overrides(**extra: object) -> list[str]:
    """A tiny training run on digits: no tracker, CPU, a few steps."""
    overrides = {"debug": "smoke", "logger": "none"}
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


def cli(module: str, *args: str, cwd: Path, check: bool = True, env: dict | None = None):
    """Run ``python -m diffusion.cli.<module> ARGS`` as a user would, returning the completed process."""
    import subprocess

    full_env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", f"diffusion.cli.{module}", *args], cwd=cwd, capture_output=True, text=True, env=full_env,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"diffusion.cli.{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
