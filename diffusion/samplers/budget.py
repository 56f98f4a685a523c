"""How many steps a sampler takes on a budget of network evaluations per image."""

from __future__ import annotations

# samplers that evaluate the network twice per step, except on their last step (to sigma = 0)
TWO_EVALUATIONS_PER_STEP = ("heun",)


def steps_for_nfe(nfe: int, sampler: str) -> int:
    """The most steps ``sampler`` (a name or ``_target_``) can take within ``nfe`` evaluations (Heun: 2 steps - 1)."""
    nfe = int(nfe)
    if nfe < 1:
        raise ValueError(f"nfe must be a positive number of network evaluations per image, got {nfe}")
    if sampler.rsplit(".", 1)[-1].removeprefix("sample_") in TWO_EVALUATIONS_PER_STEP:
        return max(1, (nfe + 1) // 2)
    return nfe
