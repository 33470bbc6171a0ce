"""A GGUF matrix loaded as another quant type (`--requant-streamed`): what a backend's
load_matrix gets in place of the file's tensor, and the raw blocks it turns into.

The NumPy backend quantizes on the host with kernels/quantize.py; the CuPy backend on the GPU
(kernels/cupy/requant.py, kernels/cuda/quantize.cu, the same algorithm) for the K-quants, the
host path for any other type (the legacy types rows of odd lengths fall back to: small models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from kernels.quantize import quantize
from kernels.quants import block_shape, dequantize

DEVICE_CHUNK_VALUES = 1 << 24  # float32 values a device requantizes at a time (64 MiB)


@dataclass(frozen=True)
class Blocks:
    """A matrix as load_matrix reads a GGUF tensor: name, type, shape and raw blocks
    [rows, row_bytes] (a NumPy array, or a CuPy one already on the device)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: object


@dataclass(frozen=True)
class Requantized:
    """source (a 2-D GGUF tensor) to be loaded as qtype. Sized like the result (what placement
    counts); quantized only when a backend loads it."""

    source: object  # workers.model.gguf_file.TensorInfo
    qtype: GGMLQuantizationType

    def __post_init__(self):
        if len(self.source.shape) != 2 or self.source.shape[-1] % block_shape(self.qtype)[0]:
            raise ValueError(f"{self.source.name} {self.source.shape} cannot be requantized to {self.qtype.name}")

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def n_elements(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_bytes(self) -> int:
        block, size = block_shape(self.qtype)
        return self.shape[0] * (self.shape[1] // block) * size

    def values(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of the source dequantized: float32 [rows, cols]."""
        rows = np.asarray(self.source.data[start:stop])
        return dequantize(rows, self.source.qtype).reshape(len(rows), -1)

    def on_host(self) -> Blocks:
        """Requantized on the host (kernels/quantize.py, no importance: as `ntr quantize` without
        an importance matrix), row chunks at a time."""
        rows = self.shape[0]
        step = max(1, (1 << 22) // self.shape[1])
        data = np.concatenate([quantize(self.values(r, r + step), self.qtype) for r in range(0, rows, step)])
        return Blocks(self.name, self.qtype, self.shape, data)
