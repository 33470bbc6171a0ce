"""The ops of a process that drives pipeline stages and runs no layer itself
(workers/engine/pipeline.py): it plans the stages and numbers their KV blocks, so it needs the
model's and the KV cache's sizes as the stages' backend stores them, and nothing on a device.
A driver of GPU stages (a Serve replica's ComputeWorker, `ntr generate --pp`) therefore holds
no GPU of its own: every GPU goes to a stage."""

from __future__ import annotations

from kernels.cupy.planes import CupySizes
from kernels.numpy_backend import NumpyBackend
from kernels.ops import Backend


class CupyDriver(NumpyBackend):
    """The host's ops, sized as the CuPy backend stores weights and KV (CupySizes)."""

    name = CupySizes.name
    kv_types = CupySizes.kv_types
    requant_local_bytes = CupySizes.requant_local_bytes

    def matrix_nbytes(self, *tensors) -> int:
        return CupySizes.matrix_nbytes(*tensors)


def get_driver(name: str) -> Backend:
    """The driver's ops for stages of backend `name` (`kernels.get_backend`'s names)."""
    if name == "cupy":
        return CupyDriver()
    from kernels import get_backend

    return get_backend(name)
