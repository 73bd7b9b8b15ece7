"""The operator-feedback store of ``patchad serve --feedback-dir DIR``, and its reading API.

Torch-free. On-disk layout (flat, one folder):

    DIR/<stamp>-<hex>.<suffix>   the image, as uploaded (suffix: a known image suffix)
    DIR/<stamp>-<hex>.json       its record: {"version": 1, "image": "<stamp>-<hex>.<suffix>",
                                 "label": "good" | "defect", "model": NAME,
                                 "model_sha256": HEX | null, "score": float | null,
                                 "decision": "normal" | "anomalous" | null, "time": ISO 8601 UTC,
                                 "note": str, "name": the client's file name (never used as a
                                 path)}

``<stamp>`` is the UTC time ``YYYYmmdd-HHMMSS-nnnnnnnnn`` (nanoseconds, increasing within a
store even when two items arrive in one tick) and ``<hex>`` 16 random hex digits, so names sort
in the order items were stored and never come from the client. Both files are written atomically
(:mod:`patchad.atomic`), the image first: a record exists only once its image is complete, and
an image without a record (a write cut short) is ignored by :func:`read_feedback`.

Labels: ``"good"`` = a false alarm, the part is good; ``"defect"`` = a confirmed defect.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchad.atomic import atomic_write_bytes
from patchad.errors import PatchadError
from patchad.images import IMAGE_SUFFIXES

#: The two labels an operator gives.
LABELS = ("good", "defect")
#: Longest note kept, in characters.
MAX_NOTE = 2000
RECORD_VERSION = 1


@dataclass(frozen=True)
class FeedbackRecord:
    """One operator verdict on one image, as stored.

    Attributes:
        image: the stored image file (absolute, inside the feedback folder).
        label: ``"good"`` (false alarm: the part is good) or ``"defect"`` (confirmed defect).
        model: the served model's name (its file stem).
        model_sha256: SHA-256 of the model file whose score is stored (None: not from a file).
        score: that model's image score of the stored image.
        decision: that model's decision, ``"normal"``/``"anomalous"`` (None: not calibrated).
        time: when it was stored, ISO 8601 UTC.
        note: the operator's note ("" when none).
        name: the file name the client sent (for display only).
        record: the JSON record file.
    """

    image: Path
    label: str
    model: str
    model_sha256: str | None
    score: float | None
    decision: str | None
    time: str
    note: str
    name: str
    record: Path


def check_label(label: str) -> str:
    """The label, checked.

    Raises:
        PatchadError: not one of :data:`LABELS`.
    """
    if label not in LABELS:
        raise PatchadError(f"label must be 'good' (false alarm) or 'defect', got {label!r}")
    return label


class FeedbackStore:
    """Writes feedback items into one folder, under generated names (see the module docstring).

    Args:
        directory: the feedback folder; created if missing.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PatchadError(f"{self.directory}: cannot create ({exc.strerror})") from None
        self._lock = threading.Lock()
        self._last_ns = 0

    def add(
        self,
        *,
        image: bytes,
        name: str,
        label: str,
        model: str,
        model_sha256: str | None,
        score: float | None,
        decision: str | None,
        note: str = "",
    ) -> FeedbackRecord:
        """Store one image and its record; returns the record as :func:`read_feedback` reads it.

        ``name`` (the client's file name) only chooses the suffix, when it is a known image
        suffix (else ``.png``; the bytes are kept as sent), and is stored as text.

        Raises:
            PatchadError: a bad label, or the folder is not writable.
        """
        check_label(label)
        suffix = Path(name).suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".png"
        with self._lock:  # one writer at a time: a name is never reused
            # names sort in the order items were stored, even within one second
            ns = self._last_ns = max(time.time_ns(), self._last_ns + 1)
            now = ns / 1e9
            while True:
                stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{ns % 10**9:09d}"
                stem = f"{stamp}-{secrets.token_hex(8)}"
                image_path = self.directory / f"{stem}{suffix}"
                record_path = self.directory / f"{stem}.json"
                if not image_path.exists() and not record_path.exists():
                    break
            body = {
                "version": RECORD_VERSION,
                "image": image_path.name,
                "label": label,
                "model": model,
                "model_sha256": model_sha256,
                "score": score,
                "decision": decision,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "note": note[:MAX_NOTE],
                "name": name,
            }
            atomic_write_bytes(image_path, image, force=False)
            atomic_write_bytes(record_path, json.dumps(body, indent=1).encode(), force=False)
        return _record(record_path, body)


def _record(path: Path, body: dict[str, Any]) -> FeedbackRecord:
    image = (path.parent / str(body["image"])).resolve()
    if image.parent != path.parent.resolve():
        raise PatchadError(f"its image {body['image']!r} is outside the folder")
    score = body.get("score")
    return FeedbackRecord(
        image=image,
        label=check_label(str(body.get("label"))),
        model=str(body.get("model", "")),
        model_sha256=body.get("model_sha256"),
        score=None if score is None else float(score),
        decision=body.get("decision"),
        time=str(body.get("time", "")),
        note=str(body.get("note", "")),
        name=str(body.get("name", "")),
        record=path.resolve(),
    )


def read_feedback(
    directory: str | os.PathLike[str],
    *,
    model: str | None = None,
    label: str | None = None,
) -> list[FeedbackRecord]:
    """Every complete feedback item in ``directory``, oldest first.

    Args:
        directory: a ``--feedback-dir`` folder.
        model: keep only this model's items (by name).
        label: keep only ``"good"`` or ``"defect"`` items.

    Raises:
        PatchadError: the folder is missing, or a record is unreadable (the message names it).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise PatchadError(f"{folder}: no such feedback folder")
    if label is not None:
        check_label(label)
    records = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = _record(path, json.loads(path.read_text("utf-8")))
        except (OSError, ValueError, KeyError, TypeError, PatchadError) as exc:
            raise PatchadError(f"{path}: not a feedback record ({exc})") from None
        if not record.image.is_file():
            raise PatchadError(f"{path}: its image {record.image.name} is missing")
        if (model is None or record.model == model) and (label is None or record.label == label):
            records.append(record)
    return records
