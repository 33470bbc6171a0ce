"""The OpenAI-compatible HTTP API of the dev-cpu Serve app, on a real local Ray cluster with
the real default model, driven by the official `openai` client (and raw HTTP for bad input)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import time

import openai
import pytest

from finite_schema import SCHEMA
from serving_cluster import dev_config, http_get, kv_blocks_in_use, ray_cluster, served_app, wait_until

pytestmark = pytest.mark.real_model
KEY = "test-key"


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster, real_model_path, tmp_path_factory):
    # every request that can speculates (3 tokens drafted by lookup a pass), so every test below
    # runs the scheduler's passes beside plain rows
    config, http_port, _ = dev_config(tmp_path_factory.mktemp("serve"), real_model_path, api_keys=[KEY],
                                      speculate=3, drafter="lookup")
    with served_app(cluster, config, http_port) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    (entry,) = client.models.list().data
    return entry.id


def test_completion_with_logprobs(client, model):
    r = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=4, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    (choice,) = r.choices
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens > 0
    assert choice.finish_reason == "length" and choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == choice.text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_chat_seed_reproducibility_and_logprobs(client, model):
    def ask(seed):
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=5, temperature=1.0,
            seed=seed, logprobs=True, top_logprobs=2)

    a, b = ask(1234), ask(1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"
    content = a.choices[0].logprobs.content
    assert len(content) == a.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_completion_stream_is_openais_and_matches_non_streaming(client, model):
    kwargs = dict(model=model, prompt="import numpy as", max_tokens=5, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *choices, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    texts = [(c.choices[0].text, c.choices[0].finish_reason) for c in choices]
    assert all(text for text, _ in texts[:-1]) and [f for _, f in texts[:-1]] == [None] * (len(texts) - 1)
    assert texts[-1] == ("", whole.choices[0].finish_reason), "the finish reason comes alone, with empty text"
    assert "".join(text for text, _ in texts) == whole.choices[0].text
    streamed = [t for c in choices if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs and len(streamed) == whole.usage.completion_tokens
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    assert whole.system_fingerprint.startswith("fp_")


def test_chat_stream_is_openais(client, model):
    """Role alone, then never-empty content, then the finish reason with an empty delta, then
    usage, then [DONE] (the client stops on it); every token's logprob once, as without a stream."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Say hello in French, with accents."}],
                  max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    first, *middle, finish, last = chunks
    delta = first.choices[0].delta
    assert (delta.role, delta.content, first.choices[0].finish_reason) == ("assistant", "", None)
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None and c.choices[0].delta.role is None
               for c in middle)
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert last.choices == [] and last.usage == whole.usage
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    streamed = [t.logprob for c in middle + [finish] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.logprob for t in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint} and whole.system_fingerprint


