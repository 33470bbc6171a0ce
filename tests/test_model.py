"""The transformer on tiny synthetic GGUF models: against an independent float64 forward,
batched against step-by-step, and the engine's generation loop."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.quants import SUPPORTED_QTYPES, dequantize
from workers.engine.engine import ContextLengthError, Engine, Sequence
from workers.engine.sampling import SamplingParams
from drive import forward

ALL_QTYPES = sorted(q.name for q in SUPPORTED_QTYPES)


def reference_forward(engine: Engine, tokens: list[int]) -> np.ndarray:
    """Plain float64 decoder over the whole sequence, written from the architecture's definition."""
    g, c = engine.gguf, engine.config
    w = lambda name: dequantize(g.tensors[name].data, g.tensors[name].qtype).astype(np.float64)  # noqa: E731
    n, hd = len(tokens), c.head_dim

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_eps) * weight

    def rope(x, inv_freq):  # x [n, heads, hd]
        ang = np.arange(n)[:, None, None] * inv_freq[None, None, :]
        if c.rope_neox:
            z = (x[..., : hd // 2] + 1j * x[..., hd // 2:]) * np.exp(1j * ang)
            return np.concatenate([z.real, z.imag], -1)
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
        return np.stack([z.real, z.imag], -1).reshape(x.shape)

    gemma = c.arch == "gemma3"  # llama.cpp's src/models/gemma3.cpp
    x = w("token_embd.weight")[tokens] * (np.sqrt(c.d_model) if gemma else 1.0)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    # gemma3: every 6th layer global, the others see the last sliding_window keys, RoPE base 10000;
    # mistral with a sliding_window: every layer sees the last sliding_window keys
    sliding = np.where(np.subtract.outer(np.arange(n), np.arange(n)) >= c.sliding_window, -np.inf, 0.0) + causal
    local_freq = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        local = (gemma and i % 6 != 5) or (c.arch == "mistral" and c.sliding_window > 0)
        h = norm(x, w(p + "attn_norm.weight"))
        q, k, v = (h @ w(p + f"attn_{s}.weight").T + (w(p + f"attn_{s}.bias") if c.qkv_bias else 0) for s in "qkv")
        q, k = q.reshape(n, c.n_heads, hd), k.reshape(n, c.n_kv_heads, hd)
        if gemma:
            q, k = norm(q, w(p + "attn_q_norm.weight")), norm(k, w(p + "attn_k_norm.weight"))
        freq = local_freq if local and gemma else c.inv_freq
        q = rope(q, freq)
        k = np.repeat(rope(k, freq), c.n_heads // c.n_kv_heads, axis=1)
        v = np.repeat(v.reshape(n, c.n_kv_heads, hd), c.n_heads // c.n_kv_heads, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + (sliding if local else causal)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(n, -1) @ w(p + "attn_output.weight").T
        x = x + (norm(o, w(p + "post_attention_norm.weight")) if gemma else o)
        h = norm(x, w(p + "ffn_norm.weight"))
        gate, up = h @ w(p + "ffn_gate.weight").T, h @ w(p + "ffn_up.weight").T
        if gemma:  # GELU, tanh form
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
        else:
            act = gate / (1 + np.exp(-gate))
        f = (act * up) @ w(p + "ffn_down.weight").T
        x = x + (norm(f, w(p + "post_ffw_norm.weight")) if gemma else f)
    out = "token_embd.weight" if c.tied_embeddings else "output.weight"
    return norm(x, w("output_norm.weight")) @ w(out).T


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch, qtype, tied", [("llama", q, False) for q in ALL_QTYPES]
                         + [("qwen2", None, False), ("llama", None, True), ("gemma3", None, True)])
def test_forward_matches_reference_and_batching(tiny_model, arch, qtype, tied):
    engine = Engine(tiny_model(arch, qtype, tied), max_context=256, kv_cache_tokens=256)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, engine.config.vocab_size, 23).tolist()
    want = reference_forward(engine, tokens)

    prefill = forward(engine, [(Sequence(tokens), 23)], all_logits=True)
    assert rel_err(prefill, want) < 1e-4

    # Prefill 10, then one token at a time: the cache must give the same logits.
    seq = Sequence(tokens)
    steps = [forward(engine, [(seq, 10)])[0]] + [forward(engine, [(seq, 1)])[0] for _ in range(13)]
    assert rel_err(np.stack(steps), want[9:]) < 1e-4

    # Two sequences of different lengths in one call, one of them mid-decode.
    other = rng.integers(0, engine.config.vocab_size, 5).tolist()
    seq2 = Sequence(other)
    both = forward(engine, [(seq2, 5), (Sequence(tokens[:7]), 7)])
    assert rel_err(both[0], reference_forward(engine, other)[-1]) < 1e-4
    assert rel_err(both[1], want[6]) < 1e-4


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    return Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=128)


def test_generate_greedy_length_and_release(tiny_engine):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    events = list(tiny_engine.generate([1, 2, 3], params))
    assert len(events) == 8 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    again = [e.token_id for e in tiny_engine.generate([1, 2, 3], params)]
    assert again == [e.token_id for e in events]
    # Greedy tokens are the argmax of a reference forward over the growing sequence.
    ids = [1, 2, 3]
    for e in events[:3]:
        assert e.token_id == int(np.argmax(reference_forward(tiny_engine, ids)[-1]))
        ids.append(e.token_id)
    assert tiny_engine.blocks.blocks_in_use == 0


def test_greedy_decode_is_forward_then_argmax(tiny_engine):
    """Engine.greedy_decode, each step fed the previous step's ids (ops.greedy_step), gives the
    ids of a forward and an argmax per step, for sequences of different lengths."""
    from workers.engine.engine import Sequence

    engine = tiny_engine
    seqs = [Sequence([1, 2, 3]), Sequence([5, 6, 7, 8, 9])]
    ahead = [Sequence(list(s.token_ids)) for s in seqs]
    try:
        for s in seqs + ahead:
            forward(engine, [(s, len(s.token_ids) - 1)])
        want, got = [], []
        for _ in range(6):
            ids = np.argmax(forward(engine, [(s, 1) for s in seqs]), axis=-1)
            for s, t in zip(seqs, ids.tolist()):
                s.token_ids.append(t)
            want.append(ids.tolist())
        steps = engine.greedy_decode(ahead)
        for _ in range(6):
            ids = next(steps).tolist()
            for s, t in zip(ahead, ids):
                s.token_ids.append(t)
            got.append(ids)
        steps.close()
        assert got == want
        assert [s.token_ids for s in ahead] == [s.token_ids for s in seqs]
        # the step in flight when it stopped has already cached the last ids
        assert [s.num_cached for s in ahead] == [len(s.token_ids) for s in ahead]
        with pytest.raises(ValueError, match="cannot advance"):
            forward(engine, [(ahead[0], 1)])
    finally:
        for s in seqs + ahead:
            engine.release(s)
    assert engine.blocks.blocks_in_use == 0


def test_generate_stops_on_stop_id_and_context(tiny_engine):
    first = next(iter(tiny_engine.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=1)))).token_id
    events = list(tiny_engine.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=5, stop_ids=(first,))))
    assert len(events) == 1 and events[0].finish_reason == "stop" and events[0].text == ""
    # A default max_tokens is cut to the context window: 60 prompt tokens + 4 = 64 ...
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, cut_to_context=True)
    events = list(tiny_engine.generate(list(range(60)), params))
    assert len(events) == 4 and events[-1].finish_reason == "length"
    # ... one asked for that does not fit is refused, as vLLM refuses it
    with pytest.raises(ContextLengthError, match=r"max_tokens=50 .* room for 4") as e:
        next(tiny_engine.generate(list(range(60)), params.with_(cut_to_context=False)))
    assert e.value.param == "max_tokens"


