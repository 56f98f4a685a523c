"""The engine's arithmetic: gradient accumulation, mixed precision, checkpoint files."""

import pytest
import torch

from diffusion.cli.train import train
from diffusion.data import DigitsDataset
from diffusion.engine.callbacks import Callback
from diffusion.engine.checkpoint import load_checkpoint, save_checkpoint
from diffusion.engine.tasks import DiffusionTask
from diffusion.engine.trainer import Trainer
from diffusion.models import UNet
from diffusion.process.objectives import EpsilonObjective
from diffusion.process.schedules import LinearSchedule
from tests.conftest import compose_config, smoke_overrides


class ReconstructionObjective(EpsilonObjective):
    """A deterministic loss (no random timesteps or noise), so two batchings must give one gradient."""

    def loss(self, model, schedule, x0, generator=None, class_labels=None, draws=None):
        t = torch.full((x0.shape[0],), 3, device=x0.device)
        return (model(x0, t) - x0).pow(2).flatten(1).mean(1)


def one_sgd_step(tmp_path, batch_size, accumulation_steps):
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4)
    trainer = Trainer(max_steps=1, batch_size=batch_size, accumulation_steps=accumulation_steps, device="cpu",
                      grad_clip=None)
    task = DiffusionTask(model, LinearSchedule(10), ReconstructionObjective(),
                         optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
                         lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))
    trainer.fit(task, DigitsDataset(image_size=8), tmp_path)
    return model.state_dict()


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    large = one_sgd_step(tmp_path / "a", batch_size=8, accumulation_steps=1)
    accumulated = one_sgd_step(tmp_path / "b", batch_size=4, accumulation_steps=2)
    initial = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_heads=2, norm_groups=4).state_dict()
    assert any(not torch.allclose(large[k], initial[k]) for k in large)  # the step did move the weights
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], atol=1e-6, rtol=1e-5)


class RecordActivationDtypes(Callback):
    """Records the dtype of every convolution's and linear layer's output in the training forward passes."""

    def __init__(self) -> None:
        self.dtypes: set[str] = set()

    def on_fit_start(self, run) -> None:
        def record(module, inputs, output):
            if module.training:
                self.dtypes.add(f"{type(module).__name__}: {output.dtype}")

        self.layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in run.model.modules())
        self.hooks = [m.register_forward_hook(record) for m in run.model.modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def on_fit_end(self, run) -> None:
        for hook in self.hooks:
            hook.remove()

    def summary(self) -> dict:
        return {"activation_dtypes": sorted(self.dtypes), "hooked_layers": self.layers}


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_mixed_precision_runs_the_network_in_its_dtype_and_keeps_fp32_weights(tmp_path, precision, dtype):
    overrides = smoke_overrides(**{"trainer.precision": precision, "callbacks.sample_grid.every": 0,
                                   "+callbacks.dtypes._target_": "tests.test_engine.RecordActivationDtypes"})
    result = train(compose_config("train", overrides, tmp_path))
    assert result["step"] == 4 and 0 < result["loss"] < 10
    assert result["hooked_layers"] > 20  # every convolution and linear layer of the UNet
    assert result["activation_dtypes"] == [f"Conv2d: {dtype}", f"Linear: {dtype}"]  # autocast took effect
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key, value in [*state["model"].items(), *state["ema"]["state_dict"].items()]:
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key  # the master weights stay fp32
    if precision == "fp16":  # the scaler's state is saved: its scale starts at 2**16 and halves on overflow
        assert state["grad_scaler"]["scale"] in [2.0 ** (16 - k) for k in range(5)]
    else:
        assert state["grad_scaler"] == {}  # fp32 and bf16 need no scaler


def test_checkpoints_are_written_atomically_and_load_without_code(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(2)}, "step": 3}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 3

    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    torch.save({"model": {}, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"holds Python objects beyond tensors, which could run code when loaded, so "
                                         r"it is refused \(it names (__builtin__\.)?print\): save state dicts of tensors alone"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("keep, files", [(2, ["last.pt", "step_6.pt", "step_8.pt"]), (0, ["last.pt"])])
def test_keep_checkpoints_prunes_old_step_files(tmp_path, keep, files):
    """Four checkpoints (steps 2, 4, 6, 8): the newest ``keep`` step files stay beside last.pt; keep=0 writes none."""
    overrides = smoke_overrides(**{"trainer.max_steps": 8, "callbacks.checkpoint.every": 2,
                                   "callbacks.checkpoint.keep": keep, "callbacks.sample_grid.every": 0})
    train(compose_config("train", overrides, tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files  # no temporary or link file either
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 8
    for name in files[1:]:  # each step file is that step's checkpoint
        assert load_checkpoint(tmp_path / "checkpoints" / name)["step"] == int(name[5:-3])


def test_processes_writing_one_cache_file_at_once_do_not_collide(tmp_path):
    """Parallel sweep jobs save the same reference statistics: each write must land whole, none may fail."""
    import threading

    state, errors = {"model": {"w": torch.randn(256, 1024)}}, []

    def save_many():
        try:
            for _ in range(20):
                save_checkpoint(state, tmp_path / "stats.pt")
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=save_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert torch.equal(load_checkpoint(tmp_path / "stats.pt")["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["stats.pt"]  # no temporary file left behind
