"""`ntr perplexity`: chunking and scoring against a direct float64 NumPy computation on tiny
synthetic models; the real model against llama.cpp's figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from test_model import reference_forward
from workers.engine.engine import Engine
from workers.engine.perplexity import perplexity, text_ids

REFERENCE = json.loads((Path(__file__).parent / "data" / "llamacpp_perplexity.json").read_text())


def direct_perplexity(engine: Engine, ids: list[int], ctx: int) -> tuple[float, int]:
    """exp(mean NLL) of each whole chunk's second half, each chunk through the float64 reference."""
    bos = engine.tokenizer.bos_id if engine.tokenizer.add_bos else None
    nll, scored = 0.0, 0
    for c in range(len(ids) // ctx):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        logits = reference_forward(engine, chunk)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(ctx // 2, ctx - 1):
            nll -= logp[j, chunk[j + 1]]
            scored += 1
    return math.exp(nll / scored), scored


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama's vocabulary adds BOS, qwen2's does not
def test_perplexity_matches_direct_numpy(tiny_model, arch):
    engine = Engine(tiny_model(arch), max_context=64, kv_cache_tokens=2 * 32)
    rng = np.random.default_rng(5)
    ids = rng.integers(3, engine.config.vocab_size, 3 * 32 + 11).tolist()  # 11 tokens past the last chunk
    want, scored = direct_perplexity(engine, ids, 32)
    got = perplexity(engine, ids, ctx=32, per_pass=2)  # a pass of two chunks, then one of one
    assert (got.tokens, got.chunks, got.scored) == (len(ids), 3, scored) and scored == 3 * 15
    assert abs(got.ppl - want) / want < 1e-4
    assert engine.blocks.blocks_in_use == 0
    one_by_one = perplexity(engine, ids, ctx=32, per_pass=1)
    assert abs(one_by_one.ppl - got.ppl) / got.ppl < 1e-5


def test_perplexity_cli(capsys, tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    model = str(tiny_model("qwen2"))
    assert main(["perplexity", "--model", model, "--file", str(text), "--ctx", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"ppl", "tokens", "chunks", "scored"}
    engine = Engine(model, max_context=64, kv_cache_tokens=64)
    ids = text_ids(engine, text.read_text())
    assert result["tokens"] == len(ids) and result["chunks"] == len(ids) // 64
    assert result["scored"] == result["chunks"] * 31
    assert result["ppl"] == pytest.approx(perplexity(engine, ids, 64, per_pass=1).ppl, rel=1e-5)
    short = tmp_path / "short.txt"
    short.write_text("Too short for a chunk.")
    for argv, message in [(["--ctx", "100000"], "--ctx must be in [8, 512]"), (["--ctx", "4"], "--ctx must be in"),
                          (["--batch", "0"], "--batch must be >= 1"),
                          (["--ctx", "64", "--file", str(short)], "fewer than one chunk of --ctx 64")]:
        assert main(["perplexity", "--model", model, "--file", str(text), *argv]) == 2, argv
        assert message in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_first_chunks_match_llamacpp(real_engine):
    """The default model on the first chunks of the GPL-3 text, against llama.cpp's figure for the
    same chunks (tests/data/llamacpp_perplexity.json; the whole text: docs/benchmarks.md)."""
    ref = REFERENCE["gpl3_first_chunks"]
    ids = text_ids(real_engine, Path(ref["file"]).read_text(encoding="utf-8"))
    assert len(ids) == ref["tokens"]
    ctx = ref["ctx"]
    part = ids[:ref["chunks"] * ctx]
    got = perplexity(real_engine, part, ctx, per_pass=1)
    assert got.scored == ref["scored"]
    assert abs(got.ppl - ref["ppl"]) / ref["ppl"] < 0.005
