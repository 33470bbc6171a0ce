"""`ntr quantize`: a GGUF requantized to one static type, or to per-matrix types chosen by
measured sensitivity under a byte budget.

The budgeted recipe predicts the loss of matrix m at type t as s_g * E(m, t): E is the
importance-weighted squared error of the round trip, sum_c imp_c * sum_r (q(w) - w)_rc^2 (the
expected squared change of the product's outputs, per token, when imp is the mean squared
input), estimated on a fixed sample of rows; s_g is measured once per group g of matrices (a
layer's Q/K/V, its attention output, its FFN gate/up, its FFN down; the output head; the
embedding table): the mean KL divergence of the next-token distribution on a calibration text
when only that group is quantized to a probe type (Q4_0 rows, Q3_K where rows allow K-quants),
divided by the group's E at the probe. `quant_recipe.assign` then picks the types.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kernels.quantize import quantize
from kernels.quants import dequantize
from workers.engine.engine import Engine
from workers.engine.quant_calibration import importance_matrix, log_probs, mean_kl, swapped, weight_slots
from workers.model.gguf_file import GGUFFile
from workers.model.gguf_writer import file_type, write_gguf
from workers.model.quant_recipe import (Option, Q, assign, candidates, group_of, is_matrix, probe_type, static_type,
                                        tensor_bytes)

ALIGN = 32  # GGUF tensor data alignment (the writer's default)
SAMPLE_ROWS = 512  # rows per matrix the error table quantizes
SENSITIVITY_TOKENS = 256
IMATRIX_TOKENS = 1024
MAX_IMATRIX_COLS = 1 << 20


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def matrices(src: GGUFFile) -> list[str]:
    return [n for n, t in src.tensors.items() if is_matrix(t.shape)]


def static_types(src: GGUFFile, qtype) -> dict[str, Q]:
    """`--type`: llama.cpp's static recipe for qtype, matrix by matrix."""
    has_output = "output.weight" in src.tensors
    return {n: static_type(n, src.tensors[n].shape, qtype, has_output) for n in matrices(src)}


# --- importance matrix files ------------------------------------------------------------------

def save_imatrix(path: str | Path, imatrix: dict[str, np.ndarray], tokens: int, text: str) -> None:
    """An .npz of float32 [cols] per matrix name, with `__tokens__` and `__text__` saying what made it."""
    np.savez(path, __tokens__=np.array(tokens), __text__=np.array(text), **imatrix)


def load_imatrix(path: str | Path, src: GGUFFile) -> dict[str, np.ndarray]:
    """An importance matrix from save_imatrix, checked against the source's matrices."""
    out = {}
    with np.load(path, allow_pickle=False) as f:
        for name in f.files:
            if name.startswith("__"):
                continue
            t = src.tensors.get(name)
            if t is None or not is_matrix(t.shape):
                raise ValueError(f"{path}: {name!r} is no matrix of {src.path.name}")
            v = f[name]
            if v.shape != (t.shape[-1],) or v.shape[0] > MAX_IMATRIX_COLS:
                raise ValueError(f"{path}: {name!r} has shape {v.shape}, the matrix takes {t.shape[-1]} columns")
            v = v.astype(np.float32)
            if not (np.isfinite(v).all() and (v >= 0).all()):
                raise ValueError(f"{path}: {name!r} holds negative or non-finite values")
            out[name] = v
    return out


# --- the budgeted recipe ----------------------------------------------------------------------

def error_table(src: GGUFFile, imatrix: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[Q, float]]:
    """E(m, t) for every matrix and each of its candidate types (0 at its source type),
    from SAMPLE_ROWS rows scaled to the whole matrix."""
    rng = np.random.default_rng(seed)
    table = {}
    for name in matrices(src):
        t = src.tensors[name]
        rows = t.shape[0]
        pick = np.sort(rng.choice(rows, min(rows, SAMPLE_ROWS), replace=False))
        x = dequantize(np.asarray(t.data[pick]), t.qtype).reshape(len(pick), -1)
        imp = imatrix.get(name)
        weight = np.ones(x.shape[1], np.float32) if imp is None else imp
        table[name] = {}
        for qtype in candidates(t.shape, t.qtype):
            if qtype == t.qtype:
                table[name][qtype] = 0.0
                continue
            y = dequantize(quantize(x, qtype, imp), qtype)
            table[name][qtype] = float(np.sum(weight * np.square(y - x, dtype=np.float64))) * rows / len(pick)
    return table


