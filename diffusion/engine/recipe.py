"""``experiment=folder``: a training recipe derived from a folder of images, each choice printed with its reason.

The recipe is a list of command-line overrides chosen from the data (``diffusion.data.folder_facts``) and, under a
time budget, from the training speed measured at start. The config is then composed again with them before the
user's own overrides, so every choice can be overridden like any other value and shows in ``.hydra/config.yaml``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.data.folder_facts import FolderFacts, look_at_folder
from diffusion.engine import distributed
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.devices import resolve_device
from diffusion.engine.run_dir import checkpoint_to_resume, shown
from diffusion.errors import ConfigError

log = logging.getLogger(__name__)

# the EDM recipe measured on digits at 16x16 (experiment=digits): its noise levels' centre at that side
REFERENCE_SIDE, REFERENCE_P_MEAN = 16, -0.4
# the labels of task.augment with all four transforms on
AUGMENT_DIM = 6
# the first level's channels over the values of a patch, at least: at 32 px, digits on 4x4 patches in 32 channels (2)
# kept grain in every sample (FD 9.7 after 300 s), on 2x2 patches (8) far less (FD 6.6); docs/data.md
PATCH_WIDTH_RATIO = 4
# planned steps over those the budget holds at the measured speed: a run measured too slow still fills its budget
STEPS_MARGIN = 1.25


@dataclass(frozen=True)
class Choice:
    """One setting of the recipe: ``key=value`` and why."""

    key: str
    value: object
    reason: str

    @property
    def override(self) -> str:
        value = self.value
        if isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        elif value is None:
            value = "null"
        elif isinstance(value, bool):
            value = str(value).lower()
        return f"{self.key}={value}"


def override_key(override: str) -> str:
    """The key an override sets: ``trainer.batch_size`` of ``trainer.batch_size=64``, ``model`` of ``model=x``."""
    return override.split("=", 1)[0].lstrip("+~")


def set_by_user(key: str, user_keys: Sequence[str]) -> bool:
    """Whether the user's overrides set ``key``, or chose the config group it belongs to (``model`` for
    ``model.patch_size``), so that the recipe leaves it to them."""
    return any(key == user or key.startswith(user + ".") and "." not in user for user in user_keys)


class FolderRecipe:
    """The choices of ``experiment=folder`` for a folder of images.

    Args:
        augment_below: non-leaky augmentation is on for data sets of fewer images than this.
        augment_probability: its probability then (EDM's for the 50,000 images of CIFAR-10: 0.12).
        dropout_above_passes: dropout 0.1 when the run passes over each image more often than this.
        flips_below_ratio: random flips stay on when mirrored images lie less than this many times farther from the
            data than its own images (``FolderFacts.mirror_ratio``).
        max_side_cpu: the largest side trained on a CPU (larger images are made smaller).
    """

    def __init__(self, augment_below: int = 1000, augment_probability: float = 0.25,
                 dropout_above_passes: float = 200, flips_below_ratio: float = 1.2, max_side_cpu: int = 64) -> None:
        self.augment_below, self.augment_probability = augment_below, augment_probability
        self.dropout_above_passes, self.flips_below_ratio = dropout_above_passes, flips_below_ratio
        self.max_side_cpu = max_side_cpu

    def data_choices(self, facts: FolderFacts, on_gpu: bool) -> list[Choice]:
        """What the data alone decides: size, colour, flips, model, patches, noise levels, batch, rate, EMA,
        classes and augmentation."""
        side = 2 ** max(3, round(math.log2(facts.side)))
        side_reason = f"the images' median side is {facts.side} px"
        if not on_gpu and side > self.max_side_cpu:
            side, side_reason = self.max_side_cpu, side_reason + f"; at most {self.max_side_cpu} px on a CPU"
        channels = 1 if facts.grayscale else 3
        model, width = ("unet_small", 64) if on_gpu else ("unet_tiny", 32)
        # on a CPU colour images get a wider first level, so that 2x2 patches fit it (full-size levels are 4x slower)
        wider = not on_gpu and channels == 3
        width = max(width, PATCH_WIDTH_RATIO * 4 * channels) if wider else width
        patch = 1
        while PATCH_WIDTH_RATIO * (2 * patch) ** 2 * channels <= width and side // (2 * patch) >= 8:
            patch *= 2
        first = side // patch
        flips = facts.mirror_ratio < self.flips_below_ratio
        p_mean = round(REFERENCE_P_MEAN + math.log(side / REFERENCE_SIDE), 2)
        choices = [
            Choice("dataset.image_size", side, side_reason + " (the nearest power of two)"),
            Choice("dataset.channels", channels, f"{'all' if facts.grayscale else 'not all'} of the {facts.read:,} "
                   "images read are grayscale"),
            Choice("dataset.random_flip", flips,
                   f"mirrored images lie {facts.mirror_ratio:.2f}x as far from the data as its own images: "
                   + ("mirror-symmetric, flips add images like its own" if flips
                      else "not mirror-symmetric (like digits or text), flips would add images unlike its own")),
            Choice("model", model, ("a GPU" if on_gpu else "a CPU") + f": {model}"
                   + ("" if on_gpu else " (unet_small on a GPU)")),
            *([Choice("model.base_channels", width, "colour on a CPU: a first level wide enough for 2x2 patches")]
              if wider else []),
            Choice("model.patch_size", patch,
                   f"the largest patch whose {patch}x{patch}x{channels} values are at most a quarter of "
                   f"the first level's {width} channels and leave it at least 8 px: it works at {first}x{first}"),
            Choice("model.attention_resolutions", [first // 2], "self-attention at the second level"),
            Choice("objective.P_mean", p_mean,
                   f"EDM's noise levels centred on {REFERENCE_P_MEAN} at {REFERENCE_SIDE} px (digits), shifted by "
                   f"ln({side}/{REFERENCE_SIDE}): the noise that hides an image grows with its side (simple "
                   "diffusion's shifted log-SNR, Hoogeboom et al. 2023)"),
            Choice("trainer.batch_size", 64, "the digits recipe's batch"),
            Choice("optimizer.lr", 1e-3, "the digits recipe's rate, where the Optuna search settled (docs/sweeps.md)"),
            Choice("trainer.ema_decay", [], "no fixed-decay EMA: its length would not follow the run's"),
            Choice("trainer.ema_sigma_rel", [0.1, 0.05],
                   "EDM2's power-function EMAs, sigma_rel 0.10 sampled (the length follows the run's); snapshots let "
                   "any other be chosen after training"),
        ]
        if facts.num_classes > 1:
            choices.append(Choice("model.num_classes", facts.num_classes,
                                  f"{facts.num_classes} class folders: class-conditional, with guidance"))
        else:
            choices.append(Choice("model.num_classes", None, "one class: unconditional"))
        augment = facts.count < self.augment_below
        choices += [
            Choice("task.augment.probability", self.augment_probability if augment else 0.0,
                   f"{facts.count:,} images: non-leaky augmentation " + (
                       f"on below {self.augment_below:,}" if augment else f"only below {self.augment_below:,}")),
            Choice("model.augment_dim", AUGMENT_DIM if augment else 0,
                   "the network is told each image's augmentation" if augment else "no augmentation to be told"),
        ]
        return choices

    def length_choices(self, cfg: DictConfig, facts: FolderFacts, steps: Choice | None) -> list[Choice]:
        """What the run's length decides: warm-up, dropout and the callbacks' cadences; ``steps`` chose
        ``trainer.max_steps`` (None: the config's)."""
        batch = cfg.trainer.batch_size * cfg.trainer.accumulation_steps
        choices = [steps] if steps is not None else []
        steps = steps.value if steps is not None else cfg.trainer.max_steps
        passes = steps * batch / facts.count
        dropout = 0.1 if passes > self.dropout_above_passes else 0.0
        choices += [
            Choice("lr_scheduler.warmup_steps", max(1, steps // 20), "a twentieth of the run"),
            Choice("model.dropout", dropout, f"the run passes over each image {passes:,.0f} times: dropout "
                   + ("against overfitting" if dropout else f"only above {self.dropout_above_passes:g}")),
            Choice("callbacks.sample_grid.every", max(1, steps // 2), "a grid at half way and at the end"),
            Choice("callbacks.checkpoint.every", max(1, steps // 5), "five checkpoints"),
            Choice("callbacks.ema_snapshots.every", max(1, steps // 10), "ten EMA snapshots (post-hoc EMA)"),
            Choice("callbacks.metrics.every", max(1, steps // 50), "fifty metrics lines"),
        ]
        return choices


def measure_images_per_second(cfg: DictConfig, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Training images per second of ``cfg``'s model, objective and batch on ``device``: forward, backward and
    update of random images, the median of ``repeats`` steps after ``warmup`` (the loader's time left out)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate({**model_cfg, "num_classes": None}).to(device)
    schedule, objective = instantiate(cfg.schedule).to(device), instantiate(cfg.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = cfg.trainer.batch_size // distributed.current_world().size
    images = torch.randn(batch, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size, device=device)
    generator = torch.Generator(device).manual_seed(0)
    seconds = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        draws = objective.draw(schedule, images.shape, device, generator, False)
        objective.loss(model, schedule, images, class_labels=None, draws=draws).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return distributed.broadcast(batch * distributed.current_world().size / statistics.median(seconds[warmup:]))


def recipe_block(facts: FolderFacts, choices: list[Choice], user_overrides: Sequence[str],
                 budget: float | None) -> str:
    """The printed recipe: the data, then each choice with its reason; the user's own settings marked as theirs."""
    user_keys = [override_key(o) for o in user_overrides]
    width = max(len(choice.override) for choice in choices)
    lines = [f"experiment=folder: {facts.describe()} ({facts.root}); the recipe, each value overridable:"]
    for choice in choices:
        if set_by_user(choice.key, user_keys):
            continue
        lines.append(f"  {choice.override:<{width}}  {choice.reason}")
    theirs = [o for o in user_overrides if override_key(o) not in ("experiment", "dataset.root")]
    if theirs:
        lines.append("  yours: " + " ".join(theirs))
    if budget is not None:
        lines.append(f"  training ends after {budget:g} s of training (trainer.max_train_seconds), the learning rate "
                     "annealed within it; the samples are in samples/ of the run")
    return "\n".join(lines)


def apply_recipe(cfg: DictConfig, user_overrides: Sequence[str],
                 compose: Callable[[list[str]], DictConfig]) -> DictConfig:
    """The config composed again with the recipe's choices before ``user_overrides``; logs the recipe block.

    ``compose(overrides)`` composes the run's primary config with those overrides.
    """
    if cfg.dataset.get("root") in (None, "", "???"):
        raise ConfigError("experiment=folder derives its recipe from your images: run with dataset.root=/path/to/images")
    recipe = instantiate(cfg.recipe)
    facts = distributed.computed_by_rank_zero(look_at_folder)(cfg.dataset.root)
    device = resolve_device(cfg.trainer.device, distributed.current_world().local_rank, setting="trainer.device")
    user_keys = [override_key(o) for o in user_overrides]
    choices = recipe.data_choices(facts, on_gpu=device.type == "cuda")
    mine = [c.override for c in choices if not set_by_user(c.key, user_keys)]
    composed = compose([*mine, *user_overrides])
    budget = composed.trainer.max_train_seconds
    lengths = recipe.length_choices(composed, facts, planned_steps(composed, budget, user_keys, device))
    choices += lengths
    mine += [c.override for c in lengths if not set_by_user(c.key, user_keys)]
    composed = compose([*mine, *user_overrides])
    if distributed.current_world().is_main:
        log.info(recipe_block(facts, choices, user_overrides, budget))
    return composed


def planned_steps(cfg: DictConfig, budget: float | None, user_keys: Sequence[str],
                  device: torch.device) -> Choice | None:
    """``trainer.max_steps`` for a time budget: the steps it holds at the speed measured now, or a resumed run's own
    (so that its schedule does not move); None without a budget or when the user set the steps."""
    if budget is None or set_by_user("trainer.max_steps", user_keys):
        return None
    if (resumed := checkpoint_to_resume(cfg.get("resume"), cfg.paths.output_dir)) is not None:
        saved = OmegaConf.create(load_checkpoint(resumed)["config"])
        return Choice("trainer.max_steps", saved.trainer.max_steps, f"the resumed run's ({shown(resumed)})")
    speed = measure_images_per_second(cfg, device)
    batch = cfg.trainer.batch_size * cfg.trainer.accumulation_steps
    return Choice("trainer.max_steps", max(10, int(STEPS_MARGIN * budget * speed / batch)),
                  f"{STEPS_MARGIN:g} x what the {budget:g} s budget (trainer.max_train_seconds) holds at "
                  f"{speed:,.0f} images/s, measured now: the budget, not the steps, ends the run")
