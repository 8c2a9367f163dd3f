"""Background prefetch: read the next batches (decode, crop, resample) while the model computes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterable: Iterable, depth: int = 3) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead.

    Image decoding (Pillow), resampling and ``torch.stack`` release the GIL, so patch reading
    overlaps with the forward pass. Exceptions are re-raised in the caller.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    t = threading.Thread(target=work, name="stdistill-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
