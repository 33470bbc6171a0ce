"""NumPy backend: the reference every GPU kernel is checked against, and the CPU path.

Weights are dequantized to float32 once at load: on 2 cores a BLAS sgemv over cached
floats (~11 GB/s) beats dequantizing blocks on every token by a wide margin. The token
embedding stays quantized and only the looked-up rows are dequantized.
"""

from __future__ import annotations

import numpy as np

from kernels.kv_layout import KV_TYPES, RING, KVRows
from kernels.kv_quant import dequantize_rows, quantize_rows, transform, untransform
from kernels.layer_images import LayerImages, align, tensor_types
from kernels.ops import Backend, StepInputs, check_supported
from kernels.quants import dequantize
from kernels.requantized import Requantized


GELU_C = float(np.sqrt(2.0 / np.pi))
# Up to GEMV_ROWS rows, a product is one GEMV a row over slices of the weight of
# GEMV_SLICE_BYTES: OpenBLAS's GEMM for a few rows costs ~3.4x one GEMV on two cores (it packs
# the whole weight), while a slice kept in the L3 cache (32 MiB, shared) serves every row after
# the first from there. Each row's output is bit-for-bit the single-row product's, so a verifying
# pass scores its rows as plain decode does. Measured in docs/benchmarks.md ("The CPU's few-row
# product").
GEMV_ROWS = 12
GEMV_SLICE_BYTES = 8 << 20
Q8_MAX = 127 * 128  # the GPU stores q as two int8 planes, q >> 7 and q & 127 (quant_gemv_q8.cu quantize_x)


