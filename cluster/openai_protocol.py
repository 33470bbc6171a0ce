"""OpenAI's completions and chat completions on the wire: request JSON -> prompts and
SamplingParams, worker events -> responses and stream chunks; and the tokenize/detokenize
bodies (vLLM's and llama-server's shapes).

Defaults and ranges are OpenAI's (temperature 1 in [0, 2], completions max_tokens 16,
chat generating until the context is full); top_k, min_p, repetition_penalty and
ignore_eos are accepted as the extensions vLLM and llama.cpp's server also accept.
No field is ignored: a field is honoured (CHAT_FIELDS, COMPLETION_FIELDS), informational
(INFORMATIONAL_FIELDS: it cannot change the output), or a 400 that names it. A field whose
value is null counts as absent, as OpenAI's API has it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from cluster.errors import APIError
from workers.engine.sampling import SamplingParams

MAX_N = 16
MAX_TOP_LOGPROBS = 20
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for completions; chat's is the rest of the context
MAX_TOKENIZE_CHARS = 1 << 20  # /tokenize's text; /detokenize's ids: MAX_DETOKENIZE_IDS
MAX_DETOKENIZE_IDS = 1 << 20

_SAMPLING_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty",
                              "presence_penalty", "logprobs", "stream", "stream_options",
                              "top_k", "min_p", "repetition_penalty", "ignore_eos"})  # the last four: extensions
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
# best_of only as n, suffix only empty, echo only without logprobs: anything else is a 400.
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "best_of", "suffix", "echo"}
# What OpenAI's clients send that cannot change the output: accepted and not used.
INFORMATIONAL_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                                  "prompt_cache_key"})
# Issue 20 part A's fields (structured outputs, tool calls, logit_bias): a 400 by name until they are honoured.
NOT_YET_SUPPORTED = frozenset({"response_format", "grammar", "tools", "tool_choice", "parallel_tool_calls",
                               "logit_bias"})
# Chat roles as the template gets them: OpenAI's "developer" is the system message of its newer models.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}
MESSAGE_FIELDS = frozenset({"role", "content", "name"})


@dataclass
class CompletionRequest:
    chat: bool
    model: str
    prompts: list  # each a string, a list of token ids, or chat messages
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: each choice's text begins with its prompt's
    system_fingerprint: str | None = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def choices(self) -> list[tuple[str | list, SamplingParams]]:
        """(prompt, params) per choice, index = prompt * n + i; seeded choices get seed + i so they differ."""
        p = self.params
        return [(prompt, p if p.seed is None else p.with_(seed=p.seed + i))
                for prompt in self.prompts for i in range(self.n)]


def json_body(raw: bytes) -> object:
    """A request body's JSON. Anything malformed is the client's error, whatever its shape: bad
    syntax or encoding, and nesting too deep for the parser (a RecursionError, not a ValueError)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


def _field(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {_shown(value)}",
                       param=name)
    return value


def _shown(value) -> str:
    text = repr(value)
    return text[:60] + "..." if len(text) > 64 else text


def _known_fields(body: dict, honoured: frozenset, where: str = "") -> None:
    """Every non-null field is honoured or informational; anything else is a 400 that names it."""
    for name, value in body.items():
        if value is None or name in honoured or name in INFORMATIONAL_FIELDS:
            continue
        if name in NOT_YET_SUPPORTED:
            raise APIError(400, f"'{name}' is not supported yet", param=name)
        raise APIError(400, f"unknown field '{name}'{where}: not supported (the informational fields that "
                            f"may pass: {', '.join(sorted(INFORMATIONAL_FIELDS))})", param=name)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        if m["role"] not in ROLES:
            raise APIError(400, f"messages[{i}].role {_shown(m['role'])} is not supported "
                                f"(supported: {', '.join(ROLES)})", param=f"messages[{i}].role")
        extra = next((k for k, v in m.items() if v is not None and k not in MESSAGE_FIELDS), None)
        if extra is not None:
            raise APIError(400, f"messages[{i}].{extra} is not supported", param=f"messages[{i}].{extra}")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: only text is supported
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts",
                           param=f"messages[{i}].content")
        message = {"role": ROLES[m["role"]], "content": content}
        if m.get("name") is not None:  # the template decides whether the speaker's name shows
            if not isinstance(m["name"], str):
                raise APIError(400, f"messages[{i}].name must be a string", param=f"messages[{i}].name")
            message["name"] = m["name"]
        out.append(message)
    return out


