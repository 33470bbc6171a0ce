"""Pipeline stages on the GPU (`pytest -m gpu`): P CuPy stages in this process sharing the one
device (`LocalPipeline`: what the stage actors run, without Ray, which the GPU machine lacks)
against one CuPy engine: on the real default model, and on synthetic models with real
shapes: Qwen2.5-0.5B's 24 layers in its Q4_K_M mix, and a Gemma 3-wide model whose sliding
layers' window the passes outgrow.
Each stage runs a pass as the backend runs a model's step (a decode step replayed from the
stage's own graph) and hands the residual stream on through the host. The kernels are the
same but for a stage's first layer, whose 1-token input its own quantizer rounds (the product
that made it, in the stage before, did it in one process). The prompt passes' tensor-core products add their
stream-K partial sums in whatever order the blocks finish, so one engine's logits move from
run to run (up to 9.2e-4 relative on the 0.5B replica, H100): the stages must stay within a
few times that spread, with the same argmax, and give equal greedy tokens except after a
near tie that spread can flip (a random replica has them; one engine against itself too)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("cupy")  # the module skips visibly where CuPy is missing

from workers.engine.engine import Engine, Sequence  # noqa: E402
from workers.engine.sampling import SamplingParams  # noqa: E402
from workers.model.synthetic import SHAPES, Shape, write_model  # noqa: E402
from budgets import every_stage_streams  # noqa: E402
from drive import forward, mixed_passes  # noqa: E402

pytestmark = pytest.mark.gpu
MODELS = {  # name -> (shape, vocabulary file)
    "qwen2.5-0.5b": (SHAPES["qwen2.5-0.5b"], "ggml-vocab-qwen2.gguf"),
    "gemma3-windowed": (Shape("gemma3", 6, 640, 4, 1, 2048, 1_000_000.0, 8192, tied_embeddings=True, head_dim=256,
                              sliding_window=4), "ggml-vocab-llama-spm.gguf"),
}
KW = {"backend": "cupy", "max_context": 256, "kv_cache_tokens": 1024}
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
CODE = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
CHAT = "Why is the sky blue? Two sentences."


@pytest.fixture(scope="module", params=[pytest.param("default", marks=pytest.mark.real_model), *MODELS])
def model(request, tmp_path_factory, vocab_dir, cuda_device):
    if request.param == "default":
        path = request.getfixturevalue("real_model_path")
    else:
        shape, vocab = MODELS[request.param]
        path = write_model(tmp_path_factory.mktemp("gpu-pp") / f"{request.param}.gguf", shape, vocab_dir / vocab)
    return path, Engine(path, **KW)


def relative_error(want, got) -> float:
    return float((np.linalg.norm(want - got, axis=-1) / np.linalg.norm(want, axis=-1)).max())


def near_tie(logits: np.ndarray, token: int) -> bool:
    """Whether token's logit is within 1% of the row's RMS of its top one: a gap that one
    engine's own run-to-run spread can flip (a random replica has such rows)."""
    return logits.max() - logits[token] < 0.01 * np.sqrt(np.mean(logits ** 2))


def assert_like_one_engine(single, staged) -> None:
    """The staged engine's logits of `mixed_passes` within 3x (+1e-4) of how far the single
    engine's own move between two runs, the same argmax on every row but a near tie's."""
    want, again, got = mixed_passes(single), mixed_passes(single), mixed_passes(staged)
    assert len(want) == len(got) == 8
    for w, a, g in zip(want, again, got):
        assert w.dtype == g.dtype == np.float32 and w.shape == g.shape
        assert np.all(np.isfinite(g))
        spread, err = relative_error(w, a), relative_error(w, g)
        assert err < 3 * spread + 1e-4, (err, spread)
        for row in np.flatnonzero(w.argmax(-1) != g.argmax(-1)):
            assert near_tie(w[row], g[row].argmax()), (row, w[row].max(), w[row][g[row].argmax()])


