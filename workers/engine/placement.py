"""Where each layer lives under a VRAM budget: resident, streamed from pinned host RAM, or
streamed from disk; how many VRAM slots the stream uses; and what that predicts for speed.

The budget holds everything the process puts on the device: the runtime reserve (CUDA
context, cuBLAS workspace, scratch, activations, captured decode graphs: `runtime_reserve`;
for a resident model, where the budget holds them, the captured prompt passes' pools:
`with_prompt_graphs`), what every step needs (embedding, output norm and head, the layers'
norms), the KV cache, the slots, and the resident layers. Resident layers are the first ones
(the early-exit drafter runs them), or the first of an order the caller gives: a skip set's
(`workers/engine/skip_calibration.residency_order`), so the skip drafter runs resident layers
only; the rest stream through the slots (kernels/layer_ring.py), from host RAM while their
images fit in it, then from disk. A model that does not fit keeps its embedding table (when it
is not also the output head) in pinned host memory, as llama.cpp does: a step reads one row a
token of it, which the kernel fetches over the link, so its VRAM goes to layers instead.

Speed is predicted from named rates: the host-to-device link (measured, kernels/cupy/link.py),
the rate at which products read resident weights, the prompt's compute rate and the disk's
read rate. A streamed layer costs the longer of its copy and its compute; a resident one its
compute (the link idles then, as the slots are full when a pass starts); a pass takes at
least the read of its disk layers, which the disk tier does ahead, beside everything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kernels.layer_ring import RingSchedule
from workers.engine.kv_cache import pool_bytes, pool_units_within, sliding_pool
from workers.engine.requant_streamed import load_scratch_bytes, retyped, streamed_types
from workers.model.transformer import layer_matrices

GIB = 2**30
CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, CuPy and cuBLAS handles and workspace (H200: ~0.6 GiB measured)
# what a process adds outside the pool after an engine has measured it (context_bytes): the
# kernel modules loaded at first use, cuBLAS's workspace
LATE_RUNTIME_BYTES = 256 << 20
SCRATCH_BYTES = 128 << 20  # the prompt products' fp16 dequantization scratch (kernels/cupy/products.py)
GRAPH_BYTES = 256 << 20  # captured decode graphs' private pools, one per batch size seen
# captured prompt passes' pools (kernels/cupy/steps.py keeps them within what the plan grants):
# granted to a resident model where the budget holds it too; a streamed one runs prompts eagerly
PROMPT_GRAPH_BYTES = 256 << 20
MAX_SLOTS = 4


@dataclass(frozen=True)
class Rates:
    """The rates predictions use, each named where it is printed."""

    link_gb_s: float = 25.0  # pinned host-to-device (measured at start; a PCIe 4 x16 guess until then)
    weight_read_gb_s: float = 3000.0  # 1-token products over resident weights (H200: 70B tg128 = 71% of 4.2 TB/s copy)
    prompt_tflops: float = 170.0  # prompt products (H200: 70B pp512 = 1,247 tok/s, 2 x 70.6 GFLOP a token)
    disk_gb_s: float = 2.0  # the disk tier's reads (measured by the disk tier)
    # a layer's kernels at batch 1 take at least this however few its bytes: their launches and
    # dependent steps (H200: the 0.5B's resident step, 24 layers, 0.62 ms; 5 us of reading each)
    layer_floor_s: float = 20e-6
    source: dict = field(default_factory=dict)  # rate name -> where it came from


@dataclass(frozen=True)
class ModelSizes:
    """The model as the backend stores it."""

    layers: tuple[int, ...]  # each layer's matrices: what streams
    fixed: int  # embedding, output norm and head, every layer's norms: always resident
    kv_per_token: int  # the global layers' K and V for one token (every layer's without sliding ones)
    layer_params: tuple[int, ...]  # each layer's weights' values (2 flops a value a token)
    head_params: int
    kv_sliding_per_token: int = 0  # the sliding layers' K and V for one token of their pool
    kv_sliding_tokens: int = 0  # the sliding pool's tokens (kv_cache.sliding_pool_blocks), at most the main pool's
    head_bytes: int = 0  # the output head's weights (read by every pass; counted in fixed)
    embed_bytes: int = 0  # the embedding's (counted in fixed)
    embed_apart: bool = False  # the embedding is a table of its own, not the (tied) output head
    vector_bytes: int = 0  # every norm and bias vector, as float32 (counted in fixed)

    def fixed_on_device(self, embed_on_host: bool) -> int:
        """The part of `fixed` on the device, the embedding table in host memory or not."""
        return self.fixed - (self.embed_bytes if embed_on_host else 0)

    def kv_bytes(self, kv_tokens: int) -> int:
        """The KV cache of a main pool of kv_tokens tokens, its sliding pool included."""
        return pool_bytes(kv_tokens, self.kv_per_token, self.kv_sliding_per_token, self.kv_sliding_tokens)

    def kv_tokens_within(self, nbytes: int) -> int:
        """The most main-pool tokens whose KV cache, sliding pool included, fits in nbytes."""
        return pool_units_within(nbytes, self.kv_per_token, self.kv_sliding_per_token, self.kv_sliding_tokens)

    def kv_sliding_bytes(self, kv_tokens: int) -> int:
        """The sliding pool's part of kv_bytes(kv_tokens)."""
        return min(kv_tokens, self.kv_sliding_tokens) * self.kv_sliding_per_token


