"""Which type each matrix of a model gets: llama.cpp's static recipe for one type, or the
types that minimise a predicted loss under a byte budget.

Row-length fallback: K-quants need rows that are a multiple of 256 values; other rows (the
0.5B Qwen's 896) take the legacy type llama.cpp falls back to (its llama-quant.cpp, as this
project's llama-cpp-python 0.3.36 build does it: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0).

The budgeted assignment: every matrix starts at its source type (copied, no loss); each has
cheaper options (bytes, predicted loss); the options on each matrix's lower convex hull are
taken greedily, the step with the least loss per byte saved first, until the bytes fit. For
a separable loss this is the optimum of the relaxed problem; what its last step leaves under
the budget is then filled by moves back up. The same steps taken until a loss bound instead
(`within_loss`) give the fewest bytes for that loss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels.quantize import QUANTIZABLE

Q = GGMLQuantizationType
QK_K = 256
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# cheaper types a matrix may move to, by what its rows allow
K_LADDER = (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K)
LEGACY_LADDER = (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)
OUTPUT_NAMES = ("output.weight",)
EMBED_NAMES = ("token_embd.weight",)


def row_type(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """qtype where rows of `cols` values allow it, else llama.cpp's fallback."""
    return FALLBACK[qtype] if qtype in FALLBACK and cols % QK_K else qtype


def tensor_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def is_matrix(shape: tuple[int, ...]) -> bool:
    """Quantized at all: 2-D weights (1-D norms and biases stay as they are)."""
    return len(shape) == 2


def static_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, has_output: bool) -> GGMLQuantizationType:
    """llama.cpp's type for one matrix under `--type qtype`: the output head (or a tied embedding)
    Q6_K (Q8_0 where its rows cannot take K-quants, or where qtype is Q8_0), every other matrix
    qtype, with the row-length fallback."""
    if qtype not in QUANTIZABLE:
        raise ValueError(f"--type must be one of {', '.join(sorted(t.name for t in QUANTIZABLE))}, got {qtype.name}")
    if name in OUTPUT_NAMES or (not has_output and name in EMBED_NAMES):
        return Q.Q8_0 if qtype == Q.Q8_0 or shape[-1] % QK_K else Q.Q6_K
    return row_type(qtype, shape[-1])


def candidates(shape: tuple[int, ...], source: GGMLQuantizationType) -> list[GGMLQuantizationType]:
    """The source type and the types rows of this shape allow that take fewer bytes."""
    ladder = K_LADDER if shape[-1] % QK_K == 0 else LEGACY_LADDER
    own = tensor_bytes(source, shape)
    return [source] + [t for t in ladder if t != source and tensor_bytes(t, shape) < own]


@dataclass(frozen=True)
class Option:
    qtype: GGMLQuantizationType
    nbytes: int
    loss: float


def assign(options: dict[str, list[Option]], budget: int) -> dict[str, GGMLQuantizationType]:
    """Per matrix, the option chosen so that the bytes fit `budget` with the least summed loss
    (options[name][0] is the starting point, its source type); ValueError when even the cheapest
    options do not fit. The descent's last step may leave room under the budget: it is spent
    on the moves back up that cut the most loss per byte and still fit."""
    chosen = descend(options, budget)
    total = sum(o.nbytes for o in chosen.values())
    while True:
        room, best = budget - total, None
        for name, opts in options.items():
            cur = chosen[name]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= room and o.loss < cur.loss:
                    gain = (cur.loss - o.loss) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, o)
        if best is None:
            return {name: o.qtype for name, o in chosen.items()}
        _, name, o = best
        total += o.nbytes - chosen[name].nbytes
        chosen[name] = o


def within_loss(options: dict[str, list[Option]], max_loss: float) -> dict[str, GGMLQuantizationType]:
    """Per matrix, the option the hulls' steps reach, taken in order of least loss per byte saved
    while the summed loss stays within max_loss (a matrix whose next step would pass it stops
    there): the fewest bytes for that loss, as `descend` finds the least loss for a budget."""
    hulls = {name: _hull(opts) for name, opts in options.items()}
    # along a hull the rates rise, so this order takes each matrix's steps in turn
    steps = sorted(((h[i + 1].loss - h[i].loss) / (h[i].nbytes - h[i + 1].nbytes), name, i)
                   for name, h in hulls.items() for i in range(len(h) - 1))
    at = {name: 0 for name in hulls}
    loss, stopped = sum(h[0].loss for h in hulls.values()), set()
    for _, name, i in steps:
        h = hulls[name]
        if name in stopped or loss + h[i + 1].loss - h[i].loss > max_loss:
            stopped.add(name)
            continue
        loss += h[i + 1].loss - h[i].loss
        at[name] = i + 1
    return {name: hulls[name][i].qtype for name, i in at.items()}


def descend(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """The greedy descent alone: steps along each matrix's convex hull, least loss per byte saved
    first, until the bytes fit. Where it stops no choice spending as few bytes has less loss."""
    hulls = {name: _hull(opts) for name, opts in options.items()}
    floor = sum(h[-1].nbytes for h in hulls.values())
    if floor > budget:
        raise ValueError(f"the budget of {budget} tensor bytes is below the {floor} bytes of the cheapest types")
    at = {name: 0 for name in hulls}
    total = sum(h[0].nbytes for h in hulls.values())
    while total > budget:
        def rate(name):
            h, i = hulls[name], at[name]
            return (h[i + 1].loss - h[i].loss) / (h[i].nbytes - h[i + 1].nbytes)
        name = min((n for n in hulls if at[n] + 1 < len(hulls[n])), key=rate)
        h, i = hulls[name], at[name]
        total -= h[i].nbytes - h[i + 1].nbytes
        at[name] = i + 1
    return {name: hulls[name][i] for name, i in at.items()}


def _hull(opts: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, loss), from the most bytes down: an option
    that a cheaper one matches in loss, or that lies above the line between its neighbours,
    is never worth a step."""
    front, best = [], math.inf
    for o in sorted(opts, key=lambda o: (o.nbytes, o.loss)):
        if o.loss < best:  # bytes ascending: keep what lowers the loss
            front.append(o)
            best = o.loss
    hull: list[Option] = []
    for c in front:
        while len(hull) >= 2 and _on_or_above(hull[-2], hull[-1], c):
            hull.pop()
        hull.append(c)
    return hull[::-1]


def _on_or_above(a: Option, b: Option, c: Option) -> bool:
    """b (bytes between a's and c's) lies on or above the segment a-c."""
    return (b.loss - a.loss) * (c.nbytes - a.nbytes) >= (c.loss - a.loss) * (b.nbytes - a.nbytes)


def group_of(name: str) -> str:
    """The group a matrix's sensitivity is measured with."""
    m = re.fullmatch(r"(blk\.\d+\.)(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight", name)
    if m is None:
        return name
    role = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "ffn_gate": "ffn_gate_up",
            "ffn_up": "ffn_gate_up"}.get(m.group(2), m.group(2))
    return m.group(1) + role


def probe_type(shape) -> Q:
    """The type a group's sensitivity is measured at."""
    return row_type(Q.Q3_K, shape[-1])