@pytest.mark.parametrize("parts", [2, 3])
def test_gpu_stages_give_the_logits_of_one_engine(model, parts):
    path, single = model
    staged = Engine(path, pipeline_parallel_size=parts, **KW)
    assert len(staged.stages) == parts and staged.model is None
    assert_like_one_engine(single, staged)
    assert staged.blocks.blocks_in_use == 0


def assert_same_greedy(single, prompt: list[int], want: list[int], got: list[int]) -> None:
    """Greedy tokens from stages (drawn on the last stage) equal to the single engine's, except
    after a position where its own run-to-run spread can flip its argmax (top-2 gap within
    1% of its logits' RMS)."""
    if got == want:
        return
    i = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
    assert i < min(len(want), len(got)), (want, got)
    seq = Sequence(prompt + want[:i])
    try:
        logits = forward(single, [(seq, len(seq.token_ids))])[-1]
    finally:
        single.release(seq)
    assert near_tie(logits, got[i]), (i, want, got)


def assert_same_greedy_tokens(single, staged) -> None:
    """32 greedy tokens of a code prompt and a chat prompt, staged against single."""
    for prompt in (single.prompt_ids(CODE), single.chat_prompt_ids([{"role": "user", "content": CHAT}])):
        assert_same_greedy(single, prompt, [e.token_id for e in single.generate(prompt, GREEDY)],
                           [e.token_id for e in staged.generate(prompt, GREEDY)])


@pytest.mark.parametrize("parts", [2, 3])
def test_gpu_stages_generate_the_greedy_tokens_of_one_engine(model, parts):
    path, single = model
    assert_same_greedy_tokens(single, Engine(path, pipeline_parallel_size=parts, **KW))


@pytest.fixture(scope="module")
def q4_engine(model):
    path, _ = model
    return Engine(path, kv_type="q4", **KW)


def test_gpu_stages_calibrate_a_quantized_kv_cache(model, q4_engine):
    """P = 2 CuPy stages with a q4 (RotateKV) cache: each stage calibrates its own layers, to
    one engine's transforms within the spread its prompt products' stream-K order gives
    (1e-2); with one engine's transforms installed, the logits and greedy tokens are its."""
    path, _ = model
    single = q4_engine
    staged = Engine(path, pipeline_parallel_size=2, kv_type="q4", **KW)
    own = staged.pipeline.transforms
    assert sorted(own) == list(range(single.config.n_layers))
    for i, (k, _) in enumerate(single.kv.layers):
        for mine, theirs in zip(own[i], (k.center.get(), k.scale.get())):
            assert np.abs(mine - theirs).max() <= 1e-2 * (np.abs(theirs).max() + 1e-3), i
    theirs = {i: (k.center.get(), k.scale.get()) for i, (k, _) in enumerate(single.kv.layers)}
    for stage in staged.pipeline.stages:
        stage.install_transforms(theirs)
    assert_like_one_engine(single, staged)
    assert_same_greedy_tokens(single, staged)


def test_gpu_stages_verify_lookup_drafts(model, monkeypatch):
    """Speculation through P = 2 CuPy stages: each verifying pass runs in every stage as its
    decode step of that many rows (replayed from its graph). Lookup proposes what one engine
    decodes greedily, its third token wrong, so passes keep drafts and reject some; the tokens
    are one engine's plain greedy ones."""
    from workers.engine import speculation
    from workers.engine.speculation import Speculation

    path, single = model
    prompt = single.prompt_ids(CODE)
    want = [e.token_id for e in single.generate(prompt, GREEDY)]

    def proposal(token_ids, k):
        done = len(token_ids) - len(prompt)
        return [t if j != 2 else t + 1 for j, t in enumerate(want[done:done + k])]

    monkeypatch.setattr(speculation, "lookup_proposal", proposal)
    staged = Engine(path, pipeline_parallel_size=2, **KW)
    got = [e.token_id for e in staged.generate(prompt, GREEDY, Speculation(3, "lookup"))]
    stats = staged.last_speculation
    assert stats.passes > 0 and 0 < stats.accepted < stats.drafted
    assert_same_greedy(single, prompt, want, got)


