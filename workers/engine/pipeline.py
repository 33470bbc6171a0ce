"""Pipeline parallelism: a model's layers cut into P contiguous stages, and one stage's step.

The split is by bytes: each layer costs its matrices (as the backend stores them) and its KV
pool, the first stage also holds the embedding and the last the output head, and the cut
points minimize the largest stage's sum, so that the stage that bounds the device memory
and a decode step's weight reads is as small as it can be.

Under a VRAM budget each stage is a device of its own (`plan_stages`): resident where every
stage fits, else each placed as a model of its own, streaming the last layers it cannot hold.

A `Stage` holds only its layers' weights (`Transformer(held=...)`) and its layers' KV
(`PagedKVCache(held=...)`); every stage's pools have the same number of blocks, so the block
tables of the one scheduler (the engine that drives the stages) are valid in each. A step's
inputs (tokens, positions, the AttentionBatch) go to every stage; the residual stream goes
from one stage to the next as float32 [T, d_model] (the activation precision: logits equal
a single process's), and the last stage returns the logits or, given the rows' draws
(workers/engine/sampling.py `Draw`), draws each row's token beside them and returns only
the picks: on the GPU a decode step's ids, not a row of vocabulary-wide logits a sequence
(607 KB for Qwen2.5's 151,936 tokens); a draft tree's chain step asks for each row's two best
ids instead (`TOP2`). A pass also carries the KV moves of the draft-tree leaves kept since the
last one, which each stage makes in its layers before it runs the pass. Where the stages run
is the caller's: `LocalPipeline` runs them in this process, `workers/stage_worker.py` in Ray
actors. Either has `submit(step, draws=None, calibrate=False, layers=None, moves=())`, which
returns a pass whose `result()` waits for its output, and `calibrate(step)`: a quantized KV
cache's calibration pass (workers/engine/kv_calibration.py), in which each stage calibrates its
own layers and the transforms travel with the stream to the last stage, so that the pipeline
keeps them for a stage that restarts.

Two passes may be in flight at once (the scheduler's micro-batches, workers/engine/
scheduler.py): stage k runs pass B while stage k + 1 runs pass A. Their KV writes cannot
interleave wrongly: the passes hold disjoint sequences (their own blocks, sliding blocks
and ring slots, all reserved before either is submitted), and each stage runs its steps one
at a time in the order they were submitted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kernels import StepInputs, get_backend
from kernels.kv_layout import KVLayout
from kernels.layer_ring import RingSchedule
from kernels.ops import Backend
from workers.engine.kv_cache import PagedKVCache
from workers.engine.kv_calibration import Transforms, calibrating, install
from workers.engine.placement import CONTEXT_BYTES, ModelSizes, Placement, Rates, place
from workers.engine.requant_streamed import retyped
from workers.engine.sampling import Draw, draw_rows
from workers.memory.disk_stream import DiskStream, image_path
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile
from workers.model.quant_recipe import Q
from workers.model.transformer import Transformer, layer_matrices


TOP2 = "top2"  # a pass's draws: each logit row's argmax and runner-up, [2, B] host ids (`Backend.top2`)
# a pass through stage actors longer than this is stuck in a stage (workers/stage_worker.py; a
# prompt chunk takes seconds on the CPU); the server's step_timeout_s
PASS_TIMEOUT_S = 300.0


def split_by_bytes(layer_bytes: list[int], parts: int, first_bytes: int = 0, last_bytes: int = 0) -> list[range]:
    """`parts` contiguous non-empty ranges of layer indices covering every layer, whose largest
    sum (first_bytes added to the first range's, last_bytes to the last's) is the least any
    such split has. Exact, by dynamic programming over the cut points: O(parts * n^2) for n
    layers, nothing next to a model's load."""
    n = len(layer_bytes)
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= n:
        raise ValueError(f"pipeline_parallel_size={parts!r} must be in [1, {n}] (the model's layers)")
    prefix = np.concatenate([[0], np.cumsum(layer_bytes, dtype=np.int64)]).tolist()

    def cost(start: int, end: int, k: int) -> int:  # layers [start, end) as stage k of `parts`
        return prefix[end] - prefix[start] + (first_bytes if k == 0 else 0) + (last_bytes if k == parts - 1 else 0)

    # best[k][e]: the least largest sum of stages 0..k over layers [0, e); cut[k][e]: stage k's start there
    best = [[cost(0, e, 0) if e >= 1 else None for e in range(n + 1)]]
    cut = [[0] * (n + 1)]
    for k in range(1, parts):
        row, starts = [None] * (n + 1), [0] * (n + 1)
        for e in range(k + 1, n + 1):
            for s in range(k, e):  # stages before k hold layers [0, s), at least one each
                value = max(best[k - 1][s], cost(s, e, k))
                if row[e] is None or value < row[e]:
                    row[e], starts[e] = value, s
        best.append(row)
        cut.append(starts)
    ranges, end = [], n
    for k in range(parts - 1, -1, -1):
        start = cut[k][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


def staged_pass(parts: int, n_layers: int) -> bool:
    """Whether a model of n_layers runs its forward pass in `parts` stages (parts > 1);
    ValueError naming pipeline_parallel_size for a size out of range."""
    split_by_bytes([0] * n_layers, parts)  # the range check, with the field's name
    return parts > 1


@dataclass(frozen=True)
class StageSpec:
    """What a stage needs to build itself (picklable: it travels to a stage actor)."""

    index: int
    model_path: str
    backend: str
    layers: range
    block_size: int
    kv_type: str | None
    num_blocks: int
    recent_slots: int
    sliding: tuple[int, ...]
    sliding_blocks: int
    nbytes: int  # what the split counted for it: its layers' matrices and KV pools, embedding, head
    budget: int | None = None  # the device memory its process may hold, its runtime reserve included
    pool_limit: int | None = None  # of it, what its device pool may take: the budget less the context planned
    device_bytes: int | None = None  # what its process is planned to hold on its device (with a budget)
    # where the budget does not hold every stage resident: this one placed as a model of its own
    # (its layers numbered from 0), which says what streams and through how many slots
    placement: Placement | None = None

    @property
    def streamed(self) -> tuple[int, ...]:
        """Its layers the budget does not hold: they stream through its slots."""
        return tuple(self.layers.start + i for i in self.placement.streamed) if self.placement else ()

    @property
    def on_disk(self) -> tuple[int, ...]:
        """Of them, those its share of host RAM does not hold: they stream from a disk tier."""
        if not self.placement:
            return ()
        return tuple(self.layers.start + i for i, t in enumerate(self.placement.tiers) if t == "disk")

    @property
    def n_buffers(self) -> int:
        """The slots its streamed layers pass through."""
        return self.placement.n_buffers if self.placement else 0

    @property
    def first(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        return f"stage {self.index} (layers {self.layers.start}-{self.layers.stop - 1})"


@dataclass(frozen=True)
class KVPools:
    """A layer's KV pool as the engine will size it, before the cache exists: `num_blocks`
    blocks of `layout` (a sliding layer's at most sliding_cap) and a ring of recent_slots."""

    layout: KVLayout
    recent_slots: int
    sliding: tuple[int, ...]
    sliding_cap: int

    def layer_bytes(self, layer: int, num_blocks: int) -> int:
        blocks = min(self.sliding_cap, num_blocks) if layer in self.sliding else num_blocks
        return self.layout.fixed_bytes(self.recent_slots) + self.layout.bytes_per_block * blocks


def plan_stages(model_path: str, backend: str, sizes: ModelSizes, parts: int, pools: KVPools, num_blocks: int,
                kv_type: str | None, budget: int | None = None, reserve: int = 0, grow: bool = False,
                rates: Rates = Rates(), n_buffers: int | None = None, context: int = CONTEXT_BYTES,
                host_ram: int | None = None, requant=None,
                resident_order: tuple[int, ...] | None = None) -> list[StageSpec]:
    """The stages of a model split `parts` ways by bytes: each layer's matrices as `backend`
    stores them (sizes, the model's `ModelSizes`, from a Backend or a sizer such as CupySizes)
    and its KV pool of num_blocks blocks. With a budget each stage is a device of its own holding
    reserve (its runtime: context, scratch, graphs, activations), its share of the model and
    the vectors (norms) of every layer; context (in the reserve) is what the pool limit leaves
    outside the pool. Where every stage fits, grow: the pools take the most blocks with which
    every stage still does (num_blocks at least). Where one does not, each stage is placed as
    a model of its own (`placement.place`): the layers its budget does not hold stream through
    its slots from host memory, every pool keeping num_blocks. host_ram (None: no limit) is the
    host memory for every stage's streamed images together: each stage takes a share in
    proportion to the bytes it streams, so each reads the same fraction of them from disk (a
    pipeline runs at its slowest stage's pace). requant(p, first=, place_again=): a streaming
    stage's placement p (its layer 0 the model's layer `first`) with its streamed layers
    requantized (`placement.requantized`, given the model and the type); None: streamed at the
    file's types. resident_order (the model's layers, as `placement.place` takes it): the order
    in which each stage's layers claim residency on its device (a skip draft's first, so that
    its drafts copy nothing; the first layers if None). ValueError naming
    pipeline_parallel_size and the stage where not even that fits."""
    embed, head, vectors = sizes.embed_bytes, sizes.head_bytes, sizes.vector_bytes

    def split(blocks: int) -> tuple[list[range], list[int]]:
        per_layer = [w + pools.layer_bytes(i, blocks) for i, w in enumerate(sizes.layers)]
        ranges = split_by_bytes(per_layer, parts, embed, head)
        return ranges, [sum(per_layer[i] for i in r) + (embed if k == 0 else 0) + (head if k == parts - 1 else 0)
                        for k, r in enumerate(ranges)]

    def fits(blocks: int) -> bool:
        return max(split(blocks)[1]) + vectors + reserve <= budget

    def placed(k: int, layers: range, ram: int | None = None) -> Placement:
        """Stage k as a model of its own under the budget (a resident one where it fits)."""
        last, sliding = k == parts - 1, sum(i in pools.sliding for i in layers)
        per_token = pools.layout.bytes_per_token
        own = ModelSizes(tuple(sizes.layers[i] for i in layers),
                         vectors + (embed if k == 0 else 0) + (head if last else 0)
                         + len(layers) * pools.layout.fixed_bytes(pools.recent_slots),
                         per_token * (len(layers) - sliding), tuple(sizes.layer_params[i] for i in layers),
                         sizes.head_params if last else 0, per_token * sliding, sizes.kv_sliding_tokens,
                         head if last else 0, embed if k == 0 else 0,
                         k == 0 and (sizes.embed_apart or not last))  # a tied table is the head only where both are
        tokens = num_blocks * pools.layout.block_size
        order = None if resident_order is None else own_layers(resident_order, layers)

        def place_with(more: int) -> Placement:
            return place(own, budget, more, tokens, tokens, rates, ram, n_buffers, order)

        try:
            p = place_with(reserve)
            return requant(p, first=layers.start, place_again=place_with) if requant and p.streamed else p
        except ValueError as e:
            raise ValueError(f"pipeline_parallel_size={parts}: stage {k} (layers {layers.start}-{layers.stop - 1}), "
                             f"its layers streamed: {e}") from None

    streaming = budget is not None and not fits(num_blocks)
    if budget is not None and not streaming and grow and len(pools.sliding) < len(sizes.layers):
        low, high = num_blocks, num_blocks + max(1, budget // pools.layout.bytes_per_block)
        while low < high:  # the most blocks that fit: fits() is monotone in the blocks
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        num_blocks = low
    ranges, sums = split(num_blocks)
    placements = [placed(k, r) if streaming else None for k, r in enumerate(ranges)]
    # shares of host RAM in the file's sizes, which place() assigns it in (requantized images are smaller)
    streamed = sum(p.file_streamed_bytes for p in placements if p)
    if host_ram is not None and streamed > host_ram:
        placements = [p and placed(k, r, host_ram * p.file_streamed_bytes // streamed)
                      for k, (r, p) in enumerate(zip(ranges, placements))]
    specs = []
    for k, (r, p) in enumerate(zip(ranges, placements)):
        specs.append(StageSpec(
            index=k, model_path=model_path, backend=backend, layers=r, block_size=pools.layout.block_size,
            kv_type=kv_type, num_blocks=num_blocks, recent_slots=pools.recent_slots, sliding=pools.sliding,
            sliding_blocks=min(pools.sliding_cap, num_blocks), nbytes=sums[k], budget=budget,
            pool_limit=None if budget is None else budget - context,
            device_bytes=p.device_bytes if p else (None if budget is None else sums[k] + vectors + reserve),
            placement=p))
    return specs


def stages_step_seconds(specs: list[StageSpec], tokens: int, rates: Rates,
                        layers: tuple[int, ...] | None = None) -> float:
    """A pass of `tokens` tokens through streaming stages (each placed as a model of its own)
    over `layers` (every layer if None; a draft's otherwise), the stages one after another, so
    each stage's copies overlap only its own compute: a bound, each stage's
    `Placement.step_seconds` of its part (a stage that runs none of them only its head, if last)."""
    return sum(s.placement.step_seconds(tokens, rates, None if layers is None else own_layers(layers, s.layers))
               for s in specs)


def own_layers(layers, held: range) -> tuple[int, ...]:
    """Of the model's `layers` (in their order), those a stage holding `held` has, numbered
    from its first: the indices of its own placement (`StageSpec.placement`)."""
    return tuple(i - held.start for i in layers if i in held)


class Stage:
    """One stage's layers and their KV cache, loaded from the model file (mapped, so a stage
    reads only its own tensors' pages)."""

    def __init__(self, spec: StageSpec, ops: Backend | None = None, host_alloc=None, disk_open=None):
        """host_alloc, disk_open: where its streamed layers' images live, as `Engine` takes them
        (the backend's own host memory, and no disk tier, if None)."""
        self.spec = spec
        self.ops = ops or get_backend(spec.backend)
        gguf = GGUFFile(spec.model_path)
        c = self.config = ModelConfig.from_gguf(gguf)
        if spec.layers.stop > c.n_layers:
            raise ValueError(f"{spec.describe()}: the model has {c.n_layers} layers")
        if spec.placement and spec.placement.requant:  # its streamed matrices requantized as they load
            gguf = retyped(gguf, {n: Q[t] for n, t in spec.placement.requant.items()})
        if spec.streamed:  # as Engine streams a model's
            self.ops.stream_layers(RingSchedule(spec.streamed, spec.n_buffers),
                                   {i: layer_matrices(gguf, c, i) for i in spec.streamed}, spec.on_disk,
                                   host_alloc, disk_open)
        self.model = Transformer(gguf, c, self.ops, held=spec.layers,
                                 embed_on_host=bool(spec.placement and spec.placement.embed_on_host))
        layout = self.ops.kv_layout(c.n_kv_heads, c.head_dim, spec.block_size, spec.kv_type)
        self.kv = PagedKVCache(self.ops, c.n_layers, layout, spec.num_blocks, spec.recent_slots, spec.sliding,
                               spec.sliding_blocks, held=spec.layers)
        self.kv_by_layer = self.kv.by_layer
        # a decode step's incoming residual stream, by its sequences: one array a batch size,
        # so that a step the backend captured (a CUDA graph) reads the next step's stream from
        # where it read this one's (prompt passes, which stages run eagerly, take theirs as it comes)
        self.inputs: dict[int, object] = {}

    def step(self, step: StepInputs, hidden, draws: list[Draw | None] | str | None = None, calibrate: bool = False,
             layers: tuple[int, ...] | None = None, moves: tuple[tuple[int, int], ...] = ()):
        """The first stage embeds step's tokens (hidden None); the others take the previous
        stage's residual stream [T, d_model] float32. Returns the stream leaving this stage's
        last layer, or from the last stage the logits of step.logit_rows, float32 on the host,
        or with draws (the pass's: one a logit row) each row's (token, logprob, top),
        `draw_rows`'s, or with TOP2 each row's two best ids; a stage without the output head
        passes the draws by. moves: (src, dst) KV slots whose rows its layers copy first
        (`Engine.move_kv`: kept draft-tree leaves). Runs as the backend runs a model's step
        (`Backend.run_step`: on the GPU, a decode step replayed from its graph). layers: a
        draft's pass over a subset of the model's layers (`Engine.forward`'s): this stage runs
        those it holds, a step of its own to a backend that captures steps, and a middle stage
        holding none hands the stream on as it came. calibrate: the KV calibration pass, which
        this stage's layers calibrate on; the stream and the output are then `Calibrated`,
        carrying every layer's transforms so far."""
        for src, dst in moves:
            self.ops.copy_kv(self.kv.layers, src, dst)
        if not calibrate:
            return self._step(step, hidden, draws, layers)
        before = hidden.transforms if isinstance(hidden, Calibrated) else {}
        with calibrating(self.ops, self.kv_by_layer, self.config, len(step.tokens)) as mine:
            out = self._step(step, hidden.stream if isinstance(hidden, Calibrated) else hidden, draws)
        return Calibrated(out, {**before, **mine})

    def install_transforms(self, transforms: Transforms) -> None:
        """This stage's layers take their key transforms from a calibration pass's (a restarted
        stage's, which lost them)."""
        if self.kv.layout.type.quantized:
            install(self.ops, self.kv_by_layer, transforms)

    def _step(self, step: StepInputs, hidden: np.ndarray | None, draws: list[Draw | None] | str | None,
              layers: tuple[int, ...] | None = None):
        ops, c, T = self.ops, self.config, len(step.tokens)
        if (hidden is None) != self.spec.first:
            raise ValueError(f"{self.spec.describe()}: {'no ' if self.spec.first else ''}hidden states expected")
        run = self.spec.layers if layers is None else tuple(i for i in self.spec.layers if i in layers)
        if hidden is not None:
            if hidden.shape != (T, c.d_model) or hidden.dtype != np.float32:
                raise ValueError(f"{self.spec.describe()}: hidden states {hidden.dtype}{list(hidden.shape)}, expected "
                                 f"float32[{T}, {c.d_model}]")
            if not run and not self.model.heads:
                return hidden
            if T == step.batch.num_seqs:
                if T not in self.inputs:
                    self.inputs[T] = ops.asarray(np.zeros((T, c.d_model), np.float32))
                ops.copy_into(self.inputs[T], hidden)
                hidden = self.inputs[T]
            else:
                hidden = ops.asarray(hidden)
        forward = functools.partial(self._forward, hidden=hidden, layers=run)
        forward.returns_logits = self.model.heads
        if layers is not None:
            forward.graph_key = ("layers", run)
            forward.layers_run = run  # a streaming stage's ring copies only these (kernels/layer_ring.py)
        out = ops.run_step(forward, step, self.kv_by_layer)
        if draws is not None and self.model.heads:
            return ops.top2(out) if draws == TOP2 else draw_rows(ops, out, draws)
        return ops.to_numpy(out).astype(np.float32, copy=False)

    def _forward(self, step: StepInputs, kv_caches, hidden, layers):
        x = self.model.embedding(step) if hidden is None else hidden
        x = self.model.run_layers(x, step, kv_caches, layers)
        return self.model.logits(x, step) if self.model.heads else x


@dataclass(frozen=True)
class Calibrated:
    """What a calibration pass carries from a stage: its stream (the last stage's logits) and
    the key transforms of every layer it has been through, by layer index."""

    stream: np.ndarray
    transforms: Transforms


class Finished:
    """A pass that ran to its end when it was submitted (`LocalPipeline`'s)."""

    def __init__(self, output):
        self.output = output

    def result(self):
        return self.output


class LocalPipeline:
    """The stages in this process, one after the other (the engine-level form of a pipeline:
    what the Ray stage actors run, without Ray). A pass runs to its end as it is submitted,
    so passes never overlap here. The stages share this process's device pool, which no
    stage's budget caps (a stage actor's own process is capped at it: workers/stage_worker.py)."""

    # a pass's time beyond its stages' compute, by backend (the draft policy's: Engine.
    # pass_overhead_seconds; docs/benchmarks.md). cupy: the real default model on an H100, P = 2
    # against one process, 0.14-0.18 ms a step (the hand-off's 20-25 us, the host's work between
    # steps that one process's greedy steps run ahead of; the 70B replica's: 0.69 ms). numpy:
    # none counted; the placement's step is a GPU's seconds (`Rates`), not the CPU's, and on the
    # CPU a pass through stages took ~2 ms more of ~83, within the runs' spread.
    PASS_OVERHEAD_SECONDS = {"numpy": 0.0, "cupy": 0.16e-3}

    def __init__(self, specs: list[StageSpec]):
        self.specs = specs
        # a stage's disk layers go to an image file of its own, read back by a thread (as `ntr
        # generate` streams a model's: cluster/cli.py disk_tier)
        self.stages = [Stage(spec, disk_open=lambda sizes, s=spec: DiskStream(
            image_path(s.model_path, f"-stage{s.index}"), sizes)) for spec in specs]
        self.transforms: Transforms = {}

    def submit(self, step: StepInputs, draws: list[Draw | None] | str | None = None, calibrate: bool = False,
               layers: tuple[int, ...] | None = None, moves: tuple[tuple[int, int], ...] = ()) -> Finished:
        hidden = None
        for stage in self.stages:
            hidden = stage.step(step, hidden, draws, calibrate, layers, moves)
        return Finished(hidden)

    def calibrate(self, step: StepInputs) -> None:
        self.transforms = self.submit(step, calibrate=True).result().transforms
