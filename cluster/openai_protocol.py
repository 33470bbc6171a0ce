"""OpenAI's completions and chat completions on the wire: request JSON -> prompts and
SamplingParams, worker events -> responses and stream chunks; and the tokenize/detokenize
bodies (vLLM's and llama-server's shapes).

Defaults and ranges are OpenAI's (temperature 1 in [0, 2], completions max_tokens 16,
chat generating until the context is full); top_k, min_p, repetition_penalty and
ignore_eos are accepted as the extensions vLLM and llama.cpp's server also accept.
No field is ignored: a field is honoured (CHAT_FIELDS, COMPLETION_FIELDS), informational
(INFORMATIONAL_FIELDS: it cannot change the output), or a 400 that names it. A field whose
value is null counts as absent, as OpenAI's API has it.

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
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for completions; chat's is the rest of the context
MAX_TOKENIZE_CHARS = 1 << 20  # /tokenize's text; /detokenize's ids: MAX_DETOKENIZE_IDS
MAX_DETOKENIZE_IDS = 1 << 20

_SAMPLING_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty",
                              "presence_penalty", "logprobs", "stream", "stream_options",
                              "top_k", "min_p", "repetition_penalty", "ignore_eos"})  # the last four: extensions
_STRUCTURE_FIELDS = frozenset({"response_format", "grammar", "logit_bias"})
CHAT_FIELDS = _SAMPLING_FIELDS | _STRUCTURE_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                                                      "tool_choice", "parallel_tool_calls"}
# best_of only as n, suffix only empty: anything else is a 400.
COMPLETION_FIELDS = _SAMPLING_FIELDS | _STRUCTURE_FIELDS | {"prompt", "best_of", "suffix", "echo"}
# What OpenAI's clients send that cannot change the output: accepted and not used.
INFORMATIONAL_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                                  "prompt_cache_key"})
# Chat roles as the template gets them: OpenAI's "developer" is the system message of its newer models.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system", "tool": "tool"}
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


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
    # completions' max_tokens 0 with echo: the prompt alone (scored with logprobs). One token is
    # drawn beside the prompt's last row, which costs no pass; no choice reports it
    echo_only: bool = False
    system_fingerprint: str | None = None
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
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _history_calls(m["tool_calls"], i)
        for name in ("tool_call_id", "name"):  # the template decides whether the speaker's name shows
            if m.get(name) is not None:
                if not isinstance(m[name], str):
                    raise APIError(400, f"messages[{i}].{name} must be a string", param=f"messages[{i}].{name}")
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
    tools, grammar = _tools(body) if chat else (None, None)
    asked = _grammar(body)
    if asked is not None and grammar is not None:
        raise APIError(400, "a 'response_format' or 'grammar' cannot be combined with a 'tool_choice' that "
                       "forces a call", param="response_format")
    grammar = grammar or asked
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
        _completion_only_fields(body, n)
    echo = not chat and _field(body, "echo", (bool,), False)
    echo_only = echo and max_tokens == 0
    if echo_only:
        max_tokens = 1
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
            stop=tuple(stop), logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
            logit_bias=_logit_bias(body), grammar=grammar)
    except ValueError as e:
        name = re.match(r"invalid sampling parameter (\w+)=", str(e))
        raise APIError(400, str(e), param=name and name.group(1)) from None
    stream = _field(body, "stream", (bool,), False)
    return CompletionRequest(chat=chat, model=model, prompts=prompts, params=params, n=n, stream=stream,
                             include_usage=_include_usage(body, stream), echo=echo, echo_only=echo_only,
                             system_fingerprint=system_fingerprint, tools=tools)


def _model(body: dict, served_model: str) -> str:
    return check_model(_field(body, "model", (str,), served_model), served_model)


def check_model(model: str, served_model: str) -> str:
    """The served model's id, or OpenAI's 404 for another."""
    if model != served_model:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    return model


def _completion_only_fields(body: dict, n: int) -> None:
    """best_of and suffix: accepted only where they leave the output as it is."""
    best_of = _field(body, "best_of", (int,), None)
    if best_of is not None and best_of != n:
        raise APIError(400, f"'best_of' must equal 'n' ({n}), got {best_of}: choosing the best of more "
                            "candidates than are returned is not supported", param="best_of")
    if _field(body, "suffix", (str,), ""):
        raise APIError(400, "'suffix' (text after the completion) is not supported", param="suffix")


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
        self.tool_parser = ToolCallParser() if request.tools else None
        self.tool_calls: list[dict] = []
        self.content: list[str] = []  # with tools: the text outside the calls

    def opening(self) -> list[dict]:
        """The stream's first entries: chat's role alone, as OpenAI sends it; an echoed prompt
        (with logprobs asked, it goes with its tokens' logprobs once they come: `add`)."""
        if not self.request.chat:
            if not self.echo or self.logprobs is not None:
                return []
            return [{"index": self.index, "text": self.echo, "logprobs": None, "finish_reason": None}]
        return [{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def add(self, event: dict) -> list[dict]:
        """Record an event; returns its stream entries: its text if any, then the finish reason
        in an entry of its own (an empty delta, or empty text), as OpenAI ends a choice. An
        echo's prompt logprobs (their own event, before the first token's) go out with the
        echoed text, each prompt token's offset counted from its start as a token's text is."""
        if "prompt_logprobs" in event:
            for entry in event["prompt_logprobs"]:
                self.logprobs.append(self._logprob_entry(entry))
                self.offset += len(_token(entry["bytes"]))
            self.offset = len(self.echo)
            return [self._stream_entry(self.echo, None)]
        if self.request.echo_only:  # the token drawn beside the prompt's scores is not asked for
            self.finish_reason = "length"
            return [self._stream_entry("", "length")]
        text, finish = event["text"], event["finish_reason"]
        self.text.append(text)
        self.finish_reason = finish
        self.tokens += 1
        if self.logprobs is not None:
            self.logprobs.append(self._logprob_entry(event))
            self.offset += len(text)
        piece = self._delta(text, finish) if self.request.chat else text  # never empty when sent
        out = [self._stream_entry(piece, None)] if piece else []
        if finish is not None:
            out.append(self._stream_entry("", self.finish_reason))
        return out

    def _logprob_entry(self, event: dict) -> dict:
        """A token's logprobs entry at self.offset (a prompt's first token has none: top None)."""
        token, lp, top = _token(event["bytes"]), event["logprob"], event["top_logprobs"]
        if self.request.chat:
            return {"token": token, "logprob": lp, "bytes": event["bytes"],
                    "top_logprobs": [{"token": _token(b), "logprob": v, "bytes": b} for b, v in top]}
        return {"tokens": [token], "token_logprobs": [lp], "text_offset": [self.offset],
                "top_logprobs": [None if top is None else {_token(b): v for b, v in top}]}

    def _stream_entry(self, piece: dict | str, finish: str | None) -> dict:
        """piece: chat's delta (an empty one ends a choice), or a completion's text."""
        logprobs = None
        if self.logprobs is not None and self.sent_logprobs < len(self.logprobs):
            logprobs = self._logprobs(self.logprobs[self.sent_logprobs:])
            self.sent_logprobs = len(self.logprobs)
        body = {"delta": piece or {}} if self.request.chat else {"text": piece}
        return {"index": self.index, **body, "logprobs": logprobs, "finish_reason": finish}

    def _delta(self, text: str, finish: str | None) -> dict:
        """A chat event's delta, empty when it has nothing to send. With tools, text inside
        <tool_call> blocks leaves as tool_calls deltas (a call's id and name first, then its
        arguments in pieces), the rest as content; a stop after calls is finish_reason
        tool_calls."""
        if self.tool_parser is None:
            return {"content": text} if text else {}
        content, pieces = self.tool_parser.feed(text)
        if finish is not None:
            content += self.tool_parser.finish()
        self.content.append(content)
        delta = {"content": content} if content else {}
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
            delta["tool_calls"] = deltas
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return delta

    def final(self) -> dict:
        text = "".join(self.text)
        out = {"index": self.index, "finish_reason": self.finish_reason,
               "logprobs": None if self.logprobs is None else self._logprobs(self.logprobs)}
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
