"""What `ntr quantize` measures on a calibration text with the NumPy engine: an importance
matrix (each matrix's per-input-column mean squared activation, as llama.cpp's imatrix), and
the sensitivity of the output to one group of matrices quantized lower (mean KL divergence of
the next-token distribution from the unchanged model's).

Sensitivities are measured on the loaded engine by writing a group's requantized weights over
its float32 rows in place, one forward pass, and writing the originals back: no reload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from kernels.numpy_backend import NumpyBackend
from kernels.quants import dequantize
from workers.engine.engine import Engine, Sequence
from workers.model.gguf_file import TensorInfo
from workers.model.transformer import layer_matrices

MAX_CALIBRATION_TOKENS = 1 << 16
HEAD_ROW_STRIDE = 4


def weight_slots(engine: Engine) -> dict[str, tuple[np.ndarray, slice]]:
    """Each matrix's float32 rows in the loaded model: name -> (the stacked array, its row slice).
    The embedding table is absent (it stays quantized: `swap` replaces it whole)."""
    if not isinstance(engine.ops, NumpyBackend) or engine.placement.streamed:
        raise ValueError("calibration needs the NumPy backend with every layer resident")
    model, c = engine.model, engine.config
    slots = {}
    for i, layer in model.layers.items():
        for stacked, tensors in zip((layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down),
                                    layer_matrices(engine.gguf, c, i)):
            start = 0
            for t in tensors:
                slots[t.name] = (stacked, slice(start, start + t.shape[0]))
                start += t.shape[0]
    table = c.architecture
    head = table.tensor_name("embed" if c.tied_embeddings else "output")
    slots[head] = (model.output, slice(0, model.output.shape[0]))
    return slots


class _Recorder:
    """The backend, with every product's input squared and summed per column, by weight."""

    def __init__(self, ops, keys: dict[int, list[str]]):
        self._ops, self._keys = ops, keys
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _record(self, x, w):
        names = self._keys.get(id(w))
        if names:
            sq = np.square(np.asarray(x, np.float64)).sum(axis=0)
            for n in names:
                self.sums[n] = self.sums.get(n, 0) + sq
                self.counts[n] = self.counts.get(n, 0) + len(x)

    def matmul(self, x, w):
        self._record(x, w)
        return self._ops.matmul(x, w)

    def matmul_add(self, x, w, y):
        self._record(x, w)
        return self._ops.matmul_add(x, w, y)


def importance_matrix(engine: Engine, ids: list[int], ctx: int = 512,
                      progress: Callable[[int], None] = lambda n: None) -> dict[str, np.ndarray]:
    """Per matrix name: the mean over the text's tokens of each input column's squared
    activation (float32 [cols]). The text runs in chunks of ctx tokens, each from an empty cache."""
    if not 0 < len(ids) <= MAX_CALIBRATION_TOKENS:
        raise ValueError(f"calibration text must have 1..{MAX_CALIBRATION_TOKENS} tokens, got {len(ids)}")
    keys: dict[int, list[str]] = {}
    for name, (stacked, _) in weight_slots(engine).items():
        keys.setdefault(id(stacked), []).append(name)
    model = engine.model
    recorder = _Recorder(model.ops, keys)
    model.ops = recorder
    try:
        for start in range(0, len(ids), ctx):
            chunk = ids[start:start + ctx]
            seq = Sequence(list(chunk))
            try:
                engine.reserve([(seq, len(chunk))])
                # the output head sees only the rows logits are asked for: every 4th row gives its
                # statistics at a quarter of the vocabulary product's cost
                engine.forward([(seq, len(chunk))], rows=np.arange(0, len(chunk), HEAD_ROW_STRIDE))
            finally:
                engine.release(seq)
            progress(len(chunk))
    finally:
        model.ops = recorder._ops
    return {n: (recorder.sums[n] / recorder.counts[n]).astype(np.float32) for n in recorder.sums}


def log_probs(engine: Engine, ids: list[int]) -> np.ndarray:
    """Next-token log-probabilities [len(ids), vocab] at every position, teacher-forced."""
    seq = Sequence(list(ids))
    try:
        engine.reserve([(seq, len(ids))])
        logits = np.asarray(engine.forward([(seq, len(ids))], all_logits=True), np.float32)
    finally:
        engine.release(seq)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(reference || other), both log-probabilities [positions, vocab]."""
    return float(np.mean(np.sum(np.exp(reference) * (reference - other), axis=-1, dtype=np.float64)))


@contextmanager
def swapped(engine: Engine, slots: dict, new: dict[str, tuple[np.ndarray, object]]) -> Iterator[None]:
    """The model with these matrices replaced by raw blocks (name -> (raw, qtype)) while inside."""
    saved = {}
    model = engine.model
    try:
        for name, (raw, qtype) in new.items():
            if name in slots:
                array, rows = slots[name]
                saved[name] = array[rows].copy()
                array[rows] = dequantize(raw, qtype).reshape(array[rows].shape)
            else:  # the embedding table, read a few rows at a time
                saved[name] = model.embed
                t = engine.gguf.tensors[name]
                model.embed = engine.ops.load_embedding(TensorInfo(name, qtype, t.shape, raw))
        yield
    finally:
        for name, old in saved.items():
            if name in slots:
                array, rows = slots[name]
                array[rows] = old
            else:
                model.embed = old
