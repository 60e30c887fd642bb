"""Adapter residency for a server: which adapters are in memory, loading them by name, evicting the
least recently used idle one, and the line of requests waiting for room.

At most ``max_loaded`` adapters are in memory, whichever path loads them (a request naming one,
POST /v1/adapters, vLLM's /v1/load_lora_adapter). Adapters given at start are reloadable, not
pinned: they are evicted like the others and come back from their path when a request names them
again, so the cap holds exactly and no name ever becomes unknown.

Locks, outermost first: ``loading`` (one load or eviction at a time), ``model_lock`` (taken alone
here while the model's modules change; the engine's forwards share it), ``idle`` (guards ``in_use``,
``draining`` and the line; notified whenever any of them changes).

Requests name adapters; the model holds each one under a name of its own (``in_model``,
``model_names``), the same at first. When an idle adapter's tensors are lent to the next one (a
hot swap), only the names' mapping changes: renaming the model's adapter would change its modules,
which needs every forward to stop, while writing an idle adapter's values does not (no row of a
forward in flight uses it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from pathlib import Path

import lorakit as lk

from ..errors import LoraError
from ..io.hotswap import prepare_hotswap
from ..io.peft_format import CONFIG_FILE
from ..model.state import BASE
from .openmp import release_threads
from .requests import ADAPTER_NAME, ServingError


class AdapterPool:
    def __init__(self, model, model_lock: threading.Lock, *, base_name: str, adapter_dir: str | None = None,
                 max_loaded: int | None = None, wait_s: float = 30.0):
        self.model, self.model_lock, self.base_name = model, model_lock, base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.max_loaded, self.wait_s = max_loaded, wait_s
        self.in_use: dict[str, int] = {}  # requests accepted and not finished, per adapter
        self.draining: set[str] = set()  # being unloaded: no new requests
        self.idle = threading.Condition()
        self.last_used: dict[str, float] = {}
        self.sources: dict[str, Path] = {}  # adapters given at start: reloaded from here after an eviction
        self.loading = threading.RLock()
        self.line: deque[object] = deque()  # requests waiting for room to load their adapter
        self.loads: dict[str, int] = {}  # how many times each name was loaded: tells one load from the next
        self.in_model: dict[str, str] = {}  # adapter name -> the name the model holds it under

    # --- what is there -------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The adapters requests may use: resident and not being unloaded."""
        return [n for n in self.resident() if n not in self.draining]

    def resident(self) -> list[str]:
        """Every adapter in memory, those being unloaded included (they still take room)."""
        named = {inside: name for name, inside in self.in_model.items()}
        return [named.get(inside, inside) for inside in self._held()]

    def _held(self) -> list[str]:
        """The model's own names of the adapters it holds."""
        try:
            return lk.list_adapters(self.model)
        except LoraError:
            return []

    def model_names(self, names: list[str]) -> list[str]:
        """The model's names for the adapters of a forward's rows (BASE stays BASE). The rows'
        adapters are in use, so their names cannot change while the forward runs."""
        return [self.in_model.get(name, name) for name in names]

    def known(self, name: str) -> bool:
        """Can ``name`` be loaded by name: given at start, or an adapter of --adapter-dir?"""
        if name in self.sources:
            return True
        try:
            self.resolve_path(name)
        except ServingError:
            return False
        return True

    def resolve_path(self, name: str) -> Path:
        """An adapter given at start, or a directory strictly inside the configured adapter dir (no
        paths, no `..`, no symlinks pointing out)."""
        if name in self.sources:
            return self.sources[name]
        if self.adapter_dir is None:
            raise ServingError("this server has no --adapter-dir; adapters cannot be loaded at run time", 403)
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise ServingError(f"invalid adapter name {name!r}: use letters, digits, '_', '-', '.' (no paths)")
        path = (self.adapter_dir / name).resolve()
        if path.parent != self.adapter_dir:
            raise ServingError(f"adapter {name!r} resolves outside the adapter directory; refused", 403)
        if not (path / CONFIG_FILE).is_file():
            raise ServingError(f"no adapter named {name!r} in the adapter directory", 404)
        return path

    def _check_name(self, name: str) -> None:
        if not ADAPTER_NAME.match(name) or name in (BASE, self.base_name):
            raise ServingError(f"invalid adapter name {name!r}")

    # --- loading and unloading -----------------------------------------------------------------
    def add_start_adapter(self, name: str, path: str | Path) -> None:
        """An adapter named at start (--adapter NAME=PATH): loaded now, and reloadable after eviction."""
        self._check_name(name)
        if self.max_loaded and len(self.sources) >= self.max_loaded:
            raise ServingError(f"{len(self.sources) + 1} adapters given at start but --max-loaded-adapters is "
                               f"{self.max_loaded}; raise the cap or give fewer --adapter")
        self._load(name, Path(path))
        self.sources[name] = Path(path)

    def _load(self, name: str, path: Path) -> None:
        with self.model_lock:
            self._attach(name, path)

    def _attach(self, name: str, path: Path) -> None:
        """Load ``name`` into the model; the caller holds the model lock."""
        inside, taken = name, set(self._held())
        while inside in taken:  # the model holds another adapter under this name (a swap lent it)
            inside += "_"
        try:
            lk.load_adapter(self.model, path, adapter_name=inside)
        except LoraError as exc:
            raise ServingError(f"adapter {name!r} cannot be loaded: {exc}", 422) from None
        self.in_model[name] = inside
        self._loaded(name)

    def _loaded(self, name: str) -> None:
        self.loads[name] = self.loads.get(name, 0) + 1  # a new version: prefix-cache entries of the last load are stale
        self.last_used[name] = time.monotonic()  # just loaded counts as just used: not the next to go
        release_threads()  # an OpenMP team this (HTTP) thread built for the copies would slow the engine's

    def _replace(self, victim: str, name: str, path: Path) -> None:
        """Evict idle ``victim`` for ``name``. The caller holds the loading lock, under which
        requests are counted in use: the victim stays idle, and no other load or eviction runs.

        Where ``name`` fits the victim's modules (no module the victim lacks, the same ranks, DoRA,
        rsLoRA and dropout settings: the common case of many adapters trained alike), its weights
        are written into the victim's tensors (lk.hotswap_adapter) while forwards run: they use
        other adapters, and a turn of the model lock alone would wait for every forward in flight
        and stop both workers meanwhile (BENCHMARKS.md, issue 26). A swap that changes ranks builds
        modules, so it takes the lock; anything else is evicted and loaded in one turn of it."""
        with self.idle:
            self.draining.add(victim)  # requests naming it meanwhile wait, then load it again
        try:
            inside = self.in_model.get(victim, victim)
            try:  # read and checked while forwards run
                swap = prepare_hotswap(self.model, path, inside)
            except LoraError:  # it does not fit: evict and load
                swap = None
            if swap is None:
                with self.model_lock:
                    self._detach(victim)
                    self._attach(name, path)
                return
            try:
                with self.model_lock if swap.changes_structure() else contextlib.nullcontext():
                    swap.apply()
            except Exception as exc:
                # the victim holds some of the new values now: dropped, it comes back whole from
                # its file when a request names it (a failed load leaves no half-written adapter)
                with self.model_lock:
                    self._detach(victim)
                raise ServingError(f"adapter {name!r} cannot be loaded: {exc}", 500) from exc
            self.in_model.pop(victim, None)
            self.in_model[name] = inside
            self.last_used.pop(victim, None)
            self._loaded(name)
        finally:
            self._end_draining(victim)

    def _detach(self, name: str) -> None:
        """Drop ``name`` from the model; the caller holds the model lock."""
        lk.delete_adapter(self.model, self.in_model.pop(name, name))
        self.last_used.pop(name, None)

    def _end_draining(self, name: str) -> None:
        with self.idle:
            self.draining.discard(name)
            self.idle.notify_all()

    def load(self, name: str) -> None:
        """POST /v1/adapters: load ``name`` by name, within the cap like any on-demand load."""
        self._check_name(name)
        if name in self.adapters:
            raise ServingError(f"adapter {name!r} is already loaded", 409)
        self.resolve_path(name)  # 403 / 404 before waiting for anything
        self._load_on_demand(name)

    def unload(self, name: str, timeout: float = 60.0, forget: bool = False) -> None:
        """Stop accepting requests for ``name``, wait for its running ones, then drop it. forget=True
        (DELETE /v1/adapters/NAME) also drops a start adapter's path, so it is not reloaded by name."""
        with self.idle:
            if name not in self.adapters:
                raise ServingError(f"unknown adapter {name!r}", 404)
            self.draining.add(name)
        try:
            with self.idle:
                if not self.idle.wait_for(lambda: self.in_use.get(name, 0) == 0, timeout=timeout):
                    raise ServingError(f"adapter {name!r} is still busy after {timeout:.0f} s; try again", 503)
            with self.model_lock:
                self._detach(name)
            if forget:
                self.sources.pop(name, None)
        finally:
            self._end_draining(name)

    # --- requests ------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The adapter a request names (BASE for the base model): loaded already, or loaded now
        (given at start, or from --adapter-dir), evicting the least recently used idle adapter when
        the cap is reached."""
        adapter = self.check(name)
        if adapter == BASE:
            return BASE
        if adapter not in self.adapters:
            self._load_on_demand(adapter)
        if adapter in self.adapters:
            self.last_used[adapter] = time.monotonic()
            return adapter
        raise self._unknown(adapter)

    def check(self, name: str) -> str:
        """What ``resolve`` returns, without loading: a request's adapter is loaded when it is
        submitted (``acquire``), counted in use in the same step."""
        if name in (self.base_name, BASE):
            return BASE
        if name in self.adapters or self.known(name):
            return name
        raise self._unknown(name)

    def _unknown(self, name: str) -> ServingError:
        return ServingError(f"unknown model {name!r}; available: {', '.join([self.base_name, *self.adapters])}", 404)

    def acquire(self, adapter: str) -> None:
        """Count a request against ``adapter`` (reloading it if it was evicted since the request
        named it): from here until ``release`` it cannot be evicted or unloaded."""
        while True:
            if adapter != BASE and adapter not in self.adapters:
                if self.check(adapter) != adapter:  # the base's public name: BASE is what runs
                    raise ServingError(f"a request's adapter is an adapter name or BASE ({BASE!r}), not the base "
                                       f"model's name {adapter!r}; resolve names with engine.check_model(name)")
                # load it (again) and count the request in the same turn of the loading lock, so the
                # next request in line cannot evict it first (that made 79 loads of 32 requests);
                # waiting for room happens without holding the loading lock, so the line moves
                self._load_on_demand(adapter, claim=True)
                return
            with self.loading:  # evictions happen under this lock: once counted in use, the adapter stays
                if adapter != BASE and adapter not in self.adapters:
                    continue  # evicted again in between
                with self.idle:
                    if adapter in self.draining:  # its unload began in between: wait, reload
                        continue
                self._count(adapter)
                return

    def _count(self, adapter: str) -> None:
        """One more request of ``adapter`` accepted: in use (not evictable) until ``release``."""
        with self.idle:
            self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        if adapter != BASE:
            self.last_used[adapter] = time.monotonic()

    def release(self, adapter: str) -> None:
        with self.idle:
            self.in_use[adapter] -= 1
            self.idle.notify_all()

    def _load_on_demand(self, name: str, claim: bool = False) -> None:
        """Load ``name`` (claim=True: and count a request against it before anything else can evict
        it), first evicting the least recently used idle adapter when the resident ones
        are at the cap. When all of them have requests in flight, requests that need room queue for
        it first come, first served, without holding the loading lock (requests for resident
        adapters keep being accepted meanwhile); only the first in line waits against ``wait_s``, so
        a long line under load is a queue, not a failure. A request for an adapter being unloaded
        waits for the unload to finish and then loads it again: it never evicts another adapter to
        make room for a name that is still resident."""
        ticket = object()
        idle_ones = lambda: [a for a in self.adapters if self.in_use.get(a, 0) == 0]  # noqa: E731
        with self.idle:
            self.line.append(ticket)
        try:
            deadline = None
            while True:
                with self.loading:
                    if name in self.adapters:
                        if claim:
                            self._count(name)
                        return
                    with self.idle:
                        draining = name in self.draining
                        full = bool(self.max_loaded) and len(self.resident()) >= self.max_loaded
                        first = self.line[0] is ticket
                        idle = idle_ones() if full and first and not draining else []
                    if not draining and (not full or idle):
                        if idle:
                            victim = min(idle, key=lambda a: self.last_used.get(a, 0.0))
                            self._replace(victim, name, self.resolve_path(name))
                        else:
                            self._load(name, self.resolve_path(name))
                        if claim:
                            self._count(name)
                        return
                with self.idle:
                    if draining:  # wait for its unload to finish, then load it again
                        deadline = deadline or time.monotonic() + self.wait_s
                        if not self.idle.wait_for(lambda: name not in self.draining,
                                                  timeout=max(0.0, deadline - time.monotonic())):
                            raise ServingError(f"adapter {name!r} is being unloaded and stayed busy for "
                                               f"{self.wait_s:.0f} s; retry shortly", 503)
                        continue
                    if self.line[0] is not ticket:  # behind others: wait for the line to move
                        self.idle.wait(timeout=1.0)
                        continue
                    deadline = deadline or time.monotonic() + self.wait_s
                    ready = lambda: bool(idle_ones()) or name in self.adapters  # noqa: E731
                    if not self.idle.wait_for(ready, timeout=max(0.0, deadline - time.monotonic())):
                        raise ServingError(f"all {len(self.adapters)} loaded adapters stayed busy for "
                                           f"{self.wait_s:.0f} s; retry shortly", 503)
        finally:
            with self.idle:
                self.line.remove(ticket)
                self.idle.notify_all()
