"""Draft trees (issue 15): a verifying pass that also scores the drafter's runner-up token at
each drafted position, as leaf rows of the decode step (`Engine._plan`'s leaves,
AttentionBatch.step_rows), and keeps a leaf that holds the model's token.

The references are plain passes over the sequence with the leaf's token in place: a leaf row's
logits must be those of that sequence at that position, and once its KV is moved to its
position (`Engine.move_kv`) the sequence decodes on as that sequence does.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from kernels.ops import AttentionBatch
from workers.engine.draft_policy import VERIFY_COST, DraftPolicy
from workers.engine.engine import Engine, Sequence
from workers.engine.sampling import SamplingParams
from workers.engine.speculation import Choice, Speculation
from drive import forward
from test_verify_rows import N, make_engine, poison, prompt_of, rel_err

LEAVES = [(1, 7), (3, 11), (5, 2)]  # (step position, token): alternatives at positions base + j


def leaf_pass(engine: Engine, ids: list[int], leaves=LEAVES, move: int | None = None):
    """The last N of ids verified as decode rows with `leaves` after them, every slot the pass
    writes poisoned first. With move (an index into leaves), that leaf is then kept as
    speculation keeps one: its KV moved to its position, the sequence cut after it, and one
    decode step fed `ids[0]` from there. -> (the pass's logits, that step's logits or None)."""
    seq = Sequence(list(ids))
    base = len(ids) - N
    try:
        while seq.num_cached < base:
            forward(engine, [(seq, min(engine.max_batch_tokens, base - seq.num_cached))])
        engine.reserve([(seq, N + len(leaves))])
        poison(engine, seq, range(base, len(ids) + len(leaves)))
        out = engine.forward([(seq, N)], all_logits=True, decode_rows=True, leaves=[leaves])
        if move is None:
            return out, None
        j, token = leaves[move]
        engine.move_kv(seq, base + N + move, base + j)
        seq.token_ids[base + j:] = [token, ids[0]]
        seq.num_cached = base + j + 1
        engine.blocks.trim(seq, seq.num_cached)
        return out, forward(engine, [(seq, 1)], all_logits=True)
    finally:
        engine.release(seq)


def reference(engine: Engine, ids: list[int], j: int, token: int, then: list[int] = ()) -> np.ndarray:
    """The logits of the sequence ids[:base + j] + [token] + then at its last position, by
    single decode steps after the positions before base (as the pass's rows see them)."""
    seq = Sequence(ids[:len(ids) - N + j] + [token, *then])
    try:
        forward(engine, [(seq, len(ids) - N)])
        while seq.num_cached < len(seq.token_ids) - 1:
            forward(engine, [(seq, 1)])
        return forward(engine, [(seq, 1)], all_logits=True)[-1]
    finally:
        engine.release(seq)


@pytest.mark.parametrize("case", ["f16", "streamed"])
def test_a_leaf_row_scores_its_token_at_its_position(request, case):
    """Each leaf row's logits are those of the sequence with the leaf's token at its position;
    the chain's rows are those of the pass without leaves."""
    engine = make_engine(request, case)
    ids = prompt_of(engine, 70 + N, seed=3)
    rows, _ = leaf_pass(engine, ids)
    chain, _ = leaf_pass(engine, ids, leaves=[])
    assert rows.shape == (N + len(LEAVES), engine.config.vocab_size)
    assert rel_err(rows[:N], chain) < 1e-5
    for m, (j, token) in enumerate(LEAVES):
        assert rel_err(rows[N + m], reference(engine, ids, j, token)) < 1e-4, (j, token)
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("move", range(len(LEAVES)))
def test_a_kept_leaf_decodes_on_as_its_sequence(request, move):
    """A leaf's KV moved to its position: the next step's logits are those of the sequence
    that had the leaf's token there all along."""
    engine = make_engine(request, "f16")
    ids = prompt_of(engine, 70 + N, seed=4)
    _, after = leaf_pass(engine, ids, move=move)
    j, token = LEAVES[move]
    assert rel_err(after[-1], reference(engine, ids, j, token, [ids[0]])) < 1e-4


def test_leaves_are_refused_where_their_kv_cannot_move(tiny_model):
    """A RotateKV cache's ring holds each position's row once: no leaf rows there."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512, kv_type="q4")
    assert not engine.verifies_trees
    seq = Sequence(prompt_of(engine, 20, seed=5))
    try:
        forward(engine, [(seq, 16)])
        engine.reserve([(seq, 6)])
        with pytest.raises(ValueError, match="leaf rows need an unquantized KV cache"):
            engine.forward([(seq, 4)], all_logits=True, decode_rows=True, leaves=[[(1, 3)]])
    finally:
        engine.release(seq)
    # trees asked for are refused by name there, not silently left out; auto and lookup stand
    with pytest.raises(ValueError, match="draft_tree 'on': this engine does not verify draft trees"):
        engine.drafters(Speculation(3, "early-exit", tree=True))
    assert engine.drafters(Speculation(3, "early-exit")) and engine.drafters(Speculation(3, "lookup", tree=True))


def test_leaf_rows_in_the_batch_layout():
    """A leaf names its sequence's first row (step_rows) and is a range of its own; the
    chain's rows stay one range."""
    b = AttentionBatch(query_starts=np.arange(6, dtype=np.int32), context_lens=np.asarray([8, 9, 10, 9, 4], np.int32),
                       block_tables=np.asarray([[0], [0], [0], [0], [1]], np.int32),
                       slot_mapping=np.zeros(5, np.int32), step_from=np.asarray([7, 7, 7, 7, 3], np.int32),
                       step_rows=np.asarray([0, 0, 0, 0, 4], np.int32))
    assert b.leaves().tolist() == [False, False, False, True, False]
    assert b.sequence_rows() == [(0, 3), (3, 4), (4, 5)]
    assert b.first_positions().tolist() == [7, 7, 7, 7, 3] and b.first_rows().tolist() == [0, 0, 0, 0, 4]
    # without step_from or step_rows: each sequence's own new tokens, a prompt chunk of 3 and two decodes
    plain = AttentionBatch(query_starts=np.asarray([0, 3, 4, 5], np.int32), context_lens=np.asarray([3, 9, 4], np.int32),
                           block_tables=np.asarray([[0], [1], [2]], np.int32), slot_mapping=np.zeros(5, np.int32))
    assert plain.first_positions().tolist() == [0, 8, 3] and plain.first_rows().tolist() == [0, 3, 4]


def test_a_greedy_chain_gives_each_steps_runner_up(tiny_model):
    """greedy_chain(runner_up=True): each step's argmax and the argmax of the row without it,
    as the same steps run one at a time give them on the host."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)
    seq = Sequence(prompt_of(engine, 20, seed=2))
    try:
        forward(engine, [(seq, 19)])
        (ids, second), = engine.greedy_chain([seq], 4, (0,), runner_up=True)
        want, runner = [], []
        for _ in range(4):
            row = forward(engine, [(seq, 1)], all_logits=True, layers=(0,))[-1]
            order = np.argsort(-row, kind="stable")
            want.append(int(order[0]))
            runner.append(int(order[1]))
            seq.token_ids.append(want[-1])
    finally:
        engine.release(seq)
    assert ids == want and second == runner


def run(engine, prompt, speculation=None, **params):
    params = SamplingParams(**{"max_tokens": 40, "temperature": 0, "ignore_eos": True, **params})
    return [(e.token_id, e.text, e.finish_reason, e.logprob) for e in engine.generate(prompt, params, speculation)]


TREE_SPECS = [Speculation(3, "skip", skip=(1,), tree=True), Speculation(4, "early-exit", depth=1, tree=True),
              Speculation(1, "skip", skip=(1,), tree=True)]


@pytest.mark.parametrize("spec", TREE_SPECS, ids=repr)
def test_tree_speculation_gives_the_plain_greedy_tokens(tiny_model, spec):
    """Greedy with trees: the plain tokens and logprobs, some leaves kept along the way."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)
    prompt = prompt_of(engine, 12, seed=6)
    plain = run(engine, prompt, logprobs=2)
    got = run(engine, prompt, spec, logprobs=2)
    assert [t[:3] for t in got] == [t[:3] for t in plain]
    assert np.allclose([t[3] for t in got], [t[3] for t in plain], atol=1e-4)
    stats = engine.last_speculation
    assert stats.leaves > 0 and 0 < stats.leaf_hits <= stats.leaves
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_the_scheduler_verifies_trees_in_a_batch(tiny_model):
    """Four greedy requests, trees through the serving scheduler: each request's plain tokens."""
    from drive import drain
    from workers.engine.scheduler import Scheduler

    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=1024)
    prompts = [prompt_of(engine, 10 + i, seed=20 + i) for i in range(4)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = {i: [e.token_id for e in engine.generate(p, params)] for i, p in enumerate(prompts)}
    scheduler = Scheduler(engine, speculation=Speculation(3, "skip", skip=(1,), tree=True))
    for i, p in enumerate(prompts):
        scheduler.submit(i, p, params)
    tokens, _, _ = drain(scheduler)
    assert tokens == plain
    assert scheduler.spec_stats.leaf_hits > 0
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_sampled_passes_draft_no_tree(tiny_model):
    """A tree's leaves are for greedy passes: a sampled request's policy never asks for one."""
    engine = Engine(tiny_model("llama"), max_context=256, kv_cache_tokens=512)
    spec = Speculation(3, "skip", skip=(1,), tree=True)
    assert DraftPolicy.for_engine(engine, spec, greedy=True).next().tree
    assert not DraftPolicy.for_engine(engine, spec, greedy=False).next().tree


def test_the_policy_takes_a_tree_where_its_rows_are_cheap():
    """Leaves holding the model's token 2 times in 5: where a pass's rows cost little (the
    GPU's streamed passes) the tree pays; on the CPU, where each row costs a fifth to half a
    step, it does not."""
    spec = Speculation(3, "skip", skip=(1,))
    drafters = {"skip": (0, 2)}

    def policy(costs, hits):
        p = DraftPolicy(spec, drafters, {"skip": 0.1}, costs, trees=True)
        for i in range(20):
            p.update("skip", 3, 1, i % 5 < hits)
        return p.next()

    assert policy(VERIFY_COST["cupy", True], 2).tree
    assert not policy(VERIFY_COST["numpy", False], 2).tree
    # a tree of 16 drafts (33 rows): its cost past the last measured point, along its slope
    costly = DraftPolicy(Speculation(16, "skip", skip=(1,), tree=True), drafters, {"skip": 0.1},
                         VERIFY_COST["numpy", False], trees=True)
    assert costly.next() == Choice("skip", (0, 2), 16, tree=True)
    assert costly.verify_cost[32] > costly.verify_cost[16] == VERIFY_COST["numpy", False][16]
    assert Choice("skip", (0,), 5, tree=True).cut(6) == Choice("skip", (0,), 3, tree=True)
    assert Choice("skip", (0,), 5, tree=True).cut(1) == Choice("skip", (0,), 1)


def filled_caches(ops, layers: int, kv: str = "f16", seed: int = 0) -> list:
    """`layers` layers' (K, V) caches of 4 blocks of 16 rows, each filled with its own random
    values (on a GPU backend's stream, which the caches were zeroed on)."""
    rng = np.random.default_rng(seed)
    with getattr(ops, "stream", contextlib.nullcontext()):
        caches = [ops.new_kv_cache(4, ops.kv_layout(2, 64, 16, kv)) for _ in range(layers)]
        for layer in caches:
            for cache in layer:
                cache.rows[...] = ops.xp.asarray(rng.standard_normal(cache.rows.shape).astype(cache.rows.dtype))
    return caches


def test_copy_kv_moves_one_row_in_every_cache():
    """Backend.copy_kv: row src at row dst in every layer's K and V, every other row as it was."""
    from kernels.numpy_backend import NumpyBackend

    ops = NumpyBackend()
    caches = filled_caches(ops, 3)
    before = [[cache.rows.copy() for cache in layer] for layer in caches]
    ops.copy_kv(caches, 37, 5)
    for layer, was in zip(caches, before):
        for cache, rows in zip(layer, was):
            flat, old = cache.rows.reshape(64, -1), rows.reshape(64, -1)
            assert np.array_equal(flat[5], old[37])
            assert np.array_equal(np.delete(flat, 5, axis=0), np.delete(old, 5, axis=0))


# --- the CUDA kernels (`pytest -m gpu`) -----------------------------------------------------

@pytest.mark.gpu
def test_gpu_leaf_rows_give_the_twin_logits(request, cuda_device):
    """On CuPy a leaf row reads its sequence's step rows before its position (step_rows) and
    its own new row; the pass replays the decode graph of batch N + leaves: the logits against
    the NumPy twin's, and after a kept leaf's move the next step's too."""
    gpu, cpu = make_engine(request, "f16", "cupy"), make_engine(request, "f16")
    ids = prompt_of(gpu, 70 + N, seed=3)
    rows, after = leaf_pass(gpu, ids, move=1)
    again, _ = leaf_pass(gpu, ids)
    g = gpu.ops.steps.last_graph
    assert g is not None and g.B == N + len(LEAVES) and g.graph is not None
    assert rel_err(again, rows) < 1e-4
    twin, twin_after = leaf_pass(cpu, ids, move=1)
    errs = (rel_err(rows, twin), rel_err(after, twin_after))
    print("leaf rows, after the move:", [f"{e:.2e}" for e in errs])
    assert max(errs) < 1e-2


@pytest.mark.gpu
def test_gpu_top2_and_a_runner_up_chain(tiny_model, cuda_device):
    """top2_rows against the host's top 2 (ties to the first index), and a chain's runner-ups."""
    import cupy as cp

    engine = Engine(tiny_model("llama"), backend="cupy", max_context=256, kv_cache_tokens=512)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 151936)).astype(np.float32)
    x[1, [7, 90000]] = 50.0  # a tie for the best: the first index, then the other
    x[2, [3, 4]] = [40.0, 39.0]
    got = engine.ops.top2(cp.asarray(x))
    order = np.argsort(-x, axis=1, kind="stable")
    assert np.array_equal(got, order[:, :2].T)
    seq = Sequence(prompt_of(engine, 20, seed=2))
    try:
        forward(engine, [(seq, 19)])
        (ids, second), = engine.greedy_chain([seq], 4, (0,), runner_up=True)
        plain, = engine.greedy_chain([seq], 4, (0,))
    finally:
        engine.release(seq)
    assert ids == plain and all(a != b for a, b in zip(ids, second))