@pytest.mark.parametrize("chat, fields, param", [
    (False, {"best_of": 2}, "best_of"),
    (False, {"suffix": "}"}, "suffix"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (True, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (True, {"extra_body": {"frobnicate": 1}}, "frobnicate"),
    (True, {"tools": "notalist"}, "tools"),
    (True, {"max_tokens": "5"}, "max_tokens"),
])
def test_a_field_that_would_change_the_output_is_honoured_or_named_in_a_400(client, model, chat, fields, param):
    kwargs = {"model": model, "max_tokens": 1, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(**{"messages": [{"role": "user", "content": "hi"}], **kwargs})
        else:
            client.completions.create(prompt="hi", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.body["message"]


def test_echo_begins_the_text_with_the_prompt(client, model, server):
    prompt = "def add(a, b):"
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text and echoed.usage == plain.usage
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == prompt and "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    status, ids = post(server, "/tokenize", json.dumps({"prompt": prompt}))
    by_ids = client.completions.create(model=model, prompt=ids["tokens"], max_tokens=3, temperature=0, echo=True)
    assert status == 200 and by_ids.choices[0].text == echoed.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_sampling_scores_a_token(client, model, server):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs, one token): every prompt
    token's logprob, the first None; the last prompt token's equals what sampling reports for
    it as the first token after the rest of the prompt (another pass, another code path)."""
    status, ids = post(server, "/tokenize", json.dumps({"prompt": "def add(a, b):"}))
    prompt = ids["tokens"]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=5)
    assert status == 200
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 1
    assert "".join(lp.tokens) == r.choices[0].text and r.choices[0].text.startswith("def add(a, b):")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and r.usage.completion_tokens == 1
    for token, chosen, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 5 and chosen <= max(top.values()) + 1e-6
        assert token not in top or top[token] == pytest.approx(chosen, abs=1e-6)
    before = client.completions.create(model=model, prompt=prompt[:-1], max_tokens=1, temperature=0, logprobs=5)
    sampled_top = before.choices[0].logprobs.top_logprobs[0]
    assert sampled_top[lp.tokens[len(prompt) - 1]] == pytest.approx(lp.token_logprobs[len(prompt) - 1], abs=2e-3)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                            logprobs=5, stream=True))
    assert chunks[0].choices[0].text == r.choices[0].text[:len("def add(a, b):")]
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    alone = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    assert alone.choices[0].text == "def add(a, b):" and alone.usage.completion_tokens == 0
    scored = alone.choices[0].logprobs.token_logprobs
    assert scored[0] is None and scored[1:] == pytest.approx(lp.token_logprobs[1:-1], abs=1e-5)


def test_informational_fields_pass(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       user="u1", metadata={"k": "v"}, store=False, service_tier="auto")
    assert r.usage.completion_tokens == 1


def test_tokenize_and_detokenize_round_trip_as_the_engine_tokenizes(server, model, real_model_path):
    from workers.model.gguf_file import GGUFFile
    from workers.model.tokenizer import Tokenizer

    with GGUFFile(real_model_path) as gguf:
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
    text = "def f(x):\n    return x ** 2  # caf\u00e9 \U0001f917 <|im_end|>"
    for path in ("/tokenize", "/v1/tokenize"):
        status, vllm = post(server, path, json.dumps({"model": model, "prompt": text}))
        assert status == 200 and vllm["tokens"] == tokenizer.encode(text, add_special=True, parse_special=False)
        assert vllm["count"] == len(vllm["tokens"]) and vllm["max_model_len"] > 0
    status, llama = post(server, "/tokenize", json.dumps({"content": text}))
    assert status == 200 and llama["tokens"] == tokenizer.encode(text, add_special=False, parse_special=False)
    for path in ("/detokenize", "/v1/detokenize"):
        status, back = post(server, path, json.dumps({"tokens": vllm["tokens"]}))
        assert status == 200 and back["prompt"] == back["content"] == tokenizer.decode(vllm["tokens"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    status, chat = post(server, "/v1/tokenize", json.dumps({"messages": messages}))
    r = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model, messages=messages, max_tokens=1)
    assert status == 200 and chat["count"] == r.usage.prompt_tokens
    assert tokenizer.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    status, error = post(server, "/detokenize", json.dumps({"tokens": [1, tokenizer.vocab_size]}))
    assert status == 400 and error["error"]["param"] == "tokens" and str(tokenizer.vocab_size) in error["error"]["message"]


def test_model_by_id(client, model):
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found" and "gpt-17" in e.value.body["message"]


def test_stop_string_and_n(client, model):
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop" and "," not in r.choices[0].text
    r = client.completions.create(model=model, prompt="x =", max_tokens=2, n=2, seed=5, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 4


def test_32_concurrent_streams_complete(server, model):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=600, max_retries=0)

        async def one(i):
            stream = await aclient.completions.create(
                model=model, prompt=f"# item {i}\n", max_tokens=4, temperature=0.7, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            finish, usage = None, None
            async for chunk in stream:
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
                usage = chunk.usage or usage
            return finish, usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 600)
        finally:
            await aclient.close()

    assert asyncio.run(main()) == [("length", 4)] * 32


def send(server: str, path: str, body: bytes | str | None, key: str | None = KEY, method: str = "POST",
         authorization: str | None = None) -> http.client.HTTPConnection:
    """A request on a connection of its own (authorization: the header's whole value, instead of
    'Bearer <key>'); the caller reads the response, or goes away."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    authorization = authorization or (f"Bearer {key}" if key else None)
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    conn.request(method, path, body=body, headers=headers)
    return conn


def post(server: str, path: str, body: bytes | str, key: str | None = KEY) -> tuple[int, dict]:
    conn = send(server, path, body, key)
    r = conn.getresponse()
    payload = json.loads(r.read())
    conn.close()
    return r.status, payload


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, model):
    good = {"model": model, "prompt": "Hello", "max_tokens": 1}
    cases = [
        ("/v1/completions", b'{"model": "x", "prompt": ', KEY, 400, "not valid JSON"),
        ("/v1/completions", {**good, "model": "gpt-17"}, KEY, 404, "does not exist"),
        ("/v1/completions", {**good, "max_tokens": -3}, KEY, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi " * 5000}]}, KEY,
         400, "context window"),
        ("/v1/completions", {**good, "temperature": 7}, KEY, 400, "temperature"),
        ("/v1/completions", good, "wrong-key", 401, "API key"),
        ("/v1/chat/completions", {"model": model, "messages": []}, None, 401, "API key"),
        ("/v1/chat/completions", {"model": model, "messages": "hi"}, KEY, 400, "messages"),
        ("/v1/completions", b"[" * 100_000, KEY, 400, "not valid JSON"),
        ("/v1/completions", {**good, "top_k": -5}, KEY, 400, "top_k"),
        ("/v1/completions", {**good, "stop": [""]}, KEY, 400, "stop"),
        ("/v1/completions", {**good, "stop": ["x" * 1_000_000] * 4}, KEY, 400, "stop"),
        ("/v1/completions", {**good, "max_tokens": 10**9}, KEY, 400, "max_tokens=1000000000 does not fit"),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "bogus"}}, KEY, 400, "response_format.type"),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                  "tools": "notalist"}, KEY, 400, "'tools' must be a list"),
        ("/v1/completions", {**good, "logit_bias": {"x9707": -100}}, KEY, 400, "logit_bias"),
        ("/v1/completions", {**good, "logit_bias": {"999999999": -100}}, KEY, 400, "logit_bias: token ids out of range"),
        # 112 choices > 32 running + 64 queued: admission control refuses the request as a whole
        ("/v1/completions", {**good, "prompt": ["a"] * 7, "n": 16}, KEY, 429, "retry later"),
    ]
    for path, body, key, status, words in cases:
        got, payload = post(server, path, body if isinstance(body, bytes) else json.dumps(body), key)
        assert got == status, (str(body)[:200], payload)
        assert words in payload["error"]["message"], payload
    status, payload = post(server, "/v1/completions", json.dumps(good))
    assert status == 200 and payload["usage"]["completion_tokens"] == 1
    wait_until(lambda: kv_blocks_in_use(server) == 0, 30,
               "the refused request's blocks to be freed")


