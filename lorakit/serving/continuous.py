"""Continuous batching: requests join the running batch at the next decoding step and leave it the
moment they finish.

Each turn of the loop runs one decoding step for every running request (one token each, each
through its own adapter) and then admits newcomers: those whose prompts fit in one chunk are
prefilled together in one forward (a prompt several of them share, such as the G samples of one
GRPO prompt or an n>1 request, is computed once and its keys and values copied to the others'
slots), while a longer prompt goes one chunk per turn, so it delays running requests by one chunk
per token, not by the whole prompt; short prompts still start while a long one is between chunks.
Short prompts go in one forward per adapter laid end to end, no padding (packed_prefill.py; where
a model's packed forward is not proved equal to its plain one, they are grouped by length so that
right-padding wastes little), and every prompt starts after the blocks of it the prefix cache
(prefix_cache.py) already holds for its adapter. A newcomer whose prompt is done samples its first
token and joins the running rows. Keys and values live in a SlotCache: one slot per request, its
own positions, a 4-D mask, so joining and leaving copy nothing but one moved slot.

Why not transformers' own continuous batching (``generate_batch`` / PagedAttentionCache): it runs
its own generation loop with one set of weights for every request; lorakit needs each row's adapter,
stop strings, seed and streaming per token, which that loop has no hook for. Its cache classes are
used as the base of SlotCache, and its models take the 4-D mask as they are.
"""

from __future__ import annotations

import contextlib
import queue
from collections import deque

import torch

import lorakit as lk

from ..model.state import BASE
from .decode_kernel import decoding
from .lora_kernel import lora_kernel_for_threads
from .decoding import _eos_ids, _pick, _Row, classify_batch
from .openmp import release_threads
from .packed_prefill import packing, placeholder_mask
from .prefill_groups import adapter_groups, length_groups
from .prefix_cache import BLOCK, PrefixCache
from .requests import ServingError
from .slot_cache import SlotCache, cache_keyword

PREFILL_TOKENS = 4096  # prompt tokens admitted per turn of the loop (running rows wait for them)


class _Active:
    """A request inside the batch: its decoding state, its cache length and what it feeds next."""

    def __init__(self, row: _Row):
        self.row, self.request = row, row.request
        self.length = 0          # cache columns filled
        self.next_token = None   # the token the next decoding step feeds
        self.answered = False    # done or failed, and released


