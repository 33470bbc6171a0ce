"""`--requant-streamed auto|TYPE`: the streamed layers' matrices loaded as cheaper quant types,
so that every decode pass moves fewer bytes over the host link.

TYPE (a K-quant): every streamed matrix that takes more bytes than TYPE's is requantized to it
(rows not a multiple of 256 take `ntr quantize`'s legacy fallback, quant_recipe.row_type).

auto: per matrix, the types that take the fewest bytes with the summed predicted loss at most
AUTO_KL (quant_recipe.within_loss): the bytes follow from the accuracy kept, not from a fixed
bit rate, which a model's rows may not even allow (the 0.5B's 896-wide rows take nothing below
Q4_0's 4.5 bits, and a fixed 3.9 sent its most sensitive matrices, ffn_down, to Q2_K: +80%
perplexity). The loss of matrix m (group g: a layer's QKV, attention output, gate/up or down) at
type t is KL_g * n_m r(t) / sum_{m' in g} n_m' r(probe(m')): the KL `ntr quantize` measured
with g at its probe types (SENSITIVITIES, the 0.5B's), shared by the matrices' expected squared
error, n weights times r(t), the twin's relative squared round-trip error on Gaussian rows.
Staying at the file's type costs nothing. A model of N layers reads layer i's sensitivities
from layer round(i (L - 1) / (N - 1)) of the L-layer model they were measured on, scaled by
L / N: a layer of a deeper model carries a smaller share of what the model computes (a guess,
the only transfer there is: no deeper model's sensitivities were measured here).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np

from kernels.quantize import quantize
from kernels.quants import dequantize
from kernels.requantized import DEVICE_CHUNK_VALUES, Requantized
from workers.model.quant_recipe import Option, Q, candidates, group_of, probe_type, row_type, tensor_bytes, within_loss
from workers.model.transformer import layer_matrices

TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # what TYPE may name: quant kernels on the GPU
# predicted (the units of SENSITIVITIES' KL); measured on the default model, the prediction ran
# 2-3x below the change of log perplexity (docs/benchmarks.md)
AUTO_KL = 0.005
SENSITIVITIES = Path(__file__).resolve().parents[2] / "tools/data/quant_sensitivity_qwen2.5-coder-0.5b-q4_k_m.json"


def check_spec(spec: str | None, field: str = "--requant-streamed") -> str | None:
    """spec as given if it is None, "auto" or a TYPES name; ValueError naming `field` otherwise."""
    if spec is None or spec == "auto" or spec in {t.name for t in TYPES}:
        return spec
    raise ValueError(f"{field} must be 'auto' or one of {', '.join(t.name for t in TYPES)}, got {spec!r}")


def streamed_matrices(gguf, config, streamed) -> list:
    return [t for i in streamed for m in layer_matrices(gguf, config, i) for t in m]


def streamed_types(gguf, config, streamed, spec: str, sensitivities: dict | None = None) -> dict[str, Q]:
    """The streamed matrices whose type changes, and to what."""
    check_spec(spec)
    tensors = streamed_matrices(gguf, config, streamed)
    if spec != "auto":
        out = {}
        for t in tensors:
            q = row_type(Q[spec], t.shape[-1])
            if tensor_bytes(q, t.shape) < tensor_bytes(t.qtype, t.shape):
                out[t.name] = q
        return out
    loss = _loss_model(tensors, config.n_layers, sensitivities or load_sensitivities())
    options = {t.name: [Option(q, tensor_bytes(q, t.shape), 0.0 if q == t.qtype else loss(t, q))
                        for q in candidates(t.shape, t.qtype)] for t in tensors}
    chosen = within_loss(options, AUTO_KL)
    return {t.name: chosen[t.name] for t in tensors if chosen[t.name] != t.qtype}


def load_sensitivities(path: Path = SENSITIVITIES) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["groups"]


@functools.cache
def relative_error(qtype: Q) -> float:
    """The twin's squared round-trip error over the squared values, on fixed Gaussian rows."""
    x = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
    y = dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    return float(np.square(y - x, dtype=np.float64).sum() / np.square(x, dtype=np.float64).sum())


def _loss_model(tensors, n_layers: int, groups: dict):
    """loss(tensor, qtype) as the module docstring defines it."""
    measured = [int(m.group(1)) for g in groups if (m := re.match(r"blk\.(\d+)\.", g))]
    if not measured:
        raise ValueError("the sensitivities hold no layer groups")
    src_layers = max(measured) + 1
    by_role: dict[str, list[float]] = {}
    for g, s in groups.items():
        if (m := re.match(r"blk\.\d+\.(.+)", g)):
            by_role.setdefault(m.group(1), []).append(s["kl"])

    def kl(group: str) -> float:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", group)
        if m is None:
            return groups.get(group, {}).get("kl", 0.0)
        i, role = int(m.group(1)), m.group(2)
        j = 0 if n_layers == 1 else round(i * (src_layers - 1) / (n_layers - 1))
        s = groups.get(f"blk.{j}.{role}")
        return (s["kl"] if s is not None else float(np.mean(by_role.get(role, [0.0])))) * src_layers / n_layers

    denominators: dict[str, float] = {}
    for t in tensors:
        g = group_of(t.name)
        denominators[g] = denominators.get(g, 0.0) + t.shape[0] * t.shape[1] * relative_error(probe_type(t.shape))

    def loss(t, qtype: Q) -> float:
        g = group_of(t.name)
        return kl(g) * t.shape[0] * t.shape[1] * relative_error(qtype) / denominators[g]

    return loss


def load_scratch_bytes(gguf, types: dict[str, Q], sizer) -> int:
    """At most the device memory a backend's requantization of one matrix holds besides what
    placement counts (kernels/cupy/requant.py): the source's upload and planes, a float32 chunk,
    the new blocks, and the local memory the driver reserves for the quantizers' stacks."""
    return max((2 * sizer.matrix_nbytes(gguf.tensors[n]) + sizer.matrix_nbytes(Requantized(gguf.tensors[n], q))
                + 4 * DEVICE_CHUNK_VALUES + sizer.requant_local_bytes for n, q in types.items()), default=0)


def retyped(gguf, types: dict[str, Q]):
    """The file as it is loaded: a shallow copy whose tensors in `types` are Requantized."""
    loaded = copy.copy(gguf)
    loaded.tensors = {n: Requantized(t, types[n]) if n in types else t for n, t in gguf.tensors.items()}
    return loaded
