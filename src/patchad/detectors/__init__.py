"""Detectors: PatchCore, PaDiM and SPADE share one pipeline (:class:`Detector`)."""

from __future__ import annotations

from patchad.detectors.base import Detector, Prediction
from patchad.detectors.padim import PaDiM
from patchad.detectors.patchcore import PatchCore
from patchad.detectors.spade import SPADE
from patchad.detectors.stored import load

DETECTORS: dict[str, type[Detector]] = {"patchcore": PatchCore, "padim": PaDiM, "spade": SPADE}

__all__ = ["DETECTORS", "SPADE", "Detector", "PaDiM", "PatchCore", "Prediction", "load"]
