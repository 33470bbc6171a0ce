"""Tool calls in the chat template's own format: Qwen2.5's (and Hermes') `<tool_call>` blocks,
each `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`.

What a template with tools renders is checked here (does it show the tools, and does it ask
for `<tool_call>` blocks), the grammar that forces a call (tool_choice `required` or a named
function) is written here as Lark text for the grammar engine, and the model's output is
split here into content and calls, incrementally for streams.
"""

from __future__ import annotations

import json

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def check_tool_format(template: str, rendered: str, tools: list[dict]) -> None:
    """ValueError unless the template rendered the tools and writes calls as <tool_call> blocks."""
    names = [t["function"]["name"] for t in tools]
    if not all(name in rendered for name in names):
        raise ValueError("the model's chat template has no tool support: it does not render 'tools'")
    if OPEN not in template:
        raise ValueError("the model's chat template writes tool calls in a format other than <tool_call> "
                         "blocks, which is not supported")


def tool_call_grammar(tools: list[dict], parallel: bool, json_options: dict) -> str:
    """Lark text for one (parallel: one or more) <tool_call> block calling one of tools with
    arguments that validate against its parameters, written as json_options (llguidance's JSON
    options) say (the markers as text literals: Qwen2.5's
    single user-defined tokens match them, workers/engine/grammar.py)."""
    calls = []
    for tool in tools:
        f = tool["function"]
        schema = {"x-guidance": json_options, "type": "object", "properties": {
            "name": {"const": f["name"]},
            "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}
        calls.append(f"%json {json.dumps(schema)}")
    lines = ["start: call" + ("+" if parallel else ""),
             f'call: "{OPEN}\\n" body "\\n{CLOSE}" "\\n"?',
             "body: " + " | ".join(f"body{i}" for i in range(len(calls)))]
    lines += [f"body{i}: {c}" for i, c in enumerate(calls)]
    return "\n".join(lines) + "\n"


class ToolCallParser:
    """Text deltas in, content deltas and finished calls out: text from <tool_call> on is held
    until its </tool_call>; a call whose body is not a JSON object with a string name stays
    content, as the model wrote it."""

    def __init__(self):
        self.pending = ""  # held: a block not closed yet, or a tail that may begin <tool_call>
        self.calls: list[dict] = []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to emit now, calls completed by this text: {"name", "arguments" (JSON text)})."""
        self.pending += text
        content, calls = [], []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = _partial_tail(self.pending, OPEN)
                content.append(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content.append(self.pending[:start])
            end = self.pending.find(CLOSE, start)
            if end < 0:
                self.pending = self.pending[start:]
                break
            call = _parse_call(self.pending[start + len(OPEN):end])
            if call is None:
                content.append(self.pending[start:end + len(CLOSE)])
            else:
                calls.append(call)
            self.pending = self.pending[end + len(CLOSE):]
        self.calls += calls
        return "".join(content), calls

    def finish(self) -> str:
        """What was held back at the end (an unclosed block is content)."""
        out, self.pending = self.pending, ""
        return out


def _partial_tail(text: str, marker: str) -> int:
    """The length of the longest tail of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _parse_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"name": call["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}
