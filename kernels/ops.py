"""The ops interface: everything the transformer needs from a compute backend.

The model (`workers/model.py`) is written once against this class; a backend (`numpy`,
`cupy`) implements it for its arrays. Activations are 2-D `[tokens, features]` in the
backend's float type. A batch of sequences of different lengths is flattened along the
token axis and described by an `AttentionBatch` (the varlen layout of vLLM/nano-vllm), so
prefill, decode and a mix of both are the same call. A forward pass's inputs travel as one
`StepInputs` (tokens, positions, batch, logit rows), which `run_step` hands to the ops with
the backend's device copies attached (`StepInputs.dev`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kernels.kv_layout import KVLayout, KVRows, layout_for, new_kv_rows
from kernels.quants import SUPPORTED_QTYPES
from kernels.row_chunks import each_chunk

Array = Any  # the backend's array type
Weight = Any  # the backend's prepared form of a GGUF tensor
# Rows of logits token_logprobs takes at a time on the host: their temporaries (~5 MB at a
# 151,936-token vocabulary) stay in the cache. The whole of a perplexity pass's 510 x 151,936
# at once took 1-4 s (~2.5 GB of temporaries, paged in afresh), 8 rows at a time 0.15 s.
TOKEN_LOGPROB_ROWS = 8


def token_logprobs(logits: np.ndarray, tokens, top_n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row b of host logits [B, vocab]: log softmax(row)[tokens[b]] (float64 [B]) and
    the row's top_n entries, largest first and lower ids first among equals, as ids [B, top_n]
    (int64) and logprobs [B, top_n] (float64). The exponentials in float32 and their sums in
    float64 (within ~1e-8 of float64 throughout, four times faster), TOKEN_LOGPROB_ROWS rows at
    a time on the thread pool. The GPU backend's kernel computes the same beside the logits."""
    logits, tokens = np.asarray(logits), np.asarray(tokens, np.int64)
    B, V = logits.shape
    if not 0 <= top_n <= V or tokens.shape != (B,):
        raise ValueError(f"top_n must be in [0, {V}] and one token a row, got {top_n} and {tokens.shape}")
    lp, top_ids, top_lp = np.empty(B), np.empty((B, top_n), np.int64), np.empty((B, top_n))
    n = TOKEN_LOGPROB_ROWS

    def rows(r: int) -> None:
        x = logits[r:r + n].astype(np.float32, copy=False)
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1, dtype=np.float64))
        lp[r:r + n] = x[np.arange(len(x)), tokens[r:r + n]] - lse
        if top_n:
            top_ids[r:r + n] = ids = largest(x, top_n)
            top_lp[r:r + n] = np.take_along_axis(x, ids, axis=1) - lse[:, None]

    each_chunk(B, n, rows)
    return lp, top_ids, top_lp


def largest(x: np.ndarray, n: int) -> np.ndarray:
    """The indices [B, n] of each row's n largest entries of x [B, V], largest first, lower
    indices first among equals (as np.argsort(-x, kind="stable")[:, :n], without the sort)."""
    V = x.shape[1]
    ids = np.argpartition(x, V - n, axis=1)[:, V - n:]
    vals = np.take_along_axis(x, ids, axis=1)
    nth = vals.min(axis=1)[:, None]
    # argpartition takes any of the entries equal to the n-th value: where some it left out
    # are equal to it, the lowest indices among them
    for r in np.flatnonzero((x == nth).sum(axis=1) > (vals == nth).sum(axis=1)):
        above = ids[r][vals[r] > nth[r]]
        ids[r] = np.concatenate([above, np.flatnonzero(x[r] == nth[r])[:n - len(above)]])
        vals[r] = x[r, ids[r]]
    return np.take_along_axis(ids, np.lexsort((ids, -vals), axis=1), axis=1)


