"""EngineClient: a caller's side of one ComputeWorker (used by the Serve replica and the batch driver).

One background task long-polls the worker and fans each batch of events out to the
per-request queues, so the Ray round trips are one per batch of tokens whatever the
number of streams. A request's stream cancels it on the worker when the consumer stops
early (a client that disconnects), which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import AsyncIterator

from ray.exceptions import TaskCancelledError
from ray.util import metrics

from cluster.config import ServerConfig
from workers.compute_worker import ComputeWorker
from workers.engine.sampling import SamplingParams

POLL_TIMEOUT_S = 1.0
# A poll is answered as soon as any event is ready; the next one waits until this long after
# the previous started, so that at high token rates one round trip carries several steps'
# tokens instead of the worker's event loop serving a poll (and taking the GIL from the
# forward pass) after every step. It bounds the added delay of a token.
POLL_INTERVAL_S = 0.005
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class GenerationFailed(RuntimeError):
    pass


def outside_request(fn, *args):
    """fn(*args) outside the caller's Ray task context. Ray cancels every call a cancelled
    request submitted (it finds the parent through contextvars); what is started here
    outlives the request: the pump serves every stream, and a cancel must reach the worker."""
    return contextvars.Context().run(fn, *args)


class EngineClient:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.worker = ComputeWorker.options(**config.worker_options()).remote(**config.worker_args())
        self.queues: dict[str, asyncio.Queue] = {}
        self.pump: asyncio.Task | None = None
        tags = {"model": config.name}
        self.ttft = metrics.Histogram("ntr_time_to_first_token_seconds", description="submit to first token",
                                      boundaries=_LATENCY_BUCKETS, tag_keys=("model",))
        self.itl = metrics.Histogram("ntr_inter_token_latency_seconds", description="time between tokens",
                                     boundaries=_LATENCY_BUCKETS, tag_keys=("model",))
        self.ttft.set_default_tags(tags)
        self.itl.set_default_tags(tags)

    async def info(self) -> dict:
        return await self.worker.info.remote()

    async def stats(self) -> dict:
        return await self.worker.stats.remote()

    async def tokenize(self, prompt: str | list[dict], add_special: bool) -> list[int]:
        return await self.worker.tokenize.remote(prompt, add_special)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.worker.detokenize.remote(ids)

    async def prompt_text(self, prompt: str | list[int]) -> str:
        """A completion prompt as text (echo): token ids detokenized."""
        return prompt if isinstance(prompt, str) else await self.detokenize(prompt)

    async def submit(self, prompt: str | list, params: SamplingParams, tools: list | None = None) -> "Generation":
        """Queue one completion (tools: for a chat prompt's template); bad input and a full
        queue raise here, before any token."""
        request_id = uuid.uuid4().hex
        queue = self.queues[request_id] = asyncio.Queue()
        try:
            prompt_tokens = await self.worker.submit.remote(request_id, prompt, params, tools)
        except BaseException as e:
            del self.queues[request_id]
            if isinstance(e, (asyncio.CancelledError, TaskCancelledError)):  # it may land after the worker queued it
                outside_request(self.worker.cancel.remote, request_id)
            raise
        if self.pump is None or self.pump.done():
            self.pump = outside_request(asyncio.get_running_loop().create_task, self._pump())
        return Generation(self, request_id, prompt_tokens, queue)

    async def _pump(self) -> None:
        while self.queues:
            started = time.perf_counter()
            try:
                batch = await self.worker.poll.remote(POLL_TIMEOUT_S)
            except Exception as e:  # the worker died: fail every stream with it instead of hanging them
                for queue in self.queues.values():
                    queue.put_nowait(e)
                raise
            for request_id, events in batch.items():
                queue = self.queues.get(request_id)
                if queue is not None:
                    for event in events:
                        queue.put_nowait(event)
            await asyncio.sleep(POLL_INTERVAL_S - (time.perf_counter() - started))


class Generation:
    """One request's events, in order; iterate once. Leaving early cancels it on the worker."""

    def __init__(self, client: EngineClient, request_id: str, prompt_tokens: int, queue: asyncio.Queue):
        self.client, self.id, self.prompt_tokens, self.queue = client, request_id, prompt_tokens, queue
        self.completion_tokens = 0
        self.finished = False
        self.submitted = time.perf_counter()

    async def __aiter__(self) -> AsyncIterator[dict]:
        client, last = self.client, None
        try:
            while not self.finished:
                event = await self.queue.get()
                if isinstance(event, Exception):  # the worker is gone (the poll failed)
                    self.finished = True
                    raise event
                if "error" in event:
                    self.finished = True
                    raise GenerationFailed(event["error"])
                if "prompt_logprobs" in event:  # an echo's, before the first token: no token itself
                    yield event
                    continue
                now = time.perf_counter()
                if last is None:
                    client.ttft.observe(now - self.submitted)
                else:
                    client.itl.observe(now - last)
                last = now
                self.completion_tokens += 1
                self.finished = event["finish_reason"] is not None
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop it on the worker (its KV blocks are freed there) unless it already ended."""
        self.client.queues.pop(self.id, None)
        if not self.finished:
            self.finished = True
            outside_request(self.client.worker.cancel.remote, self.id)  # not awaited: this may run inside a cancellation