@pytest.mark.gpu
def test_gpu_tree_speculation_gives_the_plain_greedy_tokens(tiny_model, cuda_device):
    engine = Engine(tiny_model("llama"), backend="cupy", max_context=256, kv_cache_tokens=512)
    prompt = prompt_of(engine, 12, seed=6)
    plain = run(engine, prompt)
    for spec in TREE_SPECS:
        assert [t[:3] for t in run(engine, prompt, spec)] == [t[:3] for t in plain], spec
        assert engine.last_speculation.leaf_hits > 0


@pytest.mark.gpu
def test_gpu_copy_kv_is_the_twins_in_one_launch(cuda_device):
    """CuPy's copy_kv (one kernel over a table of the caches' addresses) leaves every layer's K
    and V as the NumPy backend's indexed copies do, bit for bit, twice in a row (the table kept)."""
    from kernels.cupy_backend import CupyBackend
    from kernels.numpy_backend import NumpyBackend

    cpu, gpu = NumpyBackend(), CupyBackend()
    twin, caches = filled_caches(cpu, 24, seed=4), filled_caches(gpu, 24, seed=4)
    for src, dst in [(37, 5), (63, 0)]:
        cpu.copy_kv(twin, src, dst)
        gpu.copy_kv(caches, src, dst)
    for a, b in zip(twin, caches):
        for x, y in zip(a, b):
            assert np.array_equal(x.rows, gpu.to_numpy(y.rows))