@dataclass(frozen=True)
class AttentionBatch:
    """Where each sequence's new tokens sit in the flat batch and which cache slots it owns.

    Host-side int32 arrays; backends copy them to the device once per step.
    """

    query_starts: np.ndarray  # [B+1] offsets of each sequence's new tokens in the flat batch
    context_lens: np.ndarray  # [B] tokens in the cache for each sequence after this step
    block_tables: np.ndarray  # [B, max_blocks] cache block ids, -1 past the end
    slot_mapping: np.ndarray  # [T] flat cache slot (block * block_size + offset) of each new token
    recent_slots: np.ndarray | None = None  # [B] each sequence's slot of a RotateKV cache's recent ring
    # the sliding pool's (layers whose KVRows are `sliding`; None without one): [B, max_blocks]
    # its blocks of the same positions, -1 past the end and where given back (before the
    # window), and [T] the slots of the new tokens in it
    sliding_tables: np.ndarray | None = None
    sliding_slots: np.ndarray | None = None
    # [B] the first position this step writes of each row's sequence, where one sequence's new
    # tokens are rows of their own (a verifying pass as decode rows: Engine._plan): row b's
    # sequence then has this step's position p (step_from[b] <= p < context_lens[b] - 1) in
    # flat row step_rows[b] + p - step_from[b], which attention reads as this step's, not the
    # cache's ring, and its own position in row b. None: each sequence's new tokens are its
    # own query range (context_lens minus them)
    step_from: np.ndarray | None = None
    # [B] with step_from: the flat row of each row's sequence's position step_from[b]. None:
    # b - (context_lens[b] - 1 - step_from[b]), one sequence's rows consecutive. A row that
    # is not its sequence's next after the row of the position before its own is a leaf (a
    # draft tree's alternative token, workers/engine/speculation.py): it sees its sequence's
    # positions before its own and itself, and its KV goes to a slot no other row reads.
    step_rows: np.ndarray | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def first_positions(self) -> np.ndarray:
        """[B] step_from, or where each sequence's own new tokens start."""
        if self.step_from is not None:
            return self.step_from
        return self.context_lens - np.diff(self.query_starts)

    def first_rows(self) -> np.ndarray:
        """[B] step_rows, or its default; without step_from, where each sequence's own new
        tokens start."""
        if self.step_rows is not None:
            return self.step_rows
        if self.step_from is None:
            return self.query_starts[:-1]
        return np.arange(self.num_seqs) - (self.context_lens - 1 - self.step_from)

    def leaves(self) -> np.ndarray:
        """[B] bool: the leaf rows (step_rows)."""
        if self.step_rows is None:
            return np.zeros(self.num_seqs, bool)
        return self.step_rows + self.context_lens - 1 - self.step_from != np.arange(self.num_seqs)

    def sequence_rows(self) -> list[tuple[int, int]]:
        """Each sequence's rows [b, b_end) of the batch: one row range a sequence, except a
        sequence's decode rows (step_from), which are one range of rows b.. at its positions
        step_from[b].., and a leaf (`leaves`), a range of its own (ValueError where a sequence's
        rows name different block tables)."""
        if self.step_from is None:
            return [(b, b + 1) for b in range(self.num_seqs)]
        ranges: list[tuple[int, int]] = []
        first, leaves = self.first_rows(), self.leaves()
        for b in range(self.num_seqs):
            if not 0 <= first[b] <= b or not np.array_equal(self.block_tables[b], self.block_tables[first[b]]):
                raise ValueError(f"row {b} continues a sequence from position {self.step_from[b]} "
                                 "that no earlier row with its block table starts")
            if self.context_lens[b] - 1 > self.step_from[b] and not leaves[b]:  # the previous row's next position
                if not ranges or self.context_lens[b] != self.context_lens[b - 1] + 1 or leaves[b - 1]:
                    raise ValueError(f"row {b} continues a sequence from position {self.step_from[b]} "
                                     "that no earlier row with its block table starts")
                ranges[-1] = (ranges[-1][0], b + 1)
            else:
                ranges.append((b, b + 1))
        return ranges

    def pool_of(self, cache: KVRows) -> tuple[np.ndarray, np.ndarray]:
        """(block tables, slot mapping) that address `cache`'s rows: its pool's."""
        if not cache.sliding:
            return self.block_tables, self.slot_mapping
        if self.sliding_tables is None or self.sliding_slots is None:
            raise ValueError("a sliding layer's cache needs the batch's sliding_tables and sliding_slots")
        return self.sliding_tables, self.sliding_slots


