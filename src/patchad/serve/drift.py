"""Drift alarms of ``patchad serve``: a rolling window of a model's recent answers, and two
tests on it. Torch-free; scipy is imported when a test runs.

**Drift of the good parts** (the ``patchad_drift`` gauge). Under no drift a good part's score
is exchangeable with the calibration scores, so the scores of the window's parts judged good
(score <= threshold) follow the law of the calibration scores at or below the threshold; this
is the statement "the calibrated p-values of the parts judged good are uniform above the
threshold's p-value", made exact for a finite calibration set. The test is the two-sample
Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided) of those window scores against
those calibration scores. Defects scored above the threshold never enter it, so it does not
depend on the defect rate; defects the model misses do enter it, as would any good-looking
change. The alarm is 1 when its p-value is below ``alpha`` (the alarm's own false-alarm rate
per evaluation) and the window holds at least ``min_good`` parts judged good.

**Defect rate** (optional, the ``patchad_defect_rate_alarm`` gauge): given the expected defect
rate d, a one-sided binomial test (``scipy.stats.binomtest``) of the window's anomalous count
against d + (1 - d) * f, f the calibrated false-alarm rate: the highest anomaly rate expected
when every defect is flagged. Alarm when its p-value is below ``alpha``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DriftSettings:
    """The window and the tests' settings (CLI: ``--drift-window``, ``--drift-alpha``,
    ``--drift-min-good``, ``--expected-defect-rate``)."""

    window: int = 200
    alpha: float = 0.001
    min_good: int = 30
    expected_defect_rate: float | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"drift window must be >= 1, got {self.window}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"drift alpha must be in (0, 1), got {self.alpha}")
        if self.min_good < 2:
            raise ValueError(f"drift min-good must be >= 2, got {self.min_good}")
        rate = self.expected_defect_rate
        if rate is not None and not 0 <= rate < 1:
            raise ValueError(f"expected defect rate must be in [0, 1), got {rate}")


class DriftWindow:
    """The last ``settings.window`` answers of one model version (score, anomalous or not).

    Args:
        settings: window size and tests.
        calibration_scores: the model's calibration scores (None: not calibrated, no test).
        threshold: the model's image threshold.
        false_alarm_rate: the calibrated false-alarm rate (expected share of good parts
            flagged).
    """

    def __init__(
        self,
        settings: DriftSettings,
        calibration_scores: Any = None,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
    ) -> None:
        self.settings = settings
        calibrated = calibration_scores is not None and threshold is not None
        self.calibrated = calibrated
        self.threshold = threshold
        self.false_alarm_rate = false_alarm_rate
        calib = np.asarray(calibration_scores if calibrated else [], dtype=np.float64)
        self._reference = np.sort(calib[calib <= threshold]) if calibrated else calib
        self._answers: deque[tuple[float, bool]] = deque(maxlen=settings.window)
        self._lock = threading.Lock()
        self._seen = 0
        self._cache: tuple[int, dict[str, Any]] | None = None

    def add(self, score: float, anomalous: bool | None) -> None:
        """Record one answer (``anomalous`` None: the model is not calibrated)."""
        with self._lock:
            self._answers.append((float(score), bool(anomalous)))
            self._seen += 1

    def snapshot(self) -> dict[str, Any]:
        """The window's state and tests: ``answers``, ``anomalous``, ``anomaly_rate``,
        ``false_alarm_rate``, ``good``, ``ks_statistic``, ``ks_pvalue``, ``drift`` (0/1),
        ``defect_rate_pvalue``, ``defect_rate_alarm`` (0/1), and the settings."""
        with self._lock:
            if self._cache is not None and self._cache[0] == self._seen:
                return self._cache[1]
            answers = list(self._answers)
            seen = self._seen
        result = self._tests(answers)
        with self._lock:
            self._cache = (seen, result)
        return result

    def _tests(self, answers: list[tuple[float, bool]]) -> dict[str, Any]:
        settings = self.settings
        n = len(answers)
        flagged = sum(1 for _, a in answers if a)
        good = np.asarray([s for s, a in answers if not a], dtype=np.float64)
        out: dict[str, Any] = {
            "window": settings.window,
            "alpha": settings.alpha,
            "min_good": settings.min_good,
            "test": "ks_2samp(window good scores, calibration scores <= threshold)",
            "calibrated": self.calibrated,
            "answers": n,
            "anomalous": flagged,
            "anomaly_rate": flagged / n if n and self.calibrated else None,
            "false_alarm_rate": self.false_alarm_rate,
            "good": int(good.size),
            "reference": int(self._reference.size),
            "ks_statistic": None,
            "ks_pvalue": None,
            "drift": 0,
            "expected_defect_rate": settings.expected_defect_rate,
            "defect_rate_pvalue": None,
            "defect_rate_alarm": 0,
        }
        if not self.calibrated:
            return out
        if good.size >= settings.min_good and self._reference.size >= 2:
            from scipy.stats import ks_2samp

            test = ks_2samp(good, self._reference)
            out["ks_statistic"] = float(test.statistic)
            out["ks_pvalue"] = float(test.pvalue)
            out["drift"] = int(test.pvalue < settings.alpha)
        rate = settings.expected_defect_rate
        if rate is not None and n and self.false_alarm_rate is not None:
            from scipy.stats import binomtest

            expected = rate + (1 - rate) * self.false_alarm_rate
            pvalue = float(binomtest(flagged, n, expected, alternative="greater").pvalue)
            out["defect_rate_pvalue"] = pvalue
            out["defect_rate_alarm"] = int(pvalue < settings.alpha)
        return out


def window_for(settings: DriftSettings, facts: dict[str, Any]) -> DriftWindow:
    """A window for a model from its facts (:func:`patchad.serve.model.model_facts`); the
    false-alarm rate is ``expected_false_alarm_rate`` of its calibration."""
    if not facts.get("calibrated") or not facts.get("calibration_scores"):
        return DriftWindow(settings)
    scores = np.asarray(facts["calibration_scores"], dtype=np.float64)
    threshold = float(facts["image_threshold"])
    fpr = facts.get("fpr")
    if fpr is not None:
        from patchad.calibration import expected_false_alarm_rate

        rate = expected_false_alarm_rate(int(scores.size), float(fpr))
    else:
        rate = float((1 + np.sum(scores > threshold)) / (scores.size + 1))
    return DriftWindow(settings, scores, threshold, rate)