def measure_sensitivities(engine: Engine, ids: list[int], src: GGUFFile, imatrix: dict[str, np.ndarray],
                          errors: dict[str, dict[Q, float]],
                          progress: Callable[[str, float], None] = lambda g, kl: None) -> dict[str, dict]:
    """Per group: {"kl": mean KL with the group at its probe types, "err": the group's E there,
    "probe": {matrix: type}}; groups whose matrices cannot go lower are absent."""
    groups: dict[str, list[str]] = {}
    for name in matrices(src):
        if probe_type(src.tensors[name].shape) in errors[name]:
            groups.setdefault(group_of(name), []).append(name)
    slots = weight_slots(engine)
    reference = log_probs(engine, ids)
    out = {}
    for group, names in groups.items():
        new = {}
        for name in names:
            t, qtype = src.tensors[name], probe_type(src.tensors[name].shape)
            x = dequantize(t.data, t.qtype).reshape(t.shape[0], -1)
            new[name] = (quantize(x, qtype, imatrix.get(name)), qtype)
        with swapped(engine, slots, new):
            kl = mean_kl(reference, log_probs(engine, ids))
        out[group] = {"kl": kl, "err": sum(errors[n][new[n][1]] for n in names),
                      "probe": {n: new[n][1].name for n in names}}
        progress(group, kl)
    return out


def budget_types(src: GGUFFile, errors: dict[str, dict[Q, float]], sensitivities: dict[str, dict],
                 tensor_budget: int) -> tuple[dict[str, Q], float]:
    """(types, predicted summed KL) for the matrices to fit tensor_budget bytes (other tensors
    counted as they are)."""
    fixed = sum(aligned(t.n_bytes) for n, t in src.tensors.items() if not is_matrix(t.shape))
    options = {}
    for name in matrices(src):
        t = src.tensors[name]
        s = sensitivities.get(group_of(name))
        slope = 0.0 if s is None or s["err"] <= 0 else s["kl"] / s["err"]
        opts = [Option(q, aligned(tensor_bytes(q, t.shape)), slope * e) for q, e in errors[name].items()]
        options[name] = [o for o in opts if o.qtype == t.qtype] + [o for o in opts if o.qtype != t.qtype]
    types = assign(options, tensor_budget - fixed)
    predicted = sum(o.loss for n, opts in options.items() for o in opts if o.qtype == types[n])
    return types, predicted


# --- writing ----------------------------------------------------------------------------------

def header_bytes(src: GGUFFile) -> int:
    """The source's bytes before and between its tensors' data: what a rewrite with the same
    metadata and names spends besides the (aligned) tensors."""
    return src.path.stat().st_size - sum(aligned(t.n_bytes) for t in src.tensors.values())


def write_quantized(src: GGUFFile, out: str | Path, types: dict[str, Q], imatrix: dict[str, np.ndarray]) -> Path:
    """The source with each matrix in types[name] (copied where that is its type), the rest as is."""
    def tensors():
        for name, t in src.tensors.items():
            qtype = types.get(name, t.qtype)
            if qtype == t.qtype:
                yield name, t.data, t.qtype
            else:
                x = dequantize(t.data, t.qtype).reshape(t.shape[0], -1)
                yield name, quantize(x, qtype, imatrix.get(name)), qtype

    ftype = file_type((types[n], src.tensors[n].n_elements) for n in types if not n.startswith(("output.", "token_embd.")))
    return write_gguf(out, src, tensors(), ftype)


def summary(path: str | Path) -> dict:
    """Bytes by type of a written file."""
    g = GGUFFile(path)
    by_type: dict[str, int] = {}
    for t in g.tensors.values():
        by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + t.n_bytes
    n = sum(t.n_elements for t in g.tensors.values())
    return {"bytes": Path(path).stat().st_size, "bpw": round(8 * sum(by_type.values()) / n, 4), "bytes_by_type": by_type}


def imatrix_digest(imatrix: dict[str, np.ndarray]) -> str:
    """A short hash of an importance matrix: cached sensitivities (KL per unit of its weighted
    error) hold only with the importance they were measured with."""
    h = hashlib.sha256()
    for name in sorted(imatrix):
        h.update(name.encode())
        h.update(np.ascontiguousarray(imatrix[name], np.float32).tobytes())
    return h.hexdigest()[:16]