class ContinuousBatcher:
    """One worker's scheduler: ``worker`` of the engine's ``workers``, with its share of max_batch
    slots and of the KV cache; the prefix cache is the engine's, shared by all workers."""

    def __init__(self, engine, prefill_chunk: int = 256, prefill_tokens: int = PREFILL_TOKENS, worker: int = 0):
        self.engine, self.prefill_chunk, self.prefill_tokens = engine, prefill_chunk, prefill_tokens
        self.worker, workers = worker, engine.workers
        total = engine.limits.max_batch
        self.max_batch = total // workers + (worker < total % workers)
        self.kv_cache_bytes = int(engine.limits.kv_cache_mb * 2**20 / workers)
        self.prefix_cache: PrefixCache = engine.prefix_cache
        self.running: list[_Active] = []     # slot i holds running[i]
        self.prefilling: _Active | None = None  # slot len(running)
        self.waiting: deque = deque()
        engine.report_waiting(lambda: len(self.waiting))  # counted against --max-queue
        self.cache: SlotCache | None = None
        self.eos_ids = _eos_ids(engine)
        self.cache_keyword = cache_keyword(engine.model)

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        self._ensure_cache()
        limits = engine.limits
        self.cache.reserve(self.kv_cache_bytes, limits.max_prompt_tokens + limits.max_new_tokens)
        engine.counters.kv_cache(self.cache, self.worker)
        while engine.running:
            if not self._pull(block=not (self.running or self.prefilling or self.waiting)):
                break
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._guarded(self.running[:], self._decode_step)
            if self.prefilling is not None:
                self._guarded([self.prefilling], self._prefill_chunk)
            engine.counters.running(len(self.running) + (self.prefilling is not None), self.worker)
        for active in [*self.running, *([self.prefilling] if self.prefilling else [])]:
            self._fail(active, ServingError("the server is shutting down", 503))

    def _pull(self, block: bool) -> bool:
        """Move queued requests to ``waiting`` (classification requests run at once); False on close.
        One of several workers takes only its share (``_share``), leaving the rest to the others."""
        classify = []
        try:
            if not block and self._share() <= 0:
                return True
            if block and self.engine.workers > 1:
                # idle: free this worker's OpenMP threads, or they count against the team of the
                # worker that runs next alone on every core, whose threads then stop spinning
                # between operations (openmp.py): a lone 400-token prefill ran 20% slower
                release_threads()
            item = self.engine.take(block)
            while True:
                if item is None:
                    return False
                (classify if item.kind == "classify" else self.waiting).append(item)
                if self._share() <= 0:
                    break
                item = self.engine.take(block=False)
        except queue.Empty:
            pass
        if classify:
            self.engine.run_batch(classify_batch, classify, "classification")
        return True

    def load(self) -> int:
        """Requests this worker holds: running, being prefilled, or taken and waiting to start."""
        return len(self.running) + (self.prefilling is not None) + len(self.waiting)

    def _share(self) -> float:
        """How many more queued requests to take now: all of them with one worker; with several, up
        to an even split of everything queued and held by the workers, within this one's slots (a
        burst of 8 requests goes 4 and 4 to two idle workers, not 8 to the first that wakes)."""
        engine = self.engine
        if engine.workers == 1:
            return float("inf")
        mine = self.load()
        held = engine.queue.qsize() + sum(batcher.load() for batcher in engine.batchers)
        return min(-(-held // engine.workers) - mine, self.max_batch - mine)

    def _admit(self) -> None:
        """Start waiting requests: short prompts (up to a token budget per turn) are prefilled now,
        in forwards of similar length, even while a long prompt is being prefilled chunk by chunk
        (it is parked in the last slot meanwhile) and even behind long prompts still waiting, so a
        long prompt never holds up short ones; the first long prompt in line starts its chunks when
        no other one is in progress."""
        limit = self.max_batch
        busy = len(self.running) + (self.prefilling is not None)
        if not self.waiting or busy >= limit:
            return
        room, budget = limit - busy, self.prefill_tokens
        short, passed = [], deque()
        # In arrival order; a long prompt keeps its place in line for the chunked path but does not
        # hold up the short ones behind it (measured on the anchor workload: six prompts over one
        # chunk each stopped admission for two turns, and the decoding steps ran half empty).
        while self.waiting and len(short) < room:
            length = len(self.waiting[0].prompt_ids)
            if length > self.prefill_chunk:
                passed.append(self.waiting.popleft())
                continue
            if short and length > budget:
                break
            budget -= length
            short.append(self._active(self.waiting.popleft()))
        self.waiting.extendleft(reversed(passed))
        parked, self.prefilling = self.prefilling, None
        if parked is not None:
            self.cache.move(len(self.running), limit - 1, parked.length)  # out of the newcomers' slots
        for group in (adapter_groups if self.engine.packed_prefill else length_groups)(short):
            self._prefill_together(group)
        if parked is not None:
            self.cache.move(limit - 1, len(self.running), parked.length)
            self.prefilling = parked
        elif passed and len(self.running) < limit:  # the first long prompt in line starts its chunks
            self.prefilling = self._active(self.waiting.popleft())

    def _active(self, request) -> _Active:
        self.engine.counters.started(request)
        return _Active(_Row(request, self.engine.tokenizer, self.eos_ids, self.engine.counters.prometheus.token))

    # --- forwards ------------------------------------------------------------------------------
    def _forward(self, adapters: list[str], first_slot: int, ids: torch.Tensor, starts: torch.Tensor,
                 last: torch.Tensor | None = None):
        """Logits of each row's last new token (or of column ``last[row]`` of the new tokens)."""
        tokens = ids.shape[1]
        mask = self._plan(lambda cache: cache.plan(slice(first_slot, first_slot + len(adapters)), starts, tokens))
        positions = starts.unsqueeze(1) + torch.arange(tokens)
        # The columns whose logits are wanted, always as an index tensor: an int makes transformers
        # slice the hidden states to a strided view, and the LM head's matmul over a strided
        # 3-D input copies the whole vocab × hidden weight once per forward (measured: over half
        # of a short prompt's prefill).
        keep = torch.tensor([tokens - 1]) if last is None else torch.unique(last)
        # one token a row (a decoding step): each row's attention over its own columns (decode_kernel.py)
        context = decoding(self.engine.decode_kernel, starts) if tokens == 1 else contextlib.nullcontext()
        out = self._run(adapters, context, input_ids=ids, attention_mask=mask,
                        position_ids=positions, logits_to_keep=keep)
        if last is None:
            return out.logits[:, -1]
        column = torch.searchsorted(keep, last).to(out.logits.device)
        return out.logits[torch.arange(len(last), device=out.logits.device), column]

    def _forward_packed(self, adapter: str, first_slot: int, fed: list[list[int]], starts: list[int]) -> torch.Tensor:
        """One forward of several prompts of one adapter laid end to end (packed_prefill.py): prompt
        i's tokens ``fed[i]`` into slot ``first_slot + i`` from column ``starts[i]``; the logits of
        each one's last token."""
        plan = self._plan(lambda cache: cache.plan_packed(first_slot, starts, [len(f) for f in fed]))
        ids = torch.tensor([[token for prompt in fed for token in prompt]])
        mask = placeholder_mask(plan, self.cache.dtype)
        out = self._run([adapter], packing(plan), input_ids=ids, attention_mask=mask,
                        position_ids=plan.positions().unsqueeze(0), logits_to_keep=plan.last_tokens())
        return out.logits[0]

    def _plan(self, make):
        """``make(cache)``: the slot cache's plan for the next forward, which may grow the cache; the
        metrics then report its new size."""
        self._ensure_cache()
        capacity = self.cache.capacity
        plan = make(self.cache)
        if self.cache.capacity != capacity:
            self.engine.counters.kv_cache(self.cache, self.worker)
        return plan

    def _run(self, names: list[str], context, **inputs):
        """The model's forward over this worker's slot cache, each row through its adapter, with this
        worker's share of the torch threads."""
        engine, model = self.engine, self.engine.model
        device = self.cache.device
        threads = engine.threads_for(self)
        current = torch.get_num_threads()  # this thread's own OpenMP team size
        if threads and threads != current:
            torch.set_num_threads(threads)
            if threads < current:  # its idle team threads would count against the other worker's spinning
                release_threads()
        inputs = {name: value.to(device) for name, value in inputs.items()}
        with engine.model_lock.shared(), torch.inference_mode(), self._adapters(names), context:
            return model(use_cache=True, **inputs, **{self.cache_keyword: self.cache})

    def _ensure_cache(self) -> None:
        if self.cache is None:
            reference = next(self.engine.model.parameters())
            self.cache = SlotCache(self.engine.model.config, self.max_batch, reference.dtype, reference.device)

    def _restore_prefix(self, owner: tuple, prompt: list[int], slot: int, end: int | None = None) -> int:
        """Copy the cached blocks ``prompt`` starts with (up to ``end``) into ``slot``; how many
        tokens they cover. Only a request's own prompt (no ``end``) counts in the hit rate."""
        self._ensure_cache()
        blocks = self.prefix_cache.lookup(owner, prompt, end, count=end is None)
        if blocks:
            self.cache.write(slot, 0, torch.cat(blocks, dim=3))
        return len(blocks) * BLOCK

    def _store_prefix(self, owner: tuple, prompt: list[int], slot: int, end: int | None = None) -> None:
        """After ``prompt`` (up to ``end``) is prefilled in ``slot``: its whole blocks not cached yet go in."""
        for start in self.prefix_cache.missing(owner, prompt, end):
            self.prefix_cache.add(owner, prompt, start, self.cache.read(slot, start, start + BLOCK))
        self.engine.counters.prefix(self.prefix_cache)

    def _prefill_shared_prefixes(self, adapters: list[str], owners: list[tuple], prompts: list[list[int]],
                                 first: int) -> None:
        """Before newcomers' forward: the leading blocks two or more of them share and the prefix
        cache lacks, computed once (one row each, in the newcomers' first slots) and put in the
        cache, so that every one of them then starts after them. The anchor workload's first burst
        fed its 34-token system prompt once per request before (BENCHMARKS.md, issue 26)."""
        shared = self.prefix_cache.shared_uncached(list(zip(owners, prompts)))
        if not shared:
            return
        rows = []  # (adapter, owner, prompt, cached start, end), the i-th in slot first + i
        for i, end in shared:
            start = self._restore_prefix(owners[i], prompts[i], first + len(rows), end)
            if start < end:  # (another worker may have cached it meanwhile)
                rows.append((adapters[i], owners[i], prompts[i], start, end))
        if not rows:
            return
        ids = _right_padded([prompt[start:end] for _, _, prompt, start, end in rows])
        self._forward([row[0] for row in rows], first, ids, torch.tensor([row[3] for row in rows]))
        for slot, (_, owner, prompt, _, end) in enumerate(rows, start=first):
            self._store_prefix(owner, prompt, slot, end)

    def _adapters(self, names: list[str]):
        model = self.engine.model
        names = self.engine.pool.model_names(names)
        if all(n == BASE for n in names):
            return lk.disable_adapters(model) if self.engine.has_adapters() else contextlib.nullcontext()
        if len(set(names)) == 1 and lk.active_adapters(model) == names[:1]:
            return contextlib.nullcontext()  # every row uses the active adapter: the plain forward
        # every loaded adapter is stacked, so steps over changing rows reuse one set of stacks
        return lk.mixed_batch(model, names, stack=lk.list_adapters(model),
                              kernel=lora_kernel_for_threads(self.engine.lora_kernel))

    def _decode_step(self) -> None:
        rows = self.running
        ids = torch.tensor([[a.next_token] for a in rows])
        starts = torch.tensor([a.length for a in rows])
        logits = self._forward([a.request.adapter for a in rows], 0, ids, starts)
        self.engine.counters.step(len(rows))
        greedy = logits.max(-1).indices.tolist()  # one op for the batch; max is faster than argmax on CPU
        finished = []
        for index, (active, row_logits) in enumerate(zip(rows, logits)):
            active.length += 1
            self._take(active, row_logits, greedy[index])
            if active.row.finish:
                finished.append(index)
        for index in reversed(finished):
            self._leave(index)

    def _prefill_together(self, newcomers: list[_Active]) -> None:
        """Prefill short prompts in one forward, each distinct (adapter, prompt) once, in the slots
        after the running rows: packed (one adapter, laid end to end) or right-padded (a row's
        padding columns lie past its length, never attended to, overwritten as it grows). A prompt
        whose first blocks are in the prefix cache gets them copied into its slot and feeds only
        the rest. Afterwards its new whole blocks go into the prefix cache, a shared prompt's keys
        and values are copied into the slot of every other newcomer that has it, and each samples
        its first token and joins the running rows. If the forward fails, only these newcomers fail."""
        first = len(self.running)
        groups: dict[tuple, list[_Active]] = {}
        for active in newcomers:
            groups.setdefault((active.request.adapter, tuple(active.request.prompt_ids)), []).append(active)
        prompts = [list(key[1]) for key in groups]
        owners = [self.engine.adapter_version(key[0]) for key in groups]
        try:
            self._prefill_shared_prefixes([key[0] for key in groups], owners, prompts, first)
            starts = [self._restore_prefix(owner, prompt, first + source)
                      for source, (owner, prompt) in enumerate(zip(owners, prompts))]
            fed = [p[s:] for p, s in zip(prompts, starts)]
            if self.engine.packed_prefill:  # one adapter (adapter_groups), no padding
                logits = self._forward_packed(newcomers[0].request.adapter, first, fed, starts)
            else:
                logits = self._forward([key[0] for key in groups], first, _right_padded(fed), torch.tensor(starts),
                                       last=torch.tensor([len(f) - 1 for f in fed]))
            for source, (owner, prompt) in enumerate(zip(owners, prompts)):
                self._store_prefix(owner, prompt, first + source)
            slot = first + len(groups)
            for source, (key, members) in enumerate(groups.items()):
                for _ in members[1:]:
                    self.cache.move(first + source, slot, len(key[1]))
                    slot += 1
        except Exception as exc:
            for active in newcomers:
                self._fail(active, ServingError(f"generation failed: {exc}", 500))
            return
        arranged = [(members[0], g) for g, members in enumerate(groups.values())]
        arranged += [(active, g) for g, members in enumerate(groups.values()) for active in members[1:]]
        greedy = logits.max(-1).indices.tolist()
        finished = []
        for active, g in arranged:
            active.length = len(active.request.prompt_ids)
            self._take(active, logits[g], greedy[g])
            self.engine.counters.prompt(active.length)
            self.running.append(active)
            if active.row.finish:
                finished.append(len(self.running) - 1)
        for index in reversed(finished):
            self._leave(index)

    def _prefill_chunk(self) -> None:
        active = self.prefilling
        prompt, slot = active.request.prompt_ids, len(self.running)
        owner = self.engine.adapter_version(active.request.adapter)
        if active.length == 0:  # its first chunk: start after the cached blocks it begins with
            active.length = self._restore_prefix(owner, prompt, slot)
        chunk = prompt[active.length: active.length + self._chunk_size()]
        logits = self._forward([active.request.adapter], slot, torch.tensor([chunk]), torch.tensor([active.length]))
        active.length += len(chunk)
        if active.length < len(prompt):
            return
        self._store_prefix(owner, prompt, slot)
        self.prefilling = None
        self._take(active, logits[0])
        self.engine.counters.prompt(len(prompt))
        if active.row.finish:
            self._finish(active)
        else:
            self.running.append(active)  # already in slot len(running)

    def _chunk_size(self) -> int:
        """Prompt tokens for the next chunk. Chunks exist so that running and waiting requests get
        their turn between them; with none here or queued, the rest of the prompt (up to the turn's
        token budget) goes in one forward, which is faster per token (fp32: 687 tokens/s in chunks
        of 256, 736 in 512) and, like vLLM's token budget per step, delays nobody."""
        if self.running or self.waiting or self.engine.queue.qsize():
            return self.prefill_chunk
        return max(self.prefill_chunk, self.prefill_tokens)

    def _take(self, active: _Active, logits: torch.Tensor, greedy: int | None = None) -> None:
        if greedy is not None and active.request.temperature <= 0:
            token = greedy
        else:
            token = _pick(logits, active.request, active.row.generator)
        active.row.add(token)
        active.next_token = token

    # --- leaving -------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Requests whose client went away leave before the next step: their slots and adapters free."""
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._cancelled(request)
        if self.prefilling is not None and self.prefilling.request.cancelled:
            active, self.prefilling = self.prefilling, None  # it sat in slot len(running): nothing moves
            active.answered = True
            self._cancelled(active.request)
        for index in reversed(range(len(self.running))):
            if self.running[index].request.cancelled:
                self._leave(index, cancelled=True)

    def _cancelled(self, request) -> None:
        self.engine.counters.cancelled()
        self.engine.finish(request)

    def _leave(self, index: int, cancelled: bool = False) -> None:
        """Running row ``index`` is done (or its client went away): answer it, refill its slot with the
        last running row and move the prompt being prefilled down behind them."""
        active = self.running[index]
        last = len(self.running) - 1
        if index != last:
            self.cache.move(last, index, self.running[last].length)
            self.running[index] = self.running[last]
        self.running.pop()
        if self.prefilling is not None:
            self.cache.move(last + 1, last, self.prefilling.length)
        if cancelled:
            active.answered = True
            self.engine.counters.completion(len(active.row.tokens))
            self._cancelled(active.request)
        else:
            self._finish(active)

    def _finish(self, active: _Active) -> None:
        active.answered = True
        self.engine.counters.completion(len(active.row.tokens))
        try:
            active.row.close()
        finally:
            self.engine.finish(active.request)

    def _fail(self, active: _Active, error: ServingError) -> None:
        active.answered = True
        self.engine.counters.failed(1, error.status)
        try:
            active.request.sink("error", error)
        finally:
            self.engine.finish(active.request)

    def _guarded(self, rows: list[_Active], step) -> None:
        """Run a forward; if it fails, fail the requests it carried (the server goes on)."""
        try:
            step()
        except Exception as exc:
            if self.prefilling in rows:  # its chunk failed
                self.prefilling = None
            else:  # a decoding step failed: every running row goes; a prefill in progress moves to slot 0
                self.running = []
                if self.prefilling is not None:
                    self.cache.move(len(rows), 0, self.prefilling.length)
            for active in rows:
                if not active.answered:
                    self._fail(active, ServingError(f"generation failed: {exc}", 500))


def _right_padded(fed: list[list[int]]) -> torch.Tensor:
    """Rows of token ids as one tensor, each padded on the right with its own last token up to the
    longest: the padding columns lie past the row's length, never attended to, overwritten as it grows."""
    width = max(map(len, fed))
    return torch.tensor([f + [f[-1]] * (width - len(f)) for f in fed])
