"""--requant-streamed: the streamed layers' matrices requantized as they load. On the CPU:
logits equal to those of the file `ntr quantize` writes with the same types, auto's loss bound,
validation, `ntr plan`'s bytes, and kernels/cuda/quantize.cu built for the host against its
NumPy twin; on the GPU (marked gpu): the CUDA quantizer against the twin on fresh rows, and a
streamed CuPy engine with requant against the NumPy one."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import numpy as np
import pytest

from kernels.quantize import quantize
from kernels.quants import Q, block_shape, dequantize
from workers.engine.placement import GIB
from workers.engine.requant_streamed import AUTO_KL, TYPES, streamed_types
from workers.model.gguf_file import GGUFFile
from workers.model.quant_recipe import candidates, tensor_bytes
from budgets import streaming_budget

KERNEL_NAMES = {Q.Q2_K: "quantize_q2_k", Q.Q3_K: "quantize_q3_k", Q.Q4_K: "quantize_q4_k",
                Q.Q5_K: "quantize_q5_k", Q.Q6_K: "quantize_q6_k"}
# what common.cu gives quantize.cu on the GPU, for g++: the _rn intrinsics are the plain
# operations once contraction is off (-ffp-contract=off), fp16 through _Float16
HOST_SHIM = r"""
#include <cmath>
#include <cstring>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(n)
typedef unsigned char u8;
typedef unsigned short u16;
struct Dim3 { unsigned x; };
static Dim3 blockIdx{0}, blockDim{1}, gridDim{1}, threadIdx{0};
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
#define NEG_INF (-__int_as_float(0x7f800000))
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline u16 f2h(float f) { _Float16 h = (_Float16)f; u16 u; std::memcpy(&u, &h, 2); return u; }
inline float h2f(u16 u) { _Float16 h; std::memcpy(&h, &u, 2); return (float)h; }
"""


def fresh_rows(seed: int, rows: int = 24, cols: int = 1024) -> np.ndarray:
    """Gaussian rows of varied scale, an all-zero super-block and an outlier sub-block."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    x[0, :256] = 0
    x[1, :16] = 3.0
    x[2] = rng.standard_t(3, cols).astype(np.float32)  # heavy tails
    return x


def agreement(got: np.ndarray, want: np.ndarray, qtype: Q, x: np.ndarray) -> tuple[float, float, float]:
    """(share of blocks byte-equal, squared round-trip error of got, of want)."""
    size = block_shape(qtype)[1]
    equal = (got.reshape(-1, size) == want.reshape(-1, size)).all(axis=1).mean()
    err = [float(np.square(dequantize(q, qtype).reshape(x.shape) - x, dtype=np.float64).sum()) for q in (got, want)]
    return float(equal), err[0], err[1]


