"""Tool calls in the chat template's own format: Qwen2.5's (and Hermes') `<tool_call>` blocks,
each `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`.

What a template with tools renders is checked here (does it show the tools, and does it ask
for `<tool_call>` blocks), the grammar that forces a call (tool_choice `required` or a named
function) is written here as Lark text for the grammar engine, and the model's output is
split here into content and calls, incrementally for streams.
"""

from __future__ import annotations

import json
import re

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


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Text deltas in, content deltas and tool-call pieces out, as OpenAI streams them.

    Text from <tool_call> on is held. Once a block's `{"name": "...", "arguments": ` is read,
    the call starts (a piece with its index and name) and the arguments' text follows in
    pieces as it arrives, less a tail that may be the block's closing `}` and </tool_call>.
    A block written otherwise is parsed whole when it closes; one that is not a JSON object
    with a string name stays content, as the model wrote it. Each piece is {"index", "name"
    (the first piece of a call only), "arguments" (text to append)}."""

    def __init__(self):
        self.pending = ""  # held: a block not started or not closed, or a tail that may begin <tool_call>
        self.calls = 0
        self.in_block = False
        self.streaming = False  # in a block whose header was read: pending is unsent arguments
        self.sent = False  # some of that call's arguments were sent

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to emit now, the call pieces this text completes)."""
        self.pending += text
        content, pieces = [], []
        while True:
            if not self.in_block:
                start = self.pending.find(OPEN)
                if start < 0:
                    keep = _partial_tail(self.pending, OPEN)
                    content.append(self.pending[:len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                content.append(self.pending[:start])
                self.pending, self.in_block = self.pending[start + len(OPEN):], True
            end = self.pending.find(CLOSE)
            if not self.streaming:
                header = _HEADER.match(self.pending)
                if header is not None and (end < 0 or header.end() <= end):
                    pieces.append({"index": self.calls, "name": json.loads(header.group(1)), "arguments": ""})
                    self.pending, self.streaming = self.pending[header.end():], True
                    end = self.pending.find(CLOSE)
                elif end >= 0:  # a block written otherwise: whole, or content
                    call = _parse_call(self.pending[:end])
                    if call is None:
                        content.append(OPEN + self.pending[:end + len(CLOSE)])
                    else:
                        pieces.append({"index": self.calls, **call})
                        self.calls += 1
                    self.pending, self.in_block = self.pending[end + len(CLOSE):], False
                    continue
                else:
                    break
            if not self.sent:  # the space after "arguments": may come after the header was read
                self.pending = self.pending.lstrip()
                end = self.pending.find(CLOSE)
            if end < 0:
                sent = len(self.pending) - _closing_tail(self.pending)
                if sent:
                    pieces.append({"index": self.calls, "arguments": self.pending[:sent]})
                    self.pending, self.sent = self.pending[sent:], True
                break
            last = self.pending[:end].rstrip()
            last = last[:-1] if last.endswith("}") else last  # the call object's own closing brace
            if last:
                pieces.append({"index": self.calls, "arguments": last.rstrip()})
            self.calls += 1
            self.pending, self.in_block, self.streaming = self.pending[end + len(CLOSE):], False, False
            self.sent = False
        return "".join(content), _merged(pieces)

    def finish(self) -> str:
        """What was held back at the end as content (an unclosed block that never started a call)."""
        out = "" if self.streaming else (OPEN if self.in_block else "") + self.pending
        self.pending, self.in_block, self.streaming = "", False, False
        return out


def _merged(pieces: list[dict]) -> list[dict]:
    """Consecutive pieces of one call as one."""
    out: list[dict] = []
    for piece in pieces:
        if out and out[-1]["index"] == piece["index"]:
            out[-1] = {**out[-1], "arguments": out[-1]["arguments"] + piece["arguments"]}
        else:
            out.append(dict(piece))
    return out


def _closing_tail(text: str) -> int:
    """The length of the tail of a call's arguments text that may be the block's end: white
    space, the call object's closing brace, white space, and a beginning of </tool_call>."""
    n = _partial_tail(text, CLOSE)
    body = text[:len(text) - n]
    stripped = body.rstrip()
    if stripped.endswith("}"):
        stripped = stripped[:-1].rstrip()
    return len(text) - len(stripped)


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
