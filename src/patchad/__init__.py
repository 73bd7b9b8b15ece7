"""patchad: unsupervised industrial visual anomaly detection (PatchCore, PaDiM, SPADE).

``import patchad`` is light: it imports neither torch nor timm. The detectors and the feature
extractor are imported the first time one of their names is used (``patchad.PatchCore``), so
the CLI answers ``--help`` at once and the torch-free runtime (``patchad.runtime``) can import
the package where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from patchad.errors import ConfigError, NotFittedError, PatchadError
from patchad.prediction import Prediction

__version__ = "0.1.0"

if TYPE_CHECKING:
    from patchad.detectors import DETECTORS, SPADE, Detector, PaDiM, PatchCore, load
    from patchad.features import FeatureExtractor

#: Public names imported on first use: name -> module.
_LAZY = {
    "DETECTORS": "patchad.detectors",
    "SPADE": "patchad.detectors",
    "Detector": "patchad.detectors",
    "PaDiM": "patchad.detectors",
    "PatchCore": "patchad.detectors",
    "load": "patchad.detectors",
    "FeatureExtractor": "patchad.features",
}


def __getattr__(name: str) -> Any:
    """Import a heavy public name on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchad' has no attribute {name!r}")


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
