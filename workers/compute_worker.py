"""ComputeWorker: the Ray actor that owns the device, the resident weights and the KV cache.

It runs the continuous-batching loop (`workers.engine.scheduler`) on its own: one forward pass per
step for every running request, whatever the number of callers. Tokenizing, sampling
(`workers.engine.sampling.Sampler`, one per request) and detokenizing happen here too, next to
the logits: a step's logits are [batch, vocab] floats (600 KB a row for a 150k vocabulary),
so shipping them to another process every step would cost more than sampling them. What
leaves the actor is small: text deltas, token ids and, when asked for, logprobs.

Callers talk to it with three calls: `submit` (validation and admission errors are raised
right there), `cancel`, and `poll`, a long poll that returns every request's new events at
once, so its single consumer (a Serve replica or a batch driver) pays one Ray round trip
per batch of tokens, not one per token per request. `tokenize` and `detokenize` serve the
API's endpoints of those names with the model's own tokenizer and chat template.

The scheduling loop runs on a thread of its own, so that the actor's event loop keeps
answering submit, cancel and poll while the device is busy, and so that a step follows the
previous one without a round trip through the event loop (at ~1 ms a step on the GPU, two
thread hand-offs per step cost a tenth of the speed). The scheduler is shared under one lock,
held for planning, committing, submitting and cancelling but not during the forward pass;
the loop wakes the event loop only when a poll is waiting for events.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import deque

import ray
from ray.util import metrics
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from workers.engine.engine import Engine, GeneratedToken, PromptLogprobs
from workers.engine.pipeline import PASS_TIMEOUT_S
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.skip_calibration import load_skip_set, residency_order
from workers.engine.speculation import Speculation
from workers.model.store import fingerprint
from workers.node_tiers import NodeTiers
from workers.stage_worker import RayPipeline
from workers.tier_loader import TierLoader

GIB = 2**30
# A forward pass this long past step_timeout_s fails the worker: a pipeline first has that long to
# restart a stuck stage itself (its pings and kills take seconds).
STALL_GRACE_S = 30.0


class WorkerFailed(RuntimeError):
    """The worker is broken for good (its loop failed, or a step stalled): every call raises
    this, the health check too, so Serve replaces the replica."""


def engine_options(max_context: int, kv_cache_gb: float | None, vram_budget_gb: float, block_size: int,
                   max_num_seqs: int, max_batch_tokens: int, host_ram_gb: float | None, n_buffers: int | None,
                   kv_type: str | None = None, requant_streamed: str | None = None, **_) -> dict:
    """The Engine's capacity and placement arguments from a server config's (sizes in GiB; the
    rest of ServerConfig.worker_args is not the engine's)."""
    def gib(value):
        return None if value is None else int(value * GIB)

    return {"max_context": max_context, "block_size": block_size, "kv_cache_bytes": gib(kv_cache_gb),
            "vram_budget": gib(vram_budget_gb), "host_ram": gib(host_ram_gb), "n_buffers": n_buffers,
            "max_batch_tokens": max_batch_tokens, "max_logit_rows": max_num_seqs, "kv_type": kv_type,
            "requant_streamed": requant_streamed}


def model_metrics(kind, prefix: str, model: str, described: list[tuple[str, str]]) -> dict:
    """A Ray metric of `kind` (Gauge, Counter) for each (name, description), named prefix +
    name and tagged with the model it serves."""
    made = {name: kind(prefix + name, description=text, tag_keys=("model",)) for name, text in described}
    for metric in made.values():
        metric.set_default_tags({"model": model})
    return made


@ray.remote
class ComputeWorker:
    async def __init__(self, model: str | None, backend: str = "numpy", max_context: int = 4096,
                 kv_cache_gb: float | None = None, vram_budget_gb: float = 24.0, block_size: int = 16,
                 max_num_seqs: int = 32, max_batch_tokens: int = 512, max_queue: int = 256,
                 host_ram_gb: float | None = None, n_buffers: int | None = None, kv_type: str | None = None,
                 requant_streamed: str | None = None, pipeline_parallel_size: int = 1,
                 placement_strategy: str = "STRICT_PACK", num_cpus: float = 1.0, speculate: str | int = "off",
                 drafter: str = "lookup", draft_layers: int | None = None, skip_set: str | None = None,
                 draft_tree: str = "auto", stage_gpus: float = 0.0, step_timeout_s: float = PASS_TIMEOUT_S):
        """With pipeline_parallel_size > 1 the forward pass runs in that many StageWorker actors
        (workers/stage_worker.py), each reserving num_cpus and stage_gpus, placed by
        placement_strategy, each under vram_budget_gb; this actor keeps the scheduler and the
        block tables, and holds no device (kernels/driver.py). speculate, drafter,
        draft_layers, skip_set, draft_tree: the scheduler's speculation (`Speculation.from_setting`); a
        skip set's draft layers claim residency first (skip_calibration.residency_order).
        step_timeout_s: a pass longer is stuck (a pipeline restarts the stage holding it;
        `_watch` fails the worker once it is STALL_GRACE_S longer still)."""
        node = ray.get_runtime_context().get_node_id()
        # The disk tier must be on this node: the engine maps the file it returns.
        self.loader = TierLoader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(model)
        spec = await self.loader.load.remote()
        # Placed under the budget (workers/engine/placement.py); the layers that do not fit
        # stream from this node's host and disk tiers. Loading a large model takes minutes:
        # a thread of its own keeps the actor answering meanwhile.
        self.tiers = NodeTiers(spec["path"])
        options = engine_options(max_context=max_context, kv_cache_gb=kv_cache_gb, vram_budget_gb=vram_budget_gb,
                                 block_size=block_size, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                                 host_ram_gb=host_ram_gb, n_buffers=n_buffers, kv_type=kv_type,
                                 requant_streamed=requant_streamed)
        stages = functools.partial(RayPipeline, strategy=placement_strategy, num_cpus=num_cpus, num_gpus=stage_gpus,
                                   pass_timeout_s=step_timeout_s)
        order = residency_order(skip_set, spec["path"]) if skip_set else None
        self.engine = await asyncio.to_thread(Engine, spec["path"], backend=backend, host_alloc=self.tiers.host_alloc,
                                              disk_open=self.tiers.disk_open, pipeline_parallel_size=pipeline_parallel_size,
                                              stage_runner=stages, resident_order=order, **options)
        self.tiers.loaded()
        try:
            self.fingerprint = fingerprint(spec["path"])
            skip = load_skip_set(skip_set, self.engine.config.n_layers) if skip_set else None
            speculation = Speculation.from_setting(speculate, drafter, draft_layers, skip, draft_tree)
            self.scheduler = Scheduler(self.engine, max_num_seqs, max_batch_tokens, max_queue, speculation)
        except BaseException:
            # the stages' compiled graph would keep this process from exiting: the error
            # would never reach the callers, which would wait on a worker that never answers
            if self.engine.pipeline is not None:
                self.engine.pipeline.shutdown()
            raise
        self.outbox: dict[str, list[dict]] = {}
        self.lock = threading.Lock()  # the scheduler and the outbox
        self.has_work = threading.Event()
        self.has_events = asyncio.Event()
        self.poll_waiting = False
        self.event_loop = asyncio.get_running_loop()
        self.failure: BaseException | None = None
        self.stall_s = step_timeout_s + STALL_GRACE_S
        self.busy_since: float | None = None  # when the loop began its step's launch and wait (`_watch`)
        model = self.engine.model_name
        self.gauges = model_metrics(metrics.Gauge, "ntr_", model, [
            ("queue_depth", "requests waiting for admission"),
            ("running_requests", "requests in the running batch"),
            ("kv_blocks_in_use", "KV cache blocks held by requests"),
            ("kv_blocks_total", "KV cache blocks")])
        self.gauge_values: dict[str, int] = {}
        (self.generated,) = model_metrics(metrics.Counter, "ntr_", model,
                                          [("generated_tokens", "tokens generated")]).values()
        self.speculated = model_metrics(metrics.Counter, "ntr_speculation_", model, [
            ("passes", "verifying passes of speculative decoding"),
            ("drafted", "tokens drafted"),
            ("accepted", "drafted tokens the model kept (a draft tree's leaves included)"),
            ("leaves", "passes whose first rejected draft had a draft tree's leaf"),
            ("leaf_hits", "leaves that held the model's token"),
            ("plain_steps", "decode steps a speculating request took without a draft")])
        self.speculated_counts = dict.fromkeys(self.speculated, 0)
        self._update_gauges()
        threading.Thread(target=self._run, name="scheduling-loop", daemon=True).start()
        # The grammar engine's vocabulary takes seconds to build: built beside the loop, so the
        # first constrained request does not stall the actor (a request arriving earlier waits
        # for it: Engine.grammar_tokenizer is built once, under a lock).
        threading.Thread(target=lambda: self.engine.grammar_tokenizer, name="grammar-vocabulary", daemon=True).start()

    def info(self) -> dict:
        """What the callers need to know of the model; raises once the worker is broken (health checks call it)."""
        self._check_alive()
        e = self.engine
        return {"model": e.model_name, "max_context": e.max_context, "kv_blocks_total": e.kv.num_blocks,
                "block_size": e.kv.block_size, "vocab_size": e.tokenizer.vocab_size,
                "system_fingerprint": self.fingerprint,
                "pipeline_stages": [{"layers": [s.layers.start, s.layers.stop], "bytes": s.nbytes,
                                     "streamed": list(s.streamed)} for s in e.stages]}

    def stats(self) -> dict:
        """The gauges' values (/health answers them); raises once the worker is broken."""
        self._check_alive()
        return self._counts()

    def _counts(self) -> dict:
        s = self.scheduler
        return {"queue_depth": len(s.waiting), "running_requests": len(s.running),
                "kv_blocks_in_use": s.kv_blocks_in_use, "kv_blocks_total": self.engine.kv.num_blocks}

    async def submit(self, request_id: str, prompt: str | list, params: SamplingParams,
                     tools: list | None = None) -> int:
        """Queue a request: a plain prompt, chat messages (with the tools their template renders)
        or token ids. Returns its prompt token count."""
        self._check_alive()
        e = self.engine
        if isinstance(prompt, str):
            ids = e.prompt_ids(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = e.chat_prompt_ids(prompt, tools)
        else:
            ids = list(prompt)
        with self.lock:
            self.scheduler.submit(request_id, ids, params)
            self.outbox[request_id] = []
            self.has_work.set()
        self._update_gauges()
        return len(ids)

    async def tokenize(self, prompt: str | list[dict], add_special: bool) -> list[int]:
        """The ids of a text (plain-prompt rules: special-token text stays text; add_special: BOS
        as the metadata says), or of chat messages as a chat completion is prompted. In a thread:
        a long text must not hold up the polls of running streams."""
        self._check_alive()
        e = self.engine
        if isinstance(prompt, list):
            return await asyncio.to_thread(e.chat_prompt_ids, prompt)
        return await asyncio.to_thread(e.tokenizer.encode, prompt, add_special, False)

    async def detokenize(self, ids: list[int]) -> str:
        self._check_alive()
        return await asyncio.to_thread(self.engine.tokenizer.decode, ids)

    async def cancel(self, request_id: str) -> None:
        with self.lock:
            self.scheduler.cancel(request_id)
            self.outbox.pop(request_id, None)
        self._update_gauges()

    async def poll(self, timeout_s: float = 1.0) -> dict[str, list[dict]]:
        """Every request's events since the last poll; waits up to timeout_s for the first."""
        self._watch()
        with self.lock:
            ready = self._take_events()
            if not ready:
                self.has_events.clear()
                self.poll_waiting = True  # read by the loop under the lock: no wake-up is lost
        if not ready:
            try:
                await asyncio.wait_for(self.has_events.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            with self.lock:
                self.poll_waiting = False
                ready = self._take_events()
        return ready

    def _take_events(self) -> dict[str, list[dict]]:
        ready = {rid: events for rid, events in self.outbox.items() if events}
        for rid, events in ready.items():
            if events[-1].get("finish_reason") or "error" in events[-1]:
                del self.outbox[rid]
            else:
                self.outbox[rid] = []
        return ready

    def _run(self) -> None:
        """The scheduling loop (its own thread). Steps are launched until `Scheduler.depth`
        are in flight, then the oldest is waited for and committed: a greedy decode step is
        followed by the next one before its ids are read (Scheduler.plan_ahead), and through
        P pipeline stages each micro-batch group's step runs in the stages while another's
        is sampled and committed. The loop only ends on a bug: then every request and the
        health check fail rather than hang."""
        try:
            launched: deque = deque()  # (step, its pending tokens), oldest first
            while True:
                with self.lock:
                    after = self.scheduler.plan_next()
                    if after is None and not launched:
                        self.has_work.clear()
                if after is None and not launched:
                    self.has_work.wait()
                    continue
                try:
                    self.busy_since = time.monotonic()
                    if after is not None:
                        launched.append((after, self.scheduler.launch(after)))
                        if len(launched) < self.scheduler.depth:
                            continue
                    step, pending = launched.popleft()
                    picked = pending()
                except Exception as e:  # a device or stage failure ends the requests it lost, not the worker
                    with self.lock:
                        for request in self.scheduler.abort():
                            self._emit(request.id, {"error": f"forward pass failed: {e}"})
                    launched.clear()
                    self._update_gauges()
                    continue
                finally:
                    self.busy_since = None
                with self.lock:
                    events = self.scheduler.commit(step, picked)
                    for rid, event in events:
                        self._emit(rid, self._wire(event))
                if tokens := sum(isinstance(event, GeneratedToken) for _, event in events):
                    self.generated.inc(tokens)
                self._count_speculation()
                self._update_gauges()
        except BaseException as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """The worker is broken for good: every request ends with the error, and so does every
        later call (`_check_alive`; health checks too, so Serve replaces the replica)."""
        self.failure = e
        locked = self.lock.acquire(timeout=1.0)  # the loop may be stuck holding it: go on without it then
        try:
            for request_id in list(self.outbox):
                self._emit(request_id, {"error": self._failure_message()})
        finally:
            if locked:
                self.lock.release()

    def _watch(self) -> None:
        """The watchdog, on the event loop (each poll and health check): a step stuck for
        stall_s (a wedged device, or a stage its pipeline could not restart) fails the worker,
        which would otherwise answer every call while its requests wait forever."""
        since = self.busy_since
        if self.failure is None and since is not None and time.monotonic() - since > self.stall_s:
            self._fail(TimeoutError(f"a forward pass has not finished in {self.stall_s:g} s "
                                    f"(step_timeout_s + {STALL_GRACE_S:g} s)"))

    def _check_alive(self) -> None:
        self._watch()
        if self.failure is not None:
            raise WorkerFailed(self._failure_message()) from self.failure

    def _failure_message(self) -> str:
        """What the requests it ends and the calls after it are told."""
        return f"the compute worker failed: {type(self.failure).__name__}: {self.failure}"

    def _emit(self, request_id: str, event: dict) -> None:
        """Queue an event for the next poll (the lock held); wake a waiting poll."""
        if request_id in self.outbox:
            self.outbox[request_id].append(event)
            if self.poll_waiting:
                self.poll_waiting = False
                self.event_loop.call_soon_threadsafe(self.has_events.set)

    def _wire(self, event: GeneratedToken | PromptLogprobs) -> dict:
        """An event as it leaves the actor: token ids with their bytes where logprobs go with them."""
        token_bytes = self.engine.tokenizer.token_bytes
        if isinstance(event, PromptLogprobs):
            return {"prompt_logprobs": [{"token_id": t, "bytes": list(token_bytes(t)), "logprob": lp, "top_logprobs":
                                         None if top is None else [(list(token_bytes(i)), v) for i, v in top]}
                                        for t, lp, top in event.entries]}
        out = {"token_id": event.token_id, "text": event.text, "finish_reason": event.finish_reason}
        if event.logprob is not None:
            out["logprob"] = event.logprob
            out["bytes"] = list(token_bytes(event.token_id))
            out["top_logprobs"] = [(list(token_bytes(t)), lp) for t, lp in event.top_logprobs]
        return out

    def _count_speculation(self) -> None:
        """The scheduler's speculation totals (Scheduler.spec_stats) into their counters: what
        grew since the last call."""
        for name, counter in self.speculated.items():
            total = getattr(self.scheduler.spec_stats, name)
            if total != self.speculated_counts[name]:
                counter.inc(total - self.speculated_counts[name])
                self.speculated_counts[name] = total

    def _update_gauges(self) -> None:
        # Only what changed: a Ray metric update costs tens of microseconds, a decode step
        # about a millisecond on the GPU, and these values move far less often than every step.
        for name, value in self._counts().items():
            if self.gauge_values.get(name) != value:
                self.gauges[name].set(value)
                self.gauge_values[name] = value
