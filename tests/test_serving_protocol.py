"""The OpenAI wire format and the error taxonomy, without a server."""

from __future__ import annotations

import pickle

import grpc
import pytest
from ray.exceptions import RayTaskError

from cluster.errors import APIError
from cluster.openai_protocol import Choice, chunk, parse_request, response
from workers.engine.engine import ContextLengthError
from workers.engine.scheduler import QueueFull
from workers.model.store import ModelNotFound

M = "m"


def test_defaults_are_openais():
    r = parse_request({"prompt": "hi"}, chat=False, served_model=M, max_context=4096)
    assert (r.params.temperature, r.params.top_p, r.params.max_tokens, r.n, r.stream) == (1.0, 1.0, 16, 1, False)
    c = parse_request({"model": M, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
                      chat=True, served_model=M, max_context=4096)
    assert c.params.max_tokens == 4096 and c.prompts == [[{"role": "user", "content": "a"}]]


def test_choices_per_prompt_and_n_with_distinct_seeds():
    r = parse_request({"prompt": ["a", [1, 2]], "n": 2, "seed": 10, "stop": "\n", "logprobs": 3}, False, M, 4096)
    assert [(p, params.seed) for p, params in r.choices()] == [("a", 10), ("a", 11), ([1, 2], 10), ([1, 2], 11)]
    assert r.params.stop == ("\n",) and r.params.logprobs == 3
    chat = parse_request({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2},
                         True, M, 4096)
    assert chat.params.logprobs == 2


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "a", "model": "other"}, 404, "does not exist"),
    ({"prompt": "a", "max_tokens": True}, 400, "'max_tokens' must be int"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": 2.5}, 400, "[0, 2]"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "n": 17}, 400, "'n' must be in [1, 16]"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "at most 4"),
    ({"prompt": "a", "echo": True}, 400, "echo"),
    ({"prompt": 5}, 400, "'prompt' must be"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_fields(body, status, words):
    with pytest.raises(APIError) as e:
        parse_request(body, chat=False, served_model=M, max_context=4096)
    assert e.value.status == status and words in e.value.message
    assert e.value.body()["error"]["message"] == e.value.message


@pytest.mark.parametrize("exc, status, code", [
    (QueueFull("busy"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ContextLengthError("too long"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound("no such model"), 404, grpc.StatusCode.NOT_FOUND),
    (ValueError("bad"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("boom"), 500, grpc.StatusCode.INTERNAL),
])
def test_engine_errors_map_to_status_codes_even_through_ray(exc, status, code):
    wrapped = RayTaskError("ComputeWorker.submit", "Traceback ...", exc)
    for e in (exc, wrapped):
        error = APIError.from_exception(e)
        assert (error.status, error.grpc_code) == (status, code) and str(exc) in error.message
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.message, copy.code) == (error.status, error.message, error.code)


def test_responses_and_chunks():
    r = parse_request({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1},
                      True, M, 4096)
    choice = Choice(r, 0)
    event = {"token_id": 5, "text": "Hi", "finish_reason": None, "logprob": -0.5, "bytes": [72, 105],
             "top_logprobs": [([72, 105], -0.5)]}
    lp = choice.add(event)
    first = chunk(r, choice, event, lp)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert lp["content"][0]["top_logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]
    choice.add({**event, "text": "!", "bytes": [33], "finish_reason": "stop"})
    body = response(r, [choice], prompt_tokens=3)
    assert body["choices"][0]["message"]["content"] == "Hi!" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert len(body["choices"][0]["logprobs"]["content"]) == 2


@pytest.mark.parametrize("asgi", ["2.0", "2.4"])  # Starlette's two ways of running a stream
def test_stream_cancels_its_generations_when_cancelled_inside_send(asgi):
    """A client that disconnects cancels the task sending the SSE response. Cancelled while it
    waits in send(), the body iterator stays suspended at its yield and its own cleanup does not
    run; the response must still cancel the generations (or they decode on into the KV cache)."""
    import asyncio

    from cluster.app import CancellingStream

    class FakeGeneration:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    async def body():
        while True:
            yield "data: {}\n\n"

    async def scenario():
        generations, sending = [FakeGeneration(), FakeGeneration()], asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                sending.set()
                await asyncio.Event().wait()  # a client that stopped reading

        async def receive():
            await asyncio.Event().wait()

        scope = {"type": "http", "asgi": {"spec_version": asgi}}
        task = asyncio.create_task(CancellingStream(body(), generations)(scope, receive, send))
        await sending.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return generations

    assert all(g.cancelled for g in asyncio.run(scenario()))
