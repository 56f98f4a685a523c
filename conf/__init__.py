"""The shipped configs: this folder is the package ``diffusion.conf`` once installed (``pyproject.toml`` maps it)."""

from pathlib import Path

# where Hydra finds train.yaml and the config groups, in a checkout and in an installed wheel alike
CONFIG_DIR = str(Path(__file__).resolve().parent)