def open_stream(server: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = send(server, "/v1/completions", json.dumps({**body, "stream": True, "ignore_eos": True}))
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # tokens are flowing
    return conn, r


def test_disconnect_mid_stream_frees_its_blocks_and_spares_other_streams(server, cluster, model):
    # The leaving stream is submitted first, so the replica's event pump starts in its request:
    # Serve's cancellation of that request must stop it on the worker and reach nothing else.
    leaving, _ = open_stream(server, {"model": model, "prompt": "Write a long story.", "max_tokens": 2000})
    staying, r = open_stream(server, {"model": model, "prompt": "Count to fifty.", "max_tokens": 40})
    metric = "ray_ntr_kv_blocks_in_use"
    wait_until(lambda: (cluster.metric(metric) or 0) > 0, 60, "the KV blocks metric to show the streams")
    leaving.sock.close()  # the client goes away mid-stream
    leaving.close()
    events = [json.loads(line.removeprefix(b"data: ")) for line in r.read().splitlines()
              if line.startswith(b"data: {")]
    staying.close()
    assert [e for e in events if "error" in e] == []
    assert events[-1]["choices"][0]["finish_reason"] == "length" and 30 <= len(events) <= 40
    assert all(e["choices"][0]["text"] and e["choices"][0]["finish_reason"] is None for e in events[:-1])
    wait_until(lambda: kv_blocks_in_use(server) == 0, 30,
               "the worker to free the blocks")
    wait_until(lambda: cluster.metric(metric) == 0, 60, "the KV blocks metric to drop to 0")


def test_disconnect_before_a_whole_completion_frees_its_blocks(server, model):
    body = {"model": model, "prompt": "Write a long story.", "max_tokens": 2000, "ignore_eos": True}
    conn = send(server, "/v1/completions", json.dumps(body))
    wait_until(lambda: json.loads(http_get(f"{server}/health"))["running_requests"] == 1, 60, "the request to run")
    conn.sock.close()  # the client gives up before the response
    conn.close()
    wait_until(lambda: kv_blocks_in_use(server) == 0, 30, "the worker to free the blocks")


def test_api_keys_guard_every_route_but_health(server, model):
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1})

    def status(path, method="GET", authorization=None, key=None):
        conn = send(server, path, body if method == "POST" else None, key, method, authorization)
        code = conn.getresponse().status
        conn.close()
        return code

    assert status("/v1/completions", "POST", authorization=f"bearer {KEY}") == 200  # RFC 6750: any case
    assert status("/v1/completions", "POST", authorization=KEY) == 401  # a raw key is not the scheme
    for path in ("/docs", "/openapi.json", "/v1/models", f"/v1/models/{model}"):
        assert (status(path), status(path, key=KEY)) == (401, 200), path
    assert status("/v1/tokenize", "POST") == status("/detokenize", "POST") == 401
    assert status("/health") == 200


