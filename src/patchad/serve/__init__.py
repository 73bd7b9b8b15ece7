"""``patchad serve``: the HTTP inspection service (FastAPI) and its operator page.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, prometheus-client). See
``docs/serve.md``.
"""

from __future__ import annotations

from patchad.serve.app import create_app
from patchad.serve.batching import Batcher, QueueFull
from patchad.serve.model import load_model, model_facts, thresholds_at

__all__ = ["Batcher", "QueueFull", "create_app", "load_model", "model_facts", "thresholds_at"]
