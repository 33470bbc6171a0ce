"""Compute backends. `get_backend(name)` picks one; the model never imports a backend directly."""

from kernels.kv_layout import KVLayout, KVRows
from kernels.ops import AttentionBatch, Backend, StepInputs

BACKENDS = ("numpy", "cupy")


def get_backend(name: str) -> Backend:
    if name == "numpy":
        from kernels.numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "cupy":
        try:
            from kernels.cupy_backend import CupyBackend
        except ImportError as e:
            raise ValueError(f"backend 'cupy' needs CuPy and a CUDA GPU ({e}); install ntransformer[gpu]") from None
        return CupyBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["AttentionBatch", "Backend", "BACKENDS", "KVLayout", "KVRows", "StepInputs", "get_backend"]