@pytest.mark.parametrize("parts, tree", [(2, False), (3, False), (2, True)])
def test_gpu_stages_run_skip_drafts(model, parts, tree):
    """A skip draft through CuPy stages (every other layer skipped): each draft step a pass in
    which each stage replays its own graph of the layers it holds, the last drawing the argmax
    (a tree's: the two best, its kept leaves' KV moved in each stage before the next pass);
    the drafts are one engine's (same acceptance, within near ties) and the tokens its plain
    greedy ones."""
    from workers.engine.speculation import Speculation

    path, single = model
    spec = Speculation(3, "skip", skip=tuple(range(1, single.config.n_layers, 2)), tree=tree)
    staged = Engine(path, pipeline_parallel_size=parts, **KW)
    if tree and single.kv.sliding:  # a sliding pool's KV cannot move: trees are refused, by name
        with pytest.raises(ValueError, match="draft_tree 'on': this engine does not verify draft trees"):
            staged.drafters(spec)
        return
    prompt = single.prompt_ids(CODE)
    want = [e.token_id for e in single.generate(prompt, GREEDY)]
    drafted = [e.token_id for e in single.generate(prompt, GREEDY, spec)]
    one = single.last_speculation
    got = [e.token_id for e in staged.generate(prompt, GREEDY, spec)]
    stats = staged.last_speculation
    assert stats.drafted > 0 and abs(stats.accepted - one.accepted) <= 0.1 * one.drafted, (stats, one)
    assert_same_greedy(single, prompt, want, drafted)
    assert_same_greedy(single, prompt, want, got)


def test_gpu_stages_requantize_what_they_stream(wide_model, cuda_device, tmp_path, monkeypatch):
    """requant_streamed Q3_K through CuPy stages that both stream (the first with its embedding
    table in host memory, where its kernel reads it through the link): each stage's streamed
    matrices requantized on the GPU as they load (kernels/cupy/requant.py), the logits those
    of one engine on the file `ntr quantize` writes with the stages' types (within the CUDA
    quantizer's distance from its twin: tests/test_requant_streamed.py)."""
    from kernels.cupy_backend import CupyBackend
    from kernels.driver import CupyDriver
    from workers.engine.quantize_model import write_quantized
    from workers.model.gguf_file import GGUFFile
    from workers.model.quant_recipe import Q

    # the quantizers' local memory at load would outgrow this tiny budget: the layers are the
    # point here (the stages' ops, and the driver that plans them)
    monkeypatch.setattr(CupyBackend, "requant_local_bytes", 0)
    monkeypatch.setattr(CupyDriver, "requant_local_bytes", 0)
    kw = dict(KW, max_context=64, kv_cache_tokens=64, pipeline_parallel_size=2)
    resident = Engine(wide_model, vram_budget=1 << 40, **kw)
    budget = every_stage_streams(resident)
    staged = Engine(wide_model, vram_budget=budget, requant_streamed="Q3_K", **kw)
    assert all(s.streamed and s.placement.requant for s in staged.stages)
    assert staged.stages[0].placement.embed_on_host
    types = {n: Q[t] for s in staged.stages for n, t in s.placement.requant.items()}
    reference = Engine(write_quantized(GGUFFile(wide_model), tmp_path / "ref.gguf", types, {}),
                       **dict(kw, pipeline_parallel_size=1))
    for want, got in zip(mixed_passes(reference), mixed_passes(staged)):
        assert relative_error(want, got) < 2e-2 and (want.argmax(-1) == got.argmax(-1)).mean() > 0.9


