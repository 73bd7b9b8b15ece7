"""Detectors: PatchCore, PaDiM and SPADE share one pipeline (:class:`Detector`)."""

from __future__ import annotations

from patchad.detectors.base import Detector, Prediction, load
from patchad.detectors.patchcore import PatchCore

DETECTORS: dict[str, type[Detector]] = {"patchcore": PatchCore}

__all__ = ["DETECTORS", "Detector", "PatchCore", "Prediction", "load"]
