"""Tokenizer built from GGUF metadata, reproducing llama.cpp's tokenizers.

Two vocab types, as llama.cpp's src/llama-vocab.cpp implements them:

* ``tokenizer.ggml.model = "llama"`` (SPM): whole fragments (no pre-tokenizer) are split
  into characters and greedily merged, highest token score first (ties: leftmost); text is
  prefixed with a space after BOS/special tokens (``add_space_prefix``), spaces become
  "▁", and characters left without a token fall back to ``<0xNN>`` byte tokens.
* ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): the text is split by the regexes of
  ``tokenizer.ggml.pre`` (applied in sequence, each splitting the previous pieces, matches
  and gaps both kept), each piece is byte-mapped and merged lowest merge-rank first.

Before either, control/user-defined token texts in the input are cut out longest first
(llama.cpp's ``tokenizer_st_partition``; control tokens only when ``parse_special``).

Why pure Python and not HF ``tokenizers`` for the BPE part (measured on 2 CPU cores):
both pass all 322 cases of llama.cpp's ggml-vocab-*.gguf.inp/.out (7 vocabs), using a
``tokenizers`` BPE(vocab, merges, ignore_merges) + Split(regex, "isolated") +
ByteLevel(use_regex=False) pipeline. Building it for the 151,936-token Qwen2.5 vocab takes
0.41 s (llama3's 128k/280k merges: 0.61 s) on top of the tables we need anyway, against
0.30 s (0.39 s) for this whole class. Encoding 2,000 characters of code/English: 0.5 ms
here once its words are cached, 5 ms for unseen words; ``tokenizers`` 0.7 / 1.4 ms. Both
are far inside the 50 ms budget, while the library would still need the Python
special-token partition (its leftmost-longest added-token matching is not llama.cpp's
token-by-token order) and Python SPM (it has no score-ordered SPM model), i.e. a second
code path; and its BPE refuses (panics on) merges whose result is not in the vocab, which
llama.cpp accepts. A differential run of 1,500 random strings per vocab against
llama-cpp-python 0.3.36 found no mismatch except on code points that llama.cpp's Unicode
tables leave unassigned but the ``regex`` module classifies (newer Unicode), which only
shifts how such characters are grouped.

Deliberate differences from llama.cpp: decode() does not apply llama.cpp's
``clean_spaces`` punctuation heuristics (they break round-trips and streaming), and a
missing BOS/EOS id is ``None`` rather than llama.cpp's placeholder 11 for BPE vocabs.
When several tokens match a role's texts (e.g. two FIM-pad spellings), llama.cpp takes the
first in hash order; we take the lowest id.
"""

from __future__ import annotations

import codecs
import heapq
import math
from typing import Any, Mapping, Sequence

import regex

from workers.model.gguf_file import shown_value

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp matches this class on text whose non-ASCII whitespace was replaced by \v, so
# whitespace inside the U+0800..U+4E00 range must not match.
_CJK = r"(?:(?![\s])[一-龥ࠀ-一가-퟿])+"

