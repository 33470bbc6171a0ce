"""A verifying pass laid out as decode rows (issue 15): n tokens of one sequence as the decode
step of n sequences (`Engine.forward(decode_rows=True)`), and greedy drafts chained on the
device (`Engine.greedy_chain`).

The references are the same tokens as one prefill-shaped step (the earlier verifying pass) and
as n decode steps one after the other. Before each pass the cache's rows and ring entries at
the pass's positions are overwritten with noise, so a row that read a position of its own step
from the cache or the ring before that step wrote it (the race a fused store-and-attend kernel
would have) gives wrong logits instead of the ones an earlier pass left there.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.kv_layout import RING
from kernels.ops import AttentionBatch
from workers.engine.engine import Engine, Sequence
from drive import forward
from budgets import streaming_budget

N = 6  # tokens a pass verifies: the last prompt token and 5 proposals


def make_engine(request, case: str, backend: str = "numpy") -> Engine:
    """f16 and q4 (RotateKV: the ring) caches, gemma3's sliding layers through a pool that
    gives blocks back (blocks of 4 against its window of 8), and a placement streaming 5 of 6
    layers (on the CPU, HostStreaming runs the ring's driver)."""
    kw = dict(backend=backend, max_context=256, kv_cache_tokens=512)
    tiny = request.getfixturevalue("tiny_model")
    if case == "f16":
        return Engine(tiny("llama"), kv_type="f16", **kw)
    if case == "q4":
        return Engine(tiny("llama"), kv_type="q4", **kw)
    if case == "sliding":
        return Engine(tiny("gemma3"), block_size=4, max_batch_tokens=24, **kw)
    deep = request.getfixturevalue("deep_model")
    resident = Engine(deep, **kw)
    return Engine(deep, vram_budget=streaming_budget(resident.placement, 1, 2), n_buffers=2, **kw)


CASES = ["f16", "q4", "sliding", "streamed"]


def poison(engine: Engine, seq: Sequence, positions: range) -> None:
    """Noise in every layer's cache rows (its pool's) and ring entries at seq's positions."""
    rng = np.random.default_rng(99)
    bs = engine.blocks.block_size
    xp = engine.ops.xp
    for keys_values in engine.kv.layers:
        for cache in keys_values:
            table = seq.sliding_table if cache.sliding else seq.block_table
            flat = cache.rows.reshape(-1, *cache.rows.shape[2:])
            for p in positions:
                noise = rng.integers(0, 256, flat.shape[1:]) if cache.layout.type.quantized else \
                    rng.normal(0, 50, flat.shape[1:])
                flat[table[p // bs] * bs + p % bs] = xp.asarray(noise.astype(flat.dtype))
                if cache.recent is not None:
                    cache.recent[seq.recent_slot, p % RING] = xp.asarray(rng.normal(0, 50, cache.recent.shape[2:]))
    if xp is not np:  # written on CuPy's current stream, not the backend's: done before the pass starts
        xp.cuda.Device().synchronize()


def prompt_of(engine: Engine, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, engine.config.vocab_size, n).tolist()


def verify_logits(engine: Engine, ids: list[int], n: int, how: str) -> np.ndarray:
    """Logits of the last n of ids after the others are cached: decode rows, one prefill-shaped
    step, or n decode steps."""
    seq = Sequence(list(ids))
    try:
        while seq.num_cached < len(ids) - n:  # the prompt in chunks the engine takes
            forward(engine, [(seq, min(engine.max_batch_tokens, len(ids) - n - seq.num_cached))])
        engine.reserve([(seq, n)])
        poison(engine, seq, range(len(ids) - n, len(ids)))
        if how == "steps":
            return np.concatenate([forward(engine, [(seq, 1)], all_logits=True) for _ in range(n)])
        return forward(engine, [(seq, n)], all_logits=True, decode_rows=how == "rows")
    finally:
        engine.release(seq)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", CASES)
def test_a_pass_as_decode_rows_gives_the_prefill_shaped_pass_logits(request, case):
    """70 cached positions (past q4's 32-position window and gemma3's 8), then N: the decode
    rows' logits equal the prefill-shaped pass's and N single steps' to float32 rounding."""
    engine = make_engine(request, case)
    ids = prompt_of(engine, 70 + N, seed=len(case))
    rows = verify_logits(engine, ids, N, "rows")
    assert rows.shape == (N, engine.config.vocab_size)
    assert rel_err(rows, verify_logits(engine, ids, N, "prefill")) < 1e-4
    assert rel_err(rows, verify_logits(engine, ids, N, "steps")) < 1e-4
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_decode_rows_are_one_sequence_per_position(tiny_model):
    """The layout: T == B == n, row j the sequence at position base + j with its context up to
    there, the same block table and ring slot in every row, the prefill-shaped step's slots."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512, kv_type="q4", block_size=4)
    seq = Sequence(prompt_of(engine, 30, seed=1))
    try:
        forward(engine, [(seq, 25)])
        engine.reserve([(seq, 5)])
        rows, ranges = engine._plan([(seq, 5)], decode_rows=True), engine._plan([(seq, 5)])
        slot = seq.recent_slot
    finally:
        engine.release(seq)
    b = rows.batch
    assert np.array_equal(b.query_starts, np.arange(6)) and np.array_equal(b.context_lens, np.arange(26, 31))
    assert np.array_equal(b.step_from, [25] * 5) and ranges.batch.step_from is None
    assert (b.block_tables == ranges.batch.block_tables[0]).all() and (b.recent_slots == slot).all()
    assert np.array_equal(b.slot_mapping, ranges.batch.slot_mapping)
    assert np.array_equal(rows.tokens, ranges.tokens) and np.array_equal(rows.positions, ranges.positions)


def test_rows_that_continue_no_sequence_are_refused():
    """sequence_rows: decode rows group into their sequence's range; a row continuing a
    sequence under another block table, or not at the next position, is refused."""
    def batch(ctx, tables, step_from):
        return AttentionBatch(query_starts=np.arange(len(ctx) + 1, dtype=np.int32),
                              context_lens=np.asarray(ctx, np.int32), block_tables=np.asarray(tables, np.int32),
                              slot_mapping=np.zeros(len(ctx), np.int32), step_from=np.asarray(step_from, np.int32))

    assert batch([8, 9, 10, 4], [[0], [0], [0], [1]], [7, 7, 7, 3]).sequence_rows() == [(0, 3), (3, 4)]
    with pytest.raises(ValueError, match="row 1 continues a sequence from position 7"):
        batch([8, 9], [[0], [1]], [7, 7]).sequence_rows()
    with pytest.raises(ValueError, match="row 1 continues"):
        batch([8, 10], [[0], [0]], [7, 7]).sequence_rows()


@pytest.mark.parametrize("layers", [None, (0,), (1,)], ids=["whole", "early-exit", "skip"])
def test_a_greedy_chain_is_its_steps_argmax_one_at_a_time(tiny_model, layers):
    """greedy_chain's k ids of two sequences against k forward steps of the same layers over
    both, each argmaxed on the host and appended; the sequences are as they were afterwards."""
    chained, after_chain, want = chain_and_steps(Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512),
                                                 5, layers)
    assert after_chain == (20, 19)
    assert chained == want


def chain_and_steps(engine, k: int, layers):
    """(greedy_chain's k ids for each of two sequences after 20- and 13-token prompts, the first
    sequence's (tokens, cached) right after it, and the ids of k forward steps of the same
    layers over the two together, each argmaxed on the host and appended)."""
    seqs = [Sequence(prompt_of(engine, 20, seed=2)), Sequence(prompt_of(engine, 13, seed=3))]
    try:
        for seq in seqs:
            forward(engine, [(seq, len(seq.token_ids) - 1)])
        chained = engine.greedy_chain(seqs, k, layers)
        after_chain = (len(seqs[0].token_ids), seqs[0].num_cached)
        want = [[], []]
        for _ in range(k):
            for ids, seq, row in zip(want, seqs, forward(engine, [(seq, 1) for seq in seqs], all_logits=True,
                                                         layers=layers)):
                ids.append(int(np.argmax(row)))
                seq.token_ids.append(ids[-1])
    finally:
        for seq in seqs:
            engine.release(seq)
    return chained, after_chain, want


def test_speculative_generation_verifies_as_decode_rows_and_drafts_by_chains(tiny_model, monkeypatch):
    """Engine.generate with a greedy early-exit draft: every pass of several tokens is planned
    as decode rows, and each drafted token but a chain's first comes from a step fed on the
    device, with the plain greedy tokens."""
    from workers.engine.sampling import SamplingParams
    from workers.engine.speculation import Speculation

    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)
    prompt, params = [5, 17, 99, 4, 23, 5, 17, 99], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = [e.token_id for e in engine.generate(prompt, params)]
    plans, plan, passes = [], engine._plan, []

    def recording(work, fed=False, decode_rows=False, leaves=None):
        plans.append((work[0][1], fed, decode_rows))
        step = plan(work, fed=fed, decode_rows=decode_rows, leaves=leaves)
        if decode_rows:
            passes.append(step.tokens)
        return step

    monkeypatch.setattr(engine, "_plan", recording)
    assert [e.token_id for e in engine.generate(prompt, params, Speculation(3, "early-exit", depth=1))] == plain
    assert passes and all(rows for n, _, rows in plans[1:] if n > 1)  # after the prefill
    chains = sum(n == 1 and not (fed or rows) for n, fed, rows in plans[1:])  # a chain's first step
    assert chains and chains + sum(fed for _, fed, _ in plans) == engine.last_speculation.drafted
    # each pass takes its proposals from the chain's ids, which its negative tokens name, not from the host
    assert all(tokens[0] >= 0 and len(tokens) > 1 and (tokens[1:] < 0).all() for tokens in passes)


def test_fed_tokens_are_the_ids_they_name():
    from kernels.ops import fed_tokens

    tokens = np.array([5, -1, -4, 7, -2, 0])
    got = fed_tokens(tokens, [np.array([[10, 11], [12, 13]]), np.array([14])])  # taken as one, flattened
    assert got.tolist() == [5, 10, 13, 7, 11, 0] and got.dtype == tokens.dtype
    with pytest.raises(ValueError, match="fed id 5 of 5"):
        fed_tokens(np.array([1, -6]), [np.arange(5)])


# --- the CUDA kernels (`pytest -m gpu`) -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_a_pass_as_decode_rows_replays_the_decode_graph_and_gives_the_twin_logits(request, cuda_device, case):
    """On CuPy the decode rows run attn_decode with rows of one sequence (its own step's keys
    read after the wait, not from the cache that the other rows' blocks are filling): the
    logits against the NumPy twin's, the prefill-shaped pass's and N single steps'; the pass
    replays the captured decode graph of batch N."""
    gpu, cpu = make_engine(request, case, "cupy"), make_engine(request, case)
    ids = prompt_of(gpu, 70 + N, seed=len(case))
    rows = verify_logits(gpu, ids, N, "rows")  # captures the graph of batch N
    again = verify_logits(gpu, ids, N, "rows")  # replays it
    g = gpu.ops.steps.last_graph
    assert g is not None and g.B == N and g.graph is not None and g in gpu.ops.steps.graphs.values()
    assert rel_err(again, rows) < 1e-4  # the replay against the capturing run
    errs = {how: rel_err(rows, ref) for how, ref in [("twin", verify_logits(cpu, ids, N, "rows")),
                                                     ("prefill", verify_logits(gpu, ids, N, "prefill")),
                                                     ("steps", verify_logits(gpu, ids, N, "steps"))]}
    print(case, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-2


@pytest.mark.gpu
def test_gpu_fed_tokens_on_the_device_are_the_twins(cuda_device):
    import cupy as cp

    from kernels.cupy.steps import fill_fed
    from kernels.ops import fed_tokens

    rng = np.random.default_rng(7)
    for T in (1, 7, 64):
        feed = [rng.integers(0, 150_000, (2, 3, 4)).astype(np.int32), rng.integers(0, 150_000, 5).astype(np.int32)]
        tokens = np.where(rng.random(T) < 0.5, -1 - rng.integers(0, 29, T), rng.integers(0, 150_000, T))
        dev = cp.asarray(tokens.astype(np.int32))
        fill_fed(dev, tokens, [cp.asarray(f) for f in feed])
        assert cp.asnumpy(dev).tolist() == fed_tokens(tokens, feed).tolist()
    with pytest.raises(ValueError, match="fed id"):
        fill_fed(cp.zeros(2, cp.int32), np.array([0, -30]), [cp.asarray(f) for f in feed])


@pytest.mark.gpu
@pytest.mark.parametrize("layers", [None, (0,)], ids=["whole", "early-exit"])
def test_gpu_a_greedy_chain_is_its_steps_one_at_a_time(tiny_model, cuda_device, layers):
    """The chain's ids, fed on the device from graph to graph, equal the same graphs' steps
    fed from the host."""
    engine = Engine(tiny_model("llama"), backend="cupy", max_context=256, kv_cache_tokens=512)
    chained, _, want = chain_and_steps(engine, 8, layers)
    assert chained == want