def model_sizes(gguf, config, ops, kv_bytes_per_token: int, kv_ring_bytes: int = 0, n_sliding: int = 0,
                kv_sliding_tokens: int = 0) -> ModelSizes:
    """The model's parts as `ops` stores them (a layer's image has a few aligned gaps: 64 KiB spare);
    kv_bytes_per_token: one layer's K and V; kv_ring_bytes: a RotateKV cache's recent ring, every
    layer and slot (kept with the fixed part); n_sliding layers keep kv_sliding_tokens in their pool."""
    table, t = config.architecture, gguf.tensors
    layers, params = [], []
    for i in range(config.n_layers):
        matrices = layer_matrices(gguf, config, i)
        layers.append(layer_bytes(ops, matrices))
        params.append(sum(x.shape[0] * x.shape[-1] for m in matrices for x in m))
    vectors = sum(x.n_elements for name, x in t.items() if len(x.shape) == 1) * 4
    head = t[table.tensor_name("embed" if config.tied_embeddings else "output")]
    embed = ops.matrix_nbytes(t[table.tensor_name("embed")])
    fixed = embed + vectors + kv_ring_bytes
    if not config.tied_embeddings:
        fixed += ops.matrix_nbytes(head)
    return ModelSizes(tuple(layers), fixed, kv_bytes_per_token * (config.n_layers - n_sliding), tuple(params),
                      head.shape[0] * head.shape[-1], kv_bytes_per_token * n_sliding, kv_sliding_tokens,
                      ops.matrix_nbytes(head), embed, not config.tied_embeddings, vectors)


def layer_bytes(ops, matrices: list) -> int:
    """A layer's image as `ops` stores it (`layer_matrices`): its matrices and a few aligned
    gaps (64 KiB spare)."""
    return sum(ops.matrix_nbytes(*m) for m in matrices) + (64 << 10)


def context_bytes(outside_pool: int | None) -> int:
    """The device memory a process holds outside its pool: the estimate, or what the backend
    measured (Backend.outside_pool_bytes) and what loads after it, whichever is more."""
    return CONTEXT_BYTES if outside_pool is None else max(CONTEXT_BYTES, outside_pool + LATE_RUNTIME_BYTES)


def runtime_reserve(d_model: int, ffn_dim: int, q_dim: int, kv_dim: int, vocab: int, max_batch_tokens: int,
                    max_logit_rows: int, context: int = CONTEXT_BYTES) -> int:
    """VRAM besides weights, KV cache and slots: context (outside the pool), scratch, graphs and
    a step's activations (float32 rows of the widest products, twice over for the pool's rounding)."""
    per_token = 4 * (3 * d_model + q_dim + 2 * kv_dim + 3 * ffn_dim)
    logits = 4 * vocab * max_logit_rows
    return context + SCRATCH_BYTES + GRAPH_BYTES + 2 * (per_token * max_batch_tokens + logits)