def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return prompt
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_request(body, chat: bool, served_model: str, max_context: int,
                  default_max_tokens: int | None = None, system_fingerprint: str | None = None) -> CompletionRequest:
    """default_max_tokens: when the body has none (None: OpenAI's for the endpoint). A default is
    cut to the room the prompt leaves; a max_tokens asked for must fit (the worker checks it)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _known_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = _model(body, served_model)
    prompts = [_messages(body)] if chat else _prompts(body)
    number = (int, float)
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    if chat:
        max_tokens = _field(body, "max_completion_tokens", (int,), None)
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", (int,), None)
        top = _field(body, "top_logprobs", (int,), None)
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        if _field(body, "logprobs", (bool,), False):
            logprobs = top or 0
        elif top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        else:
            logprobs = None
    else:
        max_tokens = _field(body, "max_tokens", (int,), None)
        logprobs = _field(body, "logprobs", (int,), None)
        _completion_only_fields(body, n, logprobs)
    temperature = _field(body, "temperature", number, 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):  # their number and length: SamplingParams, as for every entry point
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    default = default_max_tokens or (max_context if chat else COMPLETIONS_MAX_TOKENS)
    try:
        params = SamplingParams(
            temperature=float(temperature), top_p=_field(body, "top_p", number, 1.0),
            top_k=_field(body, "top_k", (int,), 0), min_p=_field(body, "min_p", number, 0.0),
            seed=_field(body, "seed", (int,), None),
            repetition_penalty=_field(body, "repetition_penalty", number, 1.0),
            frequency_penalty=_field(body, "frequency_penalty", number, 0.0),
            presence_penalty=_field(body, "presence_penalty", number, 0.0),
            max_tokens=default if max_tokens is None else max_tokens, cut_to_context=max_tokens is None,
            stop=tuple(stop), logprobs=logprobs,
            ignore_eos=_field(body, "ignore_eos", (bool,), False))
    except ValueError as e:
        name = re.match(r"invalid sampling parameter (\w+)=", str(e))
        raise APIError(400, str(e), param=name and name.group(1)) from None
    stream = _field(body, "stream", (bool,), False)
    return CompletionRequest(chat=chat, model=model, prompts=prompts, params=params, n=n, stream=stream,
                             include_usage=_include_usage(body, stream), echo=_field(body, "echo", (bool,), False),
                             system_fingerprint=system_fingerprint)


def _model(body: dict, served_model: str) -> str:
    return check_model(_field(body, "model", (str,), served_model), served_model)


def check_model(model: str, served_model: str) -> str:
    """The served model's id, or OpenAI's 404 for another."""
    if model != served_model:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    return model


def _completion_only_fields(body: dict, n: int, logprobs: int | None) -> None:
    """best_of and suffix: accepted only where they leave the output as it is; echo only
    without logprobs (an echoed prompt's logprobs would need a scoring pass)."""
    best_of = _field(body, "best_of", (int,), None)
    if best_of is not None and best_of != n:
        raise APIError(400, f"'best_of' must equal 'n' ({n}), got {best_of}: choosing the best of more "
                            "candidates than are returned is not supported", param="best_of")
    if _field(body, "suffix", (str,), ""):
        raise APIError(400, "'suffix' (text after the completion) is not supported", param="suffix")
    if _field(body, "echo", (bool,), False) and logprobs is not None:
        raise APIError(400, "'echo' with 'logprobs' is not supported (the prompt's logprobs are not computed)",
                       param="echo")


def _include_usage(body: dict, stream: bool) -> bool:
    options = _field(body, "stream_options", (dict,), None)
    if options is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    extra = next((k for k, v in options.items() if v is not None and k != "include_usage"), None)
    if extra is not None:
        raise APIError(400, f"stream_options.{extra} is not supported", param=f"stream_options.{extra}")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise APIError(400, f"stream_options.include_usage must be a boolean, got {_shown(include)}",
                       param="stream_options.include_usage")
    return bool(include)


def parse_tokenize(body, served_model: str) -> tuple[str | list[dict], bool]:
    """(text or chat messages, add_special) from vLLM's {"prompt"} / {"messages"} or llama-server's
    {"content"}. add_special (BOS as the model's metadata says) defaults as each server has it:
    vLLM's add_special_tokens true, llama-server's add_special false. Messages give the ids a
    chat completion is prompted with, the template's special tokens included."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _known_fields(body, frozenset({"model", "prompt", "content", "messages", "add_special_tokens", "add_special",
                                   "add_generation_prompt"}))
    _model(body, served_model)
    given = [k for k in ("prompt", "content", "messages") if body.get(k) is not None]
    if len(given) != 1:
        raise APIError(400, "send one of 'prompt' (a string), 'content' (a string) or 'messages' (chat messages)",
                       param=given[1] if given else "prompt")
    (kind,) = given
    if kind == "messages":
        for name in ("add_special_tokens", "add_special"):
            if body.get(name) is not None:
                raise APIError(400, f"'{name}' does not apply to 'messages': the template writes the special tokens",
                               param=name)
        if not _field(body, "add_generation_prompt", (bool,), True):
            raise APIError(400, "'add_generation_prompt': false is not supported", param="add_generation_prompt")
        return _messages(body), True
    if body.get("add_generation_prompt") is not None:
        raise APIError(400, "'add_generation_prompt' applies to 'messages' only", param="add_generation_prompt")
    text = _field(body, kind, (str,))
    if len(text) > MAX_TOKENIZE_CHARS:
        raise APIError(400, f"'{kind}' must be at most {MAX_TOKENIZE_CHARS} characters, got {len(text)}", param=kind)
    flag = "add_special_tokens" if kind == "prompt" else "add_special"
    other = "add_special" if kind == "prompt" else "add_special_tokens"
    if body.get(other) is not None:
        raise APIError(400, f"'{other}' goes with {'content' if kind == 'prompt' else 'prompt'}; "
                            f"with '{kind}' send '{flag}'", param=other)
    return text, _field(body, flag, (bool,), kind == "prompt")


def parse_detokenize(body, served_model: str, vocab_size: int) -> list[int]:
    """{"tokens": [ids]} (vLLM's and llama-server's shape), each id in the vocabulary."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _known_fields(body, frozenset({"model", "tokens"}))
    _model(body, served_model)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
    if len(tokens) > MAX_DETOKENIZE_IDS:
        raise APIError(400, f"'tokens' must hold at most {MAX_DETOKENIZE_IDS} ids, got {len(tokens)}", param="tokens")
    bad = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"tokens[{bad}] = {tokens[bad]} is outside the vocabulary [0, {vocab_size})",
                       param="tokens")
    return tokens


