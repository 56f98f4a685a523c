"""Feature extractors for the quality metrics: one interface, ``features_and_logits(images in [-1, 1])``."""

from diffusion.features.base import FeatureExtractor, extract, in_batches
from diffusion.features.digits import DigitsClassifier
from diffusion.features.inception import InceptionV3

__all__ = ["FeatureExtractor", "extract", "in_batches", "DigitsClassifier", "InceptionV3"]