@dataclass(frozen=True)
class Placement:
    tiers: tuple[str, ...]  # per layer: "vram", "ram" or "disk"
    n_buffers: int  # VRAM slots the streamed layers pass through (0: nothing streams)
    slot_bytes: int
    kv_tokens: int
    budget: int | None
    reserve: int
    sizes: ModelSizes
    why_buffers: str = ""
    requant: dict = field(default_factory=dict)  # streamed matrix -> the type it loads as (--requant-streamed)
    file_layers: tuple[int, ...] = ()  # each layer's bytes at the file's types, where requant changed sizes
    prompt_graph_bytes: int = 0  # the reserve's share for graphs of repeated prompt passes (0: none)
    embed_on_host: bool = False  # the embedding table in pinned host memory (sizes.embed_bytes off the device)

    @property
    def device_fixed(self) -> int:
        """The part of sizes.fixed on the device."""
        return self.sizes.fixed_on_device(self.embed_on_host)

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.tiers) if t != "vram")

    @property
    def streamed_bytes(self) -> int:
        """Bytes a pass over every layer copies to the device (a decode step's)."""
        return sum(self.sizes.layers[i] for i in self.streamed)

    @property
    def file_streamed_bytes(self) -> int:
        """streamed_bytes at the file's types (the same without requant)."""
        return sum((self.file_layers or self.sizes.layers)[i] for i in self.streamed)

    def schedule(self) -> RingSchedule:
        return RingSchedule(self.streamed, self.n_buffers)

    def bytes_in(self, tier: str) -> int:
        return sum(n for n, t in zip(self.sizes.layers, self.tiers) if t == tier)

    @property
    def device_bytes(self) -> int:
        """What the plan puts on the device, the reserve included."""
        s = self.sizes
        return self.reserve + self.device_fixed + s.kv_bytes(self.kv_tokens) + self.n_buffers * self.slot_bytes \
            + self.bytes_in("vram")

    def step_seconds(self, tokens: int, rates: Rates, layers: tuple[int, ...] | None = None) -> float:
        """One forward pass over `tokens` tokens (a prompt, or a decode step of that many
        sequences) through `layers` (every layer if None; a draft's otherwise) and the head:
        resident layers compute, streamed ones take the longer of copy and compute."""
        s = self.sizes

        def compute(nbytes: int, params: int) -> float:
            read = nbytes / (rates.weight_read_gb_s * 1e9)
            flops = 2 * params * tokens / (rates.prompt_tflops * 1e12)
            return max(read, flops)

        run = range(len(s.layers)) if layers is None else layers
        t = compute(s.head_bytes, s.head_params)
        for i in run:
            c = max(compute(s.layers[i], s.layer_params[i]), rates.layer_floor_s)
            t += c if self.tiers[i] == "vram" else max(c, s.layers[i] / (rates.link_gb_s * 1e9))
        # the disk tier reads ahead all the time, so a pass takes at least its disk bytes' read
        disk = sum(s.layers[i] for i in run if self.tiers[i] == "disk")
        return max(t, disk / (rates.disk_gb_s * 1e9))

    def predict(self, rates: Rates, prompt: int = 512, batch: int = 16) -> dict:
        return {"prefill_tok_s": prompt / self.step_seconds(prompt, rates),
                "decode_tok_s": 1 / self.step_seconds(1, rates),
                f"decode_x{batch}_tok_s": batch / self.step_seconds(batch, rates)}

    def as_dict(self) -> dict:
        s = self.sizes
        return {"tiers": list(self.tiers), "n_buffers": self.n_buffers, "slot_bytes": self.slot_bytes,
                "kv_tokens": self.kv_tokens, "kv_bytes": s.kv_bytes(self.kv_tokens),
                "kv_sliding_tokens": min(self.kv_tokens, s.kv_sliding_tokens),
                "kv_sliding_bytes": s.kv_sliding_bytes(self.kv_tokens), "budget": self.budget, "reserve": self.reserve,
                "device_bytes": self.device_bytes, "vram_layer_bytes": self.bytes_in("vram"),
                "ram_bytes": self.bytes_in("ram"), "disk_bytes": self.bytes_in("disk"),
                "why_buffers": self.why_buffers, "sizes": asdict(self.sizes), "streamed_bytes": self.streamed_bytes,
                "file_streamed_bytes": self.file_streamed_bytes, "requant": dict(self.requant),
                "prompt_graph_bytes": self.prompt_graph_bytes, "embed_on_host": self.embed_on_host}


