"""Pipeline parallelism (workers/engine/pipeline.py, workers/stage_worker.py): the split by
bytes against a brute force, P stages' logits against one process's (bit for bit: the same
NumPy ops on the same float32 arrays), micro-batches (the scheduler's groups, their passes
overlapping in the stage actors), stage actors on a local Ray, a stage killed mid-request,
and the configuration's checks."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import ray

from cluster.config import ConfigError, server_config
from workers.engine.draft_policy import VERIFY_COST, DraftPolicy
from workers.engine.engine import Engine, Sequence
from workers.engine.pipeline import TOP2, LocalPipeline, Stage, split_by_bytes
from workers.engine.placement import CONTEXT_BYTES, stage_reserve
from workers.engine.grammar import GrammarSpec
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine import speculation
from workers.engine.speculation import Speculation
from workers.model.synthetic import Shape, write_model
from budgets import every_stage_streams
from drive import drain, mixed_passes
import serving_cluster

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=40, seed=11, max_tokens=8, ignore_eos=True)
SHAPES = {  # more layers than conftest's tiny qwen2, so that P = 3 splits it
    "qwen2": (Shape("qwen2", n_layers=4, d_model=256, n_heads=4, n_kv_heads=1, ffn_dim=512, rope_base=1_000_000.0,
                    context_length=512), "ggml-vocab-qwen2.gguf"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, vocab_dir, tiny_model):
    """model(arch) -> a synthetic GGUF: a 4-layer qwen2, or conftest's 7-layer gemma3 (sliding layers)."""
    made = {}

    def make(arch: str):
        if arch == "gemma3":
            return tiny_model("gemma3")
        if arch not in made:
            shape, vocab = SHAPES[arch]
            made[arch] = write_model(tmp_path_factory.mktemp("pp") / f"{arch}.gguf", shape, vocab_dir / vocab)
        return made[arch]

    return make


# the split

def brute_force(costs, parts, first, last):
    """The least largest stage sum over every way to cut costs into `parts` non-empty runs."""
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        sums = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        sums[0] += first
        sums[-1] += last
        best = max(sums) if best is None else min(best, max(sums))
    return best


def stage_sums(ranges, costs, first, last):
    sums = [sum(costs[i] for i in r) for r in ranges]
    sums[0] += first
    sums[-1] += last
    return sums


