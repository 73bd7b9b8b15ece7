"""``patchad serve``: the HTTP inspection service (FastAPI) and its operator page.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, prometheus-client). See
``docs/serve.md``.
"""

from __future__ import annotations

from patchad.serve.app import create_app
from patchad.serve.batching import Batcher, QueueFull
from patchad.serve.drift import DriftSettings
from patchad.serve.feedback import FeedbackRecord, read_feedback
from patchad.serve.model import load_model, model_facts, thresholds_at
from patchad.serve.repository import Repository

__all__ = [
    "Batcher",
    "DriftSettings",
    "FeedbackRecord",
    "QueueFull",
    "Repository",
    "create_app",
    "load_model",
    "model_facts",
    "read_feedback",
    "thresholds_at",
]
