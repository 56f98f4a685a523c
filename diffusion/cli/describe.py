"""``diffusion-describe checkpoint=PATH``: what a checkpoint holds (step, config, classes) and every set of weights
``weights=`` can choose in it."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from diffusion.engine.checkpoint import load_checkpoint
from diffusion.weights.choose import averages_of, power_snapshots, primary_name, snapshot_folder
from diffusion.weights.trained_model import sampler_name


def describe_average(name: str, entry: dict) -> str:
    """One line about an average: its kind, settings and update count."""
    kind = entry.get("kind", "ema")
    updates = f"{entry.get('num_updates', '?')} updates"
    if kind == "ema":
        return f"EMA, decay {entry.get('decay')}, {updates}"
    if kind == "power_ema":
        return f"power-function EMA (EDM2), sigma_rel {entry['sigma_rel']} (gamma {entry['gamma']:.2f}), {updates}"
    if kind == "swa":
        how = "mean" if entry.get("decay") is None else f"EMA-style, decay {entry['decay']}"
        return f"SWA ({how}) from step {entry['start_step']} every {entry['every']}, {updates}"
    if kind == "posthoc_ema":
        return (f"post-hoc EMA (EDM2), sigma_rel {entry['sigma_rel']} at step {entry['num_updates']}, from "
                f"{entry['snapshots']} snapshots")
    return f"{kind}, {updates}"


def describe(path: str | Path) -> str:
    """The description ``diffusion-describe`` prints."""
    state = load_checkpoint(path)
    lines = [f"checkpoint {path}: format {state.get('format_version', 0)}, code {state.get('code_version', '?')}"
             + (" (converted from the seed repository's format)" if state.get("converted_from") == "seed" else "")]
    lines.append(f"step {state.get('step', '?')}, epoch {state.get('epoch', '?')}"
                 + (", resumable" if "optimizer" in state else ", weights only (not resumable)"))
    if state.get("config"):
        cfg = OmegaConf.create(state["config"])
        parts = {key: cfg[key].get("_target_", "?").rsplit(".", 1)[-1] for key in ("model", "schedule", "objective",
                                                                                 "dataset") if key in cfg}
        lines.append("built from: " + ", ".join(f"{key} {value}" for key, value in parts.items()))
        if "model" in cfg:
            model = cfg.model
            lines.append(f"images: {model.get('image_size', '?')}x{model.get('image_size', '?')}, "
                         f"{model.get('in_channels', '?')} channel(s)")
        if "distilled_from" in cfg:
            source, sampler = cfg.distilled_from, cfg.get("sampler", {})
            lines.append(f"a student distilled from {source.teacher} ({source.weights} weights) by {source.method}; "
                         f"it samples with sampler={sampler_name(sampler)}, {sampler.get('steps', '?')} steps, "
                         "unless told otherwise")
    names = state.get("class_names") or []
    lines.append(f"classes of the data set ({len(names)}): {', '.join(names)}" if names else "classes: none")
    parameters = sum(value.numel() for value in state["model"].values() if value.is_floating_point())
    lines += ["", "weights (sample or evaluate with weights=<name>):", f"  {'raw':<24}the trained weights, "
              f"{parameters / 1e6:.2f}M parameters"]
    averages = averages_of(state)
    if "ema" in state:
        lines.append(f"  {'ema':<24}= {primary_name(state) or 'the EMA'}")
    lines += [f"  {name:<24}{describe_average(name, entry)}" for name, entry in averages.items()]
    snapshots = power_snapshots(path, state)
    if snapshots:
        steps = sorted({t for t, _, _ in snapshots})
        lines.append(f"  {'posthoc_rel<sigma_rel>':<24}any EMA length, reconstructed from {len(snapshots)} power-function "
                     f"EMA snapshots at {len(steps)} steps ({steps[0]}..{steps[-1]}; {snapshot_folder(path)} and this "
                     "checkpoint), e.g. weights=posthoc_rel0.07")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``diffusion-describe`` and ``python -m diffusion.cli.describe``."""
    from diffusion.errors import ConfigError, reported_errors

    with reported_errors("diffusion-describe"):
        args = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
        if set(args) != {"checkpoint"}:
            raise ConfigError("usage: diffusion-describe checkpoint=PATH")
        print(describe(args.checkpoint))


if __name__ == "__main__":
    main()