def test_split_of_equal_layers_is_even():
    assert split_by_bytes([7] * 12, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert split_by_bytes([7] * 5, 5) == [range(i, i + 1) for i in range(5)]
    assert split_by_bytes([7] * 5, 1) == [range(0, 5)]
    # the embedding and head weigh as much as two layers each: the end stages take two fewer
    assert split_by_bytes([10] * 10, 2, first_bytes=20, last_bytes=20) == [range(0, 5), range(5, 10)]
    assert split_by_bytes([10] * 8, 3, first_bytes=20, last_bytes=20) == [range(0, 2), range(2, 6), range(6, 8)]


def test_split_is_the_least_largest_stage():
    """Contiguous, covering, non-empty, and its largest stage as small as a brute force over
    every cut finds; within the closed-form bound total / P + the largest item."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 9))
        costs = rng.integers(1, 1000, n).tolist()
        first, last = (int(x) for x in rng.integers(0, 2000, 2))
        for parts in range(1, n + 1):
            ranges = split_by_bytes(costs, parts, first, last)
            assert len(ranges) == parts and all(len(r) for r in ranges)
            assert [i for r in ranges for i in r] == list(range(n))
            sums = stage_sums(ranges, costs, first, last)
            assert max(sums) == brute_force(costs, parts, first, last)
            items = [costs[0] + first] + costs[1:-1] + [costs[-1] + last] if n > 1 else [costs[0] + first + last]
            assert max(sums) <= sum(items) / parts + max(items)


@pytest.mark.parametrize("parts", [0, -1, 5, True, 2.0])
def test_split_sizes_out_of_range_name_the_field(parts):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=.* must be in \[1, 4\]"):
        split_by_bytes([1, 2, 3, 4], parts)


def test_stages_split_a_synthetic_model_by_its_bytes(model):
    """Each stage counts its layers' matrices (as the backend stores them) and KV pools, the
    embedding on the first and the head on the last; the split is the least largest stage."""
    engine = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=3)
    c, ops, t = engine.config, engine.ops, engine.gguf.tensors
    layout = engine.kv.layout
    per_layer = [w + layout.bytes_per_block * engine.kv.num_blocks for w in engine.placement.sizes.layers]
    d, vocab, f32 = c.d_model, c.vocab_size, 4
    embed = head = vocab * d * f32  # qwen2 is untied: the head is a matrix of the same shape
    assert ops.matrix_nbytes(t["token_embd.weight"]) == embed and ops.matrix_nbytes(t["output.weight"]) == head
    sums = [s.nbytes for s in engine.stages]
    assert sums == stage_sums([s.layers for s in engine.stages], per_layer, embed, head)
    assert max(sums) == brute_force(per_layer, 3, embed, head)
    # the embedding and head outweigh the layers: each end stage keeps one layer
    assert [s.layers for s in engine.stages] == [range(0, 1), range(1, 3), range(3, 4)]
    assert engine.model is None and engine.kv.layers == [] and engine.kv.nbytes == 0  # the driver holds neither



def largest_stage(gguf, sizer, placement, layout, parts=2):
    """largest(blocks): the device bytes of the largest of `parts` stages, split by brute force,
    each holding its layers' matrices and KV pools of `blocks` blocks, the embedding (first) or
    head (last), every layer's vectors and a stage's runtime reserve."""
    t = gguf.tensors
    vectors = sum(x.n_elements for x in t.values() if len(x.shape) == 1) * 4
    embed = sizer.matrix_nbytes(t["token_embd.weight"])
    head = sizer.matrix_nbytes(t["output.weight"]) if "output.weight" in t else embed  # tied: the last stage's copy
    reserve = stage_reserve(placement)  # a stage's runtime: no prompt graphs

    def largest(blocks):
        costs = [w + layout.bytes_per_block * blocks for w in placement.sizes.layers]
        return brute_force(costs, parts, embed, head) + vectors + reserve

    return largest


def test_each_stage_is_planned_against_the_budget_of_its_device(model, single):
    """With P stages vram_budget is each stage's device's. A budget under which one process
    streams every layer holds the model in two stages; the KV pools take the most blocks with which the
    largest stage still fits (found here by the brute-force split over every pool size), and
    the stages give one process's logits. A budget below a stage's share is refused, naming
    the stage."""
    free = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    largest = largest_stage(free.gguf, free.ops, free.placement, free.kv.layout)
    one_context = 64 // free.kv.block_size
    budget = largest(one_context) + 40 * free.kv.layout.bytes_per_block + 1  # room for ~20 more blocks a layer
    alone = Engine(model("qwen2"), max_context=64, vram_budget=budget).placement
    assert alone.streamed == (0, 1, 2, 3) and alone.embed_on_host  # one process: the head leaves no layer room
    staged = Engine(model("qwen2"), max_context=64, vram_budget=budget, pipeline_parallel_size=2)
    want_blocks = max(b for b in range(one_context, one_context + 100) if largest(b) <= budget)
    assert want_blocks > one_context + 10
    assert staged.blocks.num_blocks == want_blocks
    assert [s.num_blocks for s in staged.stages] == [want_blocks] * 2 and all(s.budget == budget for s in staged.stages)
    # a stage actor caps its pool at the budget less the context planned (the driver's estimate: it has no device)
    assert all(s.pool_limit == budget - CONTEXT_BYTES for s in staged.stages)
    assert max(largest(s.num_blocks) for s in staged.stages) <= budget
    for w, g in zip(mixed_passes(single("qwen2")), mixed_passes(staged)):
        assert np.array_equal(w, g)
    # an asked-for KV size is kept, and checked
    assert Engine(model("qwen2"), max_context=64, kv_cache_tokens=64, vram_budget=budget,
                  pipeline_parallel_size=2).blocks.num_blocks == one_context


def test_a_stage_its_budget_cannot_hold_streams_the_layers_it_does_not(model, single):
    """A budget a byte short of the largest stage resident (Gemma 3's 7 layers, sliding ones
    among them, in 2 stages): each stage is placed as a model of its own (placement.place) and
    the largest streams its last layers through its slots from its host memory, the pools
    keeping one context; the logits are one process's. A budget that cannot hold a stage's
    runtime, ends and two slots is refused, naming the stage."""
    free = Engine(model("gemma3"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    largest = largest_stage(free.gguf, free.ops, free.placement, free.kv.layout)
    budget = largest(4) - 1
    staged = Engine(model("gemma3"), max_context=64, vram_budget=budget, pipeline_parallel_size=2)
    assert staged.blocks.num_blocks == 4 and any(s.streamed for s in staged.stages)
    for s, stage in zip(staged.stages, staged.pipeline.stages):
        assert s.streamed == tuple(s.layers[len(s.layers) - len(s.streamed):])  # the stage's last layers
        assert s.device_bytes <= budget
        if s.streamed:
            assert 1 <= s.n_buffers <= len(s.streamed) and stage.ops.streaming.schedule.streamed == s.streamed
    for w, g in zip(mixed_passes(single("gemma3")), mixed_passes(staged)):
        assert np.array_equal(w, g)
    # a resident order (a skip draft's layers first, as the server config gives it) holds in each stage
    reordered = Engine(model("gemma3"), max_context=64, vram_budget=budget, pipeline_parallel_size=2,
                       resident_order=tuple(reversed(range(7))))
    for s, r in zip(staged.stages, reordered.stages):
        assert r.streamed == tuple(s.layers[:len(s.streamed)])  # the stage's first layers
    for w, g in zip(mixed_passes(single("gemma3")), mixed_passes(reordered)):
        assert np.array_equal(w, g)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2: stage \d \(layers \d-\d\), its layers streamed: "
                                         r"a VRAM budget of .* cannot hold"):
        Engine(model("gemma3"), max_context=64, vram_budget=budget // 2, pipeline_parallel_size=2)



def test_the_draft_policy_prices_a_pass_through_stages(model, monkeypatch):
    """The draft policy's costs through stages. Where they stream, a pass over some layers
    takes each stage's own placement for those it holds (its layers renumbered from 0) and
    the last stage's head. Every pass through stages, a draft's step as a plain one, also pays
    the runner's overhead (`PASS_OVERHEAD_SECONDS`), which one process's chain of draft steps
    does not: a skip draft of a quarter of the layers, every proposal kept, pays without it
    (auto k drafts), and with an overhead far above a step's compute its step costs a plain
    step's, so the policy decodes plainly."""
    free = Engine(model("gemma3"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    largest = largest_stage(free.gguf, free.ops, free.placement, free.kv.layout)
    streaming = Engine(model("gemma3"), max_context=64, vram_budget=largest(4) - 1, pipeline_parallel_size=2)
    assert streaming.streams and not free.streams
    rates, (first, last) = streaming.rates, streaming.stages
    head = last.placement.step_seconds(1, rates, ())
    assert head > 0 and streaming.pass_seconds(()) == head
    assert streaming.pass_seconds(tuple(first.layers)) == first.placement.step_seconds(1, rates) + head
    assert streaming.pass_seconds(tuple(last.layers)) == last.placement.step_seconds(1, rates)
    assert streaming.pass_seconds() == pytest.approx(first.placement.step_seconds(1, rates)
                                                     + last.placement.step_seconds(1, rates), rel=1e-12)

    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    staged.rates = replace(staged.rates, layer_floor_s=1.0)  # the layers, not the head, make a step
    spec = Speculation(None, "skip", skip=(1, 2, 3))

    def policy(overhead: float) -> DraftPolicy:
        monkeypatch.setitem(LocalPipeline.PASS_OVERHEAD_SECONDS, "numpy", overhead)
        assert staged.pass_overhead_seconds == overhead
        made = DraftPolicy.for_engine(staged, spec, greedy=False)
        for _ in range(20):
            made.update("skip", 4, 4)
        return made

    step, draft = staged.pass_seconds(), staged.pass_seconds((0,))
    alone = policy(0.0)
    assert alone.draft_cost["skip"] == pytest.approx(draft / step) and alone.draft_cost["skip"] < 0.3
    assert alone.next().drafter == "skip"
    loaded = policy(100.0)
    assert loaded.draft_cost["skip"] == pytest.approx((draft + 100.0) / (step + 100.0))
    assert loaded.verify_cost[4] == pytest.approx((VERIFY_COST["numpy", False][4] * step + 100.0) / (step + 100.0))
    assert loaded.next() is None


def test_stages_share_host_ram_by_what_they_stream_and_read_the_rest_from_disk(wide_model, tmp_path, monkeypatch):
    """Both stages streaming, host_ram half their streamed bytes: each stage's images in RAM
    stay within its share (in proportion to what it streams), the rest are its last streamed
    layers read from a disk tier of its own (an image file each, in one process), and the
    logits are one process's."""
    monkeypatch.setenv("NTR_HOME", str(tmp_path))
    kw = dict(max_context=64, kv_cache_tokens=64, pipeline_parallel_size=2)
    resident = Engine(wide_model, vram_budget=1 << 40, **kw)
    budget = every_stage_streams(resident)
    streaming = Engine(wide_model, vram_budget=budget, **kw).stages
    assert streaming[0].placement.embed_on_host and not streaming[1].placement.embed_on_host
    streamed = [s.placement.streamed_bytes for s in streaming]
    assert all(streamed)
    host_ram = sum(streamed) // 2
    staged = Engine(wide_model, vram_budget=budget, host_ram=host_ram, **kw)
    assert [s.streamed for s in staged.stages] == [s.streamed for s in streaming]
    for s, n in zip(staged.stages, streamed):
        assert s.placement.bytes_in("ram") <= host_ram * n // sum(streamed)
        assert s.on_disk and s.on_disk == s.streamed[len(s.streamed) - len(s.on_disk):]
    for w, g in zip(mixed_passes(Engine(wide_model, max_context=64, kv_cache_tokens=256)), mixed_passes(staged)):
        assert np.array_equal(w, g)
    # a draft skipping one of a disk-streaming stage's streamed layers and running the others cannot run there
    ring = next(s.streamed for s in staged.stages if len(s.streamed) > 1)
    with pytest.raises(ValueError, match="the skip drafter runs some of the layers streamed from disk"):
        staged.drafters(Speculation(3, "skip", skip=ring[:1]))


@pytest.mark.parametrize("spec", ["Q3_K", "auto"])
def test_streaming_stages_requantize_what_they_stream(wide_model, tmp_path, spec):
    """requant_streamed through stages: each streaming stage's streamed matrices (only those)
    load retyped as spec says (placement.requantized, per stage), and the stages' logits are
    those of one process on the file `ntr quantize` writes with every stage's types. (The
    NumPy backend stores every type as float32: the bytes they save are the GPU's, next test.)"""
    from workers.engine.quantize_model import write_quantized
    from workers.model.gguf_file import GGUFFile
    from workers.model.quant_recipe import Q

    kw = dict(max_context=64, kv_cache_tokens=64)
    resident = Engine(wide_model, vram_budget=1 << 40, pipeline_parallel_size=2, **kw)
    budget = every_stage_streams(resident)
    plain = Engine(wide_model, vram_budget=budget, pipeline_parallel_size=2, **kw)
    staged = Engine(wide_model, vram_budget=budget, pipeline_parallel_size=2, requant_streamed=spec, **kw)
    assert all(s.streamed for s in staged.stages)
    types = {}
    for s, before in zip(staged.stages, plain.stages):
        p = s.placement
        assert s.streamed == before.streamed and p.file_streamed_bytes == before.placement.streamed_bytes
        assert p.requant and {int(n.split(".")[1]) for n in p.requant} <= set(s.streamed)
        types |= {n: Q[t] for n, t in p.requant.items()}
    reference = write_quantized(GGUFFile(wide_model), tmp_path / "ref.gguf", types, {})
    want = mixed_passes(Engine(reference, **kw))
    for w, g in zip(want, mixed_passes(staged)):
        assert np.array_equal(w, g)
    assert not np.array_equal(want[0], mixed_passes(plain)[0])  # requantizing changes what the model computes


def test_ntr_plan_pp_shows_what_requantized_stages_stream(tmp_path, vocab_dir, capsys, monkeypatch):
    """`ntr plan --pp 2 --requant-streamed Q4_K` on a Q6_K model with rows wide enough that the
    GPU's planes carry little padding, a budget a byte short of the smaller stage resident: the
    last stage streams the same layers as without, its streamed bytes cut to about 0.7 of the
    file's and its device bytes with them; the first keeps its layers resident by holding its
    embedding table in host memory, and requantizes nothing. (The
    quantizers' local memory at load, which would outgrow this tiny budget, is left out, as in
    tests/test_requant_streamed.py.)"""
    from cluster.cli import main
    from kernels.cupy.planes import CupySizes
    from workers.model.quant_recipe import Q
    from workers.model.synthetic import uniform_mix

    monkeypatch.setattr(CupySizes, "requant_local_bytes", 0)
    # 4 layers a stage: a stage a byte short of resident keeps one and streams 3 through 2 slots
    shape = Shape("llama", n_layers=8, d_model=2048, n_heads=16, n_kv_heads=4, ffn_dim=1024, context_length=512)
    wide = write_model(tmp_path / "wide.gguf", shape, vocab_dir / "ggml-vocab-llama-spm.gguf",
                       mix=uniform_mix(Q.Q6_K), seed=3)
    plan = ["plan", "--model", str(wide), "--ctx", "64", "--seqs", "4", "--pp", "2", "--json"]
    assert main(plan + ["--vram-gb", "1000"]) == 0
    budget = min(s["device_bytes"] for s in json.loads(capsys.readouterr().out)["stages"]) - 1
    plan[-1:] = ["--vram-gb", repr(budget / 2**30)]
    assert main(plan + ["--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(plan + ["--json", "--requant-streamed", "Q4_K"]) == 0
    after = json.loads(capsys.readouterr().out)
    first, last = after["stages"]
    assert not first["streamed"] and first["embed_on_host"] and first == before["stages"][0]
    assert last["streamed"] and after["file_streamed_bytes"] == before["streamed_bytes"]
    # 4.5 bits a weight for 6.5625 (0.69), and each layer's 64 KiB of spare
    b = before["stages"][1]
    assert last["streamed"] == b["streamed"] and 0 < last["streamed_bytes"] < 0.72 * b["streamed_bytes"]
    assert last["device_bytes"] < b["device_bytes"] <= budget
    assert set(after["requant"].values()) == {"Q4_K"}
    assert main(plan + ["--requant-streamed", "Q4_K"]) == 0
    assert f"requantized ({len(after['requant'])} matrices to Q4_K)" in capsys.readouterr().out


def test_a_driver_of_gpu_stages_needs_no_gpu(model):
    """An engine whose stages run on the GPU plans them and numbers their KV blocks on the
    host (kernels/driver.py), sizing them as the GPU stores the model (CupySizes): it starts
    on a machine without a GPU, as a Serve replica's ComputeWorker that reserves none does."""
    from kernels.cupy.planes import CupySizes
    from workers.engine.placement import plan_model
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    path, started = model("qwen2"), []
    with GGUFFile(path) as g:
        c = ModelConfig.from_gguf(g)
        layout = CupySizes.kv_layout(c.n_kv_heads, c.head_dim, 16)
        largest = largest_stage(g, CupySizes, plan_model(g, c, CupySizes, None, 64, 64, max_logit_rows=32), layout)
    budget = largest(4) + 40 * layout.bytes_per_block + 1
    engine = Engine(path, backend="cupy", max_context=64, vram_budget=budget, pipeline_parallel_size=2,
                    stage_runner=started.append)
    (specs,) = started
    assert engine.ops.name == "cupy" and engine.kv.layout == layout and [s.backend for s in specs] == ["cupy"] * 2
    assert max(largest(s.num_blocks) for s in specs) <= budget < largest(specs[0].num_blocks + 1)


def test_ntr_plan_pp_shows_each_stage_under_its_budget(model, capsys):
    """`ntr plan --pp 2` sizes the stages for the GPU without one (CupySizes): each stage's
    device bytes within --vram-gb, the KV cache asked for, and the most every stage has room for."""
    from cluster.cli import main
    from kernels.cupy.planes import CupySizes
    from workers.engine.placement import GIB, plan_model
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile

    path = model("qwen2")
    with GGUFFile(path) as g:
        c = ModelConfig.from_gguf(g)
        layout = CupySizes.kv_layout(c.n_kv_heads, c.head_dim, 16)
        largest = largest_stage(g, CupySizes, plan_model(g, c, CupySizes, None, 64, 64, max_logit_rows=16), layout)
    budget = largest(4) + 40 * layout.bytes_per_block + 1
    plan = ["plan", "--model", str(path), "--ctx", "64", "--seqs", "16", "--pp", "2", "--json", "--vram-gb"]
    assert main(plan + [repr(budget / GIB)]) == 0
    out = json.loads(capsys.readouterr().out)
    (a, b), (c, d) = (s["layers"] for s in out["stages"])
    assert (a, b + 1, d) == (0, c, 3)
    assert max(s["device_bytes"] for s in out["stages"]) == largest(4) <= budget and out["kv_tokens"] == 64
    assert out["kv_tokens_room"] == 16 * max(b for b in range(4, 200) if largest(b) <= budget) > 64 + 160
    assert main(plan + [repr((largest(4) - 1) / GIB)]) == 2
    assert "pipeline_parallel_size=2: stage" in capsys.readouterr().err


def test_ntr_plan_pp_predicts_streaming_stages_below_resident_ones(wide_model, capsys):
    """A budget a byte short of the smaller stage's share (the first stage's without its embedding
    table, which a streaming stage keeps in host memory): both stages stream, and `ntr plan`
    predicts them (the stages' own placements one after the other) slower than the same
    stages resident, and not faster than the link moves every stage's streamed bytes."""
    from cluster.cli import main

    link = 20.0  # GB/s, given (as a GPU would measure it)
    plan = ["plan", "--model", str(wide_model), "--ctx", "64", "--seqs", "4", "--pp", "2", "--json",
            "--link-gb-s", str(link)]
    assert main(plan + ["--vram-gb", "1000"]) == 0
    resident = json.loads(capsys.readouterr().out)
    budget = min(s["device_bytes"] for s in resident["stages"]) - resident["embed_bytes"] - 1
    assert main(plan + ["--vram-gb", repr(budget / 2**30)]) == 0
    streaming = json.loads(capsys.readouterr().out)
    assert streaming["streamed_bytes"] > 0 and all(s["streamed"] for s in streaming["stages"])
    fast, slow = resident["predicted"], streaming["predicted"]
    assert 0 < slow["decode_tok_s"] < fast["decode_tok_s"] and 0 < slow["prefill_tok_s"] <= fast["prefill_tok_s"]
    assert slow["decode_tok_s"] <= link * 1e9 / streaming["streamed_bytes"]
    # half the streamed bytes in host RAM: each stage reads some of its layers from disk, slower still
    ram = streaming["streamed_bytes"] / 2 / 2**30
    assert main(plan + ["--vram-gb", repr(budget / 2**30), "--ram-gb", repr(ram)]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert all(s["on_disk"] and s["on_disk"] == s["streamed"][-len(s["on_disk"]):] for s in disk["stages"])
    assert 0 < disk["predicted"]["decode_tok_s"] < slow["decode_tok_s"]


# P stages against one process

@pytest.fixture(scope="module")
def single(model):
    made = {}

    def make(arch, kv_type=None):
        if (arch, kv_type) not in made:
            made[arch, kv_type] = Engine(model(arch), max_context=64, kv_cache_tokens=256, kv_type=kv_type)
        return made[arch, kv_type]

    return make


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("parts", [2, 3])
def test_stages_give_the_logits_of_one_process(model, single, arch, parts):
    staged = Engine(model(arch), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=parts)
    assert len(staged.stages) == parts
    want, got = mixed_passes(single(arch)), mixed_passes(staged)
    assert len(want) == len(got) == 8
    for w, g in zip(want, got):
        assert w.dtype == g.dtype == np.float32 and w.shape == g.shape
        assert np.array_equal(w, g)
    assert staged.blocks.blocks_in_use == 0


@pytest.mark.parametrize("arch, parts, kv_type", [("qwen2", 2, "q8"), ("qwen2", 3, "q4"), ("gemma3", 3, "q4")])
def test_quantized_kv_stages_calibrate_their_layers_as_one_process_does(model, single, arch, parts, kv_type):
    """A quantized KV cache's key transforms are calibrated per layer: each stage calibrates its
    own in the one calibration pass, installs what one process installs (so the logits are one
    process's), and the pipeline gets every layer's transforms back (kept for restarts)."""
    one = single(arch, kv_type)
    staged = Engine(model(arch), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=parts, kv_type=kv_type)
    transforms = staged.pipeline.transforms
    assert sorted(transforms) == list(range(one.config.n_layers))
    for i, (k, _) in enumerate(one.kv.layers):
        assert not np.all(k.scale == 1)  # calibrated, not the identity
        assert np.array_equal(transforms[i][0], k.center) and np.array_equal(transforms[i][1], k.scale)
    for stage in staged.pipeline.stages:
        for i, (k, _) in stage.kv.by_layer.items():
            assert np.array_equal(k.center, one.kv.layers[i][0].center)
            assert np.array_equal(k.scale, one.kv.layers[i][0].scale)
    for w, g in zip(mixed_passes(one), mixed_passes(staged)):
        assert np.array_equal(w, g)


def test_stages_generate_the_greedy_tokens_of_one_process(model, single):
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    want = [e.token_id for e in single("qwen2").generate([5, 6, 7], GREEDY)]
    assert [e.token_id for e in staged.generate([5, 6, 7], GREEDY)] == want


DRAWS = {"greedy": GREEDY, "seeded": SEEDED, "logprobs": SEEDED.with_(seed=5, logprobs=3),
         "penalized": SEEDED.with_(seed=6, repetition_penalty=1.3, frequency_penalty=0.4),
         "biased": GREEDY.with_(logit_bias={7: 4.0}),
         "grammar": SamplingParams(temperature=1.2, seed=2, max_tokens=20,
                                   grammar=GrammarSpec("gbnf", 'root ::= "yes" | "no" | "maybe"'))}


@pytest.mark.parametrize("on_device", [False, True], ids=["host-rules", "device-sampler"])
def test_the_last_stage_draws_the_tokens_and_only_they_come_back(model, single, monkeypatch, on_device):
    """The last of P = 2 stages draws each request's token beside its logits (`Draw`s sent with
    the pass): greedy, seeded, with logprobs, penalties, a logit bias and a grammar, by the
    host's rules or (on_device) through the backend's sampler as a GPU stage draws, the NumPy
    twins standing in. Alone and batched, every request gets one process's tokens and
    logprobs, and no pass of them returns logits: only the picks come back."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=512, pipeline_parallel_size=2)
    monkeypatch.setattr(staged.pipeline.stages[-1].ops, "device_sampling", on_device)
    outputs = []
    submit = staged.pipeline.submit

    def recorded(step, draws=None, **kw):
        done = submit(step, draws, **kw)
        outputs.append(done.result())
        return done

    monkeypatch.setattr(staged.pipeline, "submit", recorded)
    prompt = [5, 6, 7, 8]
    for name, params in DRAWS.items():
        want = list(single("qwen2").generate(prompt, params))
        assert list(staged.generate(prompt, params)) == want, name
    assert outputs and all(isinstance(o, list) and all(p is None or isinstance(p, tuple) for p in o) for o in outputs)

    requests = {name: (prompt, params) for name, params in DRAWS.items()}
    sched = Scheduler(staged, max_num_seqs=6, max_batch_tokens=64)
    for rid, (p, params) in requests.items():
        sched.submit(rid, p, params)
    assert drain(sched)[0] == solo_tokens(single("qwen2"), requests)
    assert all(isinstance(o, list) for o in outputs)
    assert staged.blocks.blocks_in_use == 0


def scheduled_speculation(engine, prompts: dict, spec: Speculation) -> tuple[dict, speculation.Stats]:
    """prompts ({id: (prompt, params)}) served together by a scheduler speculating with spec
    (their micro-batches, through stages): each request's events and the speculation's stats.
    Every KV block comes back."""
    sched = Scheduler(engine, max_num_seqs=4, max_batch_tokens=32, speculation=spec)
    for rid, (p, params) in prompts.items():
        sched.submit(rid, p, params)
    events = drain(sched)[0]
    assert engine.blocks.blocks_in_use == 0
    return events, sched.spec_stats


def test_lookup_speculation_through_stages_gives_one_process_tokens(model, single, monkeypatch):
    """Prompt-lookup drafts (no model) verified through P = 2 stages, whose verifying pass is a
    whole pass of decode rows: greedy gives plain decoding's tokens, sampled (with logprobs)
    the same draws one process's speculation makes, alone and in the scheduler's micro-batches.
    A random model quotes little, so lookup here proposes what plain greedy decoding will
    write, its third token wrong: passes keep drafts and reject some."""
    one, spec = single("qwen2"), Speculation(3, "lookup")
    prompts = {"a": ([5, 6, 7, 8, 9], GREEDY.with_(max_tokens=16)), "b": ([9, 8, 7], SEEDED.with_(max_tokens=12)),
               "c": ([3, 1, 4, 1, 5], GREEDY.with_(max_tokens=12)),
               "d": ([2, 7, 1, 8], SEEDED.with_(seed=4, max_tokens=12, logprobs=2))}
    plain = {tuple(p): [e.token_id for e in one.generate(p, GREEDY.with_(max_tokens=20))] for p, _ in prompts.values()}

    def proposal(token_ids, k):
        prompt = next(p for p in plain if tuple(token_ids[:len(p)]) == p)
        done = len(token_ids) - len(prompt)
        return [t if j != 2 else t + 1 for j, t in enumerate(plain[prompt][done:done + k])]

    monkeypatch.setattr(speculation, "lookup_proposal", proposal)
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    submitted = []  # each pass's draws and what came back
    submit = staged.pipeline.submit

    def recorded(step, draws=None, **kw):
        done = submit(step, draws, **kw)
        submitted.append((draws, done.result()))
        return done

    monkeypatch.setattr(staged.pipeline, "submit", recorded)
    for p, params in prompts.values():
        submitted.clear()
        want = [(e.token_id, e.logprob) for e in one.generate(p, params, spec)]
        assert [(e.token_id, e.logprob) for e in staged.generate(p, params, spec)] == want
        stats = staged.last_speculation
        assert stats.passes > 0
        # a greedy pass without logprobs brings back each row's ids, not a row of logits each
        verifying = [(draws, out) for draws, out in submitted if draws is None or draws == TOP2]
        assert len(verifying) == stats.passes
        if params.greedy and params.logprobs is None:
            assert all(draws == TOP2 and out.shape[0] == 2 for draws, out in verifying)
        else:
            assert all(draws is None and out.shape[-1] == staged.config.vocab_size for draws, out in verifying)
        if params.greedy:  # (a random model's flat distribution rejects most sampled proposals)
            assert 0 < stats.accepted < stats.drafted
            assert [t for t, _ in want] == plain[tuple(p)][:params.max_tokens]

    results = [scheduled_speculation(engine, prompts, spec) for engine in (one, staged)]
    assert all(0 < stats.accepted < stats.drafted for _, stats in results)
    assert results[1][0] == results[0][0]
    assert results[1][0]["a"] == plain[tuple(prompts["a"][0])][:16]


@pytest.mark.parametrize("parts, spec", [
    (3, Speculation(3, "early-exit", depth=1, tree=False)),  # stage 1 holds none of its layers: it hands the stream on
    (2, Speculation(3, "skip", skip=(1,), tree=False)),
    (3, Speculation(3, "early-exit", depth=1, tree=True)),
    (2, Speculation(3, "skip", skip=(1,), tree=True)),
], ids=["early-exit", "skip", "early-exit-tree", "skip-tree"])
def test_model_drafts_through_stages_give_one_process_tokens(model, single, parts, spec):
    """Early-exit and skip drafts through stages: each draft step a pass over the draft's
    layers, each stage running those it holds and the last drawing the argmax (a tree's: the
    two best, `TOP2`); the verifying pass takes the draft's ids (a tree's runner-ups as leaf
    rows, a kept leaf's KV moved in each stage before the next pass). Greedy and sampled
    requests (a sampled draft's steps come back as logits; no tree), alone and in the
    scheduler's micro-batches, give one process's speculation: the same tokens, logprobs,
    passes and leaves kept."""
    one = single("qwen2")
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=parts)
    prompts = {"a": ([5, 6, 7, 8, 9], GREEDY.with_(max_tokens=16)), "b": ([9, 8, 7], SEEDED.with_(max_tokens=12)),
               "c": ([3, 1, 4, 1, 5], GREEDY.with_(max_tokens=12, logprobs=2))}
    drafted = leaf_hits = 0
    for p, params in prompts.values():
        want = [(e.token_id, e.logprob) for e in one.generate(p, params, spec)]
        stats = one.last_speculation
        assert [(e.token_id, e.logprob) for e in staged.generate(p, params, spec)] == want
        assert staged.last_speculation == stats
        drafted, leaf_hits = drafted + stats.drafted, leaf_hits + stats.leaf_hits
        if params.greedy:
            assert [t for t, _ in want] == [e.token_id for e in one.generate(p, params)]
    assert drafted > 0 and (leaf_hits > 0) == spec.tree  # a tree's leaves are kept, so its KV moves
    events, stats = scheduled_speculation(staged, prompts, spec)
    assert (events, stats) == scheduled_speculation(one, prompts, spec) and (stats.leaf_hits > 0) == spec.tree


def test_what_stages_do_not_run_is_refused(model):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=5 must be in \[1, 4\]"):
        Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=5)


@pytest.mark.parametrize("layers", [(0,), (1, 3), (3,)])
def test_a_pass_over_some_layers_through_stages_is_one_process_pass(model, single, layers):
    """A draft's pass over a subset of the layers (early exit (0,), skip (1, 3), the last
    layer alone): through 3 stages, each running those it holds, the logits of one process's."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=3)
    got = []
    for engine in (single("qwen2"), staged):
        seq = Sequence([1, 2, 3, 4])
        engine.reserve([(seq, 4)])
        try:
            got.append(engine.forward([(seq, 4)], all_logits=True, layers=layers))
        finally:
            engine.release(seq)
    assert np.array_equal(*got)


def test_server_config_checks_pipeline_parallel_size(model):
    for value in (0, -2):
        with pytest.raises(ConfigError, match=r"args\.pipeline_parallel_size: Input should be greater than or equal"):
            server_config({"pipeline_parallel_size": value})
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size \(5\) must be <= the model's 4 layers"):
        server_config({"model": str(model("qwen2")), "pipeline_parallel_size": 5})
    with pytest.raises(ConfigError, match="pipeline_parallel_size > 1 needs num_gpus > 0"):
        server_config({"backend": "cupy", "pipeline_parallel_size": 2})
    gpu = server_config({"model": str(model("qwen2")), "backend": "cupy", "num_gpus": 0.5, "pipeline_parallel_size": 2})
    # each stage reserves the GPU share; the compute worker, which drives them, none (nor does its bundle)
    assert gpu.worker_args()["stage_gpus"] == 0.5 and gpu.worker_options() == {"num_cpus": 1, "num_gpus": 0.0}
    with pytest.raises(ConfigError, match="placement_strategy"):
        server_config({"placement_strategy": "ANYWHERE"})
    assert server_config({"pipeline_parallel_size": 2, "requant_streamed": "Q4_K"}).worker_args()["requant_streamed"] \
        == "Q4_K"
    assert server_config({"pipeline_parallel_size": 2, "host_ram_gb": 8}).worker_args()["host_ram_gb"] == 8
    config = server_config({"model": str(model("qwen2")), "pipeline_parallel_size": 4, "placement_strategy": "SPREAD"})
    assert config.worker_args()["pipeline_parallel_size"] == 4
    assert config.worker_args()["placement_strategy"] == "SPREAD"
    assert config.worker_args()["stage_gpus"] == 0.0  # CPU stages reserve no GPU
    config = server_config({"pipeline_parallel_size": 2, "kv_type": "q4", "speculate": "auto", "drafter": "auto"})
    assert config.worker_args()["kv_type"] == "q4" and config.worker_args()["speculate"] == "auto"


@pytest.mark.parametrize("backend, stages, gpus, share", [
    ("numpy", 2, 0, 0.0), ("numpy", 2, 4, 0.0), ("cupy", 2, 1, 0.5), ("cupy", 3, 1, 1 / 3), ("cupy", 3, 2, 0.5),
    ("cupy", 5, 2, 1 / 3), ("cupy", 2, 2, 1.0), ("cupy", 2, 8, 1.0)])
def test_generate_pp_reserves_a_gpu_or_a_share_that_packs(backend, stages, gpus, share):
    """`ntr generate --pp`'s stage actors: a GPU each where Ray sees enough, else shares that
    fit the GPUs there are (a GPU holds floor(1 / share) stages)."""
    from cluster.cli import stage_gpu_share

    got = stage_gpu_share(backend, stages, gpus)
    assert got == pytest.approx(share)
    if got:
        assert int(1 / got + 1e-9) * gpus >= stages
    if backend == "cupy":
        with pytest.raises(ValueError, match=f"--pp {stages} with --backend cupy: the stages need a GPU"):
            stage_gpu_share(backend, stages, 0)


# micro-batches

MIXED = {"a": ([1, 2, 3, 4, 5, 6, 7], GREEDY), "b": ([9, 8, 7], SEEDED), "c": (list(range(20, 45)), GREEDY),
         "d": ([3, 1, 4, 1, 5], SEEDED.with_(seed=3)), "e": ([2, 7, 1, 8], GREEDY.with_(max_tokens=5))}


def solo_tokens(engine, prompts):
    return {rid: [e.token_id for e in engine.generate(p, params)] for rid, (p, params) in prompts.items()}


def test_micro_batches_give_each_request_its_tokens_alone(model, single):
    """P = 2 stages (in this process): the running requests split into two disjoint groups,
    whose steps are in flight together; greedy and seeded requests, a prompt prefilled in
    chunks and one admitted later each get the tokens they get alone on one process, and from
    a P = 1 scheduler; every block comes back."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    alone = solo_tokens(single("qwen2"), MIXED)
    sched = Scheduler(staged, max_num_seqs=4, max_batch_tokens=16)
    assert sched.groups == 2 and sched.depth == 2
    requests = [sched.submit(rid, *MIXED[rid]) for rid in "abcd"]
    tokens, _, together = drain(sched, before_step=lambda i: i == 5 and sched.submit("e", *MIXED["e"]))
    assert tokens == alone
    assert together
    assert [r.group for r in requests] == [0, 0, 1, 1]  # four waiting: two a group
    assert all(a.group != b.group and not set(a.requests) & set(b.requests) for a, b in together)
    assert staged.blocks.blocks_in_use == 0 and not sched.has_work

    one = Scheduler(single("qwen2"), max_num_seqs=4, max_batch_tokens=16)
    assert one.groups == 1
    for rid in MIXED:
        one.submit(rid, *MIXED[rid])
    assert drain(one)[0] == alone


def test_groups_left_uneven_by_finishes_even_out(model, single):
    """Four requests in two groups of two; the second group's both finish early, leaving the
    first group's two: the next time the first is planned it gives its latest request to the
    empty group, so the two remaining decode in steps of one each, in flight together, and
    every request still gets its tokens alone."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    long, short = GREEDY.with_(max_tokens=12), SEEDED.with_(max_tokens=2)
    prompts = {"a": ([1, 2, 3], long), "b": ([4, 5, 6], long.with_(seed=1, temperature=0.8)),
               "c": ([7, 8, 9], short), "d": ([3, 1, 4], short.with_(seed=2))}
    sched = Scheduler(staged, max_num_seqs=4, max_batch_tokens=16)
    requests = {rid: sched.submit(rid, *prompts[rid]) for rid in prompts}
    tokens, steps, _ = drain(sched)
    assert tokens == solo_tokens(single("qwen2"), prompts)
    assert requests["b"].group == 1  # moved from group 0, once c and d had finished
    late = steps[-8:]  # a and b alone: a step each, the groups taking turns
    assert [len(s.requests) for s in late] == [1] * 8 and [s.group for s in late] == [0, 1] * 4
    assert staged.blocks.blocks_in_use == 0


def test_micro_batches_preempt_within_their_group(model, tiny_model, monkeypatch):
    """A cache too small for three growing requests: a group that finds it full preempts its
    own latest request (never one of the group in flight), which is recomputed later; every
    request still gets its tokens alone, and every block comes back."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = {str(i): (list(range(20 * i, 20 * i + 20)), params) for i in range(3)}
    alone = solo_tokens(Engine(model("qwen2"), max_context=64, kv_cache_tokens=64, block_size=4), prompts)
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=64, block_size=4, pipeline_parallel_size=2)
    sched = Scheduler(staged, max_num_seqs=3, max_batch_tokens=64)
    preempted, preempt = [], sched._preempt

    def watched(request):
        assert all(request not in step.requests for step in sched.in_flight), "preempted a request in flight"
        preempted.append(request.id)
        preempt(request)

    monkeypatch.setattr(sched, "_preempt", watched)
    for rid in prompts:
        sched.submit(rid, *prompts[rid])
    tokens, _, together = drain(sched)
    assert tokens == alone and preempted and together
    assert staged.blocks.blocks_in_use == 0 and not sched.has_work


def test_a_failed_pass_through_stages_drops_every_running_request(model, monkeypatch):
    """A pass that fails through stages (a stage may have lost every sequence's KV) drops the
    requests of the other group too, though no step of theirs is in flight."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    sched = Scheduler(staged, max_num_seqs=4, max_batch_tokens=64)
    for rid in "abcd":
        sched.submit(rid, *MIXED[rid])
    first = sched.plan_next()
    sched.commit(first, sched.launch(first)())
    second = sched.plan_next()
    assert second.group != first.group and sched.in_flight == [second]

    def broken(*_, **__):
        raise RuntimeError("stage lost")

    monkeypatch.setattr(staged.pipeline, "submit", broken)
    with pytest.raises(RuntimeError, match="stage lost"):
        sched.launch(second)
    assert sorted(r.id for r in sched.abort()) == list("abcd")
    assert staged.blocks.blocks_in_use == 0 and not sched.has_work and not sched.in_flight


def test_cancel_with_two_micro_batches_in_flight(model, single):
    """A request cancelled while its group's step and the other group's are in flight keeps its
    blocks until its step commits, and gets no token; the others decode on as alone."""
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2)
    prompts = {rid: MIXED[rid] for rid in "abcd"}
    alone = solo_tokens(single("qwen2"), prompts)
    sched = Scheduler(staged, max_num_seqs=4, max_batch_tokens=64)
    for rid in prompts:
        sched.submit(rid, *prompts[rid])
    first = sched.plan_next()
    pending = sched.launch(first)
    second = sched.plan_next()
    assert second is not None and second.group != first.group
    later = sched.launch(second)
    assert sched.plan_next() is None  # both groups are in flight
    gone = first.requests[0]
    held = staged.blocks.blocks_in_use
    assert sched.cancel(gone.id)
    assert staged.blocks.blocks_in_use == held
    events = sched.commit(first, pending())
    assert gone.id not in [rid for rid, _ in events]
    assert staged.blocks.blocks_in_use < held
    tokens = {}
    for rid, e in events + sched.commit(second, later()):
        tokens.setdefault(rid, []).append(e.token_id)
    rest = drain(sched)[0]
    for rid, ids in rest.items():
        tokens[rid] += ids
    assert tokens == {rid: ids for rid, ids in alone.items() if rid != gone.id}
    assert staged.blocks.blocks_in_use == 0 and not sched.has_work


# stage actors on a local Ray

@pytest.fixture(scope="module")
def local_ray():
    with serving_cluster.local_ray(num_cpus=4):
        yield


def test_ray_stages_give_the_logits_of_one_process(local_ray, model, single):
    from workers.stage_worker import RayPipeline

    staged = Engine(model("gemma3"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=3,
                    stage_runner=RayPipeline)
    try:
        for w, g in zip(mixed_passes(single("gemma3")), mixed_passes(staged)):
            assert np.array_equal(w, g)
    finally:
        staged.pipeline.shutdown()


def test_ray_stages_stream_from_their_nodes_host_and_disk_tiers(local_ray, wide_model, tmp_path, monkeypatch):
    """Stage actors whose budget cannot hold their layers, host_ram half what they stream: each
    streams its own, from a region of the node's HostTier and, past its share, from a DiskTier
    of its own; the stages give one process's logits."""
    from workers.stage_worker import RayPipeline

    monkeypatch.setenv("NTR_HOME", str(tmp_path))  # the stage actors' image files (they inherit the environment)
    kw = dict(max_context=64, kv_cache_tokens=64, pipeline_parallel_size=2)
    resident = Engine(wide_model, vram_budget=1 << 40, **kw)
    budget = every_stage_streams(resident)
    host_ram = sum(s.placement.streamed_bytes for s in Engine(wide_model, vram_budget=budget, **kw).stages) // 2
    before = set(os.listdir("/dev/shm"))
    staged = Engine(wide_model, vram_budget=budget, host_ram=host_ram, stage_runner=RayPipeline, **kw)
    try:
        def tiers(worker):
            s = worker.stage.ops.streaming
            return s.schedule.streamed, sorted(s.disk_layers)

        assert ray.get([a.__ray_call__.remote(tiers) for a in staged.pipeline.actors]) == \
            [(s.streamed, list(s.on_disk)) for s in staged.stages]
        assert all(s.streamed and s.on_disk and len(s.on_disk) < len(s.streamed) for s in staged.stages)
        for w, g in zip(mixed_passes(Engine(wide_model, max_context=64, kv_cache_tokens=256)), mixed_passes(staged)):
            assert np.array_equal(w, g)
        made = set(os.listdir("/dev/shm")) - before
        assert len([f for f in made if f.startswith("ntr-host-")]) == 2  # a region of each stage's RAM layers
        assert len([f for f in made if f.startswith("ntr-stage-")]) == 2  # a DiskTier's staging ring each (from the first pass)
    finally:
        staged.pipeline.shutdown()
        for name in set(os.listdir("/dev/shm")) - before:
            if name.startswith(("ntr-host-", "ntr-stage-")):  # the tiers live on with the cluster's workers
                os.unlink(os.path.join("/dev/shm", name))


def test_ray_stages_run_model_drafts(local_ray, model, single):
    """A skip draft's passes over a subset of the layers reach the stage actors (`PassInputs.layers`),
    a greedy one's as a tree (`TOP2` draws; a kept leaf's KV moves in each actor before the
    next pass, `PassInputs.moves`): greedy and sampled speculation through them gives one
    process's tokens and passes, alone and in the scheduler's two micro-batches (one group's
    draft passes submitted and read while the other group's pass is in flight)."""
    from workers.stage_worker import RayPipeline

    one, spec = single("qwen2"), Speculation(3, "skip", skip=(2,), tree=True)
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2,
                    stage_runner=RayPipeline)
    prompts = {"a": ([5, 6, 7, 8, 9], GREEDY.with_(max_tokens=12)), "b": ([9, 8, 7], SEEDED.with_(logprobs=2)),
               "c": ([3, 1, 4], GREEDY.with_(max_tokens=10))}
    try:
        for p, params in prompts.values():
            want = [(e.token_id, e.logprob) for e in one.generate(p, params, spec)]
            assert [(e.token_id, e.logprob) for e in staged.generate(p, params, spec)] == want
            assert staged.last_speculation == one.last_speculation and one.last_speculation.drafted > 0
        want = scheduled_speculation(one, prompts, spec)
        assert scheduled_speculation(staged, prompts, spec) == want and want[1].drafted > 0 and want[1].leaf_hits > 0
    finally:
        staged.pipeline.shutdown()


def test_two_micro_batches_overlap_in_the_stage_actors(local_ray, model, single):
    """Two groups' passes in flight at once through two stage actors: stage 0 starts group B's
    pass before stage 1 ends group A's. Deterministic: stage 1 holds A's pass until stage 0
    has started B's (or 30 s pass), which it can only do if B was submitted before A's
    logits were waited for. The tokens are those of one process."""
    from workers.stage_worker import RayPipeline

    @ray.remote
    class Order:
        def __init__(self):
            self.log = []

        def note(self, entry):
            self.log.append(tuple(entry))

        async def wait_for(self, entry, timeout_s):
            import asyncio

            deadline = time.monotonic() + timeout_s
            while tuple(entry) not in self.log and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        def entries(self):
            return self.log

    @ray.remote(max_restarts=0)
    class GatedStage:  # StageWorker's interface, recording when each stage starts and ends each pass
        def __init__(self, spec):
            self.stage, self.passes, self.order = Stage(spec), 0, ray.get_actor("pp-order")

        def ready(self):
            return ray.get_runtime_context().get_actor_id()

        def step(self, inputs, hidden=None):
            index, k = self.stage.spec.index, self.passes
            self.passes += 1
            ray.get(self.order.note.remote(("start", index, k)))
            if (index, k) == (1, 0):
                ray.get(self.order.wait_for.remote(("start", 0, 1), 30))
            out = self.stage.step(inputs.step, hidden, inputs.draws)
            ray.get(self.order.note.remote(("end", index, k)))
            return out

    order = Order.options(name="pp-order").remote()
    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2,
                    stage_runner=functools.partial(RayPipeline, worker=GatedStage))
    try:
        prompts = {rid: MIXED[rid] for rid in "abcd"}
        sched = Scheduler(staged, max_num_seqs=4, max_batch_tokens=64)
        for rid in prompts:
            sched.submit(rid, *prompts[rid])
        tokens, _, together = drain(sched)
        log = ray.get(order.entries.remote())
        assert log.index(("start", 0, 1)) < log.index(("end", 1, 0)), log[:8]
        assert tokens == solo_tokens(single("qwen2"), prompts) and together
    finally:
        staged.pipeline.shutdown()
        ray.kill(order)


@pytest.mark.parametrize("kv_type", [None, "q4"])
def test_a_restarted_stage_refuses_passes_until_its_lost_sequences_end(local_ray, model, single, kv_type):
    """A stage killed between two steps comes back empty: the next pass, which would read the KV
    it lost, fails naming it (Ray reports the restart, and the stage itself refuses steps),
    rather than computing wrong logits; once the caller has ended those sequences, the passes
    after run and give what the stages gave before the kill (with a quantized KV cache, the
    restarted stage has its calibrated key transforms back; a stage actor's transforms are
    not one process's to the bit: its BLAS runs one thread, which sums the calibration
    prompt's products in another order)."""
    from workers.stage_worker import PassInputs, RayPipeline, StageFailed

    staged = Engine(model("qwen2"), max_context=64, kv_cache_tokens=256, pipeline_parallel_size=2,
                    stage_runner=RayPipeline, kv_type=kv_type)
    try:
        before = mixed_passes(staged)
        seq = Sequence([1, 2, 3, 4])
        staged.reserve([(seq, 4)])
        staged.forward([(seq, 4)])
        seq.token_ids.append(5)
        staged.reserve([(seq, 1)])
        plan, hidden = staged._plan([(seq, 1)]), np.zeros((1, staged.config.d_model), np.float32)
        ray.kill(staged.pipeline.actors[1], no_restart=False)
        # ray.kill returns before the actor dies: poll until the restarted stage itself answers,
        # refusing the step (Ray answers unavailable while it restarts; the old one may still run a step)
        deadline = time.monotonic() + 60
        while True:
            try:
                inputs = PassInputs(plan, None, False, {}, False, None, ())
                ray.get(staged.pipeline.actors[1].step.remote(inputs, hidden), timeout=10)
            except ray.exceptions.RayTaskError as e:
                assert "pipeline stage 1 (layers 2-3) failed: it was restarted: its KV cache is lost" in str(e)
                break
            except ray.exceptions.RayError:
                pass
            assert time.monotonic() < deadline, "stage 1 did not restart"
            time.sleep(0.1)
        with pytest.raises(StageFailed, match=r"pipeline stage 1 \(layers 2-3\) failed: .*was restarted"):
            staged.forward([(seq, 1)])
        staged.release(seq)
        for w, g in zip(before, mixed_passes(staged)):
            assert np.array_equal(w, g)
    finally:
        staged.pipeline.shutdown()


def ended(events) -> bool:
    return bool(events) and ("error" in events[-1] or events[-1].get("finish_reason") is not None)


def poll_until(worker, request_ids, done, timeout_s=120):
    """{id: its events} once done(events) holds for each of request_ids (a poll answers for
    every request at once)."""
    events, deadline = {rid: [] for rid in request_ids}, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for rid, new in ray.get(worker.poll.remote(0.5)).items():
            events[rid] = events.get(rid, []) + new
        if all(done(events[rid]) for rid in request_ids):
            return events
    raise AssertionError(f"{ {rid: events[rid][-3:] for rid in request_ids} } after {timeout_s} s")


def test_a_worker_that_fails_after_starting_its_stages_reports_the_error(local_ray, model):
    """A ComputeWorker whose start fails after its stage actors exist (here the scheduler
    refuses draft trees, which a RotateKV cache cannot verify) shuts them down and dies with
    the error: before, the stages' compiled graph kept its process from exiting, and callers
    waited forever."""
    from workers.compute_worker import ComputeWorker

    worker = ComputeWorker.options(num_cpus=1).remote(str(model("qwen2")), max_context=64, kv_cache_gb=0.01,
                                                      pipeline_parallel_size=2, speculate=2, drafter="early-exit",
                                                      draft_tree="on", kv_type="q4")
    with pytest.raises(ray.exceptions.ActorDiedError, match="draft_tree 'on': this engine does not verify draft trees"):
        ray.get(worker.info.remote(), timeout=120)


def test_a_killed_workers_stage_group_is_reaped_and_a_new_worker_starts_in_its_room(local_ray, model, single):
    """Ray keeps a placement group an actor made until the job ends: a ComputeWorker killed
    outright (its stage actors die with it) would leave its stages' group holding the room, and
    a worker started in its place (as Serve restarts a replica) would wait for it forever. The
    next pipeline removes groups without stage actors (`reap_orphaned_groups`, after
    ORPHAN_AGE_S) and starts in that room; a live pipeline's group is never taken."""
    from workers.compute_worker import ComputeWorker
    from workers.stage_worker import ORPHAN_AGE_S, reap_orphaned_groups

    def worker():
        return ComputeWorker.options(num_cpus=1).remote(str(model("qwen2")), max_context=64, kv_cache_gb=0.01,
                                                        pipeline_parallel_size=2)

    def groups():
        return {info["name"] for info in ray.util.placement_group_table().values()
                if info["name"].startswith("ntr-stages-") and info["state"] != "REMOVED"}

    first = worker()
    ray.get(first.info.remote(), timeout=120)
    (held,) = groups()
    assert reap_orphaned_groups(min_age_s=0) == []  # its stage actors live
    ray.kill(first)
    # the room: 4 CPUs, which the dead worker's group (2) and a new worker with its group (3) exceed
    second = worker()
    try:
        ray.get(second.info.remote(), timeout=120)
        assert held not in groups() and len(groups()) == 1
        made = int(held.rpartition("@")[2])  # the group's name carries when it was made (whole seconds, rounded down)
        assert time.time() - made >= ORPHAN_AGE_S  # the dead group was taken only once old enough
        prompt, params = [5, 6, 7], GREEDY
        ray.get(second.submit.remote("r", prompt, params))
        events = poll_until(second, ["r"], ended)["r"]
        assert [e.get("token_id") for e in events] == [e.token_id for e in single("qwen2").generate(prompt, params)]
    finally:
        ray.kill(second)
        reap_orphaned_groups(min_age_s=0)


@pytest.mark.parametrize("how, speculate", [("killed", "off"), ("killed", 3), ("stopped", "off")])
def test_stage_lost_mid_request_fails_it_and_the_replica_serves_the_next(local_ray, model, single, how, speculate):
    """A ComputeWorker over 2 stage actors, two requests decoding in two micro-batch groups:
    stage 1 killed, or its process stopped (SIGSTOP: alive, never answering, which once hung
    the requests forever), ends both with an error naming the stage (a stopped one after
    step_timeout_s, killed then); Ray restarts the stage, and the next two requests (greedy and
    seeded, concurrent) get the tokens one process gives (with lookup speculation, its
    speculation's: greedy, plain decoding's)."""
    from workers.compute_worker import ComputeWorker

    worker = ComputeWorker.options(num_cpus=1).remote(str(model("qwen2")), max_context=512, kv_cache_gb=0.01,
                                                      max_num_seqs=4, max_batch_tokens=64, step_timeout_s=3.0,
                                                      pipeline_parallel_size=2, speculate=speculate)
    pid = None
    try:
        info = ray.get(worker.info.remote(), timeout=120)
        assert [s["layers"] for s in info["pipeline_stages"]] == [[0, 2], [2, 4]]
        long = SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
        for rid in ("long", "long2"):
            ray.get(worker.submit.remote(rid, [1, 2, 3], long))
        poll_until(worker, ["long", "long2"], lambda events: any(e.get("token_id") is not None for e in events))
        stage = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                     if n["name"].endswith("-stage-1"))
        actor = ray.get_actor(stage, namespace=next(
            n["namespace"] for n in ray.util.list_named_actors(all_namespaces=True) if n["name"] == stage))
        if how == "killed":
            ray.kill(actor, no_restart=False)
        else:
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGSTOP)
        for rid, events in poll_until(worker, ["long", "long2"], ended).items():
            assert "error" in events[-1], f"{rid} finished before the stage was lost"
            assert "pipeline stage 1 (layers 2-3)" in events[-1]["error"]
            if how == "stopped":
                assert "did not answer" in events[-1]["error"] and "(step_timeout_s)" in events[-1]["error"]
            assert len(events) < 480

        nexts = {"next": ([5, 6, 7], GREEDY), "next2": ([9, 8, 7], SEEDED)}
        for rid, (prompt, params) in nexts.items():
            ray.get(worker.submit.remote(rid, prompt, params))
        got = poll_until(worker, list(nexts), ended)
        spec = None if speculate == "off" else Speculation(speculate, "lookup")
        for rid, (prompt, params) in nexts.items():
            want = [e.token_id for e in single("qwen2").generate(prompt, params, spec)]
            events = got[rid]
            assert [e.get("token_id") for e in events] == want and events[-1]["finish_reason"] == "length", events[-1]
    finally:
        ray.kill(worker)
        if pid is not None:  # the pipeline killed it; were it still there, a stopped process would never exit
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_generate_pp_2_gives_the_greedy_tokens_of_one_process_on_the_default_model(real_engine, real_model_path):
    """`ntr generate --pp 2` (its own local Ray, in a process of its own) against P = 1."""
    prompt = "def fibonacci(n):"
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want = [e.token_id for e in real_engine.generate(real_engine.prompt_ids(prompt), params)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--model", str(real_model_path),
                           "--preset", "greedy", "--max-tokens", "8", "--prompt", prompt, "--json", "--pp", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["token_ids"] == want and len(want) == 8