def test_cancelled_generation_frees_blocks(tiny_engine):
    stream = tiny_engine.generate(list(range(40)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    next(stream)
    assert tiny_engine.blocks.blocks_in_use > 0
    stream.close()  # what a disconnecting client does
    assert tiny_engine.blocks.blocks_in_use == 0


def test_bad_prompts(tiny_engine):
    with pytest.raises(ContextLengthError, match="prompt has 64 tokens; the context window is 64"):
        list(tiny_engine.generate(list(range(64)), SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        list(tiny_engine.generate([], SamplingParams()))
    with pytest.raises(ValueError, match="out of range"):
        list(tiny_engine.generate([10**7], SamplingParams()))
    with pytest.raises(ContextLengthError, match="max_tokens=256 does not fit"):  # a max_tokens given must fit
        list(tiny_engine.generate([1, 2], SamplingParams()))
    assert tiny_engine.blocks.blocks_in_use == 0


def test_logprobs_and_seeded_sampling(tiny_engine):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=6, logprobs=3, ignore_eos=True)
    a = list(tiny_engine.generate([9, 8, 7], params))
    b = list(tiny_engine.generate([9, 8, 7], params))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    for e in a:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0][1] >= e.logprob - 1e-9


def test_score_reports_top_and_lse(tiny_engine):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    positions = tiny_engine.score(ids, top=5)
    want = reference_forward(tiny_engine, ids)
    assert len(positions) == len(ids)
    for p, row in zip(positions, want):
        assert [t for t, _ in p["top"]] == list(np.argsort(-row)[:5])
        lse = row.max() + np.log(np.exp(row - row.max()).sum())
        assert p["lse"] == pytest.approx(lse, abs=1e-3)


def test_a_prompt_longer_than_a_step_is_prefilled_in_steps_with_the_same_result(tiny_model):
    from workers.engine.sampling import SamplingParams

    prompt = list(range(100, 150))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    whole = Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=128)
    stepped = Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=128, max_batch_tokens=16)
    calls = []
    start = stepped.start_forward
    stepped.start_forward = lambda work, *a, **kw: calls.append([n for _, n in work]) or start(work, *a, **kw)
    ids = [e.token_id for e in stepped.generate(prompt, params)]
    assert calls[:4] == [[16], [16], [16], [2]]  # 50 prompt tokens in steps of at most 16
    assert ids == [e.token_id for e in whole.generate(prompt, params)]
