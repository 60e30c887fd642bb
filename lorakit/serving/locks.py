"""The model lock: forwards share it, changes to the model's adapters take it alone.

Several worker threads run forwards of the one model at once (each batch's adapter choice is per
thread: layers/per_thread.py), while loading or unloading an adapter changes the model's modules and
must see no forward in flight. ``with lock:`` (or acquire / release) takes it exclusively, as the
plain lock it replaces did; ``with lock.shared():`` is a forward's. A waiting exclusive taker
stops new shared ones, so an adapter load is never starved by workers that take turns.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class ModelLock:
    def __init__(self):
        self._state = threading.Condition()
        self._sharing = 0            # forwards in flight
        self._exclusive = False      # a change in progress
        self._exclusive_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._state:
            while self._exclusive or self._exclusive_waiting:
                self._state.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._state:
                self._sharing -= 1
                if not self._sharing:
                    self._state.notify_all()

    def acquire(self) -> None:
        with self._state:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._sharing:
                    self._state.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True

    def release(self) -> None:
        with self._state:
            if not self._exclusive:
                raise RuntimeError("release of a model lock that is not held exclusively")
            self._exclusive = False
            self._state.notify_all()

    def __enter__(self) -> "ModelLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
