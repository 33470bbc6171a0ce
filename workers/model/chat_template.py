"""Chat templates (``tokenizer.chat_template`` in GGUF metadata), rendered like HF
transformers' ``apply_chat_template``: jinja2 with trim_blocks/lstrip_blocks, the
loopcontrols extension, a ``tojson`` that does not HTML-escape, and the globals
``raise_exception`` and ``strftime_now``.

A GGUF file is untrusted input, so templates run in jinja2's ImmutableSandboxedEnvironment
(no underscore attributes, no mutation of messages), and each render is bounded (_Budget):
every string or list an operator, call or filter builds (`+`, `~`, `*`, `%`, widths,
replace, join) is checked before it is built, what a render builds and emits in all is
capped, and so are its loop iterations and its time, checked at every loop step, output,
operator and call. Every failure (syntax error, sandbox violation or budget, raise_exception,
a Python error inside the template) is raised as ChatTemplateError.

When a GGUF has no template, its architecture's built-in one is used where llama.cpp has one
(ARCHITECTURE_TEMPLATES: Gemma 3 270M's file has none), else DEFAULT_CHAT_TEMPLATE: ChatML
(``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``
as the generation prompt), the same fallback llama.cpp uses.
"""

from __future__ import annotations

import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any, Callable, Mapping

import jinja2
from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp's built-in "gemma" template (src/llama-chat.cpp, LLM_CHAT_TEMPLATE_GEMMA) as jinja:
# system messages, trimmed, open the next user turn; "assistant" is "model"; contents trimmed.
GEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] | trim -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\n\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# general.architecture -> the template a file of it without one gets (llama.cpp's by model name).
ARCHITECTURE_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}

# A render's budget. Far above what a real template needs for the longest prompt a model
# takes (a 128k-token prompt is ~0.5M characters), far below an exhausted machine.
MAX_VALUE_LENGTH = 1 << 22  # characters (or items) of any one string or list a template builds
MAX_BUILT = 1 << 26  # characters built by operators, calls and filters in all
MAX_EMITTED = 1 << 24  # characters output, also into {% set %} blocks and macros
MAX_ITERATIONS = 1 << 20  # loop steps
RENDER_SECONDS = 2.0
# Methods and filters whose integer arguments are widths: the result is at least that long.
_WIDTH_ARGUMENTS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs", "indent", "wordwrap", "truncate"})
# A width or precision in a format string ('%1000000000s', '{:>1000000000}'): 7 digits or more.
_HUGE_FORMAT_WIDTH = re.compile(r"[%:][^%:}]*?\d{7}")


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


class _OverBudget(SecurityError):
    pass


@dataclass
class _Budget:
    """What one render may still spend; every hook calls one of these."""

    deadline: float
    built: int = 0
    emitted: int = 0
    iterations: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"rendering took more than {RENDER_SECONDS:g} seconds")

    def build(self, length: int) -> None:
        """Before a string or list of `length` is built."""
        self.tick()
        if length > MAX_VALUE_LENGTH:
            raise _OverBudget(f"a value of {length} characters would be longer than {MAX_VALUE_LENGTH}")
        self.built += length
        if self.built > MAX_BUILT:
            raise _OverBudget(f"the template built more than {MAX_BUILT} characters")

    def emit(self, length: int) -> None:
        self.tick()
        self.emitted += length
        if self.emitted > MAX_EMITTED:
            raise _OverBudget(f"the template output more than {MAX_EMITTED} characters")

    def iterate(self) -> None:
        self.tick()
        self.iterations += 1
        if self.iterations > MAX_ITERATIONS:
            raise _OverBudget(f"the template's loops ran more than {MAX_ITERATIONS} iterations")


_BUDGET: ContextVar[_Budget] = ContextVar("chat_template_budget")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _HUGE_FORMAT_WIDTH.search(fmt):
        raise _OverBudget(f"format width in {fmt[:40]!r} is too large")


