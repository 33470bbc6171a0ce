"""CuPy backend: CUDA kernels (kernels/cuda/*.cu, compiled by NVRTC at first use and cached on
disk by CuPy) behind the ops interface.

Where the time goes and what the backend does about it (each part in kernels/cupy/):
- Decode at batch 1 reads every weight byte once per token. Weights stay quantized in VRAM
  (weights.py) and a GEMV decodes them in registers; RMSNorm and SwiGLU are fused into the
  product that consumes them (rmsnorm()/swiglu() return lazy values, elementwise.py), the
  residual add and the QKV bias into its epilogue (matmul_add), RoPE into attention (rope()
  is lazy too). Four formats take integer dot products (dp4a) on a 15-bit copy of the input
  that decode attention and the residual products make themselves (products.py).
- A 0.5B model's decode step is ~150 small kernels: Python launching them would cost more
  than the GPU time, so run_step() captures the whole step in a CUDA graph per (batch,
  block-table width) and replays it (steps.py), with programmatic dependent launch between
  its kernels (streams.py, kernels/launch.py).
- Batched decode (2-64 sequences) runs on tensor cores straight from the quantized blocks;
  prompts beyond that dequantize each weight to fp16 scratch for cuBLAS (products.py).
- Sampling runs on the device (argmax, temperature, top-k, top-p, min-p): only ids leave it;
  greedy_step feeds a greedy step's ids to the next step without a trip through the host
  (sampling.py, steps.py).
The switches benchmarks flip live on `backend.tuning` (tuning.py).
"""

from __future__ import annotations

import functools
import os

import cupy as cp
import numpy as np

from kernels.cupy import attention, elementwise, products, sampling
from kernels.cupy.elementwise import Normed, Roped, Swiglu
from kernels.cupy.kernel_constants import QMMA_MAX_T
from kernels.cupy.modules import Kernels
from kernels.cupy.products import Product
from kernels.cupy.requant import requantize
from kernels.cupy.steps import Steps
from kernels.cupy.streaming import LayerStreaming, image_layout
from kernels.cupy.streams import Launcher, on_stream
from kernels.cupy.tuning import GEMV_MAX_T, Tuning
from kernels.cupy.values import materialize
from kernels.cupy.planes import KV_TYPES, REQUANT_LOCAL_BYTES, matrix_planes
from kernels.cupy.weights import QMatrix, Uploader, stack
from kernels.layer_images import tensor_types
from kernels.ops import Backend, StepInputs, check_supported, movable_caches
from kernels.quants import dequantize
from kernels.requantized import Requantized


