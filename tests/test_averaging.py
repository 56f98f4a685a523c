"""Averages of the weights: each against its closed form, saved and restored, reconstructed after training, chosen
by name when sampling."""

import json

import numpy as np
import pytest
import torch

from diffusion.cli.train import train
from diffusion.engine.callbacks import Callback
from diffusion.engine.checkpoint import load_checkpoint, save_checkpoint
from diffusion.weights.averages import ExponentialAverage, WeightAverages
from diffusion.weights.choose import choose_weights
from diffusion.weights.posthoc import power_profile, sigma_rel_to_gamma
from diffusion.weights.trained_model import load_trained
from tests.conftest import cli, compose_config, smoke_overrides

# the scalar weight after optimizer step t (t = 1..8): anything that is not a straight line
TRAJECTORY = [3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0, 6.5]


def scalar_model(value: float = 0.0) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False).double()
    model.weight.data.fill_(value)
    return model


def drive(averages: WeightAverages, model: torch.nn.Module, steps: range) -> None:
    for step in steps:
        model.weight.data.fill_(TRAJECTORY[step - 1])
        averages.update(model, step)


def value(average) -> float:
    return average.model.weight.item()


def test_each_average_matches_its_closed_form_and_resumes_with_its_update_count():
    model = scalar_model()
    kept = dict(ema_decays=[0.5, 0.9], ema_warmup=False, sigma_rels=[0.1], swa=dict(start_step=3, every=2))
    averages = WeightAverages(model, **kept)
    assert [a.name for a in averages] == ["ema_0.5", "ema_0.9", "ema_rel0.1", "swa"]
    drive(averages, model, range(1, 6))

    restored = WeightAverages(scalar_model(7.0), **kept)
    restored.load_state_dict(averages.state_dict())
    assert {a.name: a.num_updates for a in restored} == {"ema_0.5": 5, "ema_0.9": 5, "ema_rel0.1": 5, "swa": 2}
    drive(averages, model, range(6, 9))
    drive(restored, model, range(6, 9))

    w = np.array(TRAJECTORY)
    for decay in (0.5, 0.9):  # the first update copies: d^7 w_1 + sum_t (1 - d) d^(8-t) w_t
        expected = decay ** 7 * w[0] + sum((1 - decay) * decay ** (8 - t) * w[t - 1] for t in range(2, 9))
        assert value(averages[f"ema_{decay}"]) == pytest.approx(expected, rel=1e-12)
        assert value(restored[f"ema_{decay}"]) == pytest.approx(expected, rel=1e-12)
    # EDM2's power function: its discrete profile over the 8 steps, with gamma 6.94 for sigma_rel 0.1
    expected = power_profile(sigma_rel_to_gamma(0.1), 8) @ w
    assert value(averages["ema_rel0.1"]) == pytest.approx(expected, rel=1e-12)
    assert value(restored["ema_rel0.1"]) == pytest.approx(expected, rel=1e-12)
    # SWA from step 3 every 2 steps: the mean of steps 3, 5 and 7
    assert value(averages["swa"]) == pytest.approx(np.mean(w[[2, 4, 6]]), rel=1e-12)
    assert value(restored["swa"]) == pytest.approx(np.mean(w[[2, 4, 6]]), rel=1e-12)
    assert restored["swa"].num_updates == 3 and restored["ema_rel0.1"].num_updates == 8


def test_the_ema_warmup_ramps_its_decay_after_a_first_copy_and_keeps_its_cadence():
    model = scalar_model()
    ema = ExponentialAverage(model, decay=0.5, warmup=True, update_every=2, start_step=3)
    for step in range(1, 9):
        model.weight.data.fill_(TRAJECTORY[step - 1])
        ema.update(model, step)
        if step == 3:  # a multiple of neither: nothing yet
            assert value(ema) == 0.0 and ema.num_updates == 0
    # step 4 copies; step 6 uses min(0.5, 2/11); step 8 min(0.5, 3/12) = 0.25
    after_6 = 2 / 11 * TRAJECTORY[3] + 9 / 11 * TRAJECTORY[5]
    assert value(ema) == pytest.approx(0.25 * after_6 + 0.75 * TRAJECTORY[7], rel=1e-12)
    assert ema.num_updates == 3


def test_wrong_average_settings_are_refused_with_the_key_to_fix():
    with pytest.raises(ValueError, match=r"trainer.ema_sigma_rel: sigma_rel must lie in \(0, 0.2887\)"):
        WeightAverages(scalar_model(), sigma_rels=[0.5])
    with pytest.raises(ValueError, match="ema_0.9 is listed twice"):
        WeightAverages(scalar_model(), ema_decays=[0.9, 0.9])
    with pytest.raises(ValueError, match="keep at least one average"):
        WeightAverages(scalar_model(), ema_decays=[])
    with pytest.raises(ValueError, match=r"trainer.swa_decay must lie in \[0, 1\)"):
        WeightAverages(scalar_model(), swa=dict(start_step=1, decay=1.5))


