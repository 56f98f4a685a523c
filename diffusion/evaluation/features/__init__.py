"""Feature extractors for the quality metrics: one interface, ``features_and_logits(images in [-1, 1])``."""

from diffusion.evaluation.features.base import FeatureExtractor, extract, in_batches
from diffusion.evaluation.features.digits import DigitsClassifier
from diffusion.evaluation.features.inception import InceptionV3

__all__ = ["FeatureExtractor", "extract", "in_batches", "DigitsClassifier", "InceptionV3"]
