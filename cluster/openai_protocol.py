"""OpenAI's completions and chat completions on the wire: request JSON -> prompts and
SamplingParams, worker events -> responses and stream chunks.

Defaults and ranges are OpenAI's (temperature 1 in [0, 2], completions max_tokens 16,
chat generating until the context is full); top_k, min_p, repetition_penalty and
ignore_eos are accepted as the extensions vLLM and llama.cpp's server also accept.
Unknown fields are ignored, as OpenAI's own clients may send newer ones.

Structured output: `response_format` (json_object, json_schema) and llama-server's `grammar`
(GBNF) become the request's GrammarSpec (workers/engine/grammar.py); `logit_bias` maps token
ids (as strings) to biases in [-100, 100]. Tools (chat): `tools` are rendered by the model's
chat template, its `<tool_call>` blocks come back as `tool_calls` (workers/model/
tool_calls.py); `tool_choice` `required` or a named function constrains the output to calls.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from cluster.errors import APIError
from workers.engine.grammar import JSON_OPTIONS, GrammarSpec
from workers.engine.sampling import SamplingParams
from workers.model.tool_calls import ToolCallParser, tool_call_grammar

MAX_N = 16
MAX_TOOLS = 128
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for completions; chat's is the rest of the context


@dataclass
class CompletionRequest:
    chat: bool
    model: str
    prompts: list  # each a string, a list of token ids, or chat messages
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    tools: list | None = None  # rendered into the chat prompt; the output is parsed for calls
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
        raise APIError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {value!r}",
                       param=name)
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: only text is supported
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts", param="messages")
        message = {"role": m["role"], "content": content}
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _history_calls(m["tool_calls"], i)
        for name in ("tool_call_id", "name"):
            if m.get(name) is not None:
                if not isinstance(m[name], str):
                    raise APIError(400, f"messages[{i}].{name} must be a string", param="messages")
                message[name] = m[name]
        out.append(message)
    return out


def _history_calls(calls, i: int) -> list[dict]:
    """An assistant message's tool_calls as chat templates read them: arguments as an object
    (OpenAI sends them as JSON text; Qwen's template writes `arguments | tojson`)."""
    if not isinstance(calls, list):
        raise APIError(400, f"messages[{i}].tool_calls must be a list", param="messages")
    out = []
    for call in calls:
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise APIError(400, f"messages[{i}].tool_calls: each needs a function with a string name", param="messages")
        arguments = f.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise APIError(400, f"messages[{i}].tool_calls: arguments of {f['name']!r} are not valid JSON",
                               param="messages") from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": f["name"], "arguments": arguments}})
    return out


def _tools(body: dict) -> tuple[list | None, GrammarSpec | None]:
    """The tools to render (None: none, or tool_choice none) and the grammar tool_choice asks for."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None, None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise APIError(400, f"'tools' must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    for i, tool in enumerate(tools):
        f = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param="tools")
        if not isinstance(f.get("parameters", {}), dict) or not isinstance(f.get("description", ""), str):
            raise APIError(400, f"tools[{i}].function: 'parameters' must be an object, 'description' a string",
                           param="tools")
    parallel = _field(body, "parallel_tool_calls", (bool,), True)
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None, None
    if choice == "auto":
        return tools, None
    if choice == "required":
        chosen = tools
    else:
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict) else None
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                           "\"function\": {\"name\": <one of the tools>}}", param="tool_choice")
        parallel = False
    return tools, _spec("lark", tool_call_grammar(chosen, parallel, JSON_OPTIONS), "tools")


def _spec(kind: str, source: str, param: str) -> GrammarSpec:
    try:
        return GrammarSpec(kind, source)
    except ValueError as e:
        raise APIError(400, f"'{param}': {e}", param=param) from None


def _grammar(body: dict) -> GrammarSpec | None:
    """response_format or grammar (at most one of them) as the request's grammar."""
    fmt = _field(body, "response_format", (dict,), None, "an object")
    grammar = _field(body, "grammar", (str,), None)
    kind = None if fmt is None else fmt.get("type")
    if fmt is not None and kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param="response_format")
    if grammar is not None and kind not in (None, "text"):
        raise APIError(400, "'grammar' and a JSON 'response_format' cannot be used together", param="grammar")
    if grammar is not None:
        return _spec("gbnf", grammar, "grammar")
    if kind == "json_object":
        return _spec("json_object", "", "response_format")
    if kind == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema", {}), (dict, bool)):
            raise APIError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                           param="response_format")
        if not isinstance(schema.get("strict", False), bool) and schema.get("strict") is not None:
            raise APIError(400, "'response_format.json_schema.strict' must be a boolean", param="response_format")
        # strict or not, the schema is enforced: OpenAI's non-strict mode only promises less
        return _spec("json_schema", json.dumps(schema.get("schema", {})), "response_format")
    return None


