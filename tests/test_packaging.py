"""The platform as a user installs it: a wheel, not this checkout, run from an empty folder of the user's own."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO

MY_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: unet_small
trainer:
  max_steps: 3000
optimizer:
  lr: 3e-4
"""


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command as a user would, failing with its output."""
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A throwaway virtual environment with the wheel installed in it and this environment's packages beside it."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp / "dist",
         REPO], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("diffusion-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
        cwd=tmp)
    # the dependencies: this environment's site-packages as path entries (the editable install of this checkout in
    # them is not loaded: only the .pth files of the environment's own site-packages are)
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("".join(f"{path}\n" for path in sys.path
                                                           if path.endswith("site-packages")))
    return venv


@pytest.mark.slow
def test_the_wheel_trains_samples_and_sweeps_from_an_empty_folder_with_the_users_own_experiment(installed, tmp_path):
    """As the README's "Your own project" says: an experiment of the user's own through Hydra's search path, a
    sample of its checkpoint, and a sweep on a launcher, all from the installed wheel."""
    bin_dir = installed / "bin"
    where = run([bin_dir / "python", "-c", "import diffusion, diffusion.conf; print(diffusion.__file__); "
                 "print(diffusion.conf.CONFIG_DIR)"], cwd=tmp_path).stdout.split()
    assert all(Path(path).is_relative_to(installed) for path in where), where  # the wheel's code and configs
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "my_digits.yaml").write_text(MY_EXPERIMENT)

    run([bin_dir / "diffusion-train", "hydra.searchpath=[file://conf]", "experiment=my_digits", "debug=smoke",
         "logger=none"], cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs" / "train").glob("2*")
    choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
    assert (choices.experiment, choices.model) == ("my_digits", "unet_small")
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").optimizer.lr == 3e-4
    assert (run_dir / "checkpoints" / "last.pt").is_file()

    run([bin_dir / "diffusion-sample", f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "num_images=4",
         "sampler.steps=2", "paths.output_dir=samples"], cwd=tmp_path)
    assert (tmp_path / "samples" / "grid.png").is_file()

    run([bin_dir / "diffusion-train", "-m", "debug=smoke", "logger=none", "optimizer.lr=1e-4,3e-4",
         "trainer.max_steps=2", "callbacks.sample_grid.every=0", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        cwd=tmp_path)
    jobs = sorted((tmp_path / "runs" / "train" / "multirun").glob("*/*/checkpoints/last.pt"))
    assert [OmegaConf.load(job.parent.parent / ".hydra" / "config.yaml").optimizer.lr for job in jobs] == [1e-4, 3e-4]