def _predicted_length(name: str, receiver: Any, args: tuple) -> int:
    """The length of what a str method or filter `name` on `receiver` will build, where its
    arguments can make it far longer than its inputs (0 where they cannot)."""
    if name == "replace" and isinstance(receiver, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[:2]
        return len(receiver) + receiver.count(old) * (len(new) - len(old))
    if name == "join" and isinstance(receiver, str) and args and isinstance(args[0], (list, tuple)):
        return sum(len(str(x)) for x in args[0]) + len(receiver) * max(len(args[0]) - 1, 0)
    return 0


def _checked_call(name: str, run: Callable[[], Any], receiver: Any, args: tuple, kwargs: dict) -> Any:
    """Run a method or filter `name` within the budget: its widths, format string and
    predicted length before it runs, the length of its result after."""
    budget = _BUDGET.get()
    if name in _WIDTH_ARGUMENTS:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and abs(a) > MAX_VALUE_LENGTH:
                raise _OverBudget(f"{name} width {a} is too large")
    if name == "format":  # the format filter: `receiver % args`
        _check_format(receiver)
    budget.build(_predicted_length(name, receiver, args))
    result = run()
    budget.build(_length(result))
    return result


def _checked_filter(name: str, fn: Callable) -> Callable:
    # The value a filter is applied to comes after the context or environment it may be passed.
    skip = 1 if getattr(fn, "jinja_pass_arg", None) else 0

    @wraps(fn)  # keeps jinja_pass_arg, so jinja passes the same arguments
    def checked(*args, **kwargs):
        if len(args) <= skip:
            return fn(*args, **kwargs)
        value, rest = args[skip], args[skip + 1:]
        if name == "join":  # measured as str.join: the separator joins the items (read once here)
            value = list(value)
            args = (*args[:skip], value, *rest)
            receiver, rest = (rest[0] if rest else kwargs.get("d", "")), (value,)
        else:
            receiver = value
        return _checked_call(name, lambda: fn(*args, **kwargs), receiver, rest, kwargs)

    return checked


@pass_context
def _iterate(context, iterable):
    """What every {% for %} loops over (see _Bounded): one budget step per item."""
    budget = _BUDGET.get()
    for item in iterable:
        budget.iterate()
        yield item


@pass_context
def _concat(context, parts):
    """`a ~ b ~ ...` (see _Bounded): the joined length is checked before it is built."""
    texts = [str(p) for p in parts]
    _BUDGET.get().build(sum(map(len, texts)))
    return "".join(texts)


@pass_context
def _emit(context, value):
    """Each piece of output (see _Bounded), also inside {% set %} blocks and macros."""
    _BUDGET.get().emit(len(str(value)))
    return value


class _Bounded(NodeTransformer):
    """Routes what jinja2's sandbox has no hook for through the budget: each loop's items,
    `~` and every piece of output. (The filters take the context so the compiler cannot
    fold them away as constants.)"""

    @staticmethod
    def through(name: str, node: nodes.Expr) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self.through("ntr_iterate", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return self.through("ntr_concat", nodes.Tuple(node.nodes, "load", lineno=node.lineno))

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self.through("ntr_emit", n if isinstance(n, nodes.Expr) else nodes.Const(n.data, lineno=n.lineno))
                      for n in node.nodes]
        return node


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        budget = _BUDGET.get()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.build(len(seq) * n)
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.build(len(left) + len(right))
        if operator == "%":
            _check_format(left)
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError(f"exponent {right} is too large")
        result = super().call_binop(context, operator, left, right)
        budget.build(_length(result))
        return result

    def wrap_str_format(self, value):
        # str.format and format_map are wrapped when read, so their string is checked here.
        if getattr(value, "__name__", None) in ("format", "format_map"):
            _check_format(getattr(value, "__self__", None))
        return super().wrap_str_format(value)

    def call(self, __context, __obj, *args, **kwargs):
        return _checked_call(getattr(__obj, "__name__", ""), lambda: super(_Env, self).call(__context, __obj, *args, **kwargs),
                             getattr(__obj, "__self__", None), args, kwargs)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _checked_filter(name, fn) for name, fn in env.filters.items()}
    env.filters.update(ntr_iterate=_iterate, ntr_concat=_concat, ntr_emit=_emit)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(_Bounded().visit(env.parse(template)))


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools=None, **extra: Any) -> str:
    """Render `messages` with `template`; `extra` goes to the template as variables
    (e.g. documents, enable_thinking)."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    budget = _BUDGET.set(_Budget(deadline=time.monotonic() + RENDER_SECONDS))
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except _Raised as e:
        raise ChatTemplateError(f"chat template raised an exception: {e}") from e
    except SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from e
    except Exception as e:  # untrusted code: any failure is the template's
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(budget)


def chat_template_from_metadata(md: Mapping[str, Any]) -> str:
    """The GGUF's template; when it has none, its architecture's built-in one, else
    DEFAULT_CHAT_TEMPLATE (ChatML)."""
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return template
    return ARCHITECTURE_TEMPLATES.get(md.get("general.architecture"), DEFAULT_CHAT_TEMPLATE)
