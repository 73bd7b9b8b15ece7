"""patchad: unsupervised industrial visual anomaly detection (PatchCore, PaDiM, SPADE)."""

from __future__ import annotations

__version__ = "0.1.0"

from patchad.detectors import DETECTORS, SPADE, Detector, PaDiM, PatchCore, Prediction, load
from patchad.errors import ConfigError, NotFittedError, PatchadError
from patchad.features import FeatureExtractor

__all__ = [
    "DETECTORS",
    "SPADE",
    "ConfigError",
    "Detector",
    "FeatureExtractor",
    "NotFittedError",
    "PaDiM",
    "PatchCore",
    "PatchadError",
    "Prediction",
    "__version__",
    "load",
]
