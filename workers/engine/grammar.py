"""Constrained decoding: a request's grammar (any JSON object, a JSON schema, a GBNF or Lark
grammar) compiled by llguidance and matched token by token, so that every sampled token keeps
the text a prefix of a sentence of the grammar.

llguidance was chosen over xgrammar and outlines-core (docs/benchmarks.md, "Constrained
decoding"): it installs alone (xgrammar needs torch, transformers and triton), compiles a
nested JSON schema in ~3 ms where outlines-core builds a vocabulary index for ~4 s, computes
a 151k-token mask in ~30-55 us a token on this CPU, and takes GBNF as llama-server does.

A `GrammarSpec` is what a request carries (checked where it is made, so a schema feature the
engine cannot enforce is refused before anything is queued); a `Constraint` is one sequence's
matcher; `GrammarTokenizer` is the vocabulary as llguidance sees it, built once per engine.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import llguidance
import llguidance.numpy as llnp
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from workers.model.tokenizer import CONTROL, Tokenizer

KINDS = ("json_object", "json_schema", "gbnf", "lark")
MAX_GRAMMAR_CHARS = 256 * 1024  # a request's schema or grammar text; far past any real one

# JSON is written one way, with the separators of Python's json.dumps that models see most
# (no free whitespace: a model may otherwise spend its budget on newlines the JSON allows).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """kind: json_object (any JSON object), json_schema (source: the schema as JSON text),
    gbnf (llama.cpp's grammar format) or lark (llguidance's, which tool calls use)."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not isinstance(self.source, str) or len(self.source) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"a {self.kind} grammar must be a string of at most {MAX_GRAMMAR_CHARS} characters")
        error = llguidance.LLMatcher.validate_grammar(self.grammar)
        if error:
            raise ValueError(f"the {self.kind} cannot be enforced: {error.strip()[:300]}")

    @functools.cached_property
    def grammar(self) -> str:
        """The grammar in llguidance's serialized form (ValueError for a malformed source)."""
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as e:
                raise ValueError(f"the json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the json_schema must be a JSON object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.kind == "gbnf":
            try:
                lark = gbnf_to_lark(self.source)
            except Exception as e:  # the converter raises bare Exceptions for unknown rules and syntax
                raise ValueError(f"the gbnf grammar is malformed: {e}") from None
            return llguidance.LLMatcher.grammar_from_lark(lark)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


class GrammarTokenizer:
    """The model's vocabulary as llguidance matches it: each token's bytes, control tokens
    marked special (a grammar names them as <|im_end|>; text never spells them), mask rows as
    wide as the logits (n_vocab), and the tokenizer's end-of-generation ids as the tokens that
    end a finished grammar. User-defined tokens (Qwen2.5's <tool_call>) stay text, so a
    grammar's "<tool_call>" literal matches that one token where the vocabulary has it and
    the characters where it does not."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        special = {CONTROL}

        class Vocabulary:  # what llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            tokens = [(b"\xff" if tokenizer.token_types[i] in special else b"") + tokenizer.token_bytes(i)
                      for i in range(tokenizer.vocab_size)]
            special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.token_types[i] in special]

            def __call__(self, text: bytes) -> list[int]:
                # no SPM space prefix: llguidance reads a prefix as part of the text's first token
                return tokenizer.encode(text.decode("utf-8", errors="replace"), parse_special=False, continuation=True)

        self.n_vocab = n_vocab
        self.words = (n_vocab + 31) // 32  # int32 words of one mask row
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=n_vocab,
                                                  eos_token=sorted(tokenizer.stop_ids))
        self.executor = llguidance.LLExecutor()

    def constraint(self, spec: GrammarSpec) -> "Constraint":
        return Constraint(llguidance.LLMatcher(self.lltokenizer, spec.grammar, log_level=0), self.words)

    def fill_masks(self, constraints: list["Constraint | None"]) -> np.ndarray:
        """The next-token bitmask [len(constraints), words] (int32; bit t % 32 of word t // 32
        of row r set: token t allowed; every bit set where the constraint is None), the rows
        computed in parallel by llguidance's threads."""
        out = np.full((len(constraints), self.words), -1, np.int32)
        rows = [(c.matcher, r) for r, c in enumerate(constraints) if c is not None]
        if rows:
            llnp.fill_next_token_bitmask_par(self.executor, rows, out)
        for c in constraints:
            if c is not None:
                c.check()
        return out


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, words: int):
        self.matcher, self.words = matcher, words
        self.check()

    def mask(self) -> np.ndarray:
        """The next token's bitmask row [words] (int32)."""
        out = np.empty((1, self.words), np.int32)
        llnp.fill_next_token_bitmask(self.matcher, out)
        self.check()
        return out[0]

    def check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"grammar error: {self.matcher.get_error()[:300]}")

    def consume(self, token: int) -> None:
        """Advance past a sampled token (one the last mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} was sampled against the grammar: {self.matcher.get_error()[:300]}")