def test_a_crashed_worker_is_a_503_with_retry_after_then_comes_back(server, cluster, model):
    """Runs last: the worker is killed and the app is left to recover."""
    from ray.util.state import list_actors

    (worker,) = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "ComputeWorker"),
                                                                ("state", "=", "ALIVE")])
    os.kill(worker.pid, signal.SIGKILL)
    conn = send(server, "/v1/completions", json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1}))
    r = conn.getresponse()
    payload, retry_after = json.loads(r.read()), r.getheader("Retry-After")
    conn.close()
    assert r.status == 503 and int(retry_after) > 0, payload
    assert payload["error"]["type"] == "server_error"
    assert not any(word in payload["error"]["message"] for word in ("Actor", "ComputeWorker", worker.actor_id))
    started = time.monotonic()
    conn = send(server, "/health", None, method="GET")
    assert conn.getresponse().status == 503 and time.monotonic() - started < 15  # promptly, not a timeout
    conn.close()

    def serving():
        try:
            return json.loads(http_get(f"{server}/health"))["status"] == "ok"
        except (TypeError, ValueError, KeyError):  # no JSON while the replica is replaced
            return False

    wait_until(serving, 300, "the app to serve again with a new worker")


# Structured outputs, tool calls and logit_bias (tests/finite_schema.py: a nested schema with a
# finite language; the grammar, not the model, decides the shape).
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"]}}}


def test_json_schema_response_parses_and_validates(client, model):
    import jsonschema

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe an admin user with two colour tags."}],
        max_tokens=60, temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "user", "strict": True, "schema": SCHEMA}})
    (choice,) = r.choices
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_required_tool_call_streams_as_tool_calls_with_valid_arguments(client, model):
    import jsonschema

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=60,
        temperature=0, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_logit_bias_removes_the_greedy_token(client, model, real_model_path):
    from workers.model.gguf_file import GGUFFile
    from workers.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_metadata(GGUFFile(real_model_path).metadata)
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=1, temperature=0)
    first = client.completions.create(**kwargs).choices[0].text
    (token,) = tokenizer.encode(first)
    again = client.completions.create(**kwargs, logit_bias={str(token): -100}).choices[0].text
    assert again != first


CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"


def test_a_speculating_server_gives_plain_greedy_text_and_counts_its_passes(client, model, cluster, real_engine):
    """The server speculates (the fixture's config): a greedy completion is the engine's plain
    greedy text, streamed or not, and the passes show in ntr_speculation_passes."""
    from workers.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain = "".join(e.text for e in real_engine.generate(real_engine.prompt_ids(CODE), params))
    kwargs = dict(model=model, prompt=CODE, max_tokens=40, temperature=0)
    assert client.completions.create(**kwargs).choices[0].text == plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == plain
    # each counter reaches the metrics endpoint on its own export: wait for both
    names = ("ray_ntr_speculation_passes_total", "ray_ntr_speculation_accepted_total")
    wait_until(lambda: all(cluster.metric(name) is not None for name in names), 60, "the speculation metrics")
    assert cluster.metric(names[0]) > 0
    assert cluster.metric(names[1]) > 0  # lookup keeps some of the code's repeats
