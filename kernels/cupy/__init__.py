"""The CuPy backend's parts, one module per op family (as llama.cpp's ggml-cuda/); the
backend itself, `kernels.cupy_backend.CupyBackend`, implements kernels/ops.py by calling them.
Nothing here is imported unless the cupy backend is chosen; `sources` needs no CuPy (the
ahead-of-time build, tools/bench_gpu.py --prebuild, uses it on machines without a GPU)."""
