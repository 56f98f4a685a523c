"""The package's shape, which a newcomer reads first: a short top level, small modules, a trainer that only trains,
and every package and config file in the wheel."""

import subprocess
import sys

import pytest
import setuptools

from tests.conftest import REPO

PACKAGE = REPO / "diffusion"


def tracked(folder: str) -> list[str]:
    """The files git tracks under ``folder`` (nothing a run or a build left behind)."""
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_the_package_top_level_has_at_most_twelve_entries():
    entries = {path.split("/")[1] for path in tracked("diffusion")}
    assert len(entries) <= 12, sorted(entries)


def test_no_module_is_over_400_lines_and_the_trainer_under_300():
    lengths = {path: len((REPO / path).read_text().splitlines()) for path in tracked("diffusion") if path.endswith(".py")}
    assert max(lengths.values()) <= 400, {path: n for path, n in lengths.items() if n > 400}
    assert lengths["diffusion/engine/trainer.py"] < 300


def test_importing_the_trainer_imports_no_evaluation_features_or_report_module():
    code = ("import sys, diffusion.engine.trainer; "
            "print(sorted(m for m in sys.modules if m.startswith(('diffusion.evaluation', 'diffusion.reports'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_pyproject_lists_every_package_and_maps_the_configs_into_the_wheel():
    """A package missing from the list would be left out of the wheel; conf/ is installed as diffusion.conf."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(where=str(REPO), include=["diffusion", "diffusion.*"], exclude=["diffusion.conf"])
    assert sorted(settings["packages"]) == sorted([*found, "diffusion.conf"])
    assert settings["package-dir"] == {"diffusion.conf": "conf"}
    assert settings["package-data"] == {"diffusion.conf": ["**/*.yaml"]}