def sensitivity_cache_matches(cache: dict, src: GGUFFile, text_name: str | None, imatrix: dict) -> bool:
    return (cache.get("source_bytes") == src.path.stat().st_size and cache.get("tokens") == SENSITIVITY_TOKENS
            and cache.get("text") == text_name and cache.get("imatrix") == imatrix_digest(imatrix))


def load_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def quantize_file(source: str | Path, out: str | Path, *, qtype: Q | None = None, target_bytes: int | None = None,
                  target_bpw: float | None = None, imatrix_file: str | Path | None = None,
                  imatrix_out: str | Path | None = None, calibration_file: str | Path | None = None,
                  sensitivity_file: str | Path | None = None, log: Callable[[str], None] = lambda line: None) -> dict:
    """Write `out` from `source`: every matrix in qtype's static recipe, or the types that fit
    target_bytes (the whole file's) or target_bpw (bits per weight of all tensors). Importance
    comes from imatrix_file or is measured on calibration_file (saved to imatrix_out);
    sensitivities from sensitivity_file where it matches the source and text, else measured on
    calibration_file and written there. Returns what was written."""
    if sum(v is not None for v in (qtype, target_bytes, target_bpw)) != 1:
        raise ValueError("give exactly one of --type, --target-bpw, --target-bytes")
    src = GGUFFile(source)
    budgeted = qtype is None
    engine, ids, text_name = None, None, None
    if calibration_file is not None:
        text = Path(calibration_file).read_text(encoding="utf-8")
        text_name = Path(calibration_file).name
    elif budgeted:
        raise ValueError("--target-bpw/--target-bytes measure sensitivities: give --calibration-file")

    def calibration_engine():
        nonlocal engine, ids
        if engine is None:
            engine = Engine(source, backend="numpy", max_context=512)
            ids = engine.tokenizer.encode(text, add_special=True, parse_special=False)
            if len(ids) < SENSITIVITY_TOKENS:
                raise ValueError(f"--calibration-file has {len(ids)} tokens, fewer than {SENSITIVITY_TOKENS}")
        return engine, ids

    if imatrix_file is not None:
        imatrix = load_imatrix(imatrix_file, src)
    elif calibration_file is not None:
        eng, ids = calibration_engine()
        used = ids[:IMATRIX_TOKENS]
        log(f"importance matrix on {len(used)} tokens of {text_name}")
        imatrix = importance_matrix(eng, used)
        if imatrix_out is not None:
            save_imatrix(imatrix_out, imatrix, len(used), text_name)
    else:
        imatrix = {}

    report: dict = {"source": str(source), "out": str(out), "imatrix": bool(imatrix)}
    if not budgeted:
        types = static_types(src, qtype)
    else:
        n_weights = sum(t.n_elements for t in src.tensors.values())
        budget = target_bytes if target_bytes is not None else header_bytes(src) + int(target_bpw * n_weights / 8)
        errors = error_table(src, imatrix)
        cache = load_json(sensitivity_file) if sensitivity_file and Path(sensitivity_file).exists() else {}
        if sensitivity_cache_matches(cache, src, text_name, imatrix):
            sens = cache["groups"]
            log(f"sensitivities from {sensitivity_file}")
        else:
            eng, ids = calibration_engine()
            log(f"sensitivities on {SENSITIVITY_TOKENS} tokens of {text_name}")
            sens = measure_sensitivities(eng, ids[:SENSITIVITY_TOKENS], src, imatrix, errors,
                                         progress=lambda g, kl: log(f"  {g}: KL {kl:.5f}"))
            if sensitivity_file:
                with open(sensitivity_file, "w", encoding="utf-8") as f:
                    json.dump({"source": src.path.name, "source_bytes": src.path.stat().st_size, "text": text_name,
                               "tokens": SENSITIVITY_TOKENS, "imatrix": imatrix_digest(imatrix), "groups": sens},
                              f, indent=1)
        types, predicted = budget_types(src, errors, sens, budget - header_bytes(src))
        report |= {"target_bytes": budget, "predicted_kl": predicted}
    engine = None  # the calibration model's float32 weights go before the writer's buffers come
    write_quantized(src, out, types, imatrix)
    report |= summary(out) | {"types": {n: t.name for n, t in types.items()}}
    if budgeted and report["bytes"] > report["target_bytes"]:
        raise ValueError(f"{out} came out at {report['bytes']} bytes, over the target {report['target_bytes']}")
    return report
