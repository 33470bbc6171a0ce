"""cuBLAS's GEMM (cublasGemmEx) through ctypes, on a handle of the backend's own.

CuPy's cuBLAS wrappers refuse to run while a stream is being captured, and a repeated prompt
pass is captured as a CUDA graph (steps.py) whose products go through cuBLAS; cuBLAS itself
records into graphs. The handle runs on the current stream, as CuPy's would, with a
workspace made with it, before any capture, so that a captured GEMM allocates nothing.
"""

from __future__ import annotations

import ctypes

import cupy as cp

WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper
_c_int, _c_void = ctypes.c_int, ctypes.c_void_p


def _library() -> ctypes.CDLL:
    """The libcublas CuPy has loaded (its handle made first loads it): one copy of cuBLAS in
    the process, whichever directory it came from."""
    cp.cuda.device.get_cublas_handle()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libcublas.so" in line}
    if len(paths) != 1:
        raise RuntimeError(f"expected the one libcublas CuPy loaded, found {sorted(paths) or 'none'}")
    return ctypes.CDLL(paths.pop())


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with cublasStatus_t {status}")


class Gemm:
    """cublasGemmEx on the current stream: C (m x n, ldc) = alpha op(A) op(B) + beta C,
    column-major as cuBLAS has it; alpha and beta read from host memory."""

    def __init__(self):
        lib = self._lib = _library()
        self._gemm = lib.cublasGemmEx
        self._gemm.argtypes = [_c_void, _c_int, _c_int, _c_int, _c_int, _c_int, _c_void, _c_void, _c_int, _c_int,
                               _c_void, _c_int, _c_int, _c_void, _c_void, _c_int, _c_int, _c_int, _c_int]
        self.handle = _c_void()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cp.empty((WORKSPACE_BYTES,), cp.uint8)
        self._stream = None

    def __call__(self, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc,
                 compute, algo) -> None:
        stream = cp.cuda.get_current_stream().ptr
        if stream != self._stream:  # setting the stream puts back cuBLAS's own workspace: ours again after it
            _check(self._lib.cublasSetStream_v2(self.handle, _c_void(stream)), "cublasSetStream")
            _check(self._lib.cublasSetWorkspace_v2(self.handle, _c_void(self.workspace.data.ptr),
                                                   ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
            self._stream = stream
        _check(self._gemm(self.handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype,
                          ldc, compute, algo), "cublasGemmEx")

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self._lib.cublasDestroy_v2(self.handle)
