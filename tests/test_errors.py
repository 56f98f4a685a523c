"""A user's mistake ends a command with one line that names the fix and a documented exit code, no traceback; a bug
keeps its traceback and exits with 1."""

import json
import os
import pathlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from diffusion.cli.train import train
from diffusion.config import CONFIG_DIR, check_value_types, register_resolvers
from diffusion.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from diffusion.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DataError,
    PathNotFound,
    TrainingDiverged,
    exit_code_of,
    message_of,
    reported_errors,
)
from tests.conftest import REPO, cli, compose_config, smoke_overrides


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints of a class-conditional and an unconditional model, and broken files made from them."""
    root = tmp_path_factory.mktemp("files")
    train(compose_config("train", smoke_overrides(**{"model.num_classes": "auto"}), root / "conditional"))
    train(compose_config("train", smoke_overrides(), root / "unconditional"))
    conditional = root / "conditional" / "checkpoints" / "last.pt"
    state = load_checkpoint(conditional)
    save_checkpoint({**state, "format_version": FORMAT_VERSION + 1}, root / "newer.pt")
    save_checkpoint({**state, "config": state["config"].replace("_target_: diffusion.models.UNet",
                                                                  "_target_: os.system")}, root / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, root / "foreign.pt")
    torch.save({"model": pathlib.PurePosixPath("x")}, root / "objects.pt")
    (root / "notes.pt").write_text("not a checkpoint")
    (root / "cut.pt").write_bytes(conditional.read_bytes()[:4096])
    return {"conditional": conditional, "unconditional": root / "unconditional" / "checkpoints" / "last.pt",
            **{name: root / f"{name}.pt" for name in ("newer", "evil", "foreign", "objects", "notes", "cut")}}


CASES = [
    ("sample", ["checkpoint=nope.pt"], r"checkpoint 'nope.pt' does not exist: pass the path of a .pt file"),
    ("sample", ["checkpoint={newer}"], r"has format version \d+, newer than this code's \d+: upgrade the package"),
    ("sample", ["checkpoint={evil}"], r"names _target_ 'os.system', outside .*: refusing to instantiate it"),
    ("sample", ["checkpoint={foreign}"], r"is neither a checkpoint of this platform \(no 'model' entry\) nor one of"),
    ("sample", ["checkpoint={notes}"], r"could not be read as a checkpoint \(.*\): it is not a file torch.save wrote"),
    ("sample", ["checkpoint={objects}"], r"holds Python objects beyond tensors, .* refused \(it names "
                                         r"pathlib.PurePosixPath\)"),
    ("sample", ["checkpoint={cut}"], r"could not be read as a checkpoint .* damaged or cut short"),
    ("sample", ["checkpoint={conditional}", "class_label=eleven"], r"class_label='eleven' is not a class of this "
                                                                    r"model; its classes are \['0', '1'"),
    ("sample", ["checkpoint={unconditional}", "class_label=3"], r"this model is unconditional .*: remove class_label"),
    ("sample", ["checkpoint={unconditional}", "guidance_scale=3"], r"guidance_scale=3 needs a class-conditional "
                                                                    r"model, and this one is unconditional"),
    ("eval", ["checkpoint={unconditional}", "guidance_scale=3", "num_images=4"], r"guidance_scale=3 needs a "
                                                                                  r"class-conditional model"),
    ("train", ["debug=smoke", "dataset=image_folder", "dataset.root=no_such_folder"],
     r"dataset.root 'no_such_folder' does not exist or is not a folder: point dataset.root at a folder"),
    ("train", ["experiment=folder", "logger=none"],
     r"experiment=folder derives its recipe from your images: run with dataset.root=/path/to/images"),
    ("train", ["experiment=folder", "logger=none", "dataset.root=no_such_folder"],
     r"dataset.root 'no_such_folder' does not exist or is not a folder"),
    ("train", ["debug=smoke", "logger=none", "dataset.image_size=20"],
     r"model.attention_resolutions \[8\] match no level of a 20x20 UNet"),
    ("train", ["debug=smoke", "logger=none", "trainer.precision=fp64"], r"trainer.precision='fp64' is not known"),
    ("train", ["debug=smoke", "logger=none", "trainer.max_steps=abc"],
     r"trainer.max_steps='abc' must be an integer \(Trainer's max_steps\)"),
    ("train", ["debug=smoke", "logger=none", "optimizer.lr=fast"], r"optimizer.lr='fast' must be a number"),
    ("train", ["debug=smoke", "logger=none", "trainer.grad_clip=off"], r"trainer.grad_clip='off' must be a number or null"),
    ("sample", ["checkpoint={conditional}", "sampler.steps=many"], r"sampler.steps='many' must be an integer"),
    ("convert", ["checkpoint={conditional}"], r"is not in the seed repository's format"),
    ("prepare", ["src=no_such_folder", "dst=prepared"], r"src='no_such_folder' does not exist or is not a folder"),
    ("sample", ["checkpoint={conditional}", "device=gpu"], r"device='gpu' is not a device: use auto, cpu, cuda or "
                                                            r"cuda:N"),
    ("sample", ["cascade=digits_16_32", "cascade.stages.base.checkpoint={conditional}",
                "cascade.stages.sr32.checkpoint={conditional}", "cascade.stages.base.sampler=nope"],
     r"cascade.stages.base.sampler='nope' has no conf/sampler/nope.yaml; choose from \['consistency', 'ddim'"),
    ("sample", ["checkpoint={conditional}", "weights=ema_0.5"], r"weights='ema_0.5' is not in .*: it has raw, ema"),
    ("posthoc", ["checkpoint={conditional}", "sigma_rel=wide"], r"sigma_rel='wide' must be a number"),
    ("convert", [], r"checkpoint is not set \(it is \?\?\?\): pass checkpoint=\.\.\. on the command line"),
    ("train", ["debug=smoke", "logger=none", "trainer.device=gpu"], r"trainer.device='gpu' is not a device"),
    ("train", ["debug=smoke", "logger=none", "resume=no_such_run"], r"resume='no_such_run' does not exist: pass a "
                                                                    r"run directory, a checkpoint, or resume=auto"),
    ("train", ["debug=smoke", "logger=none", "model=sr_unet_tiny", "model.low_resolution=8"],
     r"model SuperResolutionUNet is a super-resolution stage: it trains on pairs of images with task=super_resolution"),
]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
CASES += [  # a GPU asked for where there is none (a crash with PyTorch's "no NVIDIA driver" traceback before)
    pytest.param("sample", ["checkpoint={conditional}", "device=cuda"], r"device=cuda: PyTorch sees no CUDA GPU on "
                 r"this machine \(torch .*\): use device=cpu, or device=auto", marks=NO_GPU),
    pytest.param("eval", ["checkpoint={conditional}", "device=cuda:1"], r"device=cuda:1: PyTorch sees no CUDA GPU",
                 marks=NO_GPU),
    pytest.param("train", ["debug=smoke", "logger=none", "trainer.device=cuda"], r"trainer.device=cuda: PyTorch sees "
                 r"no CUDA GPU on this machine .*: use trainer.device=cpu", marks=NO_GPU),
]


@pytest.fixture(scope="module")
def mistakes(files, tmp_path_factory) -> list[dict]:
    """Every case's command, exit code and output, all run in one process (one import of torch, not one per case)."""
    cwd = tmp_path_factory.mktemp("mistakes")
    cases = [[command, [*(a.format(**files) for a in args), f"paths.runs_dir={cwd / 'runs' / str(i)}"]]
             for i, (command, args, _) in enumerate(getattr(case, "values", case) for case in CASES)]
    return in_one_process(cases, cwd)


