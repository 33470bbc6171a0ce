"""The OpenAI wire format and the error taxonomy, without a server."""

from __future__ import annotations

import pickle

import grpc
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from cluster.errors import APIError
from cluster.openai_protocol import (INFORMATIONAL_FIELDS, Choice, chunk, json_body,
                                     parse_detokenize, parse_request, parse_tokenize, response)
from workers.compute_worker import WorkerFailed
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
    ({"prompt": 5}, 400, "'prompt' must be"),
    ([1, 2], 400, "JSON object"),
    ({"prompt": "a", "top_k": -5}, 400, "top_k=-5"),
    ({"prompt": "a", "stop": [""]}, 400, "stop="),
    ({"prompt": "a", "stop": ["x" * 1_000_000] * 4}, 400, "stop="),
])
def test_bad_fields(body, status, words):
    with pytest.raises(APIError) as e:
        parse_request(body, chat=False, served_model=M, max_context=4096)
    assert e.value.status == status and words in e.value.message
    assert e.value.body()["error"]["message"] == e.value.message
    if status == 400 and isinstance(body, dict):
        assert e.value.param == next((k for k in body if k != "prompt"), "prompt"), "the error names the field"


def test_only_an_asked_max_tokens_must_fit_the_context():
    """The worker refuses prompt + max_tokens past the context; a default is cut to what is left."""
    omitted = parse_request({"prompt": "a"}, False, M, 4096).params
    chat = parse_request({"messages": [{"role": "user", "content": "a"}]}, True, M, 4096).params
    asked = parse_request({"prompt": "a", "max_tokens": 10**9}, False, M, 4096).params
    assert (omitted.max_tokens, omitted.cut_to_context) == (16, True)
    assert chat.cut_to_context and not asked.cut_to_context


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a": ', b"\xff\xfe{}", b'{"a": 1e999999}x'])
def test_malformed_json_of_any_shape_is_a_400(raw):
    with pytest.raises(APIError) as e:
        json_body(raw)
    assert e.value.status == 400 and "not valid JSON" in e.value.message


def test_a_dead_or_restarting_worker_is_a_503_that_names_no_internals():
    died = ActorDiedError()
    for e in (died, ActorUnavailableError("ComputeWorker abc123 is unreachable", b"\x00" * 16)):
        error = APIError.from_exception(e)
        assert (error.status, error.grpc_code) == (503, grpc.StatusCode.UNAVAILABLE)
        assert int(error.headers["Retry-After"]) > 0
        assert "Actor" not in error.message and "ComputeWorker" not in error.message