class RecordWeights(Callback):
    """Keeps a copy of the trained weights after every step (in ``RecordWeights.weights``)."""

    weights: dict = {}

    def on_step_end(self, trainer):
        RecordWeights.weights[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_swa_weights_are_the_mean_of_the_weights_of_their_steps_and_swalr_sets_the_rate(tmp_path):
    RecordWeights.weights = {}
    cfg = compose_config("train", smoke_overrides(**{
        "trainer.max_steps": 8, "trainer.swa": "true", "trainer.swa_start_step": 4, "trainer.swa_every": 2,
        "trainer.swa_lr": 0.05, "trainer.swa_anneal_steps": 0, "callbacks.metrics.every": 1,
        "+callbacks.record._target_": "tests.test_averaging.RecordWeights"}), tmp_path)
    train(cfg)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    swa = state["averages"]["swa"]
    assert swa["num_updates"] == 3  # steps 4, 6, 8
    for key, averaged in swa["state_dict"].items():
        if averaged.is_floating_point():
            mean = torch.stack([RecordWeights.weights[step][key] for step in (4, 6, 8)]).mean(0)
            torch.testing.assert_close(averaged, mean, rtol=1e-5, atol=1e-6)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert all(rates[step] != 0.05 for step in (1, 2, 3)) and all(rates[step] == 0.05 for step in range(4, 9))


def test_a_posthoc_ema_rebuilt_from_snapshots_equals_one_tracked_directly(tmp_path):
    """Snapshots of sigma_rel 0.05 and 0.10 every step span any profile, so sigma_rel 0.07 comes back exactly."""
    cfg = compose_config("train", smoke_overrides(**{
        "trainer.max_steps": 6, "trainer.ema_sigma_rel": "[0.05,0.1,0.07]", "callbacks.ema_snapshots.every": 1,
        "optimizer.lr": 0.01, "lr_scheduler": "constant"}), tmp_path)  # weights that move far between steps
    train(cfg)
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    # keep the snapshots' 0.05 and 0.1 alone, as a run tracking only those would have
    for path in (tmp_path / "checkpoints" / "ema_snapshots").glob("*.pt"):
        snapshot = torch.load(path, weights_only=True)
        del snapshot["averages"]["ema_rel0.07"]
        save_checkpoint(snapshot, path)
    tracked = state["averages"].pop("ema_rel0.07")
    rebuilt = choose_weights(state, "posthoc_rel0.07", checkpoint)
    assert rebuilt.info["snapshots"] == 2 * 6 + 2 and rebuilt.info["profile_error"] < 1e-9
    def farthest(weights):  # the largest difference from the tracked average, over every parameter
        return max((weights[key] - value).abs().max().item() for key, value in tracked["state_dict"].items())

    # float32 weights: exact up to rounding, while the nearest stored profile is far off
    assert farthest(rebuilt.state_dict) < 1e-3 * farthest(state["averages"]["ema_rel0.1"]["state_dict"])
    assert farthest(rebuilt.state_dict) < 1e-3 * farthest(state["averages"]["ema_rel0.05"]["state_dict"])


def test_weights_names_every_average_and_refuses_an_unknown_one(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{
        "trainer.max_steps": 4, "trainer.ema_decay": "[0.9,0.99]", "trainer.swa": "true"}), tmp_path)
    train(cfg)
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    for name, expected in (("raw", state["model"]), ("ema", state["averages"]["ema_0.9"]["state_dict"]),
                           ("ema_0.99", state["averages"]["ema_0.99"]["state_dict"]),
                           ("ema_0.990", state["averages"]["ema_0.99"]["state_dict"]),
                           ("swa", state["averages"]["swa"]["state_dict"])):
        trained = load_trained(checkpoint, name)
        for key, value in trained.model.state_dict().items():
            assert torch.equal(value, expected[key]), (name, key)
    with pytest.raises(ValueError, match=r"weights='ema_0.5' is not in .*: it has raw, ema, ema_0.9, ema_0.99, swa "
                                         r"\(diffusion-describe"):
        load_trained(checkpoint, "ema_0.5")
    with pytest.raises(ValueError, match=r"weights=posthoc_rel0.1 needs power-function EMA snapshots"):
        load_trained(checkpoint, "posthoc_rel0.1")


