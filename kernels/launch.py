"""Kernel launches with programmatic dependent launch (PDL), for the captured decode step.

A decode step is ~300 small dependent kernels; between two of them the GPU drains one grid,
then launches the next, whose first loads then wait a DRAM round trip. Launched with PDL
(cuLaunchKernelEx, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) a kernel starts
while the one before it still runs, loads what does not depend on it (weights, cached keys)
and waits in `pdl_wait()` (kernels/cuda/common.cu) for the rest. Stream capture records these
launches as programmatic edges of the CUDA graph. CuPy's RawKernel call has no launch
attributes, hence this driver call through ctypes. Only kernels that call pdl_wait() before
touching their inputs and outputs may be launched this way.
"""

from __future__ import annotations

import ctypes

import numpy as np

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _Attribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_uint64 * 8)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint64): ctypes.c_uint64,
           np.dtype(np.float32): ctypes.c_float}


class PdlLauncher:
    def __init__(self):
        self._driver = ctypes.CDLL("libcuda.so.1")
        self._launch = self._driver.cuLaunchKernelEx
        self._launch.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.c_void_p]
        self._attr = _Attribute(_PROGRAMMATIC_STREAM_SERIALIZATION, 0)
        self._attr.value[0] = 1  # programmaticStreamSerializationAllowed

    @staticmethod
    def _arg(a):
        if isinstance(a, np.generic):
            return _CTYPES[a.dtype](a.item())
        return ctypes.c_uint64(a.data.ptr)  # a CuPy array: its device pointer

    def __call__(self, kernel, grid: tuple, block: tuple, args: tuple, stream, shared_mem: int = 0) -> None:
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        held = [self._arg(a) for a in args]
        params = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
        cfg = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, stream.ptr,
                      ctypes.pointer(self._attr), 1)
        err = self._launch(ctypes.byref(cfg), kernel.kernel.ptr, params, None)
        if err != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err} ({kernel.name})")