def quantize_q8(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer activations of the GPU's small-batch products (quant_gemv_q8.cu quantize_x), to the bit:
    v [T, K] float32, K % 32 == 0 -> q int32 [T, K] in [-Q8_MAX, Q8_MAX], d float32 [T, K/32]
    with d = max|v| / Q8_MAX per 32 values and q = rint(v / d) (ties to even; 0 where d = 0)."""
    T, K = v.shape
    blocks = np.asarray(v, np.float32).reshape(T, K // 32, 32)
    d = np.abs(blocks).max(axis=-1) / np.float32(Q8_MAX)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(blocks / d[..., None]), 0)
    return q.astype(np.int32).reshape(T, K), d


def quantize_q8_input(x: np.ndarray, norm_weight=None, eps: float = 0.0, swiglu: bool = False):
    """quantize_q8 of a product's input with the GPU pre-pass's fused transform: RMSNorm
    quantizes norm_weight * x and folds 1/rms into d; SwiGLU (x = gate | up) takes exp in
    float64 as the GPU does, so both sides round the same float32 values."""
    x = np.asarray(x, np.float32)
    if swiglu:
        gate, up = np.split(x, 2, axis=-1)
        with np.errstate(over="ignore"):
            e = np.exp(-gate.astype(np.float64)).astype(np.float32)
        return quantize_q8(gate / (np.float32(1) + e) * up)
    if norm_weight is None:
        return quantize_q8(x)
    q, d = quantize_q8(x * np.asarray(norm_weight, np.float32))
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return q, d * (np.float32(1) / np.sqrt(ms + np.float32(eps)))


def matmul_q8(q: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Twin of the GPU's dp4a GEMV (quant_gemv_q8.cu gemv_q8): the integer activations q * d against
    the dequantized weight w [N, K], in float64. -> [T, N]"""
    T, K = q.shape
    x = (q.reshape(T, K // 32, 32).astype(np.float64) * d[..., None]).reshape(T, K)
    return x @ np.asarray(w, np.float64).T


class QuantizedRows:
    """A quantized table read a few rows at a time (the token embedding)."""

    def __init__(self, tensor):
        self.raw, self.qtype = tensor.data, tensor.qtype

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return dequantize(self.raw[ids], self.qtype)


class StoredKV:
    """One layer's K or V as one attention call sees it: the step's rows stored into the
    cache, and each sequence's context read back (float32, as computed). A RotateKV cache
    also gives the unquantized rows a query reads for its RECENT latest positions and the
    sink: the step's own (float16 in the cache's basis, as the GPU's scratch holds them) or
    the ring's, which takes the step's rows once the step has read it (`update_ring`)."""

    def __init__(self, cache: KVRows, x: np.ndarray, slots: np.ndarray):
        self.cache, lay = cache, cache.layout
        flat = cache.rows.reshape(-1, *lay.row_shape)
        if not lay.type.quantized:
            flat[slots] = x
            return
        y = transform(x, cache.center, cache.scale)
        flat[slots] = quantize_rows(y, lay)
        self.step16 = y.astype(np.float16)

    def read(self, blocks: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Tokens lo..hi-1 of the blocks' concatenation: [tokens, kv_heads, head_dim]."""
        c = self.cache
        rows = c.rows[blocks].reshape(-1, *c.layout.row_shape)[lo:hi]
        if not c.layout.type.quantized:
            return rows.astype(np.float32)
        return untransform(dequantize_rows(rows, c.layout), c.center, c.scale)

    def at(self, slot: int) -> np.ndarray:
        """The row stored at one slot (an unquantized cache's): [kv_heads, head_dim] float32."""
        return self.cache.rows.reshape(-1, *self.cache.layout.row_shape)[slot].astype(np.float32)

    def exact(self, first: int, ctx: int, n: int, start: int, slot: int) -> np.ndarray:
        """Positions first..ctx-1 of a sequence whose n new tokens start at `start` in the
        step, unquantized where a query of the step may read them so (zeros elsewhere)."""
        c = self.cache
        out = np.zeros((ctx - first, *c.layout.row_shape[:1], c.layout.head_dim), np.float32)
        c0 = ctx - n
        near = max(first, c0 - c.recent_window)  # rows from here on, and the sink, are filled
        filled = np.empty((ctx - near, *out.shape[1:]), np.float16)
        for p in range(near, ctx):
            filled[p - near] = self.step16[start + p - c0] if p >= c0 else c.recent[slot, p % RING]
        # only the filled rows are rotated back (a whole context of zeros was most of a decode
        # step's cost on the CPU)
        out[near - first:] = untransform(filled.astype(np.float32), c.center, c.scale)
        if first == 0 and c0 > 0:
            out[0] = untransform(c.recent[slot, RING].astype(np.float32), c.center, c.scale)
        return out

    def update_ring(self, positions: np.ndarray, seq_of: np.ndarray, ctx: np.ndarray, slots: np.ndarray) -> None:
        """The step's rows into their sequences' ring slots: each sequence's sink and last RING
        positions."""
        for t, (p, b) in enumerate(zip(positions, seq_of)):
            if p == 0:
                self.cache.recent[slots[b], RING] = self.step16[t]
            elif p >= ctx[b] - RING:
                self.cache.recent[slots[b], p % RING] = self.step16[t]


def attention_scores(qg: np.ndarray, keys: np.ndarray, scale) -> np.ndarray:
    """Queries qg [kv, g, n, D] against keys [keys, kv, D] -> scaled scores [kv, g, n, keys]."""
    return (qg @ keys.transpose(1, 2, 0)[:, None]) * scale


class RecentBand:
    """The keys a RotateKV cache's queries read unquantized: each query's `recent` latest up to
    its own, a band of columns, and the sink (key 0) where it is a column. Their scores and
    value rows are computed again from the exact rows [keys, kv, D]: for a few queries (a
    decode step, a verifying pass) as one product over every key, masked; for a prompt's
    many, only the band's, gathered (the whole square, computed twice and masked, was most
    of a prompt's cost on the CPU). query_pos [n]; keys first.. are the columns."""

    def __init__(self, query_pos: np.ndarray, first: int, keys: int, recent: int):
        self.dense = len(query_pos) < recent
        if self.dense:
            key_pos = first + np.arange(keys)
            self.near = (query_pos[:, None] - key_pos[None, :] < recent) | (key_pos == 0)[None, :]
            return
        # the column of band offset r for every query (r = recent - 1: the query's own); an
        # offset before the first key is column 0, which is then in the query's band too, so
        # it only writes that column's own score again
        cols = query_pos[:, None] - first - recent + 1 + np.arange(recent)[None, :]  # [n, recent]
        self.valid, self.cols = cols >= 0, np.maximum(cols, 0)
        # the sink where it is a column and not in the query's band already
        self.sink = (cols[:, 0] > 0) if first == 0 else np.zeros(len(query_pos), bool)

    def put_scores(self, scores: np.ndarray, qg: np.ndarray, exact: np.ndarray, scale) -> None:
        """scores [kv, g, n, keys] of queries qg [kv, g, n, D], at the near keys, from the exact ones."""
        if self.dense:
            scores[...] = np.where(self.near, attention_scores(qg, exact, scale), scores)
            return
        band = np.einsum("kgnd,nrkd->kgnr", qg, exact[self.cols]) * scale
        np.put_along_axis(scores, np.broadcast_to(self.cols, band.shape), band, axis=-1)
        i = np.flatnonzero(self.sink)
        scores[:, :, i, 0] = np.einsum("kgnd,kd->kgn", qg[:, :, i], exact[0]) * scale

    def add_values(self, o: np.ndarray, weights: np.ndarray, diff: np.ndarray) -> None:
        """o [kv, g, n, D] += each near key's weight times its exact value row less the
        quantized one (diff [keys, kv, D])."""
        if self.dense:
            o += np.where(self.near, weights, 0) @ diff.transpose(1, 0, 2)[:, None]
            return
        band = np.where(self.valid, np.take_along_axis(weights, np.broadcast_to(self.cols, weights.shape[:2]
                                                                                 + self.cols.shape), axis=-1), 0)
        o += np.einsum("kgnr,nrkd->kgnd", band, diff[self.cols])
        i = np.flatnonzero(self.sink)
        o[:, :, i] += weights[:, :, i, 0, None] * diff[0][:, None, None]


MATRIX_ALIGN = 64  # a streamed matrix's offset in its image: the alignment BLAS gets from a fresh array


class HostStreaming(LayerImages):
    """The NumPy backend's streamed layers: the GPU's schedule and images, with slots in host
    memory and copies that are done when issued. The CPU runs the whole streaming path (the
    model's hooks, the ring's driver, the host and disk tiers) with it."""

    def __init__(self, schedule, image_nbytes, disk_layers=(), host_alloc=None, disk_open=None, content=""):
        super().__init__(schedule, image_nbytes, disk_layers, host_alloc, disk_open, content=content)
        base = np.empty(schedule.n_slots * self.slot_nbytes + MATRIX_ALIGN, np.uint8)
        start = -base.ctypes.data % MATRIX_ALIGN
        self.slots = base[start:start + schedule.n_slots * self.slot_nbytes].reshape(schedule.n_slots, -1)
        self.loading: int | None = None
        self._offset = 0

    def place(self, w: np.ndarray) -> np.ndarray:
        """A matrix of the layer loading: its bytes into the layer's image, a view of its slot in its place."""
        off = align(self._offset, MATRIX_ALIGN)
        raw = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
        self.image(self.loading)[off:off + raw.nbytes] = raw
        self._offset = off + raw.nbytes
        slot = self.slots[self.schedule.slot(self.loading)]
        return slot[off:off + raw.nbytes].view(w.dtype).reshape(w.shape)

    def copy(self, layer, slot, on_copy_queue):
        n = self.image_nbytes[layer]
        if layer not in self.disk_layers:
            self.slots[slot][:n] = self.image(layer)
            return None
        staged, view = self.acquire_staged(layer)
        self.slots[slot][:n] = view
        self.disk.release(staged)
        return None

    def freed(self, slot):
        return None

    def copy_waits(self, event):
        pass

    def compute_waits(self, event):
        pass


class NumpyBackend(Backend):
    name = "numpy"
    dtype = np.float32
    xp = np
    kv_types = tuple(KV_TYPES)  # float32 by default: the reference
    streaming: HostStreaming | None = None

    def load_matrix(self, *tensors) -> np.ndarray:
        for t in tensors:
            check_supported(t)
        tensors = [t.on_host() if isinstance(t, Requantized) else t for t in tensors]
        w = np.empty((sum(len(t.data) for t in tensors), tensors[0].shape[-1]), np.float32)
        row = 0
        for t in tensors:  # each into its rows: no copy of the whole matrix to concatenate
            dequantize(t.data, t.qtype, out=w[row:row + len(t.data)])
            row += len(t.data)
        s = self.streaming
        return s.place(w) if s is not None and s.loading is not None else w

    def stream_layers(self, schedule, layer_tensors, disk_layers=(), host_alloc=None, disk_open=None) -> None:
        sizes = {i: sum(align(self.matrix_nbytes(*m), MATRIX_ALIGN) for m in layer_tensors[i])
                 for i in schedule.streamed}
        content = tensor_types(self.name, {i: m for i, m in layer_tensors.items() if i not in disk_layers})
        self.streaming = HostStreaming(schedule, sizes, disk_layers, host_alloc, disk_open, content)

    def load_layer(self, index, load):
        s = self.streaming
        if s is None or not s.schedule.is_streamed(index):
            return load()
        s.loading, s._offset = index, 0
        try:
            return load()
        finally:
            s.loading = None

    def begin_layer(self, index) -> None:
        if self.streaming is not None:
            self.streaming.driver.begin_layer(index)

    def end_layer(self, index, x):
        if self.streaming is not None:
            self.streaming.driver.end_layer(index)
        return x

    def run_step(self, forward, step: StepInputs, kv_caches, feed=None):
        if self.streaming is None:
            return super().run_step(forward, step, kv_caches, feed)
        run, late = getattr(forward, "layers_run", None), getattr(forward, "late_refills", False)
        driver = self.streaming.driver
        with driver.issued_pass(run, late), driver.whole_pass(run, late):
            return super().run_step(forward, step, kv_caches, feed)

    def load_vector(self, *tensors) -> np.ndarray:
        for t in tensors:
            check_supported(t)
        return np.concatenate([dequantize(t.data, t.qtype).reshape(-1) for t in tensors])

    def load_embedding(self, tensor, on_host=False) -> QuantizedRows:  # the host's memory either way
        check_supported(tensor)
        return QuantizedRows(tensor)

    def asarray(self, x):
        return np.asarray(x)

    def to_numpy(self, x):
        return np.asarray(x)

    def copy_into(self, dst, x):
        dst[...] = x

    def embedding(self, table: QuantizedRows, step: StepInputs):
        return table.rows(np.asarray(step.tokens))

    def matmul(self, x, w):
        rows = x.shape[0] if x.ndim == 2 else 0
        if not 1 < rows <= GEMV_ROWS or x.dtype != np.float32 or w.dtype != np.float32:
            return x @ w.T
        out = np.empty((rows, w.shape[0]), np.float32)
        step = max(1, GEMV_SLICE_BYTES // w[0].nbytes)
        for lo in range(0, w.shape[0], step):
            part = w[lo:lo + step]
            for i in range(rows):
                np.dot(part, x[i], out=out[i, lo:lo + step])
        return out

    def rmsnorm(self, x, weight, eps):
        ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(ms + eps)) * weight

    def rope(self, x, step: StepInputs, inv_freq, neox):
        angles = np.asarray(step.positions, dtype=np.float64)[:, None] * np.asarray(inv_freq, dtype=np.float64)[None, :]
        cos = np.cos(angles).astype(np.float32)[:, None, :]
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        half = x.shape[-1] // 2
        if neox:
            x1, x2 = x[..., :half], x[..., half:]
        else:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        if neox:
            return np.concatenate([r1, r2], axis=-1)
        return np.stack([r1, r2], axis=-1).reshape(x.shape)

    def swiglu(self, gate_up):
        gate, up = np.split(gate_up, 2, axis=-1)
        return gate / (1.0 + np.exp(-gate)) * up

    def geglu(self, gate_up):
        gate, up = np.split(gate_up, 2, axis=-1)
        g = gate.astype(np.float64)
        gelu = 0.5 * g * (1.0 + np.tanh(GELU_C * (g + 0.044715 * g ** 3)))
        return (gelu * up).astype(np.float32)

    def add(self, a, b):
        return a + b

    def scale(self, x, factor):
        return x * np.float32(factor)

    def attention(self, q, k, v, k_cache, v_cache, step: StepInputs, scale, window=0):
        batch = step.batch
        n_tokens, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        group = n_heads // n_kv
        block_size = k_cache.layout.block_size
        quantized = k_cache.layout.type.quantized
        if quantized and batch.recent_slots is None:
            raise ValueError("a RotateKV cache needs the batch's recent_slots")
        if self.kv_observer is not None:
            self.kv_observer(k_cache, q, k, np.asarray(step.positions) != 0)
        tables, slots = batch.pool_of(k_cache)
        ks, vs = StoredKV(k_cache, k, slots), StoredKV(v_cache, v, slots)

        out = np.empty((n_tokens, n_heads * head_dim), np.float32)
        leaves = batch.leaves()
        if quantized and leaves.any():
            raise ValueError("a draft tree's leaf rows need an unquantized KV cache")
        # a sequence's decode rows (step_from) as one query range: its context read once
        for b, b_end in batch.sequence_rows():
            start, end = int(batch.query_starts[b]), int(batch.query_starts[b_end])
            n, ctx = end - start, int(batch.context_lens[b_end - 1])
            # The first key any of these queries sees: a sliding window leaves the blocks before
            # it unread (what lets a sliding layer give them back).
            first = max(0, ctx - n - window + 1) if window > 0 else 0
            b0 = first // block_size
            blocks = tables[b, b0: -(-ctx // block_size)]
            if (blocks < 0).any():  # a block given back (or never reserved) that a query would read
                raise ValueError(f"sequence {b} reads keys {first}..{ctx - 1} through blocks {blocks.tolist()} "
                                 f"(-1: not held)")
            lo, hi = first - b0 * block_size, ctx - b0 * block_size
            qg = q[start:end].reshape(n, n_kv, group, head_dim).transpose(1, 2, 0, 3)  # [kv, g, n, D]
            query_pos = ctx - n + np.arange(n)
            behind = query_pos[:, None] - np.arange(first, ctx)[None, :]  # query position - key position

            # RotateKV: the sink and each query's RECENT latest keys are read unquantized; all
            # of them where that window spans every key (the calibration pass widens it so)
            slot = int(batch.recent_slots[b]) if quantized else -1
            banded = quantized and k_cache.recent_window < ctx - first
            if quantized and not banded:
                keys, vals = ks.exact(first, ctx, n, start, slot), vs.exact(first, ctx, n, start, slot)
            else:
                keys, vals = ks.read(blocks, lo, hi), vs.read(blocks, lo, hi)
                if leaves[b]:  # its own position's row is its own slot's, not its sequence's
                    keys[-1], vals[-1] = ks.at(slots[start]), vs.at(slots[start])
            scores = attention_scores(qg, keys, scale)
            band = RecentBand(query_pos, first, ctx - first, k_cache.recent_window) if banded else None
            if band is not None:
                band.put_scores(scores, qg, ks.exact(first, ctx, n, start, slot), scale)
            scores[..., (behind < 0) | ((window > 0) & (behind >= window))] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            weights = self.attention_weights(probs)
            o = weights @ vals.transpose(1, 0, 2)[:, None]  # [kv, g, n, D]
            if band is not None:
                band.add_values(o, weights, vs.exact(first, ctx, n, start, slot) - vals)
            out[start:end] = o.transpose(2, 0, 1, 3).reshape(n, n_heads * head_dim)
        if quantized:
            seq_of = np.repeat(np.arange(batch.num_seqs), np.diff(batch.query_starts))
            for s in (ks, vs):
                s.update_ring(np.asarray(step.positions), seq_of, batch.context_lens, batch.recent_slots)
        return out

    def attention_weights(self, probs):
        """The softmax weights as P.V takes them: as they are (a backend emulating another
        implementation's rounding of them overrides this)."""
        return probs

    def sample(self, logits, temperature, top_k, top_p, min_p, uniform) -> np.ndarray:
        """Twin of the GPU sampler: per row, temperature (0: argmax), then the filters of
        `kept_weights`, and a draw with uniform[b] in [0, 1) by the cumulative mass in vocabulary
        order."""
        logits = np.asarray(logits, np.float32)
        out = np.empty(len(logits), np.int64)
        for b, row in enumerate(logits):
            if temperature[b] <= 0:
                out[b] = int(np.argmax(row))
            else:
                out[b] = draw(kept_weights(row, temperature[b], top_k[b], top_p[b], min_p[b]), uniform[b])
        return out


def kept_weights(row, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """The weight (float64, unnormalized) each token of one row of logits is drawn with at a
    temperature > 0: exp((logit - max) / temperature) where the filters keep it, 0 elsewhere.
    They keep the top_k largest logits (0: all), the smallest set of largest tokens holding
    top_p of their mass, and tokens with p >= min_p * p_max; a token tied with the last one a
    filter keeps is kept too."""
    row = np.asarray(row, np.float64)
    w = np.exp((row - row.max()) / temperature)
    if 0 < top_k < len(row):
        w[row < np.partition(row, len(row) - top_k)[len(row) - top_k]] = 0.0
    if top_p < 1.0:
        w[w < _top_p_floor(w, top_p)] = 0.0
    if min_p > 0.0:
        w[w < min_p] = 0.0  # p_max's weight is exp(0) = 1
    return w


def _top_p_floor(w: np.ndarray, top_p: float) -> float:
    """The least weight of the smallest set of largest weights holding top_p of their sum. Only
    weights above (1 - top_p) * sum / len are sorted: those below hold less than the 1 - top_p
    that top-p leaves out, so it leaves all of them out (sorting a 262k-token vocabulary took 28
    ms a token on the development machine)."""
    total = w.sum()
    top = np.sort(w[w >= (1.0 - top_p) * total / len(w)])[::-1]
    mass = np.cumsum(top)
    return float(top[min(int(np.searchsorted(mass, top_p * total)), len(top) - 1)])


def draw(weights: np.ndarray, uniform: float) -> int:
    """The token at uniform (in [0, 1)) of the weights' cumulative mass, in vocabulary order."""
    mass = np.cumsum(weights)
    return min(int(np.searchsorted(mass, uniform * mass[-1], side="right")), len(weights) - 1)