def _token(raw: list[int]) -> str:
    return bytes(raw).decode("utf-8", errors="replace")


class Choice:
    """One choice's text, finish reason and logprobs as its events arrive, and its stream entries.

    A stream entry carries text or a finish reason, never neither: a token whose text is held
    back (part of a UTF-8 character, a possible stop string, the end-of-sequence token) adds no
    entry of its own, and its logprob rides with the next entry sent (the finishing one at the
    latest), so a stream's logprobs, joined, are the whole response's."""

    def __init__(self, request: CompletionRequest, index: int, echo: str = ""):
        """echo: the prompt's text, which begins the choice's (request.echo)."""
        self.request, self.index, self.echo = request, index, echo
        self.text, self.finish_reason, self.tokens = [echo], None, 0
        self.logprobs = [] if request.params.logprobs is not None else None
        self.sent_logprobs = 0  # entries of self.logprobs already in a stream entry
        self.offset = 0

    def opening(self) -> list[dict]:
        """The stream's first entries: chat's role alone, as OpenAI sends it; an echoed prompt."""
        if not self.request.chat:
            return [{"index": self.index, "text": self.echo, "logprobs": None, "finish_reason": None}] if self.echo else []
        return [{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def add(self, event: dict) -> list[dict]:
        """Record an event; returns its stream entries: its text if any, then the finish reason
        in an entry of its own (an empty delta, or empty text), as OpenAI ends a choice."""
        text, finish = event["text"], event["finish_reason"]
        self.text.append(text)
        self.finish_reason = finish
        self.tokens += 1
        if self.logprobs is not None:
            self.logprobs.append(self._logprob_entry(event))
            self.offset += len(text)
        out = [self._stream_entry(text, None)] if text else []
        if finish is not None:
            out.append(self._stream_entry("", finish))
        return out

    def _logprob_entry(self, event: dict) -> dict:
        token, lp, top = _token(event["bytes"]), event["logprob"], event["top_logprobs"]
        if self.request.chat:
            return {"token": token, "logprob": lp, "bytes": event["bytes"],
                    "top_logprobs": [{"token": _token(b), "logprob": v, "bytes": b} for b, v in top]}
        return {"tokens": [token], "token_logprobs": [lp], "text_offset": [self.offset],
                "top_logprobs": [{_token(b): v for b, v in top}]}

    def _stream_entry(self, text: str, finish: str | None) -> dict:
        logprobs = None
        if self.logprobs is not None and self.sent_logprobs < len(self.logprobs):
            logprobs = self._logprobs(self.logprobs[self.sent_logprobs:])
            self.sent_logprobs = len(self.logprobs)
        body = {"delta": {"content": text} if text else {}} if self.request.chat else {"text": text}
        return {"index": self.index, **body, "logprobs": logprobs, "finish_reason": finish}

    def final(self) -> dict:
        text = "".join(self.text)
        out = {"index": self.index, "finish_reason": self.finish_reason,
               "logprobs": None if self.logprobs is None else self._logprobs(self.logprobs)}
        if self.request.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    def _logprobs(self, entries: list[dict]) -> dict:
        if self.request.chat:
            return {"content": entries}
        return {k: [v for entry in entries for v in entry[k]]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(request: CompletionRequest, kind: str) -> dict:
    return {"id": request.id, "object": kind, "created": request.created, "model": request.model,
            "system_fingerprint": request.system_fingerprint}


def response(request: CompletionRequest, choices: list[Choice], prompt_tokens: int) -> dict:
    return {**_envelope(request, "chat.completion" if request.chat else "text_completion"),
            "choices": [c.final() for c in choices],
            "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}


def chunk(request: CompletionRequest, entry: dict | None, usage_: dict | None = None) -> dict:
    """A stream chunk: one choice's entry, or (entry None) the closing usage chunk. With
    include_usage every other chunk says "usage": null, as OpenAI's do."""
    out = {**_envelope(request, "chat.completion.chunk" if request.chat else "text_completion"),
           "choices": [] if entry is None else [entry]}
    if request.include_usage:
        out["usage"] = usage_
    return out