# tokenizer.ggml.pre -> (regexes, flags), following llama.cpp's name -> pre-type table.
# Regexes are llama.cpp's; its hand-written gpt2/llama3 splitters implement the full
# regex including the trailing "|\s+".
_PRE: dict[str, tuple[list[regex.Pattern], dict[str, bool]]] = {}
for _names, _regexes, _flags in [
    (["default"], [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], {}),
    (["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
     [_LLAMA3], {"ignore_merges": True, "add_bos": True}),
    (["dbrx", "smaug-bpe"], [_LLAMA3], {}),
    (["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], [_QWEN2], {}),
    (["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat", "jina-es", "jina-de",
      "jina-v2-es", "jina-v2-de"], [_GPT2], {}),
    (["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
     [r"\p{N}", _GPT2], {}),
    (["deepseek-coder"], [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"], {}),
    (["falcon"], [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], {}),
]:
    for _n in _names:
        _PRE[_n] = ([regex.compile(r) for r in _regexes], _flags)

# llama.cpp (llama_vocab::impl::load) finds these roles by token text when the metadata
# has no id for them, and forces the token found to control type.
_ROLE_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_OLD_ROLE_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
# Every token with one of these texts ends generation (and becomes control type).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})


def _byte_maps() -> tuple[dict[int, str], dict[int, int]]:
    """GPT-2's reversible byte <-> printable-character table, as str.translate maps."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = b
        else:
            chars[b], extra = 256 + extra, extra + 1
    return {b: chr(c) for b, c in chars.items()}, {c: b for b, c in chars.items()}


_BYTE_TO_CHAR, _CHAR_TO_BYTE = _byte_maps()
_BYTE_TOKEN = regex.compile(r"<0x[0-9A-Fa-f]{2}>")  # an SPM byte token's text


def _merge(symbols: list[str], priority) -> list[str]:
    """Merge adjacent symbols best-priority first (ties: leftmost), as llama.cpp's SPM and
    BPE sessions do with a heap over a linked list; `priority(a, b)` is None if no merge."""
    n = len(symbols)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    nxt[-1] = -1
    heap: list = []

    def push(i: int, j: int) -> None:
        if i >= 0 and j >= 0:
            p = priority(symbols[i], symbols[j])
            if p is not None:
                heapq.heappush(heap, (p, i, j, symbols[i] + symbols[j]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, i, j, text = heapq.heappop(heap)
        # Symbols only grow or vanish, so a changed concatenation means a stale entry.
        if not symbols[i] or not symbols[j] or symbols[i] + symbols[j] != text:
            continue
        symbols[i], symbols[j] = text, ""
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        push(prv[i], i)
        push(i, nxt[i])
    return [s for s in symbols if s]


class _Fields:
    """The tokenizer's metadata, each value checked for its type and length where it is read
    (a GGUF key can hold any type): errors are one line naming the file and the key."""

    def __init__(self, md: Mapping[str, Any], source: str):
        self.md, self.source = md, source

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.source}: {what}")

    def strings(self, key: str) -> list[str]:
        value = self.md.get(key)
        if value is None:
            raise self.fail(f"{key} is missing")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{key} is not an array of strings")
        return value

    def per_token(self, key: str, n: int, kinds: tuple[type, ...], kind_name: str) -> list | None:
        """An array with one number per token, or None when absent."""
        value = self.md.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
            raise self.fail(f"{key} is not an array of {kind_name}")
        if len(value) != n:
            raise self.fail(f"{key} has {len(value)} entries for {n} tokens")
        return value

    def text(self, key: str, default: str | None) -> str | None:
        value = self.md.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{key} = {shown_value(value)} is not a string")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.md.get(key, default)
        if not isinstance(value, (bool, int)):
            raise self.fail(f"{key} = {shown_value(value)} is not a boolean")
        return bool(value)


class Tokenizer:
    def __init__(self, md: Mapping[str, Any], source: str = "GGUF metadata"):
        """`source` names the file in errors."""
        fields = _Fields(md, source)
        model = fields.text("tokenizer.ggml.model", None)
        if model not in ("llama", "gpt2"):
            raise fields.fail(f"unsupported tokenizer.ggml.model {model!r}: "
                              "only 'llama' (SPM) and 'gpt2' (byte-level BPE) are supported")
        self.is_spm = model == "llama"
        tokens = fields.strings("tokenizer.ggml.tokens")
        if not tokens:
            raise fields.fail("tokenizer.ggml.tokens is empty")
        # llama.cpp renames empty tokens; an empty special text would match everywhere.
        self.tokens: list[str] = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = self.vocab_size = len(self.tokens)
        self.token_types: list[int] = list(
            fields.per_token("tokenizer.ggml.token_type", n, (int,), "integers") or [NORMAL] * n)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}

        flags: dict[str, bool] = {}
        if self.is_spm:
            scores = fields.per_token("tokenizer.ggml.scores", n, (int, float), "numbers") or [0.0] * n
            if not all(math.isfinite(s) for s in scores):
                raise fields.fail("tokenizer.ggml.scores holds a value that is not a finite number")
            # _piece reads a byte token's value from its text.
            bad = next((t for t, tt in zip(self.tokens, self.token_types) if tt == BYTE and not _BYTE_TOKEN.fullmatch(t)),
                       None)
            if bad is not None:
                raise fields.fail(f"tokenizer.ggml.tokens: byte token {shown_value(bad)} is not of the form <0xNN>")
            # Higher score merges first; heapq pops the smallest, so negate.
            self._neg_score = {t: -s for t, s in zip(self.tokens, scores)}
            defaults = {"bos": 1, "eos": 2, "unknown": 0}
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
        else:
            pre = fields.text("tokenizer.ggml.pre", None) or "default"
            if pre not in _PRE:
                raise fields.fail(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(sorted(_PRE))})")
            self._pre_regexes, flags = _PRE[pre]
            self._ranks = {}
            for rank, merge in enumerate(fields.strings("tokenizer.ggml.merges")):
                cut = merge.find(" ", 1)  # from 1, as llama.cpp: a left part may be a space
                if cut > 0:
                    self._ranks.setdefault((merge[:cut], merge[cut + 1:]), rank)
            defaults = {}
            self.add_space_prefix, self.add_bos, self.add_eos = False, flags.get("add_bos", False), False
        self._ignore_merges = flags.get("ignore_merges", False)
        self.add_space_prefix = fields.flag("tokenizer.ggml.add_space_prefix", self.add_space_prefix)
        self.add_bos = fields.flag("tokenizer.ggml.add_bos_token", self.add_bos)
        self.add_eos = fields.flag("tokenizer.ggml.add_eos_token", self.add_eos)

        def special_id(key: str) -> int | None:
            for k in (key, _OLD_ROLE_KEYS.get(key)):
                v = md.get(f"tokenizer.ggml.{k}_token_id")
                if isinstance(v, int) and 0 <= v < n:
                    return v
            return defaults.get(key)

        self.bos_id, self.eos_id, self.unk_id = special_id("bos"), special_id("eos"), special_id("unknown")
        self.role_ids: dict[str, int | None] = {}
        for role, texts in _ROLE_TEXTS.items():
            tid = special_id(role)
            if tid is None:
                # llama.cpp takes the first hit in hash order; the lowest id is our stand-in.
                tid = min((self.token_to_id[t] for t in texts if t in self.token_to_id), default=None)
                if tid is not None:
                    self.token_types[tid] = CONTROL
            self.role_ids[role] = tid
        eog = {self.role_ids[r] for r in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")} | {self.eos_id}
        for t in _EOG_TEXTS & self.token_to_id.keys():
            eog.add(self.token_to_id[t])
            self.token_types[self.token_to_id[t]] = CONTROL
        eog.discard(None)
        # llama.cpp's workarounds: gpt-oss/solar-open's "<|end|>" and gemma4's "</s>" are not EOG.
        by_text = {self.tokens[i]: i for i in eog}
        if "<|end|>" in by_text and ("<|call|>" in by_text or "<|calls|>" in by_text) and (
                "<|return|>" in by_text or "<|flush|>" in by_text):
            eog.discard(by_text["<|end|>"])
            self.token_types[by_text["<|end|>"]] = USER_DEFINED
        if "<|tool_response>" in by_text and "</s>" in by_text:
            eog.discard(by_text["</s>"])
            self.token_types[by_text["</s>"]] = NORMAL
        self.stop_ids = frozenset(eog)

        # Longest first, as llama.cpp's cache_special_tokens (ties by id for determinism).
        specials = sorted((i for i, tt in enumerate(self.token_types) if tt in (CONTROL, USER_DEFINED, UNKNOWN)),
                          key=lambda i: (-len(self.tokens[i].encode()), i))
        # llama.cpp sets RSTRIP on Phi-3's special tokens (matched by general.name).
        name = (fields.text("general.name", "") or "").lower()
        rstrip = set(specials) if ("phi-3" in name or "phi3" in name) else set()
        if rstrip:
            rstrip |= {self.token_to_id[t] for t in ("</s>",) if t in self.token_to_id}
            rstrip -= {self.token_to_id.get(t) for t in ("<unk>", "<s>", "<|endoftext|>")}
        self._specials = [(self.tokens[i], i, i in rstrip) for i in specials]
        self._user_specials = [s for s in self._specials if self.token_types[s[1]] == USER_DEFINED]
        self._pieces: list[bytes | None] = [None] * n
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], source: str = "GGUF metadata") -> "Tokenizer":
        return cls(md, source)

    # --- encoding -------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True,
               continuation: bool = False) -> list[int]:
        """continuation: the text continues another (no SPM space prefix on its first
        fragment), as the grammar engine tokenizes pieces of a generated text."""
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = not continuation  # SPM: a space prefix goes on the first fragment and after specials
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.is_spm:
                out += self._spm(" " + frag if self.add_space_prefix and prev_special else frag)
                prev_special = False
            else:
                for word in self._split(frag):
                    out += self._bpe(word)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of the text, one token at a time, longest first."""
        frags: list[str | int] = [text] if text else []
        for tok, tid, rstrip in self._specials if parse_special else self._user_specials:
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        out.append(tid)
                        if rstrip:
                            part = part.lstrip(" \t\n\v\f\r")
                    if part:
                        out.append(part)
            frags = out
        return frags

    def _spm(self, text: str) -> list[int]:
        neg_score, t2i = self._neg_score, self.token_to_id
        out = []
        for sym in _merge(list(text.replace(" ", "▁")),
                          lambda a, b: neg_score.get(a + b)):
            tid = t2i.get(sym)
            if tid is not None:
                out.append(tid)
            else:
                out += (self._byte_token(b) for b in sym.encode("utf-8"))
        return out

    def _byte_token(self, b: int) -> int:
        tid = self.token_to_id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self.token_to_id.get(chr(b)) if b < 0x80 else None
        return tid if tid is not None else self.unk_id

    def _split(self, text: str) -> list[str]:
        words = [text]
        for rx in self._pre_regexes:
            pieces = []
            for w in words:
                pos = 0
                for m in rx.finditer(w):
                    if m.start() > pos:
                        pieces.append(w[pos:m.start()])
                    pieces.append(m.group())
                    pos = m.end()
                if pos < len(w):
                    pieces.append(w[pos:])
            words = pieces
        return words

    def _bpe(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        mapped = word.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)
        t2i, ranks = self.token_to_id, self._ranks
        if self._ignore_merges and mapped in t2i:
            ids = [t2i[mapped]]
        else:
            ids = []
            for sym in _merge(list(mapped), lambda a, b: ranks.get((a, b))):
                if sym in t2i:
                    ids.append(t2i[sym])
                else:  # llama.cpp then looks up each UTF-8 byte; only ASCII can match
                    ids += (t2i[c] for c in sym if c < "\x80" and c in t2i)
        if len(self._cache) > 200_000:  # bound memory in long-running servers
            self._cache.clear()
        self._cache[word] = ids
        return ids

    # --- decoding -------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, tid: int) -> bytes:
        text, tt = self.tokens[tid], self.token_types[tid]
        if tt in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if self.is_spm:
            if tt == BYTE:
                return bytes([int(text[3:5], 16)])
            return text.replace("▁", " ").encode("utf-8") if tt == NORMAL else b""
        if tt != NORMAL:
            return b""  # llama.cpp renders BPE byte/unused tokens as nothing
        try:
            return text.translate(_CHAR_TO_BYTE).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte map: keep it as UTF-8
            return b"".join(bytes([_CHAR_TO_BYTE[ord(c)]]) if ord(c) in _CHAR_TO_BYTE else c.encode()
                            for c in text)

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [self.token_bytes(i) for i in ids]
        # llama.cpp's detokenize drops the space that add_space_prefix put on the first token.
        if self.add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streams decode(): feed() returns only complete UTF-8 characters, so a character
    split across byte tokens appears once its last byte arrives. Like decode(), it drops
    the SPM space prefix of the first token, so the pieces join to decode(ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def feed(self, token_id: int) -> str:
        data = self.tokenizer.token_bytes(token_id)
        if self._first:
            self._first = False
            if self.tokenizer.add_space_prefix and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