def choose_buffers(slot_bytes: int, layer_bytes: int, rates: Rates) -> tuple[int, str]:
    """Slots from a layer's copy time against its 1-token compute: while N - 1 layers compute,
    the next copy must land; when the link is slower than three layers' compute nothing hides
    it, and every slot past two would cost a resident layer for nothing."""
    copy = slot_bytes / (rates.link_gb_s * 1e9)
    compute = layer_bytes / (rates.weight_read_gb_s * 1e9)
    ratio = copy / compute
    if ratio > MAX_SLOTS - 1:
        return 2, f"copy {copy * 1e3:.2f} ms vs compute {compute * 1e3:.2f} ms a layer: link-bound, 2 slots"
    n = max(2, 1 + -(-copy // compute))
    return int(n), f"copy {copy * 1e3:.2f} ms vs compute {compute * 1e3:.2f} ms a layer: {int(n)} slots hide the copy"


def place(sizes: ModelSizes, budget: int | None, reserve: int, kv_tokens: int | None, min_kv_tokens: int,
          rates: Rates = Rates(), host_ram: int | None = None, n_buffers: int | None = None,
          resident_order: tuple[int, ...] | None = None) -> Placement:
    """kv_tokens None: the KV cache takes what the budget leaves when every layer is resident,
    else one context (min_kv_tokens). resident_order: every layer once, in the order they claim
    residency (`residency_order`); the first layers by default. A model that does not fit with
    everything on the device keeps its embedding table in pinned host memory, where it is not
    the output head (host_ram counts the streamed layers' images only)."""
    L = len(sizes.layers)
    order = tuple(range(L)) if resident_order is None else tuple(resident_order)
    if sorted(order) != list(range(L)):
        raise ValueError(f"resident order must list each of the {L} layers once, got {list(order)}")
    kv_min = max(kv_tokens or 0, min_kv_tokens)
    for on_host in (False, True) if sizes.embed_apart else (False,):  # every layer resident, the table first too
        everything = reserve + sizes.fixed_on_device(on_host) + sum(sizes.layers)
        if budget is None or everything + sizes.kv_bytes(kv_min) <= budget:
            if kv_tokens is None:
                kv_tokens = min_kv_tokens if budget is None else max(min_kv_tokens,
                                                                     sizes.kv_tokens_within(budget - everything))
            return Placement(("vram",) * L, 0, 0, kv_tokens, budget, reserve, sizes, embed_on_host=on_host)
    if L < 2:
        raise ValueError("the model does not fit the budget and has too few layers to stream")
    on_host = sizes.embed_apart  # layers stream: the table leaves the device where it is not the head
    fixed = sizes.fixed_on_device(on_host)
    kv = kv_min
    base = reserve + fixed + sizes.kv_bytes(kv)
    slot = max(sizes.layers)
    n, why = (n_buffers, "--n-buffers") if n_buffers else choose_buffers(slot, max(sizes.layers), rates)
    n = max(1, min(n, L))
    minimum = base + 2 * slot
    if budget < minimum:
        raise ValueError(
            f"a VRAM budget of {budget / GIB:.2f} GiB cannot hold the runtime ({reserve / GIB:.2f} GiB), the "
            f"{'norms and output head' if on_host else 'embedding, norms and output head'} ({fixed / GIB:.2f}), "
            f"a {kv}-token KV cache ({sizes.kv_bytes(kv) / GIB:.2f}) and two layer slots ({2 * slot / GIB:.2f}): "
            f"the minimum is {minimum / GIB:.2f} GiB")
    resident: set[int] = set()
    for _ in range(3):  # the slots are as large as the largest streamed layer, which depends on the split
        room, taken = budget - base - n * slot, 0
        while taken < L - 1 and sizes.layers[order[taken]] <= room:
            room -= sizes.layers[order[taken]]
            taken += 1
        resident = set(order[:taken])
        slot = max(sizes.layers[i] for i in order[taken:])
    n = min(n, L - len(resident))
    if budget < base + n * slot + sum(sizes.layers[i] for i in resident):
        n = 2 if L - len(resident) >= 2 else 1
    tiers, ram = [], host_ram
    for i in range(L):
        if i in resident:
            tiers.append("vram")
        elif ram is None or sizes.layers[i] <= ram:
            tiers.append("ram")
            if ram is not None:
                ram -= sizes.layers[i]
        else:
            tiers.append("disk")
            ram = 0  # the disk layers are the last streamed ones: the stream reads them in order
    return Placement(tuple(tiers), n, slot, kv, budget, reserve, sizes, why, embed_on_host=on_host)


def with_prompt_graphs(p: Placement, kv_tokens: int | None, max_context: int) -> Placement:
    """A resident placement with PROMPT_GRAPH_BYTES more in its reserve where the budget holds
    that with every layer still resident and the embedding where p keeps it (the KV cache, if
    sized by the budget, that much smaller); else p as it is, granting none."""
    try:
        q = place(p.sizes, p.budget, p.reserve + PROMPT_GRAPH_BYTES, kv_tokens, max_context)
    except ValueError:
        return p
    return p if q.streamed or q.embed_on_host != p.embed_on_host else replace(q, prompt_graph_bytes=PROMPT_GRAPH_BYTES)


def stage_reserve(p: Placement) -> int:
    """The runtime reserve of a pipeline stage's process, planned as p's: a stage runs its
    prompt passes eagerly, so none of p's share for prompt graphs."""
    return p.reserve - p.prompt_graph_bytes


def plan_model(gguf, config, sizer, budget: int | None, kv_tokens: int | None, max_context: int,
               block_size: int = 16, max_batch_tokens: int = 512, max_logit_rows: int = 32,
               host_ram: int | None = None, n_buffers: int | None = None, rates: Rates = Rates(),
               kv_type: str | None = None, requant_streamed: str | None = None,
               context: int = CONTEXT_BYTES, resident_order: tuple[int, ...] | None = None) -> Placement:
    """The placement of a GGUF model for a backend (`sizer`: a Backend, or kernels' CupySizes
    where there is no GPU: `ntr plan`) with its KV cache of kv_type (the backend's default if None).
    requant_streamed ("auto" or a type, workers/engine/requant_streamed.py): the layers are
    placed at the file's sizes, then the streamed ones' matrices retyped (Placement.requant) and
    their images and the slots shrunk to the new sizes. context: the device memory outside the
    pool (`context_bytes`). resident_order: as `place` takes it."""
    c = config
    layout = sizer.kv_layout(c.n_kv_heads, c.head_dim, block_size, kv_type)
    # a ring slot (and a share of the sliding pool) per sequence a step holds (Engine: max_logit_rows)
    sliding, _, sliding_blocks = sliding_pool(c, block_size, max_logit_rows, max_batch_tokens)
    sliding_tokens = sliding_blocks * block_size
    ring = c.n_layers * layout.fixed_bytes(max_logit_rows)
    sizes = model_sizes(gguf, c, sizer, layout.bytes_per_token, ring, len(sliding), sliding_tokens)
    reserve = runtime_reserve(c.d_model, c.ffn_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                              c.vocab_size, max_batch_tokens, max_logit_rows, context)
    p = place(sizes, budget, reserve, kv_tokens, max_context, rates, host_ram, n_buffers, resident_order)
    if not p.streamed:
        return with_prompt_graphs(p, kv_tokens, max_context)
    if requant_streamed is None:
        return p
    return requantized(p, gguf, c, sizer, requant_streamed, context, lambda more: place(
        sizes, budget, more, kv_tokens, max_context, rates, host_ram, n_buffers, resident_order))


def requantized(p: Placement, gguf, config, sizer, spec: str, context: int, place_again, first: int = 0) -> Placement:
    """p, which streams, with its streamed layers' matrices retyped as spec says ("auto" or a
    type: workers/engine/requant_streamed.py): their images and the slots shrink to the new
    sizes. p places the model, or a pipeline stage whose layer 0 is the model's layer `first`.
    The streamed layers load (and requantize) before the KV cache and any activation exist: the
    requantization's scratch takes their room, and where it is short, place_again(reserve)
    places anew with the reserve grown by as much."""
    def types_of(q: Placement) -> dict:
        return streamed_types(gguf, config, [first + i for i in q.streamed], spec)

    types = types_of(p)
    short = load_scratch_bytes(gguf, types, sizer) - (p.reserve - context - GRAPH_BYTES + p.sizes.kv_bytes(p.kv_tokens))
    if short > 0:
        try:
            p = place_again(p.reserve + short)
        except ValueError as e:
            raise ValueError(f"{e}, of which {short / GIB:.2f} GiB is requant_streamed's while the streamed layers "
                             "requantize as they load (the quantizers' scratch and stacks): raise the budget, or "
                             "stream at the file's types") from None
        types = types_of(p)
    loaded = retyped(gguf, types)
    layers = tuple(layer_bytes(sizer, layer_matrices(loaded, config, first + i)) if i in p.streamed else n
                   for i, n in enumerate(p.sizes.layers))
    return replace(p, sizes=replace(p.sizes, layers=layers), slot_bytes=max(layers[i] for i in p.streamed),
                   requant={n: q.name for n, q in types.items()}, file_layers=p.sizes.layers)