class CupyBackend(Backend):
    name = "cupy"
    dtype = cp.float32
    xp = cp
    kv_types = KV_TYPES
    requant_local_bytes = REQUANT_LOCAL_BYTES
    device_sampling = True  # the engine may call sample()/argmax() on device logits

    def __init__(self, vram_limit: int | None = None, graphs: bool = True):
        limit = vram_limit if vram_limit is not None else int(float(os.environ.get("NTR_VRAM_LIMIT_GB", "0")) * 2**30)
        if limit:
            cp.get_default_memory_pool().set_limit(size=limit)
        self.stream = cp.cuda.Stream(non_blocking=True)  # every kernel, copy and graph is ordered on it
        self.k = Kernels()
        self.steps = Steps(self)
        self.tuning = Tuning(int(cp.cuda.Device().compute_capability[:-1]) >= 9, self.drop_graphs, graphs)
        self.launcher = Launcher(self.stream, self.tuning)
        self.upload = Uploader(self.stream)
        self.gemm_scratch = None  # products.gemm's fp16 dequantization scratch, made at first use
        self.gemm = None  # products.gemm's cuBLAS handle (cublas.Gemm), made at first use
        self._loaded: dict = {}
        self._invf: dict = {}
        self._last_pos = None
        self._kv_bases = ((), None)  # copy_kv's table: the caches' base addresses, and their device copy
        self.streaming: LayerStreaming | None = None

    def drop_graphs(self) -> None:
        """Forget the captured decode graphs, so the next decode step captures anew: after a
        setting that changes what they launch (the tuning does this itself)."""
        self.steps.drop()

    # --- weights -------------------------------------------------------------
    @on_stream
    def load_matrix(self, *tensors) -> QMatrix:
        for t in tensors:
            check_supported(t)
        K = tensors[0].shape[-1]
        if any(t.shape[-1] != K or len(t.shape) != 2 for t in tensors):
            raise ValueError("stacked matrices must be 2-D with the same input size")
        into_slot = self.streaming.alloc if self.streaming is not None else None  # while a streamed layer loads
        if into_slot is not None:  # a streamed layer's (requantized where the plan says): never tied, not kept
            w = stack(self.upload, [requantize(self, t) if isinstance(t, Requantized) else t for t in tensors],
                      into_slot)
        else:
            key = tuple(id(t.data) for t in tensors)
            hit = self._loaded.get(key)
            if hit is not None and all(a is t.data for a, t in zip(hit[0], tensors)):
                return hit[1]  # tied embeddings: one copy for the table and the output
            w = stack(self.upload, tensors)
            self._loaded[key] = ([t.data for t in tensors], w)  # the views pin the ids
        self.steps.max_t = min(self.steps.max_t, QMMA_MAX_T if w.qmma else GEMV_MAX_T)
        return w

    def matrix_nbytes(self, *tensors) -> int:
        return sum(matrix_planes(tensors))

    # --- layers streamed from host memory (streaming.py) -------------------------------
    def stream_layers(self, schedule, layer_tensors, disk_layers=(), host_alloc=None, disk_open=None) -> None:
        sizes = {i: image_layout([matrix_planes(m) for m in layer_tensors[i]]) for i in schedule.streamed}
        content = tensor_types(self.name, {i: m for i, m in layer_tensors.items() if i not in disk_layers})
        self.streaming = LayerStreaming(self.stream, schedule, sizes, disk_layers, host_alloc, disk_open, content)
        if disk_layers:
            self.tuning.graphs = False  # a copy from disk waits on the host for its image

    def host_link(self) -> dict:
        from kernels.cupy.link import host_link

        return host_link()

    def limit_device_memory(self, nbytes: int | None) -> None:
        cp.get_default_memory_pool().set_limit(size=0 if nbytes is None else max(1, nbytes))  # 0: no limit

    def allow_prompt_graphs(self, nbytes: int) -> None:
        self.tuning.prompt_graph_bytes = nbytes

    def outside_pool_bytes(self) -> int:
        return _outside_pool_at_start()

    @on_stream
    def load_layer(self, index, load):
        s = self.streaming
        if s is None or not s.schedule.is_streamed(index):
            layer = load()
        else:
            with s.loading(index):
                layer = load()
        # the pool's limit counts the blocks it keeps free too: a load's chunks, cached, would
        # take room the plan gives the runtime
        cp.get_default_memory_pool().free_all_blocks()
        return layer

    def begin_layer(self, index) -> None:
        if self.streaming is not None:
            self.streaming.driver.begin_layer(index)

    @on_stream
    def end_layer(self, index, x):
        if self.streaming is None or not self.streaming.schedule.is_streamed(index):
            return x
        x = materialize(x)  # a lazy product would read the slot after its refill was queued
        self.streaming.driver.end_layer(index)
        return x

    @on_stream
    def load_vector(self, *tensors):
        for t in tensors:
            check_supported(t)
        return cp.asarray(np.concatenate([dequantize(t.data, t.qtype).reshape(-1) for t in tensors]).astype(np.float32))

    def load_embedding(self, tensor, on_host=False) -> QMatrix:
        if not on_host:
            return self.load_matrix(tensor)
        check_supported(tensor)
        # a step reads one row a token: over the link, a round trip of latency, and no VRAM
        return stack(None, [tensor])

    # --- host <-> device -------------------------------------------------------
    @on_stream
    def asarray(self, x):
        return cp.asarray(x)

    @on_stream
    def to_numpy(self, x):
        return cp.asnumpy(materialize(x), stream=self.stream)

    @on_stream
    def copy_into(self, dst, x):
        dst.set(np.ascontiguousarray(x), stream=self.stream)

    def _i32(self, a: np.ndarray) -> cp.ndarray:
        return cp.asarray(np.ascontiguousarray(a, dtype=np.int32))

    def _inv_freq(self, inv_freq) -> cp.ndarray:
        key = id(inv_freq)
        hit = self._invf.get(key)
        if hit is None or hit[0] is not inv_freq:
            hit = self._invf[key] = (inv_freq, cp.asarray(np.asarray(inv_freq, dtype=np.float64)))
        return hit[1]

    # --- compute ------------------------------------------------------------------
    @on_stream
    def embedding(self, table: QMatrix, step: StepInputs):
        ids_dev = step.dev.tokens if step.dev is not None else self._i32(step.tokens)
        T = len(ids_dev)
        out = cp.empty((T, table.K), cp.float32)
        products.dequant(self, table.segments[0], out, ids=ids_dev, n_out=T, f16=False)
        return out

    @on_stream
    def matmul(self, x, w: QMatrix):
        return products.matmul(self, x, w, None)

    @on_stream
    def matmul_add(self, x, w: QMatrix, y):
        return products.matmul(self, x, w, y)

    def rmsnorm(self, x, weight, eps):
        return Normed(self, x if isinstance(x, Product) else materialize(x), weight, eps)

    def swiglu(self, gate_up):
        return Swiglu(self, materialize(gate_up))

    @on_stream
    def geglu(self, gate_up):
        return elementwise.glu(self, materialize(gate_up), cp.float32, gelu=True)

    @on_stream
    def rope(self, x, step: StepInputs, inv_freq, neox):
        positions = step.positions
        if step.dev is not None:
            pos = step.dev.positions
        elif self._last_pos is not None and self._last_pos[0] is positions:  # q then k: one upload
            pos = self._last_pos[1]
        else:
            pos = self._i32(positions)
            self._last_pos = (positions, pos)
        return Roped(self, materialize(x), pos, self._inv_freq(inv_freq), neox)

    @on_stream
    def add(self, a, b):
        return materialize(a) + materialize(b)

    @on_stream
    def scale(self, x, factor):
        return materialize(x) * np.float32(factor)

    # --- attention ------------------------------------------------------------------
    new_kv_cache = on_stream(Backend.new_kv_cache)  # zeroed on the stream every kernel runs on

    @on_stream
    def take_rows(self, x, rows):
        return materialize(x)[cp.asarray(np.asarray(rows, dtype=np.int64))]

    @on_stream
    def copy_kv(self, kv_caches, src, dst):
        caches = movable_caches(kv_caches)
        row_bytes = {cache.rows.strides[1] for cache in caches}  # rows [blocks, block_size, ...], contiguous
        if len(row_bytes) != 1:
            raise ValueError(f"copy_kv moves rows of one size, got {sorted(row_bytes)} bytes")
        key = tuple(cache.rows.data.ptr for cache in caches)
        if self._kv_bases[0] != key:
            self._kv_bases = (key, cp.asarray(np.array(key, np.uint64)))
        self.k.get("misc.cu", "copy_row_each")((len(caches),), (256,), (self._kv_bases[1], np.int64(row_bytes.pop()),
                                                                        np.int64(src), np.int64(dst)))

    @on_stream
    def attention(self, q, k, v, k_cache, v_cache, step: StepInputs, scale, window=0):
        if self.kv_observer is not None:
            self.kv_observer(k_cache, materialize(q), materialize(k), np.asarray(step.positions) != 0)
        return attention.attention(self, q, k, v, k_cache, v_cache, step, scale, window)

    @on_stream
    def logit_input(self, x, step: StepInputs):
        if step.logit_rows is None:
            return x
        rows = step.dev.logit_rows if step.dev is not None else cp.asarray(np.asarray(step.logit_rows, np.int64))
        return x[rows]

    # --- one model step, captured and replayed for decode -------------------------------
    @on_stream
    def run_step(self, forward, step: StepInputs, kv_caches, feed=None):
        return self.steps.run(self._pass(forward), step, kv_caches, feed)

    def _pass(self, forward):
        """forward with the streamed layers' ring kept whole: filled before, joined after; a
        forward marked `late_refills` leaves the next pass's refills to after it
        (kernels/layer_ring.py), which `issued` (Steps.run's, around the pass or its replay) makes."""
        if self.streaming is None:
            return forward
        driver = self.streaming.driver
        run_layers = getattr(forward, "layers_run", None)
        late = getattr(forward, "late_refills", False) and self.tuning.late_refills

        def run(step, kv_caches):
            with driver.whole_pass(run_layers, late):
                return materialize(forward(step, kv_caches))

        run.graph_key = getattr(forward, "graph_key", None)
        if driver.issues(run_layers, late):
            run.issued = functools.partial(driver.issued_pass, run_layers, late)
        return run

    @on_stream
    def greedy_step(self, forward, step: StepInputs, kv_caches, fed):
        """The step fed from the previous one's ids on the device (its graph's argmax, or the
        argmax after an eager step), its own ids copied to pinned memory behind it: the
        returned function waits only for that copy, and no host round trip stands between
        two steps."""
        feed = [self._fed_ids(step.batch.num_seqs)] if fed else None
        self._greedy_ids, get = self.steps.greedy(self._pass(forward), step, kv_caches, feed)
        return get

    @on_stream
    def greedy_chain(self, forward, steps, kv_caches, runner_up=False):
        return self.steps.chain(self._pass(forward), steps, kv_caches, runner_up)

    @on_stream
    def top2(self, logits) -> np.ndarray:
        return cp.asnumpy(sampling.top2_dev(self, logits), stream=self.stream)

    # --- sampling on the device ---------------------------------------------------------
    @on_stream
    def argmax(self, logits) -> np.ndarray:
        g = self.steps.last_graph
        if g is not None and logits is g.out:
            return cp.asnumpy(g.ids, stream=self.stream)
        return cp.asnumpy(sampling.argmax_dev(self, logits), stream=self.stream)

    @on_stream
    def constrain(self, logits, bitmask, bias):
        return sampling.constrain(self, logits, bitmask, bias)

    @on_stream
    def sample(self, logits, temperature, top_k, top_p, min_p, uniform) -> np.ndarray:
        return sampling.sample(self, logits, temperature, top_k, top_p, min_p, uniform)

    @on_stream
    def token_logprobs(self, logits, tokens, top_n: int = 0):
        return sampling.token_logprobs(self, logits, tokens, top_n)


@functools.cache
def _outside_pool_at_start() -> int:
    """The context's bytes, measured once a process: later an earlier engine's graph pools
    would count too, and two engines of one process would place the same model differently.
    The whole device's use, another process's included."""
    free, total = cp.cuda.runtime.memGetInfo()
    return max(0, total - free - cp.get_default_memory_pool().total_bytes())
