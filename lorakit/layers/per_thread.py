"""Layer state that belongs to the thread that set it, as ``torch.no_grad`` does.

A server runs forwards of one model from several worker threads at once, each batch with its own
rows' adapters: ``lk.mixed_batch`` and ``lk.disable_adapters`` set what a layer does for the next
forwards, so that setting must not leak into another thread's forward. ``PerThread`` is a class
attribute whose value is kept per thread (the default in every thread that has not set it); the
reusable output buffers of mixed batches are kept per thread the same way.
"""

from __future__ import annotations

import threading

_local = threading.local()


def _values() -> dict:
    values = getattr(_local, "values", None)
    if values is None:
        values = _local.values = {}
    return values


class PerThread:
    """``self.x = value`` sets x for the calling thread only; other threads read ``default``.

    Values are keyed by the object's id and dropped when set back to the default (the context
    managers that set them always do), so nothing is held for modules that are gone."""

    def __init__(self, default=None):
        self.default = default

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return _values().get((id(obj), self.name), self.default)

    def __set__(self, obj, value) -> None:
        key = (id(obj), self.name)
        if value is self.default or (isinstance(value, bool) and value == self.default):
            _values().pop(key, None)
        else:
            _values()[key] = value


def assign(obj, name: str, value) -> None:
    """Set ``obj``'s PerThread attribute ``name`` for the calling thread, straight through its
    descriptor. ``obj.name = value`` on a module goes through ``nn.Module.__setattr__``'s checks
    first, which cost more than the setting: lk.mixed_batch and lk.disable_adapters set these on
    every wrapper at every decoding step of a server."""
    descriptor = getattr(type(obj), name, None)
    if not isinstance(descriptor, PerThread):
        raise TypeError(f"{type(obj).__name__}.{name} is not a PerThread attribute")
    descriptor.__set__(obj, value)


def thread_buffers(owner_dict: dict, key: str) -> dict:
    """A dict stored in ``owner_dict[key]`` for the calling thread (reused output buffers)."""
    per_thread = owner_dict.setdefault(key, {})
    return per_thread.setdefault(threading.get_ident(), {})
