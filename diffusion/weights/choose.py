"""Which weights of a checkpoint to sample, by name: ``raw``, ``ema`` (the primary average), any average the run kept
(``ema_0.9999``, ``ema_rel0.05``, ``swa``), or ``posthoc_rel<sigma_rel>``, an EDM2 post-hoc EMA reconstructed from the
run's snapshots."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion.engine.checkpoint import load_ema_snapshot
from diffusion.errors import CheckpointError, ConfigError
from diffusion.weights.averages import ema_name
from diffusion.weights.posthoc import (
    combine_state_dicts,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    reconstruction_error,
    sigma_rel_to_gamma,
)

log = logging.getLogger(__name__)

# where the ema_snapshots callback writes, beside the run's checkpoints
SNAPSHOT_FOLDER = "ema_snapshots"
# a reconstruction whose averaging profile is further than this (relative L2) from the asked one gets a warning
POOR_PROFILE = 0.05
POSTHOC = re.compile(r"posthoc_rel(?P<sigma_rel>\d*\.?\d+(?:[eE]-?\d+)?)")


@dataclass
class ChosenWeights:
    """A state dict to load, the name it was chosen by, and what else describes it (``sigma_rel``, ``step``...)."""

    name: str
    state_dict: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def snapshot_folder(checkpoint: str | Path) -> Path:
    """Where the run of ``checkpoint`` keeps its power-function EMA snapshots."""
    return Path(checkpoint).parent / SNAPSHOT_FOLDER


def averages_of(state: dict) -> dict[str, dict]:
    """A checkpoint's averages by name (one written before several averages holds its single EMA as ``ema_<decay>``)."""
    if state.get("averages"):
        return state["averages"]
    if "ema" in state:
        decay = state["ema"].get("decay")
        return {ema_name(decay) if decay is not None else "ema": state["ema"]}
    return {}


def primary_name(state: dict) -> str | None:
    """The name of the average ``weights=ema`` means (the one under the checkpoint's ``ema``)."""
    averages = averages_of(state)
    primary = state.get("ema")
    if primary is None:
        return None
    return next((name for name, entry in averages.items() if entry.get("state_dict") is primary.get("state_dict")), None)


def power_snapshots(checkpoint: str | Path, state: dict) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
    """Every stored power-function EMA up to the checkpoint's step as (updates, gamma, weights): the snapshot
    files of its run and the checkpoint's own power EMAs."""
    found = [(int(entry["num_updates"]), float(entry["gamma"]), entry["state_dict"])
             for entry in averages_of(state).values() if entry.get("kind") == "power_ema" and entry["num_updates"]]
    step = state.get("step", 0)
    folder = snapshot_folder(checkpoint)
    files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1])) if folder.is_dir() else []
    for path in files:
        if int(path.stem.split("_")[1]) > step:
            continue
        snapshot = load_ema_snapshot(path)
        found += [(int(entry["num_updates"]), float(entry["gamma"]), entry["state_dict"])
                  for entry in snapshot["averages"].values() if entry["num_updates"]]
    return found


def reconstruct(checkpoint: str | Path, state: dict, sigma_rel: float) -> ChosenWeights:
    """The power-function EMA of ``sigma_rel`` at the checkpoint's step, by EDM2's least-squares combination of the
    stored snapshots (Karras et al. 2024, Sec. 3.2 and Appendix C.2), on exact discrete averaging profiles."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    snapshots = power_snapshots(checkpoint, state)
    if not snapshots:
        raise CheckpointError(f"weights=posthoc_rel{sigma_rel} needs power-function EMA snapshots, and "
                              f"{str(checkpoint)!r} has none (nor has {str(snapshot_folder(checkpoint))!r}): train "
                              "with trainer.ema_sigma_rel=[0.05,0.10] callbacks.ema_snapshots.every=<steps>")
    target = max(t for t, _, _ in snapshots)
    profiles = [(t, g) for t, g, _ in snapshots]
    coefficients = posthoc_coefficients(profiles, (target, gamma))
    error = reconstruction_error(profiles, (target, gamma), coefficients)
    weights = combine_state_dicts([weights for _, _, weights in snapshots], coefficients.tolist())
    log.info("reconstructed the power-function EMA of sigma_rel %g at step %d from %d snapshots (relative error of "
             "its averaging profile %.2g)", sigma_rel, target, len(snapshots), error)
    if error > POOR_PROFILE:
        log.warning("the snapshots span sigma_rel %g poorly (its averaging profile is %.0f%% off): lengths far outside "
                    "the tracked ones (%s) need snapshots more often (callbacks.ema_snapshots.every)", sigma_rel,
                    100 * error, ", ".join(sorted({f"{gamma_to_sigma_rel(g):.3g}" for _, g in profiles})))
    return ChosenWeights(f"posthoc_rel{sigma_rel!r}", weights, {"sigma_rel": sigma_rel, "gamma": gamma, "step": target,
                                                               "snapshots": len(snapshots), "profile_error": error})


def weight_names(state: dict, checkpoint: str | Path | None = None) -> list[str]:
    """The names ``weights=`` takes for this checkpoint (``posthoc_rel<x>`` when it has power EMAs to combine)."""
    names = ["raw", *(["ema"] if "ema" in state else []), *averages_of(state)]
    has_power = any(entry.get("kind") == "power_ema" for entry in averages_of(state).values())
    if has_power or (checkpoint is not None and snapshot_folder(checkpoint).is_dir()):
        names.append("posthoc_rel<sigma_rel>")
    return names


def choose_weights(state: dict, name: str, checkpoint: str | Path) -> ChosenWeights:
    """The weights ``weights=<name>`` means for this checkpoint; a ValueError listing the names it has otherwise."""
    if name == "raw":
        return ChosenWeights("raw", state["model"])
    if name == "ema":
        if "ema" not in state:  # a seed file or a converted one: the weights it has
            return ChosenWeights("raw", state["model"])
        return ChosenWeights(primary_name(state) or "ema", state["ema"]["state_dict"])
    averages = averages_of(state)
    if name in averages:
        return ChosenWeights(name, averages[name]["state_dict"])
    if (match := POSTHOC.fullmatch(name)) is not None:
        return reconstruct(checkpoint, state, float(match["sigma_rel"]))
    same_value = [other for other in averages if equal_names(name, other)]  # ema_0.10 for ema_0.1
    if same_value:
        return ChosenWeights(same_value[0], averages[same_value[0]]["state_dict"])
    raise ConfigError(f"weights={name!r} is not in {str(checkpoint)!r}: it has "
                      f"{', '.join(weight_names(state, checkpoint))} (diffusion-describe checkpoint=... shows them)")


def equal_names(a: str, b: str) -> bool:
    """Whether two average names are the same prefix with the same number (``ema_rel0.10`` and ``ema_rel0.1``)."""
    split = re.compile(r"(?P<prefix>[a-z_]+?)(?P<value>\d*\.?\d+(?:[eE]-?\d+)?)")
    ma, mb = split.fullmatch(a), split.fullmatch(b)
    return bool(ma and mb and ma["prefix"] == mb["prefix"] and float(ma["value"]) == float(mb["value"]))