@pytest.mark.parametrize("exc, status, code", [
    (QueueFull("busy"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ContextLengthError("too long"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    (ContextLengthError("max_tokens=9 does not fit", param="max_tokens"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound("no such model"), 404, grpc.StatusCode.NOT_FOUND),
    (ValueError("bad"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("boom"), 500, grpc.StatusCode.INTERNAL),
    (WorkerFailed("the compute worker failed: TimeoutError: a forward pass has not finished in 330 s"), 503,
     grpc.StatusCode.UNAVAILABLE),
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
                      True, M, 4096, system_fingerprint="fp_x")
    choice = Choice(r, 0)
    event = {"token_id": 5, "text": "Hi", "finish_reason": None, "logprob": -0.5, "bytes": [72, 105],
             "top_logprobs": [([72, 105], -0.5)]}
    (entry,) = choice.add(event)
    assert entry["delta"] == {"content": "Hi"}
    assert entry["logprobs"]["content"][0]["top_logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]
    assert chunk(r, entry)["system_fingerprint"] == "fp_x" and "usage" not in chunk(r, entry)
    choice.add({**event, "text": "!", "bytes": [33], "finish_reason": "stop"})
    body = response(r, [choice], prompt_tokens=3)
    assert body["choices"][0]["message"]["content"] == "Hi!" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert len(body["choices"][0]["logprobs"]["content"]) == 2 and body["system_fingerprint"] == "fp_x"


def _events(tokens: list[tuple[bytes, str, str | None]]) -> list[dict]:
    """Worker events for (token bytes, released text, finish reason), each with a distinct logprob."""
    return [{"token_id": i, "text": text, "finish_reason": finish, "logprob": -0.25 * (i + 1), "bytes": list(raw),
             "top_logprobs": [(list(raw), -0.25 * (i + 1))]} for i, (raw, text, finish) in enumerate(tokens)]


# "H", "é" split over two byte tokens (the first releases no text), "!" held back as a possible
# stop string then released with the next token's text, and the end-of-sequence token (no text)
SPLIT = [(b"H", "H", None), (b"\xc3", "", None), (b"\xa9", "\u00e9", None), (b"!", "", None), (b"?", "!?", None),
         (b"<|im_end|>", "", "stop")]


@pytest.mark.parametrize("chat", [True, False])
def test_stream_entries_are_openais_and_carry_every_logprob(chat):
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1} if chat else \
        {"prompt": "x", "logprobs": 1}
    r = parse_request({**body, "stream": True, "stream_options": {"include_usage": True}}, chat, M, 4096)
    streamed, whole = Choice(r, 0), Choice(r, 0)
    entries = streamed.opening()
    for event in _events(SPLIT):
        entries += streamed.add(event)
        whole.add(event)
    if chat:
        assert entries[0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}
        entries = entries[1:]
    texts = [e["delta"].get("content") if chat else e["text"] for e in entries]
    assert texts == ["H", "\u00e9", "!?", None if chat else ""], "no empty text but the finishing entry's"
    assert [e["finish_reason"] for e in entries] == [None, None, None, "stop"]
    if chat:
        assert entries[-1]["delta"] == {}
    # each token's logprob once, in order: a token without text rides with the next entry sent
    final = whole.final()["logprobs"]
    if chat:
        assert [len(e["logprobs"]["content"]) for e in entries] == [1, 2, 2, 1]
        assert [t for e in entries for t in e["logprobs"]["content"]] == final["content"]
    else:
        joined = {k: [v for e in entries for v in e["logprobs"][k]] for k in final}
        assert joined == final and len(final["tokens"]) == len(SPLIT)
        assert final["text_offset"] == [0, 1, 1, 2, 2, 4]
    assert [c["usage"] for c in map(lambda e: chunk(r, e), entries)] == [None] * len(entries)
    assert chunk(r, None, {"total_tokens": 1})["choices"] == []


def test_an_echoed_prompt_begins_the_text_and_the_stream():
    r = parse_request({"prompt": "ab", "echo": True, "stream": True}, False, M, 4096)
    assert r.echo
    choice = Choice(r, 0, echo="ab")
    entries = choice.opening() + choice.add(_events([(b"c", "c", "stop")])[0])
    assert [e["text"] for e in entries] == ["ab", "c", ""] and choice.final()["text"] == "abc"
    assert choice.tokens == 1 and Choice(r, 0).opening() == []


def test_an_echo_with_logprobs_scores_the_prompt_and_sends_it_with_them():
    """The prompt's tokens' logprobs (the worker's event before the first token's) begin the
    choice's, the first token's None as OpenAI's; streamed, they go out with the echoed text
    (nothing before them), and the generated tokens' offsets count from the echo's end."""
    r = parse_request({"prompt": "Hi", "echo": True, "logprobs": 1, "stream": True}, False, M, 4096)
    assert r.params.prompt_logprobs == 1 and parse_request({"prompt": "Hi", "logprobs": 1}, False, M,
                                                            4096).params.prompt_logprobs is None
    prompt = {"prompt_logprobs": [{"token_id": 5, "bytes": list(b"H"), "logprob": None, "top_logprobs": None},
                                  {"token_id": 6, "bytes": list(b"i"), "logprob": -1.5,
                                   "top_logprobs": [(list(b"!"), -0.5)]}]}
    streamed, whole = Choice(r, 0, echo="Hi"), Choice(r, 0, echo="Hi")
    assert streamed.opening() == []
    entries = streamed.add(prompt)
    whole.add(prompt)
    for event in _events([(b"!", "!", "length")]):
        entries += streamed.add(event)
        whole.add(event)
    final = whole.final()
    assert final["text"] == "Hi!" and whole.tokens == 1
    assert final["logprobs"] == {"tokens": ["H", "i", "!"], "token_logprobs": [None, -1.5, -0.25],
                                 "top_logprobs": [None, {"!": -0.5}, {"!": -0.25}], "text_offset": [0, 1, 2]}
    assert [e["text"] for e in entries] == ["Hi", "!", ""]
    joined = {k: [v for e in entries if e["logprobs"] for v in e["logprobs"][k]] for k in final["logprobs"]}
    assert joined == final["logprobs"]


@pytest.mark.parametrize("stream", [False, True])
def test_an_echo_of_max_tokens_0_is_the_scored_prompt_alone(stream):
    """max_tokens 0 with echo (a text scored, as legacy OpenAI and vLLM allow): one token is
    asked of the worker (drawn beside the prompt's scores, no pass of its own) and reported by
    no choice: the text is the prompt's, the logprobs its tokens', no completion token, length."""
    r = parse_request({"prompt": "Hi", "echo": True, "max_tokens": 0, "logprobs": 1, "stream": stream}, False, M, 4096)
    assert r.echo_only and r.params.max_tokens == 1 and r.params.prompt_logprobs == 1
    prompt = {"prompt_logprobs": [{"token_id": 5, "bytes": list(b"Hi"), "logprob": None, "top_logprobs": None}]}
    choice = Choice(r, 0, echo="Hi")
    entries = choice.opening() + choice.add(prompt) + choice.add(_events([(b"!", "!", "stop")])[0])
    final = choice.final()
    assert final["text"] == "Hi" and final["finish_reason"] == "length" and choice.tokens == 0
    assert final["logprobs"]["tokens"] == ["Hi"] and final["logprobs"]["token_logprobs"] == [None]
    assert [(e["text"], e["finish_reason"]) for e in entries] == [("Hi", None), ("", "length")]
    with pytest.raises(APIError, match="max_tokens"):  # without echo there is nothing to return
        parse_request({"prompt": "Hi", "max_tokens": 0}, False, M, 4096)


def test_the_last_tokens_text_and_the_finish_reason_are_two_entries():
    r = parse_request({"prompt": "x", "stream": True}, False, M, 4096)
    entries = Choice(r, 0).add(_events([(b"a", "a", "length")])[0])
    assert [(e["text"], e["finish_reason"], e["logprobs"]) for e in entries] == [("a", None, None), ("", "length", None)]


CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("chat, body, param, words", [
    (False, {"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
    (True, {**CHAT, "best_of": 2}, "best_of", "unknown field"),
    (True, {**CHAT, "functions": [{"name": "f"}]}, "functions", "unknown field"),
    (False, {"prompt": "a", "best_of": 3}, "best_of", "'best_of' must equal 'n' (1)"),
    (False, {"prompt": "a", "best_of": 1, "n": 2}, "best_of", "must equal 'n' (2)"),
    (False, {"prompt": "a", "best_of": "2"}, "best_of", "must be int"),
    (False, {"prompt": "a", "suffix": "}"}, "suffix", "'suffix'"),
    (False, {"prompt": "a", "echo": 1}, "echo", "must be bool"),
    (True, {**CHAT, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs': true"),
    (True, {**CHAT, "logprobs": False, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs': true"),
    (True, {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    (True, {**CHAT, "logprobs": 2}, "logprobs", "'logprobs' must be bool"),
    (True, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'wizard' is not supported"),
    (True, {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name", "must be a string"),
    (True, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "text"),
    (True, {**CHAT, "stream": "yes"}, "stream", "'stream' must be bool"),
    (True, {**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only allowed with 'stream'"),
    (True, {**CHAT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "must be a boolean"),
    (True, {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats", "not supported"),
    (False, {"prompt": "a", "n": 1.5}, "n", "'n' must be int"),
])
def test_a_field_that_would_change_the_output_is_honoured_or_named_in_a_400(chat, body, param, words):
    with pytest.raises(APIError) as e:
        parse_request(body, chat, M, 4096)
    assert (e.value.status, e.value.param) == (400, param) and words in e.value.message, e.value.message


@pytest.mark.parametrize("name", ["tools", "tool_choice", "parallel_tool_calls"])
def test_tool_fields_are_chat_only(name):
    with pytest.raises(APIError) as e:
        parse_request({"prompt": "a", name: "auto"}, False, M, 4096)
    assert (e.value.status, e.value.param) == (400, name) and "unknown field" in e.value.message


def test_informational_fields_and_nulls_pass_and_honoured_ones_are_honoured():
    info = {name: "x" for name in INFORMATIONAL_FIELDS} | {"metadata": {"k": "v"}, "store": False}
    nulls = {"frobnicate": None, "response_format": None, "suffix": None, "best_of": None}
    r = parse_request({"prompt": "a", "n": 2, "best_of": 2, "suffix": "", "echo": False, **info, **nulls},
                      False, M, 4096)
    assert r.n == 2
    c = parse_request({"messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": "x", "name": "ann", "tool_calls": None}],
                       "stream": True, "stream_options": {"include_usage": True}, **info}, True, M, 4096)
    assert c.prompts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x", "name": "ann"}]]
    assert c.include_usage and c.params.logprobs is None


def test_tokenize_and_detokenize_bodies():
    assert parse_tokenize({"model": M, "prompt": "hi"}, M) == ("hi", True)  # vLLM: BOS by default
    assert parse_tokenize({"content": "hi"}, M) == ("hi", False)  # llama-server: none by default
    assert parse_tokenize({"prompt": "hi", "add_special_tokens": False}, M) == ("hi", False)
    assert parse_tokenize({"content": "hi", "add_special": True}, M) == ("hi", True)
    assert parse_tokenize({**CHAT, "add_generation_prompt": True}, M) == ([{"role": "user", "content": "x"}], True)
    assert parse_detokenize({"tokens": [0, 5, 9]}, M, vocab_size=10) == [0, 5, 9]
    assert parse_detokenize({"tokens": []}, M, vocab_size=10) == []


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": 5}, "prompt", "'prompt' must be str"),
    ({}, "prompt", "send one of"),
    ({"prompt": "a", "content": "b"}, "content", "send one of"),
    ({"prompt": "a", "add_special": True}, "add_special", "with 'prompt' send 'add_special_tokens'"),
    ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", "must be bool"),
    ({**CHAT, "add_special_tokens": True}, "add_special_tokens", "does not apply to 'messages'"),
    ({**CHAT, "add_generation_prompt": False}, "add_generation_prompt", "not supported"),
    ({"prompt": "a", "return_token_strs": True}, "return_token_strs", "unknown field"),
    ({"prompt": "a", "model": "other"}, "model", "does not exist"),
    ({"prompt": "x" * (2**20 + 1)}, "prompt", "at most 1048576 characters"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "not supported"),
])
def test_bad_tokenize_bodies(body, param, words):
    with pytest.raises(APIError) as e:
        parse_tokenize(body, M)
    assert e.value.param == param and words in e.value.message, e.value.message


@pytest.mark.parametrize("body, words", [
    ({"tokens": [1, 10]}, "tokens[1] = 10 is outside the vocabulary [0, 10)"),
    ({"tokens": [-1]}, "tokens[0] = -1"),
    ({"tokens": [1, True]}, "list of token ids"),
    ({"tokens": "1 2"}, "list of token ids"),
    ({"tokens": [0] * (2**20 + 1)}, "at most 1048576 ids"),
    ({"tokens": [1], "skip_special_tokens": True}, "unknown field 'skip_special_tokens'"),
])
def test_bad_detokenize_bodies(body, words):
    with pytest.raises(APIError) as e:
        parse_detokenize(body, M, vocab_size=10)
    assert e.value.status == 400 and words in e.value.message, e.value.message


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT = {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "bogus"}}, "response_format", "'response_format.type' must be"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "no-such"}}}},
     "response_format", "no-such"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar", "cannot be used together"),
    ({"grammar": 'root ::= undefined-rule'}, "grammar", "undefined-rule"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids as strings"),
    ({"logit_bias": {"5": "x"}}, "logit_bias", "must be numbers"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": [1]}, "logit_bias", "'logit_bias' must be an object"),
    ({"tools": "notalist"}, "tools", "'tools' must be a list"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice",
     "one of the tools"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
])
def test_bad_structured_output_and_tool_fields(body, param, words):
    with pytest.raises(APIError) as e:
        parse_request({**CHAT, **body}, chat=True, served_model=M, max_context=4096)
    assert e.value.status == 400 and words in e.value.message and e.value.param == param


def test_structured_output_and_tool_fields_become_params():
    r = parse_request({**CHAT, "logit_bias": {"9707": -100, "5": 2.5},
                       "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                                  "schema": {"type": "object"}}}},
                      True, M, 4096)
    assert r.params.logit_bias == ((9707, -100.0), (5, 2.5)) and r.params.grammar.kind == "json_schema"
    assert parse_request({"prompt": "a", "grammar": 'root ::= "a"'}, False, M, 4096).params.grammar.kind == "gbnf"
    auto = parse_request({**CHAT, "tools": [TOOL]}, True, M, 4096)
    assert auto.tools == [TOOL] and auto.params.grammar is None
    assert parse_request({**CHAT, "tools": [TOOL], "tool_choice": "none"}, True, M, 4096).tools is None
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = parse_request({**CHAT, "tools": [TOOL], "tool_choice": choice}, True, M, 4096)
        assert forced.tools == [TOOL] and forced.params.grammar.kind == "lark"
    history = parse_request({"messages": [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]}, True, M, 4096)
    messages = history.prompts[0]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object, for templates
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}


def test_tool_calls_in_responses_and_chunks():
    r = parse_request({**CHAT, "tools": [TOOL]}, True, M, 4096)
    events = [{"token_id": 1, "text": "<tool_call>", "finish_reason": None},
              {"token_id": 2, "text": '\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n', "finish_reason": None},
              {"token_id": 3, "text": "</tool_call>", "finish_reason": None},
              {"token_id": 4, "text": "", "finish_reason": "stop"}]
    streamed, choice = Choice(r, 0), Choice(r, 0)
    entries = [[chunk(r, entry)["choices"][0] for entry in streamed.add(e)] for e in events]
    # the header and the closing tag send nothing; no entry has content
    assert [len(x) for x in entries] == [0, 1, 0, 1]
    (start,) = entries[1][0]["delta"]["tool_calls"]  # id and name once the header is read, then arguments
    assert "content" not in entries[1][0]["delta"] and entries[1][0]["finish_reason"] is None
    assert start["index"] == 0 and start["type"] == "function" and start["id"].startswith("call_")
    assert start["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert entries[3][0]["delta"] == {} and entries[3][0]["finish_reason"] == "tool_calls"
    for e in events:
        choice.add(e)
    final = response(r, [choice], prompt_tokens=1)["choices"][0]
    assert final["finish_reason"] == "tool_calls" and final["message"]["content"] is None
    assert final["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    plain = Choice(r, 0)
    plain.add({"token_id": 1, "text": "It is cold.", "finish_reason": "stop"})
    assert response(r, [plain], 1)["choices"][0]["message"] == {"role": "assistant", "content": "It is cold."}


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
