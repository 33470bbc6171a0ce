"""tools/bench_gpu.py's reading of llama.cpp's benchmark output (the GPU runs need a device;
the lines here follow the printf formats of llama-bench's jsonl printer and of
llama-batched-bench's --output-format jsonl in llama.cpp as vendored by llama-cpp-python),
and the vocab-only GGUF it writes for the Gemma 3 replicas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from workers.model.gguf_file import GGUFFile
from workers.model.tokenizer import Tokenizer

spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "tools" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)

LLAMA_BENCH = """\
ggml_cuda_init: found 1 CUDA devices:
{"build_commit": "abc", "model_type": "llama 8B Q4_K - Medium", "n_gpu_layers": 99, "flash_attn": true, \
"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ns": 55261000, "stddev_ns": 120000, "avg_ts": 9265.123, \
"stddev_ts": 20.1, "samples_ns": [ 55261000 ], "samples_ts": [ 9265.123 ]}
{"build_commit": "abc", "model_type": "llama 8B Q4_K - Medium", "n_gpu_layers": 99, "flash_attn": true, \
"n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ns": 475836000, "stddev_ns": 900000, "avg_ts": 269.004, \
"stddev_ts": 0.5, "samples_ns": [ 475836000 ], "samples_ts": [ 269.004 ]}
"""

BATCHED_BENCH = """\
main: n_kv_max = 16384, n_batch = 2048, n_ubatch = 512, flash_attn = 1
{"n_kv_max": 16384, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": 99, \
"n_threads": 8, "n_threads_batch": 8, "pp": 128, "tg": 32, "pl": 8, "n_kv": 1280, "t_pp": 0.120000, \
"speed_pp": 8533.333333, "t_tg": 0.400000, "speed_tg": 640.000000, "t": 0.520000, "speed": 2461.538462}
{"n_kv_max": 16384, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": 99, \
"n_threads": 8, "n_threads_batch": 8, "pp": 128, "tg": 32, "pl": 64, "n_kv": 10240, "t_pp": 0.900000, \
"speed_pp": 9102.222222, "t_tg": 0.458000, "speed_tg": 4471.179039, "t": 1.358000, "speed": 7540.500736}

llama_perf_context_print:        load time =     812.12 ms
"""


def test_llama_bench_rows():
    assert bench_gpu.parse_llama_bench(LLAMA_BENCH) == {"pp512": 9265.123, "tg128": 269.004}


def test_batched_bench_rows():
    assert bench_gpu.parse_batched_bench(BATCHED_BENCH) == {"decode x8": 640.0, "decode x64": 4471.179039}


def test_write_vocab_holds_gemma3s_tokenizer(gemma3_model_path, tmp_path):
    """--write-vocab's ggml-vocab-gemma3.gguf: the 270M file's architecture and every
    tokenizer field, no tensors; it tokenizes as the model file does, and a replica written
    with it (bench_gpu's MODELS) takes its vocabulary."""
    assert set(bench_gpu.OWN_VOCABS.values()) == {"gemma3-270m"}
    bench_gpu.write_vocabs(tmp_path)
    vocab, source = GGUFFile(tmp_path / "ggml-vocab-gemma3.gguf"), GGUFFile(gemma3_model_path)
    assert len(vocab.tensors) == 0
    assert vocab.metadata["general.architecture"] == "gemma3"
    want = {k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in vocab.metadata.items() if k.startswith("tokenizer.")} == want
    text = "Gemma's tokenizer: <start_of_turn>user\nÜber 3.5 × 10⁸ tokens?  ok"
    assert Tokenizer.from_metadata(vocab.metadata).encode(text) == Tokenizer.from_metadata(source.metadata).encode(text)
    for name in ("gemma3-270m-q4_k_m", "gemma3-12b-q4_k_m"):
        assert bench_gpu.MODELS[name][2] == "ggml-vocab-gemma3.gguf"