@dataclass
class StepInputs:
    """One forward pass's inputs on the host; run_step gives the backend's device copies to `dev`."""

    tokens: np.ndarray  # [T] token ids
    positions: np.ndarray  # [T]
    batch: AttentionBatch
    logit_rows: np.ndarray | None = None  # rows of the flat batch that get logits (None: all)
    dev: Any = None  # the backend's own copies (CupyBackend: its DeviceStep); None on the CPU


def movable_caches(kv_caches: list) -> list:
    """Every layer's K and V caches as `Backend.copy_kv` moves their rows (ValueError for a
    sliding or quantized cache, whose rows are not one slot a position)."""
    caches = [cache for layer in kv_caches for cache in layer]
    if any(cache.sliding or cache.layout.type.quantized for cache in caches):
        raise ValueError("copy_kv moves rows of an unquantized cache's main pool only")
    return caches


class Backend(ABC):
    name: str
    dtype: Any  # activation dtype
    xp: Any  # the array module its arrays are made with (numpy, cupy)

    # --- weights -------------------------------------------------------------
    @abstractmethod
    def load_matrix(self, *tensors) -> Weight:
        """2-D GGUF tensors [out_i, in] (`workers.model.gguf_file.TensorInfo`, possibly of different
        quant types) prepared for `matmul` as one weight [sum(out_i), in]: Q, K and V, or
        gate and up, become one product that reads the activations once."""

    @abstractmethod
    def load_vector(self, *tensors) -> Array:
        """1-D GGUF tensors (norm weights, biases), concatenated, as a float array."""

    @abstractmethod
    def load_embedding(self, tensor, on_host: bool = False) -> Weight:
        """The token embedding table, prepared for `embedding` (may stay quantized); on_host: in
        host memory that `embedding` reads from the device (a device backend's VRAM holds none of it)."""

    requant_local_bytes = 0  # device memory outside the pool while matrices requantize (CupySizes)

    def matrix_nbytes(self, *tensors) -> int:
        """Bytes load_matrix(*tensors) takes in the backend's memory (what placement counts)."""
        return sum(t.shape[0] * t.shape[-1] * np.dtype(self.dtype).itemsize for t in tensors)

    # --- layers streamed from host memory -----------------------------------------
    # A backend that streams (CupyBackend) keeps the layers `stream_layers` names in host
    # memory and copies each into a device slot for every forward pass (kernels/layer_ring.py);
    # the model brackets each layer's loading and computing with the calls below.
    def stream_layers(self, schedule, layer_tensors: dict[int, list[list]], disk_layers=(), host_alloc=None,
                      disk_open=None) -> None:
        """Stream schedule.streamed (a RingSchedule) through schedule.n_slots device slots;
        layer_tensors: each streamed layer's matrices, as load_matrix will get them, in order.
        Images live in host memory (host_alloc(nbytes, content) -> a page-aligned uint8 array
        the backend pins, or its own pinned memory if None; content names what the images are,
        layout and types, for a region shared by key), except disk_layers', which go to
        disk_open({layer: nbytes}) (workers/memory/disk_stream.py's interface)."""
        raise ValueError(f"backend {self.name!r} keeps every layer resident")

    def host_link(self) -> dict | None:
        """The host-to-device link as measured ({"h2d_gb_s", "gen", "width", ...}); None where
        there is no device."""
        return None

    def limit_device_memory(self, nbytes: int | None) -> None:
        """Refuse allocations past nbytes of device memory (what a VRAM budget leaves the pool);
        None: no limit."""

    def allow_prompt_graphs(self, nbytes: int) -> None:
        """Device memory the plan leaves for captured graphs of repeated prompt passes (0:
        none); a backend that captures none ignores it."""

    def outside_pool_bytes(self) -> int | None:
        """Device memory in use now that the pool limit_device_memory caps does not hold (the
        CUDA context, library handles, loaded modules); None where there is no device."""
        return None

    def load_layer(self, index: int, load: Callable[[], Any]) -> Any:
        """load() loads layer `index`'s weights; a streaming backend moves a streamed layer's
        matrices to host memory as they come."""
        return load()

    def begin_layer(self, index: int) -> None:
        """Layer `index`'s weights are about to be read (a streamed one: wait for its copy)."""

    def end_layer(self, index: int, x: Array) -> Array:
        """Layer `index` computed x: every read of its weights is issued once this returns."""
        return x

    # --- host <-> backend ----------------------------------------------------
    @abstractmethod
    def asarray(self, x: np.ndarray) -> Array: ...

    @abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray: ...

    @abstractmethod
    def copy_into(self, dst: Array, x: np.ndarray) -> None:
        """x's values into dst, an array of the same shape that keeps its place (a captured
        step reads it)."""

    # --- compute -------------------------------------------------------------
    @abstractmethod
    def embedding(self, table: Weight, step: StepInputs) -> Array:
        """Rows `step.tokens` of the embedding table: [T, d]."""

    @abstractmethod
    def matmul(self, x: Array, w: Weight) -> Array:
        """x [T, in] @ w.T -> [T, out], w a prepared (possibly quantized) weight."""

    def matmul_add(self, x: Array, w: Weight, y: Array) -> Array:
        """y + x @ w.T, y a residual [T, out] or a bias [out]; a backend may fuse the add into
        the product's epilogue (one pass over the output instead of two, one launch less)."""
        return self.add(y, self.matmul(x, w))

    @abstractmethod
    def rmsnorm(self, x: Array, weight: Array, eps: float) -> Array: ...

    @abstractmethod
    def rope(self, x: Array, step: StepInputs, inv_freq: np.ndarray, neox: bool) -> Array:
        """Rotate x [T, heads, head_dim] by angle step.positions * inv_freq.

        neox: rotate the pairs (i, i + head_dim/2); otherwise adjacent pairs (2i, 2i+1).
        """

    @abstractmethod
    def swiglu(self, gate_up: Array) -> Array:
        """gate_up [T, 2F] (gate then up, as `load_matrix(gate, up)` stacks them) -> silu(gate) * up [T, F]."""

    @abstractmethod
    def geglu(self, gate_up: Array) -> Array:
        """gate_up [T, 2F] -> gelu(gate) * up [T, F], GELU's tanh approximation (Gemma's FFN)."""

    @abstractmethod
    def add(self, a: Array, b: Array) -> Array: ...

    @abstractmethod
    def scale(self, x: Array, factor: float) -> Array:
        """x * factor, factor rounded to float32 (Gemma's sqrt(d_model) on the embeddings)."""

    # --- attention with a paged KV cache -------------------------------------
    # While set, attention calls kv_observer(k_cache, q, k, keep) with its post-RoPE q and k
    # and the host mask of rows not at position 0 (a RotateKV cache's calibration pass).
    kv_observer: Callable | None = None
    kv_types: tuple[str, ...]  # the KV cache types this backend stores, its default first

    def kv_layout(self, n_kv_heads: int, head_dim: int, block_size: int, kv: str | None = None) -> KVLayout:
        """How this backend stores one layer's KV cache of type `kv` (its default if None):
        the engine sizes the cache by it."""
        return layout_for(self.name, self.kv_types, n_kv_heads, head_dim, block_size, kv)

    def new_kv_cache(self, num_blocks: int, layout: KVLayout, recent_slots: int = 0,
                     sliding: bool = False) -> tuple[KVRows, KVRows]:
        """One layer's (K, V) cache (kernels/kv_layout.py new_kv_rows), rows [num_blocks, block_size,
        *layout.row_shape] of layout.dtype; a quantized type's with recent_slots ring slots;
        sliding: blocks of the sliding pool (read through AttentionBatch.sliding_tables)."""
        return new_kv_rows(self.xp, num_blocks, layout, recent_slots, sliding)

    @abstractmethod
    def attention(
        self, q: Array, k: Array, v: Array, k_cache: Array, v_cache: Array,
        step: StepInputs, scale: float, window: int = 0,
    ) -> Array:
        """Store k, v [T, kv_heads, D] at step.batch.slot_mapping, then causal GQA attention of
        q [T, heads, D] over each sequence's cached context. Returns [T, heads * D].

        Query j of a sequence with n new tokens and context c sits at position p = c - n + j and
        sees cache positions 0..p, or with a sliding window (window > 0) the last `window` of
        them, p - window + 1..p (llama.cpp's LLAMA_SWA_TYPE_STANDARD). From a RotateKV cache
        it reads positions 0 and p - RECENT + 1..p unquantized (kernels/kv_layout.py). A
        `sliding` cache's blocks are found through the batch's sliding tables and slots (`pool_of`).
        """

    def copy_kv(self, kv_caches: list, src: int, dst: int) -> None:
        """Every layer's K and V row at slot src copied to slot dst (a draft tree's accepted
        leaf, from its own slot to its position's: workers/engine/speculation.py); main-pool
        slots of an unquantized cache."""
        for cache in movable_caches(kv_caches):
            flat = cache.rows.reshape(-1, *cache.layout.row_shape)
            flat[dst] = flat[src]

    def logit_input(self, x: Array, step: StepInputs) -> Array:
        """The rows of x [T, d] that logits are computed for: `step.logit_rows` (all if None)."""
        return x if step.logit_rows is None else x[step.logit_rows]

    # --- one model step ---------------------------------------------------------
    def run_step(self, forward, step: StepInputs, kv_caches: list, feed: list | None = None) -> Array:
        """Run `forward(step, kv_caches)` (the model's step). A GPU backend may capture it once
        and replay the capture (CUDA graph) on later steps of the same shape. feed: arrays of
        ids in the backend's type, taken as one (in order, flattened), that the step's negative
        tokens name (token -1 - i is id i; `fed_tokens`): ids an earlier step computed, which a
        GPU backend feeds the step on the device, before they reach the host."""
        if feed is not None:
            step = replace(step, tokens=fed_tokens(step.tokens, [self.to_numpy(f) for f in feed]))
        return forward(step, kv_caches)

    # True where sample() draws on the device: the engine then samples there when no logprobs
    # or penalties are asked, and only ids leave the device.
    device_sampling = False

    def sample(self, logits: Array, temperature, top_k, top_p, min_p, uniform) -> np.ndarray:
        """One id per row of logits [B, vocab]: temperature (0: argmax), top-k (0: off), top-p,
        min-p, then a draw by the cumulative mass in vocabulary order with uniform[b] in [0, 1)."""
        raise NotImplementedError

    def constrain(self, logits: Array, bitmask: np.ndarray | None, bias: LogitBias | None) -> Array:
        """logits [B, vocab] with each row's disallowed tokens at -inf and its logit bias added,
        as a new array beside them (on the device for a GPU backend): what a constrained row is
        sampled from (`constrain_logits`)."""
        return constrain_logits(self.to_numpy(logits), bitmask, bias)

    def take_rows(self, x: Array, rows: list[int]) -> Array:
        """Rows `rows` of x as a new array of the backend's: a GPU backend gathers them on the
        stream its kernels run on, so after the step that makes x (a replayed graph's output is
        written asynchronously)."""
        return x[np.asarray(rows, dtype=np.int64)]

    def argmax(self, logits: Array) -> np.ndarray:
        """Row-wise argmax of logits [B, vocab] as host ids (first index of the maximum)."""
        return np.argmax(self.to_numpy(logits), axis=-1)

    def token_logprobs(self, logits: Array, tokens, top_n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`token_logprobs` of logits [B, vocab] (the backend's array) as host arrays: a GPU
        backend computes them beside the logits, so only B * (1 + 2 * top_n) numbers leave it."""
        return token_logprobs(self.to_numpy(logits), tokens, top_n)

    _greedy_ids = None  # the last greedy_step's ids, in the backend's array type

    def greedy_step(self, forward, step: StepInputs, kv_caches: list, fed: bool) -> Callable[[], np.ndarray]:
        """A decode step (`run_step`, one token per sequence, logits for every row) and the
        argmax of each row; returns a function that waits for those ids (a host array). fed:
        each sequence's token is its id from the previous greedy_step (`step.tokens` name them,
        `fed_tokens`), so a GPU backend can start the step before those ids reach the host;
        only valid right after a greedy_step of the same sequences in the same order."""
        feed = [self._fed_ids(len(step.tokens))] if fed else None
        ids = self._greedy_ids = self.argmax(self.run_step(forward, step, kv_caches, feed))
        return lambda: ids

    def top2(self, logits: Array) -> np.ndarray:
        """[2, B] host ids: each row's argmax, and the argmax of the row without that entry
        (first indices of the maxima)."""
        x = self.to_numpy(logits)
        best = np.argmax(x, axis=-1)
        rest = x.copy()
        rest[np.arange(len(x)), best] = -np.inf
        return np.stack([best, np.argmax(rest, axis=-1)])

    def greedy_chain(self, forward, steps: Iterable[StepInputs], kv_caches: list,
                     runner_up: bool = False) -> tuple[Array, Callable[[], np.ndarray]]:
        """Greedy decode steps run one after the other (`run_step`), each fed the previous
        step's argmax ids (the first takes its own tokens; the others' name them, `fed_tokens`):
        the ids [k, B] of the k steps, with runner_up [2, k, B] (each step's `top2`), as an
        array of the backend's (what a later step may be fed) and a function that returns them
        on the host. The steps are taken one at a time, each after the last has started (an
        iterator may plan each as it is asked for). A GPU backend keeps the ids on the device
        between the steps, and the host waits for them only when it asks."""
        ids: list[np.ndarray] = []
        for step in steps:
            logits = self.run_step(forward, step, kv_caches, [ids[-1][0]] if ids else None)
            ids.append(self.top2(logits) if runner_up else self.argmax(logits)[None])
        out = np.stack(ids, axis=1)
        out = out if runner_up else out[0]
        return out, lambda: out

    def _fed_ids(self, n: int):
        """The last greedy_step's ids, to feed the next step of the same n sequences."""
        if self._greedy_ids is None or len(self._greedy_ids) != n:
            raise ValueError("greedy_step(fed=True) must follow a greedy_step of the same sequences")
        return self._greedy_ids


def check_fed(tokens: np.ndarray, n_ids: int) -> None:
    """A step's negative tokens name fed ids (-1 - i is id i): each must be one of the n_ids."""
    if len(tokens) and -int(np.min(tokens)) > n_ids:
        raise ValueError(f"a step names fed id {-int(np.min(tokens)) - 1} of {n_ids}")


def fed_tokens(tokens: np.ndarray, feed: list[np.ndarray]) -> np.ndarray:
    """A step's tokens with each negative one, -1 - i, replaced by id i of the feed (its
    arrays taken as one, in order, flattened): what a GPU backend does on the device."""
    ids = np.concatenate([np.asarray(f).reshape(-1) for f in feed])
    check_fed(tokens, len(ids))
    named = tokens < 0
    return np.where(named, ids[np.where(named, -tokens - 1, 0)], tokens).astype(tokens.dtype)


@dataclass(frozen=True)
class LogitBias:
    """Additive biases of a batch of rows: values[k] is added to logits[rows[k], ids[k]]
    (no (row, id) pair twice)."""

    rows: np.ndarray  # int32
    ids: np.ndarray  # int32
    values: np.ndarray  # float32


def unpack_bitmask(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """bool [B, vocab] from a token bitmask [B, ceil(vocab / 32)] of int32: token t is allowed
    where bit t % 32 of word t // 32 is set (llguidance's and xgrammar's layout)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, np.int32).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab].astype(bool)


def constrain_logits(logits: np.ndarray, bitmask: np.ndarray | None, bias: LogitBias | None) -> np.ndarray:
    """The host reference of `Backend.constrain`: float32 logits [B, vocab], the bias added,
    then -inf where the bitmask (None: every token allowed) leaves a token out."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if bias is not None and len(bias.rows):
        out[bias.rows, bias.ids] += bias.values
    if bitmask is not None:
        out[~unpack_bitmask(bitmask, out.shape[-1])] = -np.inf
    return out


def check_supported(tensor) -> None:
    if tensor.qtype not in SUPPORTED_QTYPES:
        raise ValueError(f"tensor {tensor.name!r} has unsupported quantization type {tensor.qtype.name}")
