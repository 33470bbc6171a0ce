"""Continuous batching over `Engine.forward`: many requests, one forward pass per step.

Each step is planned, run, then committed:

* plan: every running request (of the micro-batch group planned, below) gets its next
  tokens in one batch. Requests that are decoding (one uncached token) go first, then
  prompt chunks share what is left of the per-step token budget (`max_batch_tokens`), so
  a long prompt is prefilled over several steps and never stalls the decodes running
  beside it. Waiting requests are admitted in arrival order while there is room in the
  batch, the budget and the KV cache.
* run: `Engine.start_forward` on the planned work, then one `Engine.sample` call for every
  request whose tokens are now all cached (on the device where the backend can, so only
  ids leave it; the grammars' masks are computed on the host while the forward runs). The only slow part: callers may run it on another thread while
  `submit`/`cancel` keep being served.
* commit: each sampled token goes through its request's stop ids, stop strings and
  budget; finished and cancelled requests give their KV blocks back.

Running ahead: a step whose requests all decode greedily with nothing else read from the
logits (no logprobs, no penalties, no grammar or logit bias; the backend samples on the device) can be followed by the
same step of the same requests before its tokens are known (`plan_ahead`), fed with its ids
on the device (`Engine.greedy_step`), as long as nobody waits for admission, none is
cancelled or at its last token, and their blocks are there without preempting. So the GPU
does not wait for the host to read a step's ids, commit and plan between two decode steps.
A request that finishes at the first step's commit has its token from the second dropped;
its blocks go back once no step in flight holds it.

Speculation (a Scheduler given a `Speculation`; workers/engine/speculation.py): each request
that may (`Engine.speculates`: no penalties, grammar or bias) gets a `DraftPolicy` of its own
at submission (none where no pass could pay: `DraftPolicy.for_engine`), which picks its
drafter and k pass by pass from its own measured acceptance (workers/engine/draft_policy.py).
In a step of decodes alone, a request whose policy drafts is a pass: launch drafts for every
such request (the greedy model drafts of the same layers and k as one chain over their
sequences), then runs one verifying pass of the whole step, each plain decode one row and
each pass its last token and proposals (decode rows, as `Engine.generate` verifies); waiting
settles each pass (its own accepted length; the rejected proposals' blocks go back) and
samples the plain rows, and commit hands out each pass's tokens in order until one ends the
request. A pass's k is cut so that the step holds at most the
engine's max_logit_rows rows (the logits it keeps room for; the ComputeWorker's are
max_num_seqs: speculation fills the rows a small batch leaves), and a pass takes blocks beyond
its decode only where every later decode of the step still finds its own: speculation never
preempts. A step with a prompt chunk or an admission decodes plainly. The policy's runs of
plain steps run ahead as any greedy step does.

Micro-batches (vLLM's virtual engines): an engine whose forward pass runs through P
pipeline stages (workers/engine/pipeline.py) splits the running requests into P groups,
disjoint, each admitted request joining the group that plans next while that group holds
less than its share (a P-th of the requests running and waiting). Each group's step is
planned, launched and committed on its own, and `plan_next` plans a group while the other
groups' steps are in flight, so while one group's logits come back and are sampled and
committed, the stages run the others' passes. Finishes can leave the groups uneven; a group
about to be planned that holds two or more requests than the smallest gives its latest ones
to the smallest until they differ by one at most (none of them is in a step in flight: the
group planned has none), so that no stage idles while another group's pass runs alone.
With one group (P = 1, any engine without stages) every running request is in the one
step, as above.

KV blocks are taken as a sequence grows. When a decode finds the cache full, the most
recently admitted request (of the group being planned: the others' may be in flight) is
preempted: its blocks are freed and it goes back to the head
of the queue with its generated tokens kept, to be recomputed later (vLLM's recompute
preemption), so admission never has to reserve a request's whole `max_tokens` up front.

KV blocks are decided here and nowhere else: plan reserves each step's blocks from the
engine's block manager (`workers/engine/block_manager.py`), and `Engine.forward` runs the
block tables it is given.

A driver (the ComputeWorker's loop) launches `plan_next`'s steps
until `depth` are in flight, then waits for the oldest and commits it.

Not thread-safe: call everything from one thread, except that `launch`/`run` on a planned
step (and the wait `launch` returns) may run elsewhere (plan reserves the step's blocks, so forward does not
touch the free list, and blocks of a request cancelled mid-step are freed at commit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.engine.draft_policy import DraftPolicy
from workers.engine.engine import Completion, Engine, GeneratedToken, PromptLogprobs, Sequence
from workers.engine.sampling import SamplingParams
from workers.engine.speculation import Choice, Speculation, Stats, accept, propose, start_pass


class QueueFull(RuntimeError):
    """Admission control: the waiting queue is at its bound; retry later."""


@dataclass(eq=False)
class Request(Completion):
    id: str = field(kw_only=True)
    cancelled: bool = False
    done: bool = False  # finished; a step run ahead may still hold it
    group: int = 0  # its micro-batch group, from its admission
    policy: DraftPolicy | None = None  # its drafter and k a pass, when it speculates

    @property
    def uncached(self) -> int:
        return len(self.seq.token_ids) - self.seq.num_cached


@dataclass(eq=False)
class Step:
    requests: list[Request] = field(default_factory=list)
    work: list[tuple[Sequence, int]] = field(default_factory=list)
    greedy: bool = False  # every request decodes one greedy token: Engine.greedy_step
    fed: bool = False  # run ahead: its tokens are the previous step's ids on the device
    group: int = 0  # the micro-batch group whose requests it holds
    passes: dict[Request, Choice] = field(default_factory=dict)  # requests that draft and verify (not in work)

    def add(self, request: Request, n: int) -> None:
        self.requests.append(request)
        self.work.append((request.seq, n))

    def add_pass(self, request: Request, choice: Choice) -> None:
        self.requests.append(request)
        self.passes[request] = choice


class Scheduler:
    def __init__(self, engine: Engine, max_num_seqs: int = 32, max_batch_tokens: int = 512, max_queue: int = 256,
                 speculation: Speculation | None = None):
        """speculation: how requests that can speculate do (module docstring); None: none does."""
        if max_num_seqs < 1 or max_queue < 0:
            raise ValueError("max_num_seqs must be >= 1 and max_queue >= 0")
        if max_num_seqs > engine.max_logit_rows:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) must be <= the engine's max_logit_rows "
                             f"({engine.max_logit_rows}): a step's logits hold a row per sequence")
        if speculation is not None:
            engine.drafters(speculation)  # a drafter the engine does not run is refused here, at the start
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_num_seqs ({max_num_seqs}) "
                             "so that every running decode fits in a step")
        self.engine = engine
        self.max_num_seqs, self.max_batch_tokens, self.max_queue = max_num_seqs, max_batch_tokens, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.in_flight: list[Step] = []  # planned, not committed: one a group, or two when run ahead
        self.groups = max(len(engine.stages), 1)  # micro-batches: one a pipeline stage
        self.next_group = 0  # planned first when free, so that groups take turns
        self.speculation = speculation
        self.spec_stats = Stats()  # every request's passes, drafts and plain steps together

    # --- requests ------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ContextLengthError/ValueError for bad input, QueueFull at the bound."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request.start(self.engine, prompt_ids, params, id=request_id)  # bad input fails first
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"server busy: {len(self.waiting)} requests already waiting; retry later")
        if self.speculation is not None and self.engine.speculates(params):
            request.policy = DraftPolicy.for_engine(self.engine, self.speculation, params.greedy)
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
            self._drop(request)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_blocks_in_use(self) -> int:
        return self.engine.blocks.blocks_in_use

    # --- one step ------------------------------------------------------------
    def step(self) -> list[tuple[str, GeneratedToken]]:
        step = self.plan()
        if step is None:
            return []
        try:
            picked = self.run(step)
        except BaseException:
            self.abort()
            raise
        return self.commit(step, picked)

    @property
    def depth(self) -> int:
        """How many steps a driver keeps launched before waiting for the oldest: one a group,
        and with one group two (the greedy run-ahead)."""
        return max(self.groups, 2)

    def plan_next(self) -> Step | None:
        """The step to launch while the ones in flight run, or None (wait for the oldest): the
        next free group's, or with one group the run-ahead of its step in flight."""
        if len(self.in_flight) < self.groups:
            return self.plan()
        return self.plan_ahead(self.in_flight[-1]) if self.groups == 1 else None

    def plan(self) -> Step | None:
        """The next batch of a group with no step in flight (taking turns), its KV blocks
        reserved; None when no such group has anything to run."""
        busy = {step.group for step in self.in_flight}
        free = [g % self.groups for g in range(self.next_group, self.next_group + self.groups)
                if g % self.groups not in busy]
        if not free:
            raise RuntimeError("every micro-batch group has a step in flight: commit one first")
        for group in free:
            if (step := self._plan_group(group)) is not None:
                self.next_group = (group + 1) % self.groups
                self.in_flight.append(step)
                return step
        return None

    def _plan_group(self, group: int) -> Step | None:
        step, budget = Step(group=group), self.max_batch_tokens

        def members() -> list[Request]:
            return [r for r in self.running if r.group == group]

        self._rebalance(group)

        decodes = [r for r in members() if r.uncached == 1]
        # passes only in a step of decodes alone: a prompt chunk is no decode row
        speculating = (self.speculation is not None and len(decodes) == len(members())
                       and not (self.waiting and len(self.running) < self.max_num_seqs))
        rows = self.engine.max_logit_rows - len(decodes)  # the rows the step's passes may add to one a decode
        for i, request in enumerate(decodes):
            if request not in self.running:  # preempted to make room for an older one
                continue
            if (speculating and request.policy is not None
                    and (choice := self._choice(request, rows, len(decodes))) is not None):
                n = choice.rows(min(choice.k, request.budget - request.generated - 1))
                if self._reserve_pass(request, n, len(decodes) - i - 1):
                    step.add_pass(request, choice)
                    rows -= n - 1
                    budget -= n
                    continue
                self.spec_stats.plain_steps += 1
            while not self._try_reserve(request, 1):
                victim = members()[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                step.add(request, 1)
                budget -= 1
        for request in [r for r in members() if r.uncached > 1]:
            if budget == 0:
                break
            if n := self._fit(request, budget):
                step.add(request, n)
                budget -= n
        share = -(-min(len(self.running) + len(self.waiting), self.max_num_seqs) // self.groups)
        size = len(members())
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and size < share:
            request = self.waiting[0]
            if not (n := self._fit(request, budget)):
                break
            self.waiting.popleft()
            request.group = group
            self.running.append(request)
            step.add(request, n)
            budget -= n
            size += 1
        if not step.requests:
            return None
        step.greedy = not step.passes and all(n == 1 and request.uncached == 1 and self._greedy(request)
                                              for request, (_, n) in zip(step.requests, step.work))
        return step

    def _rebalance(self, group: int) -> None:
        """Move `group`'s latest requests to the smallest group while it holds two or more
        than that one (group has no step in flight, so none of its requests is in one)."""
        while self.groups > 1:
            sizes = [0] * self.groups
            for r in self.running:
                sizes[r.group] += 1
            smallest = min(range(self.groups), key=sizes.__getitem__)
            if sizes[group] - sizes[smallest] < 2:
                return
            [r for r in self.running if r.group == group][-1].group = smallest

    def _reserve_pass(self, request: Request, n: int, later: int) -> bool:
        """Blocks for a pass of n rows, unless they would leave fewer free blocks than the step's
        `later` decodes may take: a pass never preempts anyone."""
        if not self._try_reserve(request, n):
            return False
        if self.engine.blocks.free_blocks >= later:
            return True
        self.engine.blocks.trim(request.seq, request.seq.num_cached + 1)
        return False

    def _choice(self, request: Request, rows: int, batch: int) -> Choice | None:
        """The request's next pass in a step of `batch` decodes, its k cut to the rows the step
        has left, or None: a plain step."""
        choice = request.policy.next(batch)
        if choice is None or rows < 1:
            self.spec_stats.plain_steps += 1
            return None
        return choice.cut(rows)

    def plan_ahead(self, step: Step) -> Step | None:
        """The same greedy step again, to start before `step` (launched, not committed) has
        its ids, or None where that cannot be (module docstring)."""
        if self.in_flight != [step] or not step.greedy or self.waiting or step.requests != self.running:
            return None
        if any(r.cancelled or r.generated + 2 > r.budget for r in step.requests):
            return None
        policies = [r.policy for r in step.requests if r.policy is not None]
        batch = len(step.requests)
        if any(policy.plain_steps_ahead(batch) < 1 for policy in policies):
            return None
        if not all(self._try_reserve(r, 1) for r in step.requests):
            return None
        for policy in policies:  # the plain step each has decided next
            policy.next(batch)
            self.spec_stats.plain_steps += 1
        ahead = Step(list(step.requests), [(r.seq, 1) for r in step.requests], greedy=True, fed=True, group=step.group)
        self.in_flight.append(ahead)
        return ahead

    def launch(self, step: Step) -> Callable[[], list]:
        """Start the planned step; returns a function that waits for its tokens: one (token,
        logprob, top) or None per request, a token for each request whose tokens are now all
        cached. A greedy step only starts on the device (its ids come later); any other starts
        its forward pass (through pipeline stages it runs while the caller goes on) and
        samples when waited for, in one call on the step's logits (on the device where the
        backend can). May run on another thread than the rest: it touches only the step's
        requests."""
        if step.greedy:
            ids = self.engine.greedy_step([r.seq for r in step.requests], fed=step.fed)
            return lambda: [[(t, None, None)] for t in ids().tolist()]
        if step.passes:
            return self._launch_passes(step)
        # a request draws when the step caches the last of its tokens
        samplers = [r.sampler if not r.cancelled and r.uncached == n else None
                    for r, (_, n) in zip(step.requests, step.work)]
        scored = [r.score_rows(n) for r, (_, n) in zip(step.requests, step.work)]
        if not any(scored):
            picks = self.engine.start_sampled(step.work, samplers)
        else:  # some prompt tokens' logprobs too (prompt_logprobs), kept by their requests
            started = self.engine.start_scored(step.work, samplers, scored,
                                               [r.params.prompt_logprobs for r in step.requests])

            def picks() -> list:
                picked, scores = started()
                for request, entries in zip(step.requests, scores):
                    request.prompt_scores.extend(entries)
                return picked

        return lambda: [[] if c is None else [c] for c in picks()]

    def _launch_passes(self, step: Step) -> Callable[[], list]:
        """A step of decodes with passes: the drafts (`propose`: the greedy model drafts of the
        same layers and k as one chain), then one verifying pass of every request's rows, the
        plain ones first (`start_pass`); waiting settles each pass (`accept`) and samples the
        plain rows."""
        engine, plain = self.engine, [r for r in step.requests if r not in step.passes]
        drafts, feed = propose(engine, [(r.seq, choice, r.budget - r.generated, r.sampler)
                                        for r, choice in step.passes.items()])
        verified = start_pass(engine, drafts, [r.seq for r in plain], feed)

        def wait() -> list:
            out, rows = verified()
            first = len(plain)
            picked = {}
            if plain:
                samplers = [None if r.cancelled else r.sampler for r in plain]
                picked = {r: [] if c is None else [c]
                          for r, c in zip(plain, engine.sample(engine.ops.take_rows(out, list(range(first))),
                                                               samplers))}
            for (request, choice), d in zip(step.passes.items(), drafts):
                kept = accept(engine, d, *rows(first, d.rows), self.spec_stats)
                first += d.rows
                request.policy.update(choice.drafter, len(d.proposed), d.accepted, d.leaf_hit)
                picked[request] = kept
            return [picked[r] for r in step.requests]

        return wait

    def run(self, step: Step) -> list:
        """The planned step to its end: launch, then wait for its tokens."""
        return self.launch(step)()

    def commit(self, step: Step, picked: list) -> list[tuple[str, GeneratedToken | PromptLogprobs]]:
        """Apply the step's tokens (a list a request: one, none while its prompt is partly
        cached, a pass's kept run); returns (request id, event) pairs, a request's
        PromptLogprobs (prompt_logprobs) before its first token's. A token that ends a
        request drops the rest of its run. Requests cancelled or finished meanwhile give their
        blocks back here (once no step in flight holds them)."""
        self.in_flight.remove(step)
        events = []
        for request, choices in zip(step.requests, picked):
            if request.cancelled or request.done:
                self._drop(request)
                continue
            if (scored := request.prompt_event()) is not None:  # before the first token's
                events.append((request.id, scored))
            for choice in choices:
                event = request.advance(*choice)
                events.append((request.id, event))
                if event.finish_reason is not None:
                    self._finish(request)
                    break
        return events

    def abort(self) -> list[Request]:
        """After a failed step: the requests of every step in flight are dropped and their
        blocks freed; returns them. Through pipeline stages every running request is: a
        stage that failed may have lost the KV of all of them (workers/stage_worker.py)."""
        lost = [r for step in self.in_flight for r in step.requests]
        dropped = list(dict.fromkeys(lost + (self.running if self.engine.pipeline is not None else [])))
        self.in_flight = []
        for request in dropped:
            self.requests.pop(request.id, None)
            if request in self.running:
                self.running.remove(request)
            self.engine.release(request.seq)
        return dropped

    # --- internals -----------------------------------------------------------
    def _try_reserve(self, request: Request, n: int) -> bool:
        return self.engine.blocks.try_reserve(request.seq, request.seq.num_cached + n)

    def _fit(self, request: Request, budget: int) -> int:
        """Reserve blocks for as many of the request's uncached tokens as the budget and the free blocks allow."""
        blocks, seq = self.engine.blocks, request.seq
        n = min(request.uncached, budget, blocks.room(seq) - seq.num_cached)
        if n > 0:
            blocks.reserve(seq, seq.num_cached + n)
        return max(n, 0)

    def _greedy(self, request: Request) -> bool:
        return self.engine.decodes_ahead(request.params)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.engine.release(request.seq)
        self.waiting.appendleft(request)

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.id]
        request.done = True
        if request.policy is not None:
            request.policy.finish()
        self._drop(request)

    def _drop(self, request: Request) -> None:
        """A cancelled or finished request's blocks back, unless a step in flight holds it."""
        if not any(request in step.requests for step in self.in_flight):
            self.engine.release(request.seq)

