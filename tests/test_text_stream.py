"""TextStream: stop strings across tokens, whole UTF-8 characters, and stop matching whose
cost follows the new text, not the stop strings' length times the text."""

from __future__ import annotations

import time
from functools import cache

import pytest

from workers.engine.text_stream import TextStream
from workers.model.gguf_file import GGUFFile
from workers.model.synthetic import llama_vocab_dir
from workers.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("vocab_dir")


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(dict(GGUFFile(llama_vocab_dir() / "ggml-vocab-qwen2.gguf").metadata))


def ids(text: str) -> list[int]:
    return tokenizer().encode(text, add_special=False, parse_special=False)


def stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    s = TextStream(tokenizer(), stop)
    out = []
    for token in ids(text):
        out.append(s.push(token))
        if s.stopped:
            return out, True
    out.append(s.finish())
    return out, False


def test_stop_string_across_tokens_is_held_back_and_cut():
    out, stopped = stream("def add(a, b):\n    return a + b\n\nprint(1)", ("\n\n",))
    assert stopped and "".join(out) == "def add(a, b):\n    return a + b"
    out, stopped = stream("one two three", ("three four", "wo t"))
    assert stopped and "".join(out) == "one t"
    out, stopped = stream("one two three", ("three four",))  # a prefix that never completes is released
    assert not stopped and "".join(out) == "one two three"


def test_never_half_a_character():
    out, _ = stream("naïve — 数据 🙂", ())
    assert "".join(out) == "naïve — 数据 🙂" and all("\ufffd" not in piece for piece in out)
    out, stopped = stream("a 数据 b", ("据",))
    assert stopped and "".join(out) == "a 数"


def test_long_stop_strings_cost_what_the_new_text_costs():
    """Four 200,000-character stop strings: each token's check must look at the window a new
    delta can complete, not at every prefix of every stop string (that took tens of seconds a
    token). The bound is loose: it fails on a cost quadratic in the stop strings' length."""
    stops = tuple(c * 200_000 for c in "wxyz")
    s = TextStream(tokenizer(), stops)
    start = time.perf_counter()
    text = "".join(s.push(t) for t in ids("hello world, www xxx")) + s.finish()
    assert time.perf_counter() - start < 2.0
    assert text == "hello world, www xxx" and not s.stopped