# --- the kernel's source, built for the host --------------------------------------------------
@pytest.fixture(scope="module")
def host_quantizer(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build kernels/cuda/quantize.cu for the host")
    from kernels.cupy import kernel_constants
    from kernels.cupy.sources import CUDA_DIR

    d = tmp_path_factory.mktemp("quantize_cu")
    defines = kernel_constants.define_lines(kernel_constants.QUANTIZE_DEFINES)  # as module_source gives them
    (d / "q.cpp").write_text(HOST_SHIM + defines + (CUDA_DIR / "quantize.cu").read_text())
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-o", str(d / "q.so"),
                        str(d / "q.cpp")], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip("this g++ has no _Float16")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(d / "q.so"))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_quantize_cu_built_for_the_host_matches_the_twin(host_quantizer, qtype):
    x = fresh_rows(int(qtype))
    want = quantize(x, qtype)
    got = np.zeros_like(want)
    getattr(host_quantizer, KERNEL_NAMES[qtype])(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(x.size // 256),
                                                 got.ctypes.data_as(ctypes.c_void_p))
    equal, err_got, err_want = agreement(got, want, qtype, x)
    assert equal == 1.0 and err_got == err_want  # the same operations in the same order


# --- type choice --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep(tmp_path_factory, vocab_dir):
    from workers.model.synthetic import Shape, q4_k_m_mix, write_model

    shape = Shape("llama", n_layers=6, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=512)
    return write_model(tmp_path_factory.mktemp("models") / "deep-rq.gguf", shape,
                       vocab_dir / "ggml-vocab-llama-spm.gguf", mix=q4_k_m_mix, seed=11)


def layer_tensors(gguf, config, layers):
    from workers.engine.requant_streamed import streamed_matrices

    return {t.name: t for t in streamed_matrices(gguf, config, layers)}


def test_static_type_lowers_every_streamed_matrix_above_it(deep):
    from workers.model.config import ModelConfig

    g = GGUFFile(deep)
    c = ModelConfig.from_gguf(g)
    types = streamed_types(g, c, (3, 4, 5), "Q3_K")
    tensors = layer_tensors(g, c, (3, 4, 5))
    assert set(types) == set(tensors) and set(types.values()) == {Q.Q3_K}
    assert not any(n.startswith(("blk.0.", "blk.1.", "blk.2.")) for n in types)
    assert streamed_types(g, c, (3,), "Q6_K") == {n: Q.Q6_K for n, t in layer_tensors(g, c, (3,)).items()
                                                   if tensor_bytes(Q.Q6_K, t.shape) < tensor_bytes(t.qtype, t.shape)}


def test_auto_takes_the_fewest_bytes_within_its_loss_and_spares_sensitive_groups(deep):
    from workers.engine.requant_streamed import _loss_model
    from workers.model.config import ModelConfig
    from workers.model.quant_recipe import Option

    g = GGUFFile(deep)
    c = ModelConfig.from_gguf(g)
    layers = (1, 2, 3, 4, 5)
    tensors = layer_tensors(g, c, layers)
    # measured on a 3-layer model: layer i of 6 reads round(i * 2 / 5), scaled by 3/6; down
    # projections sensitive, the others nearly free
    groups = {f"blk.{j}.{role}": {"kl": kl} for j in range(3)
              for role, kl in (("attn_qkv", 1e-6), ("attn_output", 1e-6), ("ffn_gate_up", 1e-6), ("ffn_down", 1.0))}
    types = streamed_types(g, c, layers, "auto", sensitivities=groups)
    final = {n: types.get(n, t.qtype) for n, t in tensors.items()}
    assert all(final[n] in candidates(t.shape, t.qtype) for n, t in tensors.items())
    loss = _loss_model(list(tensors.values()), c.n_layers, groups)
    assert sum(loss(t, final[n]) for n, t in tensors.items() if final[n] != t.qtype) <= AUTO_KL
    # the free groups go as low as their rows allow; the down projections stay as they are
    assert all(final[n] == t.qtype for n, t in tensors.items() if "ffn_down" in n)
    assert all(final[n] == candidates(t.shape, t.qtype)[-1] for n, t in tensors.items()
               if "ffn_down" not in n and "attn_v" not in n)
    # no cheaper single move stays within the loss: each matrix's next option down passes it
    spent = sum(loss(t, final[n]) for n, t in tensors.items() if final[n] != t.qtype)
    for n, t in tensors.items():
        opts = [Option(q, tensor_bytes(q, t.shape), 0.0 if q == t.qtype else loss(t, q))
                for q in candidates(t.shape, t.qtype)]
        cheaper = [o for o in opts if o.nbytes < tensor_bytes(final[n], t.shape)]
        here = 0.0 if final[n] == t.qtype else loss(t, final[n])
        assert all(spent - here + o.loss > AUTO_KL for o in cheaper)
    # the bundled sensitivities (the 0.5B's 24 layers) work for a model of any depth
    real = streamed_types(g, c, layers, "auto")
    assert all(real[n] in candidates(t.shape, t.qtype) for n, t in tensors.items() if n in real)


# --- loading ------------------------------------------------------------------------------------
def logits_of(engine, prompts) -> list[np.ndarray]:
    from drive import forward
    from workers.engine.engine import Sequence

    out = []
    for p in prompts:
        s = Sequence(list(p))
        out.append(np.asarray(forward(engine, [(s, len(p))], all_logits=True)))
        engine.release(s)
    return out


PROMPTS = [list(range(40, 140)), [5, 900, 17, 2000, 33, 7]]


@pytest.mark.parametrize("spec", ["Q3_K", "Q2_K", "auto"])
def test_requantized_streaming_equals_the_file_ntr_quantize_writes(deep, tmp_path, spec):
    from workers.engine.engine import Engine
    from workers.engine.quantize_model import write_quantized

    kw = dict(backend="numpy", max_context=256, kv_cache_tokens=512, max_logit_rows=128)
    budget = streaming_budget(Engine(deep, **kw).placement, 2, 2)
    streamed = Engine(deep, vram_budget=budget, n_buffers=2, requant_streamed=spec, **kw)
    p = streamed.placement
    assert p.tiers.count("vram") == 2 and p.requant
    assert all(n.split(".")[1] in {"2", "3", "4", "5"} for n in p.requant)
    reference = write_quantized(GGUFFile(deep), tmp_path / "ref.gguf", {n: Q[t] for n, t in p.requant.items()}, {})
    resident = Engine(reference, **kw)
    for got, want in zip(logits_of(streamed, PROMPTS), logits_of(resident, PROMPTS)):
        assert np.array_equal(got, want)
    plain = Engine(deep, vram_budget=budget, n_buffers=2, **kw)  # requant changes what the model computes
    assert not np.array_equal(logits_of(plain, PROMPTS[:1])[0], logits_of(streamed, PROMPTS[:1])[0])


def test_plan_prints_streamed_bytes_before_and_after(tmp_path, vocab_dir, capsys, monkeypatch):
    """A Q6_K file with rows wide enough that the GPU's planes carry no padding at Q6_K or Q4_K
    (tiny rows are mostly padding), requantized to Q4_K. (The quantizers' 1.5 GB of local memory
    at load would outgrow this tiny budget's room: left out here, counted in the test below.)"""
    from cluster.cli import main
    from kernels.cupy.planes import CupySizes

    monkeypatch.setattr(CupySizes, "requant_local_bytes", 0)
    from workers.engine.placement import plan_model
    from workers.model.config import ModelConfig
    from workers.model.synthetic import Shape, uniform_mix, write_model

    shape = Shape("llama", n_layers=4, d_model=2048, n_heads=16, n_kv_heads=4, ffn_dim=2048, context_length=512)
    wide = write_model(tmp_path / "wide.gguf", shape, vocab_dir / "ggml-vocab-llama-spm.gguf",
                       mix=uniform_mix(Q.Q6_K), seed=3)
    with GGUFFile(wide) as g:
        c = ModelConfig.from_gguf(g)
        everything = plan_model(g, c, CupySizes, None, 512, 512)
    budget = streaming_budget(everything, 1, 2, kv_tokens=512)
    args = ["plan", "--model", str(wide), "--vram-gb", repr(budget / GIB), "--kv-tokens", "512", "--ctx", "512",
            "--n-buffers", "2", "--link-gb-s", "25"]
    assert main(args + ["--json"]) == 0
    before = json.loads(capsys.readouterr().out)["placement"]
    assert main(args + ["--json", "--requant-streamed", "Q4_K"]) == 0
    after = json.loads(capsys.readouterr().out)["placement"]
    assert after["tiers"] == before["tiers"] and after["file_streamed_bytes"] == before["streamed_bytes"]
    assert after["tiers"].count("vram") == 1
    # 4.5 bits a weight for 6.5625, and each layer's 64 KiB of spare
    assert after["streamed_bytes"] < 0.7 * before["streamed_bytes"] and after["slot_bytes"] < before["slot_bytes"]
    assert main(args + ["--requant-streamed", "Q4_K"]) == 0
    assert "requantized (21 matrices to Q4_K)" in capsys.readouterr().out


def test_bad_requant_types_are_refused_naming_the_field(deep, capsys):
    from pydantic import ValidationError

    from cluster.cli import main
    from cluster.config import ServerConfig
    from workers.compute_worker import engine_options
    from workers.engine.engine import Engine

    assert main(["generate", "--model", str(deep), "--prompt", "hi", "--requant-streamed", "Q9_K"]) == 2
    assert "--requant-streamed must be 'auto' or one of Q2_K" in capsys.readouterr().err
    with pytest.raises(ValueError, match="requant_streamed must be 'auto' or one of"):
        Engine(deep, requant_streamed="q3_k")
    with pytest.raises(ValidationError, match="requant_streamed"):
        ServerConfig(requant_streamed="Q4_0")
    cfg = ServerConfig(requant_streamed="auto")
    assert engine_options(**cfg.worker_args())["requant_streamed"] == "auto"
    # the config's literal names what the engine accepts
    literal = ServerConfig.model_fields["requant_streamed"].annotation.__args__[0].__args__
    assert set(literal) == {"auto"} | {t.name for t in TYPES}


# --- on the GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_cuda_quantizer_matches_the_twin(cuda_device, qtype):
    import cupy as cp

    from kernels import get_backend
    from kernels.cupy.requant import quantize_rows

    gpu = get_backend("cupy")
    size = block_shape(qtype)[1]
    for seed in range(3):
        x = fresh_rows(100 + seed, rows=64, cols=2048)
        want = quantize(x, qtype)
        with gpu.stream:  # the backend's stream does not wait for the legacy one
            xd, out = cp.asarray(x), cp.full(want.shape, 0xAB, cp.uint8)
            quantize_rows(gpu, xd, qtype, out)
            back = cp.asnumpy(xd, stream=gpu.stream)
        gpu.stream.synchronize()
        assert np.array_equal(back, x)
        got = cp.asnumpy(out)
        equal, err_got, err_want = agreement(got, want, qtype, x)
        differ = np.flatnonzero((got.reshape(-1, size) != want.reshape(-1, size)).any(axis=1))
        first = differ[0] if len(differ) else None
        assert equal >= 0.99, (f"{qtype.name}: {equal:.4f} of blocks equal, round-trip error {err_got:.4g} vs the "
                               f"twin's {err_want:.4g}; block {first}: got {got.reshape(-1, size)[first].tolist()} "
                               f"want {want.reshape(-1, size)[first].tolist()}")
        assert abs(err_got - err_want) <= 0.01 * err_want


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["Q3_K", "auto"])
def test_streamed_cupy_engine_with_requant_equals_the_numpy_one(deep, cuda_device, spec, monkeypatch):
    from workers.engine.engine import Engine

    from kernels.cupy_backend import CupyBackend

    kw = dict(max_context=256, kv_cache_tokens=512, max_logit_rows=128)
    budget = streaming_budget(Engine(deep, backend="cupy", **kw).placement, 2, 2)
    # the quantizers' local memory at load would outgrow this tiny budget: the layers are the point here
    monkeypatch.setattr(CupyBackend, "requant_local_bytes", 0)
    gpu = Engine(deep, backend="cupy", vram_budget=budget, n_buffers=2, requant_streamed=spec, **kw)
    assert gpu.placement.tiers.count("vram") == 2 and gpu.placement.requant
    ref_budget = streaming_budget(Engine(deep, backend="numpy", **kw).placement, 2, 2)
    cpu = Engine(deep, backend="numpy", vram_budget=ref_budget, n_buffers=2, requant_streamed=spec, **kw)
    assert cpu.placement.requant == gpu.placement.requant
    for got, want in zip(logits_of(gpu, PROMPTS), logits_of(cpu, PROMPTS)):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 2e-2 and (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_plan_leaves_room_for_the_requantization_scratch(tmp_path, vocab_dir, monkeypatch):
    """The streamed layers requantize while the resident ones, the slots and the fixed weights
    are loaded: what is left of the pool's limit then (the budget less the context and the
    graphs' pools) holds the largest matrix's scratch, the reserve growing where the KV cache
    and the activations would not cover it (the quantizers' local memory made 8 MiB too large
    here; without requant_local_bytes, at first, to see the plan as it would be)."""
    from kernels.cupy.planes import CupySizes
    from workers.engine import requant_streamed
    from workers.engine.placement import CONTEXT_BYTES, GRAPH_BYTES, plan_model
    from workers.model.config import ModelConfig
    from workers.model.synthetic import Shape, uniform_mix, write_model

    shape = Shape("llama", n_layers=4, d_model=2048, n_heads=16, n_kv_heads=4, ffn_dim=2048, context_length=512)
    wide = write_model(tmp_path / "wide.gguf", shape, vocab_dir / "ggml-vocab-llama-spm.gguf",
                       mix=uniform_mix(Q.Q6_K), seed=3)

    def room_at_load(p, budget):
        resident = sum(n for n, t in zip(p.sizes.layers, p.tiers) if t == "vram")
        return budget - CONTEXT_BYTES - GRAPH_BYTES - p.device_fixed - resident - p.n_buffers * p.slot_bytes

    with GGUFFile(wide) as g:
        c = ModelConfig.from_gguf(g)
        everything = plan_model(g, c, CupySizes, None, 512, 512)
        s = everything.sizes
        budget = streaming_budget(everything, 1, 2, kv_tokens=512)
        monkeypatch.setattr(CupySizes, "requant_local_bytes", 0)
        plain = plan_model(g, c, CupySizes, budget, 512, 512, n_buffers=2, requant_streamed="Q4_K")
        types = {n: Q[t] for n, t in plain.requant.items()}
        assert room_at_load(plain, budget) >= requant_streamed.load_scratch_bytes(g, types, CupySizes)

        # the room the plan counts on: the reserve's activations and scratch, and the KV cache
        counted = plain.reserve - CONTEXT_BYTES - GRAPH_BYTES + s.kv_bytes(512)
        short = 8 << 20
        rest = requant_streamed.load_scratch_bytes(g, types, CupySizes) - CupySizes.requant_local_bytes
        monkeypatch.setattr(CupySizes, "requant_local_bytes", counted - rest + short)
        scratch = requant_streamed.load_scratch_bytes(g, types, CupySizes)
        grown = plan_model(g, c, CupySizes, budget + short, 512, 512, n_buffers=2, requant_streamed="Q4_K")
        # a budget that holds two slots with the reserve as planned, but not with the shortfall
        # added: refused, naming what the room is for
        tight = plain.reserve + plain.device_fixed + s.kv_bytes(512) + 2 * max(s.layers) + short // 2
        with pytest.raises(ValueError, match=r"the minimum is .*, of which 0.01 GiB is requant_streamed's while the "
                                             r"streamed layers requantize as they load .*: raise the budget, or"):
            plan_model(g, c, CupySizes, tight, 512, 512, n_buffers=2, requant_streamed="Q4_K")
    assert grown.tiers == plain.tiers and grown.reserve == plain.reserve + short
    assert room_at_load(grown, budget + short) >= scratch
