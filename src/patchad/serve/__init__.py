"""``patchad serve``: the HTTP inspection service (FastAPI) and its operator page.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, prometheus-client). See
``docs/serve.md``. The names below are imported when first used, so that the feedback store
(:mod:`patchad.serve.feedback`, read by ``patchad update --feedback``) needs none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Batcher": "batching",
    "DriftSettings": "drift",
    "FeedbackRecord": "feedback",
    "QueueFull": "batching",
    "Repository": "repository",
    "create_app": "app",
    "load_model": "model",
    "model_facts": "model",
    "read_feedback": "feedback",
    "thresholds_at": "model",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'patchad.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"patchad.serve.{_WHERE[name]}"), name)