def _logit_bias(body: dict) -> dict[int, float]:
    bias = _field(body, "logit_bias", (dict,), {}, "an object mapping token ids to biases")
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"[0-9]{1,9}", key):
            raise APIError(400, f"'logit_bias' keys must be token ids as strings, got {key[:40]!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"'logit_bias' values must be numbers, got {value!r} for {key}", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)  # noqa: E731
    if isinstance(prompt, str) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return prompt
    raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


def parse_request(body, chat: bool, served_model: str, max_context: int,
                  default_max_tokens: int | None = None) -> CompletionRequest:
    """default_max_tokens: when the body has none (None: OpenAI's for the endpoint). A default is
    cut to the room the prompt leaves; a max_tokens asked for must fit (the worker checks it)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,), served_model)
    if model != served_model:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    prompts = [_messages(body)] if chat else _prompts(body)
    tools, grammar = _tools(body) if chat else (None, None)
    asked = _grammar(body)
    if asked is not None and grammar is not None:
        raise APIError(400, "a 'response_format' or 'grammar' cannot be combined with a 'tool_choice' that "
                       "forces a call", param="response_format")
    grammar = grammar or asked
    number = (int, float)
    if chat:
        max_tokens = _field(body, "max_completion_tokens", (int,), None)
        if max_tokens is None:
            max_tokens = _field(body, "max_tokens", (int,), None)
        logprobs = (_field(body, "top_logprobs", (int,), 0) if _field(body, "logprobs", (bool,), False) else None)
    else:
        max_tokens = _field(body, "max_tokens", (int,), None)
        logprobs = _field(body, "logprobs", (int,), None)
        if _field(body, "echo", (bool,), False):
            raise APIError(400, "'echo' is not supported", param="echo")
    temperature = _field(body, "temperature", number, 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):  # their number and length: SamplingParams, as for every entry point
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
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
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
            logit_bias=_logit_bias(body), grammar=grammar)
    except ValueError as e:
        name = re.match(r"invalid sampling parameter (\w+)=", str(e))
        raise APIError(400, str(e), param=name and name.group(1)) from None
    options = _field(body, "stream_options", (dict,), {})
    return CompletionRequest(chat=chat, model=model, prompts=prompts, params=params, n=n,
                             stream=_field(body, "stream", (bool,), False),
                             include_usage=bool(options.get("include_usage")), tools=tools)


def _token(raw: list[int]) -> str:
    return bytes(raw).decode("utf-8", errors="replace")


class Choice:
    """One choice's text, finish reason and logprobs as its events arrive."""

    def __init__(self, request: CompletionRequest, index: int):
        self.request, self.index = request, index
        self.text, self.finish_reason, self.tokens = [], None, 0
        self.logprobs = [] if request.params.logprobs is not None else None
        self.offset = 0
        self.tool_parser = ToolCallParser() if request.tools else None
        self.tool_calls: list[dict] = []
        self.content: list[str] = []  # with tools: the text outside the calls
        self.delta: dict = {}  # the last event's chat delta: content, and the tool-call pieces it holds

    def add(self, event: dict) -> dict | None:
        """Record an event; returns its logprobs in the response's format (None without logprobs)."""
        self.text.append(event["text"])
        self.finish_reason = event["finish_reason"]
        self.tokens += 1
        if self.request.chat:
            self._delta(event)
        if self.logprobs is None:
            return None
        token, lp = _token(event["bytes"]), event["logprob"]
        if self.request.chat:
            entry = {"token": token, "logprob": lp, "bytes": event["bytes"],
                     "top_logprobs": [{"token": _token(b), "logprob": v, "bytes": b} for b, v in event["top_logprobs"]]}
        else:
            entry = {"tokens": [token], "token_logprobs": [lp], "text_offset": [self.offset],
                     "top_logprobs": [{_token(b): v for b, v in event["top_logprobs"]}]}
        self.offset += len(event["text"])
        self.logprobs.append(entry)
        return {"content": [entry]} if self.request.chat else entry

    def _delta(self, event: dict) -> None:
        """With tools, text inside <tool_call> blocks leaves as tool_calls deltas (a call's id
        and name first, then its arguments in pieces), the rest as content; a stop after
        calls is finish_reason tool_calls."""
        if self.tool_parser is None:
            self.delta = {"content": event["text"]}
            return
        content, pieces = self.tool_parser.feed(event["text"])
        if event["finish_reason"] is not None:
            content += self.tool_parser.finish()
        self.content.append(content)
        self.delta = {"content": content}
        deltas = []
        for piece in pieces:
            if "name" in piece:
                call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                        "function": {"name": piece["name"], "arguments": piece["arguments"]}}
                self.tool_calls.append(call)
                deltas.append({"index": piece["index"], **call, "function": dict(call["function"])})
            else:
                self.tool_calls[piece["index"]]["function"]["arguments"] += piece["arguments"]
                deltas.append({"index": piece["index"], "function": {"arguments": piece["arguments"]}})
        if deltas:
            self.delta["tool_calls"] = deltas
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"

    def final(self) -> dict:
        text = "".join(self.text)
        out = {"index": self.index, "finish_reason": self.finish_reason, "logprobs": self._all_logprobs()}
        if self.request.chat and self.tool_parser is not None:
            content = "".join(self.content)
            out["message"] = {"role": "assistant", "content": content.strip() or None if self.tool_calls else content}
            if self.tool_calls:
                out["message"]["tool_calls"] = self.tool_calls
        elif self.request.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    def _all_logprobs(self) -> dict | None:
        if self.logprobs is None:
            return None
        if self.request.chat:
            return {"content": self.logprobs}
        return {k: [v for entry in self.logprobs for v in entry[k]]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(request: CompletionRequest, choices: list[Choice], prompt_tokens: int) -> dict:
    return {"id": request.id, "object": "chat.completion" if request.chat else "text_completion",
            "created": request.created, "model": request.model, "choices": [c.final() for c in choices],
            "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}


def chunk(request: CompletionRequest, choice: Choice | None, event: dict | None, logprobs: dict | None,
          usage_: dict | None = None) -> dict:
    """A stream chunk for one event, or (choice None) the closing usage chunk."""
    out = {"id": request.id, "object": "chat.completion.chunk" if request.chat else "text_completion",
           "created": request.created, "model": request.model, "choices": []}
    if choice is not None:
        c = {"index": choice.index, "logprobs": logprobs,
             "finish_reason": event["finish_reason"] and choice.finish_reason}
        if request.chat:
            c["delta"] = {"role": "assistant", **choice.delta} if choice.tokens == 1 else dict(choice.delta)
        else:
            c["text"] = event["text"]
        out["choices"].append(c)
    if usage_ is not None:
        out["usage"] = usage_
    return out
