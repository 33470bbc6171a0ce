from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from workers.model.chat_template import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, chat_template_from_metadata,
                                   render_chat)
from workers.model.gguf_file import GGUFFile

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2? <b>&</b>"},
]
CHATML = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2? <b>&</b><|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen2_template(vocab_dir) -> str:
    return GGUFFile(vocab_dir / "ggml-vocab-qwen2.gguf").metadata["tokenizer.chat_template"]


def test_qwen2_template_from_gguf(qwen2_template):
    assert render_chat(qwen2_template, MESSAGES, add_generation_prompt=True) == CHATML


def test_qwen2_template_default_system_and_no_generation_prompt(qwen2_template):
    out = render_chat(qwen2_template, MESSAGES[1:], add_generation_prompt=False)
    assert out == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                   "<|im_start|>user\nWhat is 2+2? <b>&</b><|im_end|>\n")


def test_fallback_is_chatml():
    assert chat_template_from_metadata({}) == DEFAULT_CHAT_TEMPLATE
    assert chat_template_from_metadata({"tokenizer.chat_template": "{{ 1 }}"}) == "{{ 1 }}"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, MESSAGES) == CHATML


def test_trim_and_lstrip_blocks_like_hf():
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.role }}\n    {% endif %}\n{% endfor %}"
    assert render_chat(template, MESSAGES) == "user\n"


def test_tojson_is_plain_json_and_bos_eos_tools_are_passed():
    template = "{{ bos_token }}{{ tools | tojson }}{{ eos_token }}"
    tools = [{"name": "f", "description": "a < b & c > d", "x": "é"}]
    out = render_chat(template, MESSAGES, bos_token="<s>", eos_token="</s>", tools=tools)
    assert out == '<s>[{"name": "f", "description": "a < b & c > d", "x": "é"}]</s>'


def test_strftime_now_and_loop_controls():
    out = render_chat("{{ strftime_now('%Y-%m-%d') }}|{% for m in messages %}{{ m.role }}{% break %}{% endfor %}",
                      MESSAGES)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}\|system", out)


def test_raise_exception_message_surfaces():
    template = ("{% if messages[-1].role != 'assistant' %}"
                "{{ raise_exception('Conversation roles must alternate!') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate!"):
        render_chat(template, MESSAGES)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ 'x' * 1000000000 }}",
])
def test_sandbox_blocks_injection(template):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render_chat(template, MESSAGES)


def test_syntax_and_runtime_errors():
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 // 0 }}", MESSAGES)
    assert issubclass(ChatTemplateError, ValueError)


_DOUBLING = "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"


@pytest.mark.parametrize("template, message", [
    (_DOUBLING + "{{ ns.s|length }}", "longer than"),  # 8 * 2**40 characters, no output
    (_DOUBLING.replace("ns.s ~ ns.s", "ns.s + ns.s") + "{{ ns.s|length }}", "longer than"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "iterations|seconds"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endfor %}",
     "iterations|seconds|characters"),
    ("{% set x %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}{{ x|length }}",
     "characters"),
    ("{{ 'x'.ljust(1000000000) }}", "too large"),
    ("{{ 'x'|center(1000000000) }}", "too large"),
    ("{{ '%1000000000s' % 'x' }}", "too large"),
    ("{{ '{:>1000000000}'.format('x') }}", "too large"),
    ("{% set s = 'x' * 100000 %}{{ s.replace('', s) }}", "longer than"),
    ("{% set s = 'x' * 100000 %}{{ range(100000)|join(s) }}", "longer than"),
])
def test_rendering_is_bounded_in_memory_and_time(template, message):
    """Each case under a 2 GiB address-space limit in a subprocess: before the bounds one
    exhausts memory, the other never ends."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from workers.model.chat_template import ChatTemplateError, render_chat\n"
            "try:\n"
            "    render_chat(sys.argv[1], [])\n"
            "except ChatTemplateError as e:\n"
            "    print(e)\n")
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", code, template], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("rendering ran past 20 s")
    assert done.returncode == 0, done.stderr[-500:]
    assert re.search(f"sandbox: .*({message})", done.stdout), done.stdout
    assert time.monotonic() - t0 < 10
