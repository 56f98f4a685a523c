"""Sample-quality metrics: pure functions on feature tensors (and class probabilities), and on images."""

from diffusion.evaluation.metrics.broken import broken_images, high_frequency_energy
from diffusion.evaluation.metrics.classification import conditional_accuracy
from diffusion.evaluation.metrics.frechet import frechet_distance, frechet_distance_from_features, gaussian_statistics
from diffusion.evaluation.metrics.inception_score import inception_score
from diffusion.evaluation.metrics.kid import kernel_inception_distance, polynomial_kernel
from diffusion.evaluation.metrics.precision_recall import knn_radii, manifold_coverage, precision_recall

__all__ = [
    "broken_images",
    "high_frequency_energy",
    "conditional_accuracy",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_statistics",
    "inception_score",
    "kernel_inception_distance",
    "polynomial_kernel",
    "knn_radii",
    "manifold_coverage",
    "precision_recall",
]
