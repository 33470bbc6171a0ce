"""Chat templates (``tokenizer.chat_template`` in GGUF metadata), rendered like HF
transformers' ``apply_chat_template``: jinja2 with trim_blocks/lstrip_blocks, the
loopcontrols extension, a ``tojson`` that does not HTML-escape, and the globals
``raise_exception`` and ``strftime_now``.

A GGUF file is untrusted input, so templates run in jinja2's ImmutableSandboxedEnvironment
(no underscore attributes, no mutation of messages), and string/list repetition and
powers are capped so a template cannot allocate gigabytes. Every failure (syntax error,
sandbox violation, raise_exception, a Python error inside the template) is raised as
ChatTemplateError.

When a GGUF has no template, DEFAULT_CHAT_TEMPLATE is used: ChatML
(``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``
as the generation prompt), the same fallback llama.cpp uses.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MAX_REPEAT = 1 << 20  # longest str/list a template may build with `*`


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered."""


class _Raised(Exception):
    pass


def _raise_exception(message: str = "") -> None:
    raise _Raised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and '; HF templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError(f"repetition of a length-{len(seq)} sequence {n} times is too large")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError(f"exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools=None, **extra: Any) -> str:
    """Render `messages` with `template`; `extra` goes to the template as variables
    (e.g. documents, enable_thinking)."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except _Raised as e:
        raise ChatTemplateError(f"chat template raised an exception: {e}") from e
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from e
    except Exception as e:  # untrusted code: any failure is the template's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


def chat_template_from_metadata(md: Mapping[str, Any]) -> str:
    """The GGUF's template, or DEFAULT_CHAT_TEMPLATE (ChatML) when it has none."""
    template = md.get("tokenizer.chat_template")
    return template if isinstance(template, str) and template.strip() else DEFAULT_CHAT_TEMPLATE
