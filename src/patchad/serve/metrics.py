"""The Prometheus metrics of ``patchad serve``: the service's counters, and per-model gauges
(``model`` label) read from the repository at each scrape: the drift window's anomaly rate,
the calibrated false-alarm rate, the drift statistic, its p-value and alarm. Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: gauge name -> (help, key in DriftWindow.snapshot())
DRIFT_GAUGES = {
    "patchad_window_answers": ("answers in the model's drift window", "answers"),
    "patchad_window_good": ("answers in the window judged good (the drift test's sample)", "good"),
    "patchad_window_anomaly_rate": (
        "share of the window's answers judged anomalous",
        "anomaly_rate",
    ),
    "patchad_calibrated_false_alarm_rate": (
        "expected share of good parts judged anomalous, from the calibration",
        "false_alarm_rate",
    ),
    "patchad_drift_statistic": (
        "KS statistic of the window's good-judged scores vs calibration scores",
        "ks_statistic",
    ),
    "patchad_drift_pvalue": ("p-value of that KS test", "ks_pvalue"),
    "patchad_drift": ("1 when the KS p-value is below --drift-alpha", "drift"),
    "patchad_defect_rate_pvalue": (
        "p-value of the window's anomaly count vs --expected-defect-rate",
        "defect_rate_pvalue",
    ),
    "patchad_defect_rate_alarm": (
        "1 when that p-value is below --drift-alpha",
        "defect_rate_alarm",
    ),
}


class DriftCollector(Collector):
    """Reads ``snapshots()`` (model name -> DriftWindow.snapshot()) at each scrape."""

    def __init__(self, snapshots: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self.snapshots()
        for name, (text, key) in DRIFT_GAUGES.items():
            family = GaugeMetricFamily(name, text, labels=["model"])
            for model, state in sorted(states.items()):
                if state.get("calibrated") and state.get(key) is not None:
                    family.add_metric([model], float(state[key]))
            yield family


def service_metrics(registry: CollectorRegistry) -> dict[str, Any]:
    """The service's counters, histograms and gauges, registered in ``registry``."""
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    return {
        "requests": Counter(
            "patchad_requests", "HTTP requests answered", ["path", "status"], registry=registry
        ),
        "images": Counter("patchad_images", "images scored", registry=registry),
        "decisions": Counter(
            "patchad_decisions", "image decisions", ["decision"], registry=registry
        ),
        "model_images": Counter(
            "patchad_model_images",
            "images scored, by model and decision",
            ["model", "decision"],
            registry=registry,
        ),
        "swaps": Counter(
            "patchad_model_swaps", "model versions swapped in", ["model"], registry=registry
        ),
        "feedback": Counter(
            "patchad_feedback", "feedback items stored", ["model", "label"], registry=registry
        ),
        "latency": Histogram(
            "patchad_predict_latency_seconds",
            "POST /predict latency, from request to answer",
            buckets=buckets,
            registry=registry,
        ),
        "batch": Histogram(
            "patchad_batch_images",
            "images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        ),
        "rejected": Counter(
            "patchad_rejected", "requests refused with 503 (queue full)", registry=registry
        ),
        "depth": Gauge("patchad_queue_depth", "images waiting to be scored", registry=registry),
        "loaded": Gauge("patchad_models_loaded", "model versions loaded", registry=registry),
        "in_flight": Gauge(
            "patchad_predict_in_flight", "POST /predict requests being answered", registry=registry
        ),
    }
