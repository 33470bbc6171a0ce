"""The KV cache's size against its byte budget, and the block manager (the one owner of blocks)."""

from __future__ import annotations

import pytest

from kernels.kv_layout import RING
from kernels.numpy_backend import NumpyBackend
from workers.engine.block_manager import BlockManager, OutOfBlocks
from workers.engine.engine import Engine, Sequence
from workers.engine.placement import PROMPT_GRAPH_BYTES

GIB = 2**30


# stored bits per value: dense, or codes plus a float16 scale and minimum per group
BITS = {"f32": 32, "f16": 16, "q8": 8 + 32 / 64, "q4": 4 + 32 / 64, "q3": 3 + 32 / 64, "q2": 2 + 32 / 32}


@pytest.mark.parametrize("kv", list(BITS))
def test_kv_cache_fills_its_byte_budget(tiny_model, kv):
    """The sizing follows the layout's bytes for each KV type, not the activation dtype."""
    budget = 3 * 2**20 + 12345
    engine = Engine(tiny_model("qwen2"), backend=NumpyBackend(), max_context=256, kv_cache_bytes=budget, kv_type=kv)
    held = engine.kv.nbytes
    assert 0.95 * budget <= held <= budget
    c = engine.config
    per_token = int(2 * c.n_layers * c.n_kv_heads * c.head_dim * BITS[kv] / 8)
    # a RotateKV cache's ring (32 slots of the sink and RING latest rows, K and V in float16)
    # and key centre and scale (float32) come first
    fixed = c.n_layers * (32 * 2 * (RING + 1) * c.n_kv_heads * c.head_dim * 2 + 8 * c.n_kv_heads * c.head_dim) \
        if kv.startswith("q") else 0
    assert engine.blocks.num_blocks * engine.blocks.block_size == (budget - fixed) // per_token // 16 * 16


def test_a_quantized_kv_type_holds_more_tokens_in_the_same_bytes(tiny_model):
    """q4 at least 3.5x the tokens of f16 in a budget its ring (32 sequences' slots) is small
    against (issue 17's capacity target; the ring is RING + 1 float16 tokens a sequence)."""
    tokens = {kv: Engine(tiny_model("qwen2"), max_context=256, kv_cache_bytes=256 * 2**20, kv_type=kv).kv.num_blocks
              for kv in ("f16", "q4")}
    assert tokens["q4"] >= 3.5 * tokens["f16"]


def test_an_unknown_or_unsupported_kv_type_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown kv_type 'q5'"):
        Engine(tiny_model("qwen2"), max_context=256, kv_type="q5")


def test_kv_budget_below_one_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="less than one 256-token context"):
        Engine(tiny_model("qwen2"), max_context=256, kv_cache_bytes=64 * 1024)


def test_a_vram_budget_gives_the_kv_cache_what_the_model_leaves(tiny_model):
    plain = Engine(tiny_model("qwen2"), max_context=256)
    p = plain.placement
    left = p.reserve + p.sizes.fixed + sum(p.sizes.layers)
    budget = left + 4096 * p.sizes.kv_per_token + 1000
    engine = Engine(tiny_model("qwen2"), max_context=256, vram_budget=budget)
    assert engine.placement.tiers == ("vram",) * engine.config.n_layers
    assert engine.blocks.num_blocks * engine.blocks.block_size == 4096
    assert engine.placement.device_bytes <= budget
    sized = Engine(tiny_model("qwen2"), max_context=256, vram_budget=budget, kv_cache_bytes=2 * GIB // 1024)
    assert sized.kv.nbytes <= 2 * GIB // 1024  # an explicit KV size wins over the budget's rest


def test_a_resident_plan_holds_the_prompt_graphs_pools_where_the_budget_does(tiny_model):
    """The plan grants captured prompt passes their pools (PROMPT_GRAPH_BYTES, inside the
    reserve) where every layer stays resident with them; a budget that holds the model only
    without them keeps it resident and grants none."""
    plain = Engine(tiny_model("qwen2"), max_context=256)
    p = plain.placement
    assert p.prompt_graph_bytes == PROMPT_GRAPH_BYTES
    bare = p.reserve - PROMPT_GRAPH_BYTES + p.sizes.fixed + sum(p.sizes.layers) + 256 * p.sizes.kv_per_token
    tight = Engine(tiny_model("qwen2"), max_context=256, vram_budget=bare + 1000).placement
    assert not tight.streamed and tight.prompt_graph_bytes == 0 and tight.reserve == p.reserve - PROMPT_GRAPH_BYTES
    roomy = Engine(tiny_model("qwen2"), max_context=256, vram_budget=bare + PROMPT_GRAPH_BYTES + 1000).placement
    assert not roomy.streamed and roomy.prompt_graph_bytes == PROMPT_GRAPH_BYTES
    assert roomy.kv_tokens >= 256 and roomy.device_bytes <= bare + PROMPT_GRAPH_BYTES + 1000


def test_blocks_reserve_trim_release():
    blocks = BlockManager(num_blocks=6, block_size=4)
    a, b = Sequence(list(range(10))), Sequence(list(range(3)))
    blocks.reserve(a, 10)
    assert len(a.block_table) == 3 and blocks.free_blocks == 3
    blocks.reserve(a, 12)  # still three blocks
    assert len(a.block_table) == 3
    with pytest.raises(OutOfBlocks):
        blocks.reserve(b, 17)  # five blocks: all or nothing
    assert b.block_table == [] and blocks.free_blocks == 3
    assert not blocks.try_reserve(b, 13) and blocks.try_reserve(b, 12)
    assert blocks.free_blocks == 0 and len(set(a.block_table) | set(b.block_table)) == 6
    # rejected speculative tokens: a keeps its first 5 tokens, two blocks, the third goes back
    a.num_cached = 10
    kept = a.block_table[:2]
    blocks.trim(a, 5)
    assert a.block_table == kept and a.num_cached == 5 and blocks.free_blocks == 1
    assert blocks.room(a) == 12
    blocks.release(a)
    blocks.release(b)
    assert a.block_table == b.block_table == [] and a.num_cached == 0 and blocks.free_blocks == 6


def test_forward_runs_only_reserved_blocks(tiny_model):
    engine = Engine(tiny_model("qwen2"), max_context=64, kv_cache_tokens=64, block_size=4)
    seq = Sequence([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="not reserved"):
        engine.forward([(seq, 5)])
    assert engine.blocks.blocks_in_use == 0
    engine.reserve([(seq, 5)])
    assert engine.forward([(seq, 5)]).shape == (1, engine.config.vocab_size)
    engine.release(seq)
    assert engine.blocks.blocks_in_use == 0
