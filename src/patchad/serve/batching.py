"""Micro-batching for the server: requests' images wait a few milliseconds in a bounded queue,
and one worker thread, which alone calls the model, scores them in batches of the model's size.

Torch-free and independent of the web framework: the model is any ``predict(images) ->
Prediction``, and every image gets a :class:`concurrent.futures.Future` of its own one-image
:class:`~patchad.prediction.Prediction`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from patchad.prediction import Prediction
from patchad.testhold import hold


class QueueFull(Exception):
    """The work queue cannot take these images now; the client should retry later."""


def pick(prediction: Prediction, i: int) -> Prediction:
    """The one-image :class:`Prediction` of image ``i`` of a batch's prediction."""

    def one(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else values[i : i + 1]

    return Prediction(
        scores=prediction.scores[i : i + 1],
        maps=[prediction.maps[i]],
        names=[prediction.names[i]],
        normalized=one(prediction.normalized),
        decisions=one(prediction.decisions),
        masks=None if prediction.masks is None else [prediction.masks[i]],
        image_threshold=prediction.image_threshold,
        pixel_threshold=prediction.pixel_threshold,
    )


class Batcher:
    """A bounded queue of images and the one worker thread that scores them.

    Args:
        predict: scores a list of images in one call, e.g. a detector's ``predict``.
        batch_size: most images per ``predict`` call.
        max_wait_s: once an image is waiting, how long to wait for more before scoring a
            partial batch.
        max_queue: most images waiting (not yet taken by the worker); :meth:`submit` raises
            :class:`QueueFull` past it.
        on_batch: called from the worker with (images in the batch, seconds it took).
    """

    def __init__(
        self,
        predict: Callable[[list[Any]], Prediction],
        *,
        batch_size: int,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.predict = predict
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._items: deque[tuple[Any, Future[Prediction]]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="patchad-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Images waiting for the worker."""
        return len(self._items)

    @property
    def alive(self) -> bool:
        """Whether the worker is running and taking new images."""
        return self._thread.is_alive() and not self._closing

    def full(self, count: int = 1) -> bool:
        """Whether ``count`` more images would overflow the queue now."""
        return len(self._items) + count > self.max_queue

    def submit(self, images: Sequence[Any]) -> list[Future[Prediction]]:
        """Queue images, all or none; one future per image, in order.

        Raises:
            QueueFull: the queue cannot take all of them (or the batcher is closed).
        """
        futures: list[Future[Prediction]] = [Future() for _ in images]
        with self._cond:
            if self._closing:
                raise QueueFull("shutting down")
            if self.full(len(images)):
                raise QueueFull(f"{len(self._items)} images waiting, at most {self.max_queue}")
            self._items.extend(zip(images, futures, strict=True))
            self._cond.notify()
        return futures

    def close(self, timeout: float | None = None) -> None:
        """Stop taking images, score those already queued, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[Any, Future[Prediction]]] | None:
        """The next batch: waits for a first image, then up to ``max_wait_s`` for a full batch;
        None once closed and drained."""
        with self._cond:
            while not self._items and not self._closing:
                self._cond.wait()
            if not self._items:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._items) < self.batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            count = min(self.batch_size, len(self._items))
            taken = [self._items.popleft() for _ in range(count)]
        # a future cancelled while it waited (its client left) is dropped, not scored
        return [(image, f) for image, f in taken if f.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            hold("serve-batch")  # tests only: the worker holds a batch it took
            start = time.perf_counter()
            try:
                prediction = self.predict([image for image, _ in batch])
            except BaseException as exc:  # every waiting client gets the error, the worker lives
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for i, (_, future) in enumerate(batch):
                future.set_result(pick(prediction, i))
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
