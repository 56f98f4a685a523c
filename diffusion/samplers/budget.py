"""How many steps a sampler takes on a budget of network evaluations per image."""

from __future__ import annotations

# network evaluations per step beyond the first: Heun evaluates twice per step but once on its last (to sigma=0)
SECOND_ORDER_STEPPERS = ("sample_heun",)


def steps_for_nfe(nfe: int, sampler: str) -> int:
    """The most steps ``sampler`` (a name or ``_target_``) can take within ``nfe`` evaluations (Heun: 2 steps - 1)."""
    nfe = int(nfe)
    if nfe < 1:
        raise ValueError(f"nfe must be a positive number of network evaluations per image, got {nfe}")
    if sampler.rsplit(".", 1)[-1] in SECOND_ORDER_STEPPERS or sampler == "heun":
        return max(1, (nfe + 1) // 2)
    return nfe
