"""The standard FID Inception-v3 (TensorFlow's 2015 weights, ported by torch-fidelity), from a local weights file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from diffusion.errors import ConfigError
from diffusion.evaluation.features.base import FeatureExtractor
from diffusion.reports.images import to_uint8

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
HOW_TO_GET_WEIGHTS = (
    f"nothing is downloaded at run time: fetch {WEIGHTS_URL} (torch-fidelity's port of the FID Inception-v3) "
    "on a machine with internet, copy it here and run with features.weights_path=/path/to/"
    "weights-inception-2015-12-05-6726825d.pth"
)


class InceptionV3(FeatureExtractor):
    """FID's Inception-v3 through torch-fidelity: 2048 pool features, 1008 logits for the Inception Score.

    Images in [-1, 1] are quantised to uint8 (as PNGs would be), gray ones repeated to RGB, and resized
    to 299x299 by torch-fidelity exactly as TensorFlow's FID code does. The weights file is read with
    ``torch.load(weights_only=True)``, so it can't run code; only its tensors reach torch-fidelity.

    Args:
        weights_path: the local weights file (see ``WEIGHTS_URL``); required, nothing is downloaded.
    """

    feature_dim = 2048
    num_classes = 1008  # ImageNet's 1,000 classes and 8 unused outputs of the original graph
    classes = None  # not a data set's classes: no conditional accuracy

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        if weights_path in (None, "", "???"):
            raise ConfigError(f"features=inception needs the Inception-v3 weights file: {HOW_TO_GET_WEIGHTS}")
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"features.weights_path={str(path)!r} is not a file: {HOW_TO_GET_WEIGHTS}")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        data = path.read_bytes()
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensors_only = io.BytesIO()  # torch-fidelity unpickles what it is given: give it tensors we re-saved
        torch.save(state_dict, tensors_only)
        tensors_only.seek(0)
        self.network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=tensors_only
        )
        self.name = f"inception-v3-{hashlib.sha256(data).hexdigest()[:8]}"

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = to_uint8(images)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        features, logits = self.network(pixels.contiguous())
        return features, logits
