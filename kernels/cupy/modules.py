"""The CUDA modules, compiled by NVRTC at first use or loaded prebuilt from $NTR_CUBIN_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import cupy as cp

from kernels.cupy.sources import cubin_name, module_source, quant_prefix


class Kernels:
    """The CUDA modules, compiled at first use (CuPy caches the binaries on disk)."""

    def __init__(self):
        self._modules: dict[str, cp.RawModule] = {}
        self._functions: dict[tuple[str, str], cp.RawKernel] = {}

    def _module(self, file: str, prefix: str = "") -> cp.RawModule:
        key = file + prefix
        if key not in self._modules:
            src = module_source(file, prefix)
            # $NTR_CUBIN_DIR may hold these sources compiled ahead of time by nvcc
            # (tools/bench_gpu.py --prebuild), named by the source's hash: no NVRTC wait.
            cubin = Path(os.environ.get("NTR_CUBIN_DIR", "/nonexistent")) / cubin_name(src)
            if cubin.exists():
                self._modules[key] = cp.RawModule(path=str(cubin))
            else:
                self._modules[key] = cp.RawModule(code=src, options=("-std=c++17",))
        return self._modules[key]

    def get(self, file: str, name: str, prefix: str = "", dynamic_smem: int = 0) -> cp.RawKernel:
        """Kernel `name` of `file`; dynamic_smem: the dynamic shared memory its launches pass
        (allowed past the default 48 KiB once, as the kernel is first fetched)."""
        key = (file + prefix, name)
        if key not in self._functions:
            fn = self._module(file, prefix).get_function(name)
            if dynamic_smem:
                fn.max_dynamic_shared_size_bytes = dynamic_smem
            self._functions[key] = fn
        return self._functions[key]

    def quant(self, file: str, qtype, name: str) -> cp.RawKernel:
        """Kernel `name` of quant module `file` (kernels/cupy/sources.py) built for qtype."""
        return self.get(file, name, quant_prefix(qtype))