def test_a_checkpoint_holding_one_ema_resumes_into_the_averages_and_samples(tmp_path):
    """A format-2 checkpoint (a single "ema", no "averages") keeps working."""
    cfg = compose_config("train", smoke_overrides(**{"trainer.max_steps": 3}), tmp_path / "old")
    train(cfg)
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    del state["averages"]
    state["format_version"] = 2
    save_checkpoint(state, path)
    assert load_trained(path, "ema").weights == "ema_0.999"
    assert torch.equal(load_trained(path, "ema_0.999").model.out[2].weight, state["ema"]["state_dict"]["out.2.weight"])
    resumed = compose_config("train", smoke_overrides(**{"trainer.max_steps": 4, "resume": path}), tmp_path / "old")
    train(resumed)
    after = load_checkpoint(path)
    assert after["averages"]["ema_0.999"]["num_updates"] == 4


def test_snapshots_without_power_emas_are_refused(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{"trainer.max_steps": 2, "callbacks.ema_snapshots.every": 1}),
                         tmp_path)
    with pytest.raises(ValueError, match=r"callbacks.ema_snapshots.every=1 stores power-function EMAs, but the run "
                                         r"keeps none: add them with trainer.ema_sigma_rel=\[0.05,0.10\]"):
        train(cfg)


@pytest.mark.slow
def test_diffusion_sample_takes_weights_by_name(tmp_path):
    run = tmp_path / "run"
    train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 4, "trainer.swa": "true",
                                                     "trainer.swa_start_step": 2}), run))
    result = cli("sample", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "weights=swa", "num_images=2",
                 "sampler=ddim", "sampler.steps=3", f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert "(step 4, swa weights)" in result.stdout + result.stderr
    result = cli("sample", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "weights=ema_0.5", "num_images=2",
                 f"paths.runs_dir={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "weights='ema_0.5' is not in" in result.stdout + result.stderr


@pytest.mark.slow
def test_diffusion_posthoc_writes_a_checkpoint_that_describes_samples_and_refuses_to_resume(tmp_path):
    run = tmp_path / "run"
    train(compose_config("train", smoke_overrides(**{
        "trainer.max_steps": 4, "trainer.ema_sigma_rel": "[0.05,0.1]", "callbacks.ema_snapshots.every": 2}), run))
    checkpoint = run / "checkpoints" / "last.pt"
    cli("posthoc", f"checkpoint={checkpoint}", "sigma_rel=0.07", f"hydra.run.dir={tmp_path / 'posthoc'}",
        cwd=tmp_path)
    written = tmp_path / "posthoc" / "posthoc_rel0.07.pt"
    state = load_checkpoint(written)
    direct = choose_weights(load_checkpoint(checkpoint), "posthoc_rel0.07", checkpoint)
    for key, value in direct.state_dict.items():
        assert torch.equal(state["ema"]["state_dict"][key], value), key
    assert load_trained(written, "ema").weights == "posthoc_rel0.07"

    from diffusion.cli.describe import describe

    text = describe(checkpoint)
    for line in ("step 4, epoch 0, resumable", "  ema                     = ema_0.999",
                 "  ema_rel0.05             power-function EMA (EDM2), sigma_rel 0.05 (gamma 16.97), 4 updates",
                 "any EMA length, reconstructed from 6 power-function EMA snapshots at 2 steps (2..4"):
        assert line in text, (line, text)
    assert "posthoc_rel0.07         post-hoc EMA (EDM2), sigma_rel 0.07 at step 4, from 6 snapshots" in describe(written)
    with pytest.raises(ValueError, match="holds weights only .* init_from=PATH instead of resume"):
        train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "resume": written}), tmp_path / "r"))


def test_a_length_the_snapshots_span_poorly_is_reconstructed_with_a_warning(tmp_path, caplog):
    from diffusion.weights.choose import reconstruct
    from diffusion.weights.posthoc import sigma_rel_to_gamma as gamma_of

    state = {"step": 100, "averages": {
        f"ema_rel{s}": {"kind": "power_ema", "num_updates": 100, "gamma": gamma_of(s), "sigma_rel": s,
                        "state_dict": {"w": torch.full((2,), float(i))}} for i, s in enumerate((0.05, 0.1))}}
    exact = reconstruct(tmp_path / "last.pt", state, 0.1)
    assert exact.info["profile_error"] < 1e-12 and torch.equal(exact.state_dict["w"], torch.ones(2))
    assert "span" not in caplog.text
    poor = reconstruct(tmp_path / "last.pt", state, 0.25)
    assert poor.info["profile_error"] > 0.05
    assert "the snapshots span sigma_rel 0.25 poorly" in caplog.text and "tracked ones (0.05, 0.1)" in caplog.text
