"""Batches computed ahead of the training loop, in a background thread, in step order.

A meta-training batch is a pure function of its step (EpisodeSampler.batch), so a
thread can compute steps start, start + 1, ... while the device runs the current
step, and hand them over through a bounded queue: the loop gets exactly the batch it
would have computed itself for each step, and a resumed run starts the thread at the
restored step. What `load` returns is up to the caller; the training loop's also puts
the batch on the mesh, so the host-to-device transfer overlaps the step as well.

At most depth + 1 batches exist ahead of the loop (depth queued, one being built).
depth=0 builds each batch in the caller's thread when it is asked for (no thread).

Failure and shutdown: an exception raised by `load` is re-raised in the loop when it
asks for that step (the same exception: its type, message and the producer's
traceback); the batches before it are delivered first. `close()` (leaving the `with`
block: stop_at, preemption, an exception in the loop) stops the thread after at most
the batch it is building, without computing the rest of the range.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar('T')


class Prefetcher(Generic[T]):
  """Iterates load(step) for step in [start, stop), computed up to `depth` steps ahead."""

  def __init__(self, load: Callable[[int], T], start: int, stop: int, depth: int = 2):
    if depth < 0:
      raise ValueError(f'prefetch depth must be >= 0, got {depth}')
    self.step = start  # the step of the next item
    self.stop, self.depth = stop, depth
    self._load = load
    self._error: BaseException | None = None  # the producer's, once delivered
    self._closed = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True,
                                      name=f'prefetch-from-step-{start}')
      self._thread.start()

  def _produce(self, start: int) -> None:
    for step in range(start, self.stop):
      if self._closed.is_set():
        return
      try:
        item = (step, self._load(step), None)
      except BaseException as e:  # noqa: BLE001 (handed to the consumer, which re-raises it)
        self._queue.put((step, None, e))
        return
      self._queue.put(item)  # blocks while `depth` batches wait; close() drains to unblock

  def __iter__(self):
    return self

  def __next__(self) -> T:
    if self._error is not None:
      raise self._error
    if self._closed.is_set():
      raise RuntimeError('the prefetcher is closed')
    if self.step >= self.stop:
      raise StopIteration
    if self._thread is None:
      item = self._load(self.step)
    else:
      step, item, error = self._queue.get()
      assert step == self.step, (step, self.step)  # one producer, a FIFO queue: in order
      if error is not None:
        self._error = error
        self.close()
        raise error
    self.step += 1
    return item

  def close(self) -> None:
    """Stops the thread: it finishes the batch it is building, if any, and computes no more."""
    if self._closed.is_set():
      return
    self._closed.set()
    if self._thread is None:
      return
    self._drain()  # a producer blocked in put() wakes, puts at most one more and sees _closed
    self._thread.join()
    self._drain()  # (and lets go of that last batch)

  def _drain(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return

  def __enter__(self) -> 'Prefetcher[T]':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
