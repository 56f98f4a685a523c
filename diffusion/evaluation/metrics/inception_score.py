"""The Inception Score of class probabilities (Salimans et al. 2016)."""

from __future__ import annotations

import torch

from diffusion.errors import ConfigError


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, Section 4), mean and std over ``splits`` parts.

    Args:
        probabilities: (N, C) class probabilities p(y|x) of the N images (each row sums to 1).
        splits: the images are cut into this many consecutive parts (10 in the paper's code); p(y) is the
            mean of each part, and the score is averaged over the parts.
    """
    probabilities = torch.as_tensor(probabilities).detach().to("cpu", torch.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {tuple(probabilities.shape)}")
    if not 1 <= splits <= probabilities.shape[0]:
        raise ConfigError(f"inception score: splits={splits} must lie between 1 and the {probabilities.shape[0]} "
                          "images")
    if (probabilities < 0).any() or not torch.allclose(probabilities.sum(1), torch.ones(1, dtype=torch.float64),
                                                        atol=1e-4):
        raise ValueError("inception score needs probabilities (rows >= 0 summing to 1): apply a softmax to the logits")
    scores = []
    for part in torch.tensor_split(probabilities, splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)  # 0 log 0 = 0
        scores.append(kl.sum(dim=1).mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std(unbiased=False).item() if splits > 1 else 0.0)
