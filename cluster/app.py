"""The Ray Serve application: one replica = one model on one device.

The replica is the front end (OpenAI-compatible HTTP through FastAPI, and the Generation
gRPC service through Serve's gRPC ingress); the model runs in its ComputeWorker actor,
placed in the replica's placement group so that both land on one node and the worker
holds the replica's GPU. `build_app` is the import path that Serve config files name.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type of
the ingress methods to inject it.
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.util import metrics
from starlette.exceptions import HTTPException

from cluster import openai_protocol as oai
from cluster.api_keys import authorized
from cluster.config import ServerConfig, server_config
from cluster.engine_client import EngineClient, Generation
from cluster.errors import APIError
from proto import generation_pb2 as pb

# The docs are routes of the replica's own (below), so that they need a key as every route but /health.
api = FastAPI(title="ntransformer", docs_url=None, redoc_url=None, openapi_url=None)
# /health answers within this even when the worker does not (dead, restarting, or wedged).
HEALTH_TIMEOUT_S = 5
GRPC_MAX_TOKENS = 16  # the proto's default for both inputs


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


async def merged(generations: list[Generation]) -> AsyncIterator[list[tuple[int, dict]]]:
    """(choice index, event) pairs from all generations as they arrive, in batches: each batch
    is everything that had arrived when it was taken (a stream sends one batch as one piece,
    not one Serve round trip per token); stopping early cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(drain(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            batch = []
            for index, event in items:
                if event is None:
                    running -= 1
                elif isinstance(event, Exception):
                    raise APIError.from_exception(event)
                else:
                    batch.append((index, event))
            if batch:
                yield batch
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:  # also those whose task never started
            generation.cancel()


class CancellingStream(StreamingResponse):
    """An SSE response that cancels its generations however it ends. A client that goes away
    cancels the task sending the response; when that task waits in send() rather than in the
    body iterator, the iterator only stays suspended at its yield (its own cleanup would run
    when it is garbage-collected), and the worker would keep decoding into the KV blocks."""

    def __init__(self, body, generations: list[Generation]):
        super().__init__(body, media_type="text/event-stream")
        self.generations = generations

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                generation.cancel()


@contextmanager
def grpc_status(grpc_context):
    """Errors leave with their gRPC code: Serve's proxy keeps a code set on the context before a raise."""
    try:
        yield
    except Exception as e:
        error = APIError.from_exception(e)
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(error.message)
        raise error from None


@contextmanager
def cancelled_on_failure(generations: list[Generation]):
    """A request's generations, all cancelled if what follows their submission fails (an
    APIError for the client)."""
    try:
        yield
    except Exception as e:
        for g in generations:
            g.cancel()
        raise APIError.from_exception(e) from None


@serve.deployment(name="LLMServer", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class LLMServer:
    async def __init__(self, config: dict):
        self.config: ServerConfig = server_config(config)
        self.client = EngineClient(self.config)
        self.info = await self.client.info()  # the replica is ready only once the model is loaded
        extra_keys = {k for k in os.environ.get("NTR_API_KEYS", "").split(",") if k}
        self.api_keys = frozenset(self.config.api_keys) | extra_keys
        self.requests = metrics.Counter("ntr_requests", description="API requests by endpoint and status",
                                        tag_keys=("model", "endpoint", "status"))
        self.requests.set_default_tags({"model": self.config.name})

    async def check_health(self) -> None:
        await self.client.info()  # raises if the compute worker is gone, so Serve replaces the replica

    # --- HTTP ----------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        try:
            stats = await asyncio.wait_for(self.client.stats(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the model's worker did not answer in {HEALTH_TIMEOUT_S} s",
                           code="unavailable") from None
        except Exception as e:
            raise APIError.from_exception(e) from None
        return {"status": "ok", "model": self.config.name, **stats}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        self._check_key(request.headers.get("authorization"))
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._check_key(request.headers.get("authorization"))
        return get_swagger_ui_html(openapi_url="/openapi.json", title=api.title)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict:
        self._check_key(request.headers.get("authorization"))
        oai.check_model(model_id, self.config.name)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.config.name, "object": "model", "created": 0, "owned_by": "ntransformer",
                "max_model_len": self.info["max_context"]}

    @api.post("/tokenize")
    @api.post("/v1/tokenize")
    async def tokenize(self, request: Request) -> dict:
        """vLLM's answer (tokens, count, max_model_len); llama-server's is its "tokens"."""
        self._check_key(request.headers.get("authorization"))
        prompt, add_special = oai.parse_tokenize(oai.json_body(await request.body()), self.config.name)
        try:
            tokens = await self.client.tokenize(prompt, add_special)
        except Exception as e:
            raise APIError.from_exception(e) from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.info["max_context"]}

    @api.post("/detokenize")
    @api.post("/v1/detokenize")
    async def detokenize(self, request: Request) -> dict:
        """The text under vLLM's name ("prompt") and llama-server's ("content")."""
        self._check_key(request.headers.get("authorization"))
        ids = oai.parse_detokenize(oai.json_body(await request.body()), self.config.name, self.info["vocab_size"])
        try:
            text = await self.client.detokenize(ids)
        except Exception as e:
            raise APIError.from_exception(e) from None
        return {"prompt": text, "content": text}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            self._check_key(request.headers.get("authorization"))
            body = oai.json_body(await request.body())
            req = oai.parse_request(body, chat, self.config.name, self.info["max_context"],
                                    system_fingerprint=self.info["system_fingerprint"])
            generations = await self._submit(req.choices(), req.tools)
            echoes = await self._echoes(req, generations)
        except APIError as e:
            self.requests.inc(tags={"endpoint": endpoint, "status": str(e.status)})
            raise
        self.requests.inc(tags={"endpoint": endpoint, "status": "200"})
        prompt_tokens = sum(g.prompt_tokens for g in generations[::req.n])
        choices = [oai.Choice(req, i, echo) for i, echo in enumerate(echoes)]
        if req.stream:
            return CancellingStream(self._sse(req, generations, choices, prompt_tokens), generations)
        async for batch in merged(generations):
            for index, event in batch:
                choices[index].add(event)
        return oai.response(req, choices, prompt_tokens)

    async def _sse(self, req, generations, choices, prompt_tokens) -> AsyncIterator[str]:
        def sse(entries) -> str:
            return "".join(f"data: {json.dumps(oai.chunk(req, entry))}\n\n" for entry in entries)

        try:
            if opening := sse(entry for choice in choices for entry in choice.opening()):
                yield opening
            async for batch in merged(generations):
                if text := sse(entry for i, event in batch for entry in choices[i].add(event)):  # none: held back
                    yield text
            if req.include_usage:
                tokens = oai.usage(prompt_tokens, sum(c.tokens for c in choices))
                yield f"data: {json.dumps(oai.chunk(req, None, tokens))}\n\n"
        except APIError as e:  # the status line is gone: report in the stream, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def _submit(self, choices: list, tools: list | None = None) -> list[Generation]:
        """Submit every choice, or none: a failure cancels the ones already queued."""
        generations: list[Generation] = []
        with cancelled_on_failure(generations):
            for prompt, params in choices:
                generations.append(await self.client.submit(prompt, params, tools))
        return generations

    async def _echoes(self, req, generations: list[Generation]) -> list[str]:
        """Each choice's echoed prompt text (after the submit checked token-id prompts); a failure cancels them."""
        with cancelled_on_failure(generations):
            return [await self.client.prompt_text(prompt) if req.echo else "" for prompt, _ in req.choices()]

    def _check_key(self, authorization: str | None) -> None:
        if not authorized(authorization, self.api_keys):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    # --- gRPC (method names are the Generation service's) ---------------------
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        with grpc_status(grpc_context):
            self._check_key(dict(grpc_context.invocation_metadata()).get("authorization"))
            return pb.ListModelsResponse(models=[pb.Model(id=self.config.name, max_context=self.info["max_context"])])

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        with grpc_status(grpc_context):
            generation = await self._grpc_submit(request, grpc_context)
            text, ids, finish = [], [], ""
            async for event in generation:
                text.append(event["text"])
                ids.append(event["token_id"])
                finish = event["finish_reason"] or ""
            return pb.GenerateResponse(text="".join(text), token_ids=ids, finish_reason=finish, usage=pb.Usage(
                prompt_tokens=generation.prompt_tokens, completion_tokens=len(ids)))

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateChunk]:
        with grpc_status(grpc_context):
            generation = await self._grpc_submit(request, grpc_context)
            async for event in generation:
                chunk = pb.GenerateChunk(text=event["text"], token_id=event["token_id"],
                                         finish_reason=event["finish_reason"] or "")
                if event["finish_reason"]:
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=generation.prompt_tokens,
                                                  completion_tokens=generation.completion_tokens))
                yield chunk

    async def _grpc_submit(self, request: pb.GenerateRequest, grpc_context) -> Generation:
        """The request as the equivalent OpenAI body, so both front ends share defaults and checks."""
        self._check_key(dict(grpc_context.invocation_metadata()).get("authorization"))
        body = {name: getattr(request, name) for name in (
            "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty", "seed") if request.HasField(name)}
        body |= {"model": request.model or self.config.name, "stop": list(request.stop), "ignore_eos": request.ignore_eos}
        if request.json_schema:
            try:
                schema = json.loads(request.json_schema)
            except ValueError as e:
                raise APIError(400, f"'json_schema' is not valid JSON: {e}", param="json_schema") from None
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        if request.grammar:
            body["grammar"] = request.grammar
        if request.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in request.logit_bias.items()}
        chat = request.WhichOneof("input") == "chat"
        if chat:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        else:
            body["prompt"] = request.prompt
        req = oai.parse_request(body, chat, self.config.name, self.info["max_context"], GRPC_MAX_TOKENS)
        (generation,) = await self._submit(req.choices())
        return generation


def build_app(args: dict) -> serve.Application:
    """Serve's app builder: `args` is a ServerConfig, checked here with clear errors."""
    config = server_config(args)
    # The replica itself needs no CPU: its placement group's one bundle holds what the
    # compute worker reserves, so worker and replica share a node and the GPU is the worker's
    # (pipeline stages reserve theirs in a placement group of their own: workers/stage_worker.py).
    worker = config.worker_options()
    return LLMServer.options(
        ray_actor_options={"num_cpus": 0},
        placement_group_bundles=[{"CPU": worker["num_cpus"], "GPU": worker["num_gpus"]}],
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=config.max_num_seqs + config.max_queue + 16,
    ).bind(config.model_dump())
