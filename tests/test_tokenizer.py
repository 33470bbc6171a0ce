"""Tokenizer against llama.cpp's own vocab test cases (shared/llama-vocab, from
llama.cpp's models/ggml-vocab-*.gguf{,.inp,.out}), read the way its
tests/test-tokenizer-0.cpp reads them: inputs split on "\\n__ggml_vocab_test__\\n" with
nothing stripped, expected ids one line per input, tokenized with add_special=false and
parse_special=false."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

import pytest

from workers.model.gguf_file import GGUFFile
from workers.model.synthetic import llama_vocab_dir
from workers.model.tokenizer import IncrementalDecoder, Tokenizer

VOCAB_DIR = llama_vocab_dir()
pytestmark = pytest.mark.usefixtures("vocab_dir")  # where it is missing, every test fails saying so
VOCABS = ["deepseek-coder", "gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "starcoder"]
SEP = "\n__ggml_vocab_test__\n"


def vocab_path(name: str) -> Path:
    return VOCAB_DIR / f"ggml-vocab-{name}.gguf"


def read_cases(name: str) -> list[tuple[str, list[int]]]:
    raw = Path(f"{vocab_path(name)}.inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = Path(f"{vocab_path(name)}.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(lines), f"{name}: {len(inputs)} inputs but {len(lines)} expected outputs"
    return [(s, [int(t) for t in line.split()]) for s, line in zip(inputs, lines)]


@cache
def metadata(name: str) -> dict:
    return dict(GGUFFile(vocab_path(name)).metadata)


@cache
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(name))


def _case_params():
    if VOCAB_DIR is None:
        return []
    return [pytest.param(name, i, id=f"{name}-{i}") for name in VOCABS for i in range(len(read_cases(name)))]


def test_vocab_files_present(vocab_dir):
    for name in VOCABS:
        for suffix in ("", ".inp", ".out"):
            assert Path(f"{vocab_path(name)}{suffix}").is_file(), f"missing {vocab_path(name)}{suffix}"
        assert len(read_cases(name)) >= 40


@pytest.mark.parametrize("name,i", _case_params())
def test_llama_cpp_case(name, i):
    text, expected = read_cases(name)[i]
    assert tokenizer(name).encode(text, add_special=False, parse_special=False) == expected, repr(text)


@pytest.mark.parametrize("name", VOCABS)
def test_round_trip(name):
    # Every vocab here can spell any text (byte-level BPE, or SPM byte fallback), and
    # decode() drops the SPM space prefix as llama.cpp's detokenize does.
    tok = tokenizer(name)
    for text, _ in read_cases(name):
        assert tok.decode(tok.encode(text)) == text


MULTIBYTE = "Hi 🦙 llama, 你好世界 and 😶‍🌫️ emoji; Ünïcödé ✅ ☃ 𝔘 — done\n"


@pytest.mark.parametrize("name", VOCABS)
def test_incremental_decoder(name):
    tok = tokenizer(name)
    ids = tok.encode(MULTIBYTE)
    # The test only means something if some characters are split across tokens.
    split = [i for i in ids if _incomplete_utf8(tok.token_bytes(i))]
    assert split, f"{name}: no token of {ids} holds a partial UTF-8 character"
    dec, chunks = IncrementalDecoder(tok), []
    for i in ids:
        chunk = dec.feed(i)
        assert "\ufffd" not in chunk, (name, i, chunk)
        chunks.append(chunk)
    chunks.append(dec.flush())
    assert "".join(chunks) == tok.decode(ids) == MULTIBYTE
    assert "" in chunks[:-1]  # a partial character was held back, not emitted


def _incomplete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_incremental_decoder_flushes_dangling_bytes():
    tok = tokenizer("llama-spm")
    lead = tok.token_to_id["<0xF0>"]  # first byte of a 4-byte character, never completed
    dec = IncrementalDecoder(tok)
    assert dec.feed(tok.encode("ok", parse_special=False)[0]) == "ok"
    assert dec.feed(lead) == ""
    assert dec.flush() == "\ufffd"


def test_token_bytes():
    spm, bpe = tokenizer("llama-spm"), tokenizer("llama-bpe")
    assert spm.token_bytes(spm.token_to_id["<0x0A>"]) == b"\n"
    assert spm.token_bytes(spm.token_to_id["▁Hello"]) == b" Hello"
    assert bpe.token_bytes(bpe.token_to_id["ĠHello"]) == b" Hello"
    assert bpe.token_bytes(bpe.token_to_id["Ċ"]) == b"\n"
    assert bpe.token_bytes(128009) == b"<|eot_id|>"


def test_parse_special():
    tok = tokenizer("qwen2")
    text = "<|im_start|>user\nhi<|im_end|>"
    on, off = tok.encode(text), tok.encode(text, parse_special=False)
    assert on[0] == tok.token_to_id["<|im_start|>"] == 151644
    assert on[-1] == 151645
    assert 151644 not in off and 151645 not in off and len(off) > len(on)
    assert tok.decode(on) == tok.decode(off) == text


def test_user_defined_tokens_split_even_without_parse_special():
    # llama.cpp only skips control tokens when parse_special is off.
    tok = tokenizer("deepseek-coder")
    assert tok.token_types[32000] == 4 and tok.tokens[32000] == "õ"
    assert tok.encode("õ", parse_special=False) == [32000]


def test_spm_space_prefix_after_special():
    tok = tokenizer("llama-spm")
    assert tok.encode("Hello", parse_special=False) == [15043]
    assert tok.encode("<s>Hello") == [1, 15043]  # "▁Hello" again after a special token
    assert tok.decode([15043]) == "Hello"


def test_phi3_special_tokens_strip_following_whitespace():
    # llama.cpp sets RSTRIP on Phi-3's special tokens, so the "\n" after them is dropped.
    tok = tokenizer("phi-3")
    assert tok.encode("<|user|>\nHi<|end|>\n") == tok.encode("<|user|>Hi<|end|>") == [32010, 6324, 32007]


def test_add_special_and_defaults():
    spm, l3, qwen, gpt2 = (tokenizer(n) for n in ("llama-spm", "llama-bpe", "qwen2", "gpt-2"))
    assert spm.encode("Hello", add_special=True) == [1, 15043]
    assert l3.add_bos and l3.encode("Hello", add_special=True) == [128000, 9906]  # llama3 default
    assert not qwen.add_bos and qwen.encode("Hello", add_special=True) == qwen.encode("Hello")
    assert not gpt2.add_bos and not gpt2.add_eos
    md = {**metadata("llama-spm"), "tokenizer.ggml.add_eos_token": True}
    assert Tokenizer.from_metadata(md).encode("Hello", add_special=True) == [1, 15043, 2]


def test_stop_ids():
    # The same sets llama.cpp's llama_vocab_is_eog() gives: eos plus tokens found by text
    # (including "</s>", which current llama.cpp counts as EOG, here a normal BPE token).
    assert tokenizer("qwen2").stop_ids == {151643, 151645, 128247}  # <|endoftext|>, <|im_end|>, </s>
    assert tokenizer("llama-bpe").stop_ids == {128001, 128009}  # eos + <|eot_id|>
    assert tokenizer("phi-3").stop_ids == {32000, 32007, 2}  # <|endoftext|>, <|end|>, </s>
    assert tokenizer("starcoder").stop_ids == {0, 4}  # <|endoftext|>, <fim_pad>
    assert tokenizer("llama-spm").stop_ids == {2}
    md = {**metadata("gpt-2"), "tokenizer.ggml.eot_token_id": 13}
    assert Tokenizer.from_metadata(md).stop_ids == {50256, 13}


def test_unsupported_model_and_pre():
    md = metadata("gpt-2")
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="'no-such-pre'"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "no-such-pre"})


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_long_repetitive_input(name):
    # One 20k-character "word" must not go quadratic in the merge loop.
    tok, text = tokenizer(name), "a" * 20_000 + " " * 20_000 + "z"
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 5.0
    assert tok.decode(ids) == text and len(ids) < 10_000


_ABSENT = object()


@pytest.mark.parametrize("vocab, key, value, message", [
    ("gpt-2", "tokenizer.ggml.tokens", [1, 2, 3], "tokenizer.ggml.tokens is not an array of strings"),
    ("gpt-2", "tokenizer.ggml.tokens", 7, "tokenizer.ggml.tokens is not an array of strings"),
    ("gpt-2", "tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens is empty"),
    ("gpt-2", "tokenizer.ggml.tokens", _ABSENT, "tokenizer.ggml.tokens is missing"),
    ("gpt-2", "tokenizer.ggml.merges", [1, 2], "tokenizer.ggml.merges is not an array of strings"),
    ("gpt-2", "tokenizer.ggml.merges", 7, "tokenizer.ggml.merges is not an array of strings"),
    ("gpt-2", "tokenizer.ggml.merges", _ABSENT, "tokenizer.ggml.merges is missing"),
    ("gpt-2", "tokenizer.ggml.token_type", [1, 1], "tokenizer.ggml.token_type has 2 entries for 50257 tokens"),
    ("gpt-2", "tokenizer.ggml.token_type", ["x"] * 50257, "tokenizer.ggml.token_type is not an array of integers"),
    ("gpt-2", "tokenizer.ggml.pre", 5, "tokenizer.ggml.pre = 5 is not a string"),
    ("llama-spm", "tokenizer.ggml.scores", [0.5], "tokenizer.ggml.scores has 1 entries for 32000 tokens"),
    ("llama-spm", "tokenizer.ggml.scores", [float("nan")] * 32000, "tokenizer.ggml.scores holds a value that is not"),
    ("llama-spm", "tokenizer.ggml.add_bos_token", [1], "tokenizer.ggml.add_bos_token = \\[1\\] is not a boolean"),
])
def test_malformed_metadata_names_the_key(vocab, key, value, message):
    md = {k: v for k, v in metadata(vocab).items() if k != key}
    if value is not _ABSENT:
        md[key] = value
    with pytest.raises(ValueError, match=f"^m.gguf: {message}"):
        Tokenizer.from_metadata(md, source="m.gguf")


@pytest.mark.real_model
def test_gemma3_matches_llamacpp_on_a_generated_corpus(gemma3_model_path):
    """Gemma 3's SentencePiece vocab (262,144 tokens, byte fallback, no space prefix) on a
    seeded corpus of >= 1,000 strings (tools/make_tokenizer_reference.py), against
    llama-cpp-python's tokenization of each, special-token texts kept as text."""
    ref = json.loads((Path(__file__).parent / "data" / "tokenizer_gemma3.json").read_text(encoding="utf-8"))
    from workers.model import store as model_store

    assert ref["model_sha256"] == model_store.REGISTRY["gemma3-270m"].sha256
    cases = ref["cases"]
    assert len(cases) >= 1000
    assert sum(any(0 <= t - 238 < 256 for t in ids) for _, ids in cases) >= 50  # byte fallback exercised
    tok = Tokenizer.from_metadata(GGUFFile(gemma3_model_path).metadata)
    wrong = [(text, ids, got) for text, ids in cases
             if (got := tok.encode(text, add_special=False, parse_special=False)) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ; first: {wrong[:3]}"