def in_one_process(cases: list, cwd) -> list[dict]:
    """``tests.commands_in_one_process`` on ``cases``: each command's exit code and output."""
    (cwd / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-m", "tests.commands_in_one_process", "cases.json", "results.json"], cwd=cwd,
                   check=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
    return json.loads((cwd / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("index", [pytest.param(i, marks=getattr(case, "marks", ())) for i, case in enumerate(CASES)],
                         ids=[f"{c}-{'-'.join(a)[:40]}" for c, a, _ in (getattr(x, "values", x) for x in CASES)])
def test_a_mistake_prints_one_line_naming_the_fix_and_exits_2(mistakes, index):
    command, _, message = getattr(CASES[index], "values", CASES[index])
    returncode, output = mistakes[index]["returncode"], mistakes[index]["output"]
    assert returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and re.search(f"diffusion-{command}: .*{message}", errors[0]), output


@pytest.mark.slow
def test_commands_run_in_one_process_end_as_their_own_processes_do(files, tmp_path):
    """The batch above stands for the console scripts: a mistake and a success end the same in both."""
    cases = [["sample", [f"checkpoint={files['conditional']}", "class_label=eleven", "paths.runs_dir=a"]],
             ["sample", [f"checkpoint={files['conditional']}", "num_images=2", "sampler.steps=2", "paths.runs_dir=b"]]]
    batched = in_one_process(cases, tmp_path)
    (tmp_path / "alone").mkdir()
    for (command, args), in_batch in zip(cases, batched):
        alone = cli(command, *args, cwd=tmp_path / "alone", check=False)
        assert in_batch["returncode"] == alone.returncode
        assert [line.split("] - ", 1)[-1] for line in in_batch["output"].splitlines() if "[ERROR]" in line] == \
               [line.split("] - ", 1)[-1] for line in (alone.stdout + alone.stderr).splitlines() if "[ERROR]" in line]
    assert [result["returncode"] for result in batched] == [2, 0]
    assert [len(list((folder / "b").glob("sample/*/grid.png"))) for folder in (tmp_path, tmp_path / "alone")] == [1, 1]


def test_a_bad_config_choice_is_named_by_hydra_with_the_choices_and_exits_1(tmp_path):
    result = cli("train", "model=unet_hug", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Could not find 'model/unet_hug'" in result.stderr and "unet_small" in result.stderr


def test_the_traceback_stays_available_with_hydra_full_error(tmp_path):
    result = cli("prepare", "src=no_such_folder", "dst=prepared", cwd=tmp_path, check=False,
                 env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert re.search(r"PathNotFound: src='no_such_folder' does not exist", result.stderr), result.stderr


# runs a command's main() after replacing one function of the package by one that raises ``error``
PATCHED_COMMAND = """
import importlib, sys
from diffusion.errors import ConfigError

def broken_internals(*args, **kwargs):
    raise {error}

setattr(importlib.import_module({module!r}), {function!r}, broken_internals)
command = importlib.import_module("diffusion.cli.{command}")
sys.argv = ["diffusion-{command}", *sys.argv[1:]]
command.main()
"""
# (command, the module and function replaced, arguments that would get there)
PATCHED = [("prepare", "diffusion.data.prepare_folder", "check_folders", ["src=images", "dst=prepared"]),
           ("sample", "diffusion.cli.sample", "resolve_device", ["checkpoint=model.pt"])]


def run_patched(command: str, module: str, function: str, error: str, args: list[str], cwd: Path):
    """Run ``diffusion-<command> ARGS`` in a new process, with ``module.function`` raising ``error``."""
    script = PATCHED_COMMAND.format(command=command, module=module, function=function, error=error)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", script, *args, f"paths.runs_dir={cwd / 'runs'}"], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("command, module, function, args", PATCHED, ids=[c for c, *_ in PATCHED])
def test_an_internal_value_error_is_a_bug_shown_with_its_traceback_and_exits_1(tmp_path, command, module, function,
                                                                                 args):
    result = run_patched(command, module, function, 'ValueError("internal")', args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" in result.stderr and "in broken_internals" in result.stderr, output
    assert re.search(r"^ValueError: internal$", result.stderr, re.M), output
    assert not any("[ERROR]" in line for line in output.splitlines()), output  # not reduced to one logged line


@pytest.mark.parametrize("command, module, function, args", PATCHED, ids=[c for c, *_ in PATCHED])
def test_a_user_error_raised_in_the_same_place_is_one_line_and_exits_2(tmp_path, command, module, function, args):
    result = run_patched(command, module, function, 'ConfigError("x=3 is wrong: run with x=4")', args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "broken_internals" not in output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].endswith(f"diffusion-{command}: x=3 is wrong: run with x=4"), output


def wrapped_by_hydra(error: Exception) -> InstantiationException:
    """``error`` as Hydra raises it from a component's constructor."""
    try:
        raise InstantiationException("Error in call to target") from error
    except InstantiationException as wrapper:
        return wrapper


def test_exit_codes_of_the_errors_and_a_bug_keeps_its_traceback():
    user_errors = (ConfigError("x"), DataError("x"), CheckpointError("x"), PathNotFound("x"),
                   MissingMandatoryValue("x"), wrapped_by_hydra(ConfigError("x")))
    assert [exit_code_of(e) for e in user_errors] == [2] * len(user_errors)
    assert [exit_code_of(e) for e in (CheckpointWriteError("x"), TrainingDiverged("x"))] == [3, 4]
    bugs = (ValueError("x"), FileNotFoundError("x"), TypeError("x"), KeyError("x"), wrapped_by_hydra(ValueError("x")))
    assert [exit_code_of(e) for e in bugs] == [None] * len(bugs)
    with pytest.raises(SystemExit) as stopped, reported_errors("diffusion-test"):
        raise TrainingDiverged("x")
    assert stopped.value.code == 4
    with pytest.raises(SystemExit) as stopped, reported_errors("diffusion-test"):
        raise DataError("x")
    assert stopped.value.code == 2
    for bug in (TypeError("x"), ValueError("x")):  # a bug: raised as it is
        with pytest.raises(type(bug)), reported_errors("diffusion-test"):
            raise bug
    with pytest.raises(SystemExit) as stopped, reported_errors("diffusion-test"):
        raise KeyboardInterrupt
    assert stopped.value.code == 130


def raised_by(function) -> Exception:
    """The exception ``function()`` raises."""
    with pytest.raises(Exception) as raised:
        function()
    return raised.value


def test_an_error_a_config_resolver_raises_is_judged_by_what_it_raised():
    register_resolvers()
    cfg = OmegaConf.create({"nfe": 0, "steps": "${diffusion_steps_for_nfe:${nfe},heun}",
                            "broken": "${test_broken_resolver:}"})
    mistake = raised_by(lambda: cfg.steps)
    assert exit_code_of(mistake) == 2 and message_of(mistake).startswith("nfe must be a positive number")
    OmegaConf.register_new_resolver("test_broken_resolver", lambda: 1 // 0)
    try:
        assert exit_code_of(raised_by(lambda: cfg.broken)) is None  # a bug in a resolver keeps its traceback
    finally:
        OmegaConf.clear_resolver("test_broken_resolver")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes_the_type_check(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    if cfg.model.get("num_classes") == "auto":  # what training resolves from the data set first
        cfg.model.num_classes = 10
    for group in ("dataset", "trainer", "model", "schedule", "objective", "optimizer", "lr_scheduler", "callbacks"):
        check_value_types(cfg[group], group)


@pytest.mark.parametrize("sampler", sorted(p.stem for p in (Path(CONFIG_DIR) / "sampler").glob("*.yaml")))
def test_every_shipped_sampler_passes_the_type_check(sampler):
    check_value_types(compose_config("sample", [f"sampler={sampler}", "checkpoint=x.pt"]).sampler, "sampler")
