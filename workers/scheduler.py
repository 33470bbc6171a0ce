"""Continuous batching over `Engine.forward`: many requests, one forward pass per step.

Each step is planned, run, then committed:

* plan: every running request gets its next tokens in one batch. Requests that are
  decoding (one uncached token) go first, then prompt chunks share what is left of the
  per-step token budget (`max_batch_tokens`), so a long prompt is prefilled over several
  steps and never stalls the decodes running beside it. Waiting requests are admitted
  in arrival order while there is room in the batch, the budget and the KV cache.
* run: `Engine.forward` on the planned work, then one `Engine.sample` call for every
  request whose tokens are now all cached (on the device where the backend can, so only
  ids leave it). The only slow part: callers may run it on another thread while
  `submit`/`cancel` keep being served.
* commit: each sampled token goes through its request's stop ids, stop strings and
  budget; finished and cancelled requests give their KV blocks back.

KV blocks are taken as a sequence grows. When a decode finds the cache full, the most
recently admitted request is preempted: its blocks are freed and it goes back to the head
of the queue with its generated tokens kept, to be recomputed later (vLLM's recompute
preemption), so admission never has to reserve a request's whole `max_tokens` up front.

Not thread-safe: call everything from one thread, except that `run` on a planned step
may run elsewhere (plan reserves the step's blocks, so forward does not
touch the free list, and blocks of a request cancelled mid-step are freed at commit).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.engine import Completion, Engine, GeneratedToken, Sequence
from workers.kv_cache import OutOfBlocks
from workers.sampling import SamplingParams


class QueueFull(RuntimeError):
    """Admission control: the waiting queue is at its bound; retry later."""


@dataclass(eq=False)
class Request(Completion):
    id: str = field(kw_only=True)
    cancelled: bool = False

    @property
    def uncached(self) -> int:
        return len(self.seq.token_ids) - self.seq.num_cached


@dataclass
class Step:
    requests: list[Request] = field(default_factory=list)
    work: list[tuple[Sequence, int]] = field(default_factory=list)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.work.append((request.seq, n))


class Scheduler:
    def __init__(self, engine: Engine, max_num_seqs: int = 32, max_batch_tokens: int = 512, max_queue: int = 256):
        if max_num_seqs < 1 or max_queue < 0:
            raise ValueError("max_num_seqs must be >= 1 and max_queue >= 0")
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_num_seqs ({max_num_seqs}) "
                             "so that every running decode fits in a step")
        self.engine = engine
        self.max_num_seqs, self.max_batch_tokens, self.max_queue = max_num_seqs, max_batch_tokens, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.in_flight: Step | None = None

    # --- requests ------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ContextLengthError/ValueError for bad input, QueueFull at the bound."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request.start(self.engine, prompt_ids, params, id=request_id)  # bad input fails first
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"server busy: {len(self.waiting)} requests already waiting; retry later")
        self.waiting.append(request)
        self.requests[request_id] = request
        return request

    def cancel(self, request_id: str) -> bool:
        """Drop a request; its KV blocks are free when this returns, or at commit if it is mid-step."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            if self.in_flight is None or request not in self.in_flight.requests:
                self.engine.release(request.seq)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_blocks_in_use(self) -> int:
        return self.engine.kv.blocks_in_use

    # --- one step ------------------------------------------------------------
    def step(self) -> list[tuple[str, GeneratedToken]]:
        step = self.plan()
        if step is None:
            return []
        try:
            picked = self.run(step)
        except BaseException:
            self.abort(step)
            raise
        return self.commit(step, picked)

    def plan(self) -> Step | None:
        """The next batch, its KV blocks reserved; None when there is nothing to run."""
        if self.in_flight is not None:
            raise RuntimeError("the previous step has not been committed")
        step, budget = Step(), self.max_batch_tokens
        for request in [r for r in self.running if r.uncached == 1]:
            if request not in self.running:  # preempted to make room for an older one
                continue
            while not self._try_reserve(request, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                step.add(request, 1)
                budget -= 1
        for request in [r for r in self.running if r.uncached > 1]:
            if budget == 0:
                break
            if n := self._fit(request, budget):
                step.add(request, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not (n := self._fit(request, budget)):
                break
            self.waiting.popleft()
            self.running.append(request)
            step.add(request, n)
            budget -= n
        if not step.requests:
            return None
        self.in_flight = step
        return step

    def run(self, step: Step) -> list:
        """The planned forward pass, then a token for each request whose tokens are now all
        cached, sampled in one call on the step's logits (on the device where the backend can).
        May run on another thread than the rest: it touches only the step's requests."""
        logits = self.engine.forward(step.work, device=True)
        return self.engine.sample(logits, [r.sampler if not r.cancelled and r.uncached == 0 else None
                                           for r in step.requests])

    def commit(self, step: Step, picked: list) -> list[tuple[str, GeneratedToken]]:
        """Apply `run`'s tokens; returns (request id, event) pairs. Requests cancelled meanwhile
        give their blocks back here."""
        self.in_flight = None
        events = []
        for request, choice in zip(step.requests, picked):
            if request.cancelled:
                self.engine.release(request.seq)
            elif choice is not None:
                event = request.advance(*choice)
                events.append((request.id, event))
                if event.finish_reason is not None:
                    self._finish(request)
        return events

    def abort(self, step: Step) -> None:
        """After a failed forward: the step's requests are dropped and their blocks freed."""
        self.in_flight = None
        for request in step.requests:
            self.requests.pop(request.id, None)
            if request in self.running:
                self.running.remove(request)
            self.engine.release(request.seq)

    # --- internals -----------------------------------------------------------
    def _try_reserve(self, request: Request, n: int) -> bool:
        try:
            self.engine.kv.reserve(request.seq.block_table, request.seq.num_cached + n)
            return True
        except OutOfBlocks:
            return False

    def _fit(self, request: Request, budget: int) -> int:
        """Reserve blocks for as many of the request's uncached tokens as the budget and the free blocks allow."""
        kv, seq = self.engine.kv, request.seq
        room = (len(seq.block_table) + kv.free_blocks) * kv.block_size - seq.num_cached
        n = min(request.uncached, budget, room)
        if n > 0:
            kv.reserve(seq.block_table, seq.num_cached + n)
        return max(n, 0)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.engine.release(request.seq)
        self.waiting.appendleft(request)

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.id]
        self.engine.release(request.seq)