def test_gpu_stage_actors_share_the_gpu(model):
    """The stages as Ray actors (workers/stage_worker.py), P = 2, each reserving half of the
    one GPU (fractional num_gpus), against one engine: what a replica's stages run, the last
    stage drawing the greedy tokens. (The GPU
    machine has no Ray of its own: where none is installed, this test skips.)"""
    ray = pytest.importorskip("ray")
    from serving_cluster import local_ray
    from workers.stage_worker import RayPipeline

    path, single = model
    with local_ray(num_cpus=4, num_gpus=1):
        staged = Engine(path, pipeline_parallel_size=2, stage_runner=functools.partial(RayPipeline, num_gpus=0.5),
                        **KW)
        assert ray.available_resources().get("GPU", 0.0) == 0.0  # both halves reserved by the stages
        assert_like_one_engine(single, staged)
        assert_same_greedy_tokens(single, staged)
        staged.pipeline.shutdown()


def test_generate_pp_2_on_the_gpu(model):
    """`ntr generate --backend cupy --pp 2` (its own local Ray, in a process of its own; each
    stage actor reserving half of the one GPU: cluster/cli.py `stage_gpu_share`) against one
    engine's greedy tokens."""
    pytest.importorskip("ray")
    path, single = model
    prompt = single.prompt_ids(CODE)
    want = [e.token_id for e in single.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--backend", "cupy", "--model", str(path),
                           "--preset", "greedy", "--max-tokens", "16", "--prompt", CODE, "--json", "--pp", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["prompt_ids"] == prompt
    assert_same_greedy(single, prompt, want, got["token_ids"])


def test_gpu_stages_stream_what_their_budget_does_not_hold(model):
    """P = 2 CuPy stages under a budget a byte short of the larger one's share resident (the
    first stage's without its embedding table, which it would keep in host memory to hold its
    layers): a stage it cannot hold streams its last layers through its own slots from pinned
    host memory, and the logits and greedy tokens are one engine's."""
    path, single = model
    resident = Engine(path, pipeline_parallel_size=2, vram_budget=1 << 40, stage_runner=list, **KW)
    table = resident.placement.sizes.embed_bytes
    budget = max(s.device_bytes - (table if k == 0 else 0) for k, s in enumerate(resident.stages)) - 1
    staged = Engine(path, pipeline_parallel_size=2, vram_budget=budget, **KW)
    assert any(s.streamed for s in staged.stages) and all(s.device_bytes <= budget for s in staged.stages)
    for s, stage in zip(staged.stages, staged.pipeline.stages):
        assert (stage.ops.streaming.schedule.streamed if s.streamed else stage.ops.streaming) == (s.streamed or None)
    assert_like_one_engine(single, staged)
    assert_same_greedy_tokens(single, staged)


@pytest.mark.parametrize("actors", [False, True], ids=["local", "actors"])
def test_gpu_stages_stream_from_host_and_disk_tiers(model, actors, tmp_path, monkeypatch):
    """P = 2 CuPy stages under a budget a byte short of the smaller stage's share, with host RAM
    for half of what they stream: each stage that streams reads its last streamed layers from
    disk (in the process, or as stage actors at half the GPU each, from their node's HostTier
    region and a DiskTier each, both registered as pinned memory), a first stage that does not
    stream keeps its layers by holding its embedding table in host memory, and the logits and
    greedy tokens are one engine's."""
    path, single = model
    monkeypatch.setenv("NTR_HOME", str(tmp_path))
    resident = Engine(path, pipeline_parallel_size=2, vram_budget=1 << 40, stage_runner=list, **KW)
    budget = min(s.device_bytes for s in resident.stages) - 1
    plan = Engine(path, pipeline_parallel_size=2, vram_budget=budget, stage_runner=list, **KW).stages
    host_ram = sum(s.placement.streamed_bytes for s in plan) // 2

    def check(staged):
        assert any(s.streamed for s in staged.stages) and all(s.on_disk for s in staged.stages if s.streamed)
        assert all(s.streamed or s.placement.embed_on_host for s in staged.stages)
        assert_like_one_engine(single, staged)
        assert_same_greedy_tokens(single, staged)

    if not actors:
        return check(Engine(path, pipeline_parallel_size=2, vram_budget=budget, host_ram=host_ram, **KW))
    pytest.importorskip("ray")
    from serving_cluster import local_ray
    from workers.stage_worker import RayPipeline

    with local_ray(num_cpus=4, num_gpus=1):
        staged = Engine(path, pipeline_parallel_size=2, vram_budget=budget, host_ram=host_ram,
                        stage_runner=functools.partial(RayPipeline, num_gpus=0.5), **KW)
        try:
            check(staged)
        finally:
            staged.pipeline.shutdown()


def test_a_replica_drives_gpu_stages_each_under_its_own_budget(model):
    """The served form (cluster/config.py -> ComputeWorker): backend cupy, P = 2, each stage
    actor half of the one GPU and a VRAM budget of its own under what one process needs for the
    model; the compute worker, which drives them, reserves no GPU (kernels/driver.py). A greedy
    request gets one engine's tokens, and each stage's process has its device pool capped at
    its budget less the planned context (StageSpec.pool_limit), and within it."""
    ray = pytest.importorskip("ray")
    from cluster.config import server_config
    from serving_cluster import local_ray
    from workers.compute_worker import ComputeWorker
    from workers.engine.placement import GIB

    path, single = model
    specs = []
    Engine(path, pipeline_parallel_size=2, stage_runner=specs.append, **KW)
    t = single.gguf.tensors
    vectors = sum(x.n_elements for x in t.values() if len(x.shape) == 1) * 4
    budget = max(s.nbytes for s in specs[0]) + vectors + (single.placement.reserve - single.placement.prompt_graph_bytes)
    budget += 64 << 20  # the pools' rounding
    assert single.placement.device_bytes > budget  # one process could not hold it resident
    config = server_config({"model": str(path), "backend": "cupy", "num_gpus": 0.5, "pipeline_parallel_size": 2,
                            "vram_budget_gb": budget / GIB, "max_context": KW["max_context"], "max_num_seqs": 4,
                            "max_batch_tokens": 256})
    prompt = single.prompt_ids(CODE)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = [e.token_id for e in single.generate(prompt, params)]
    with local_ray(num_cpus=4, num_gpus=1):
        worker = ComputeWorker.options(**config.worker_options()).remote(**config.worker_args())
        try:
            try:
                info = ray.get(worker.info.remote(), timeout=150)
            except ray.exceptions.GetTimeoutError:
                raise AssertionError(f"no replica after 150 s: available {ray.available_resources()} of "
                                     f"{ray.cluster_resources()}") from None
            assert len(info["pipeline_stages"]) == 2
            assert ray.available_resources().get("GPU", 0.0) == 0.0  # the stages hold both halves, the worker none
            ray.get(worker.submit.remote("r", prompt, params))
            events, deadline = [], time.monotonic() + 120
            while not (events and ("error" in events[-1] or events[-1].get("finish_reason"))):
                assert time.monotonic() < deadline, events[-3:]
                events += ray.get(worker.poll.remote(1.0)).get("r", [])
            assert "error" not in events[-1], events[-1]
            assert_same_greedy(single, prompt, want, [e["token_id"] for e in events if e.get("token_id") is not None])
            stages = [ray.get_actor(n["name"], namespace=n["namespace"]) for n in ray.util.list_named_actors(True)
                      if "-stage-" in n["name"]]
            assert len(stages) == 2

            def device_pool(_worker):  # nested: pickled by value for the stage actor
                import cupy as cp

                pool = cp.get_default_memory_pool()
                return pool.get_limit(), pool.total_bytes()

            for stage in stages:
                limit, used = ray.get(stage.__ray_call__.remote(device_pool))
                assert 0 < used <= limit <= budget, (used, limit, budget)
        finally:
            ray.kill(worker)
