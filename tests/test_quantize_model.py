"""`ntr quantize`: the static recipe, the budgeted assignment, the importance matrix, the
sensitivity swap and the written file (tiny synthetic models; the real model's numbers are in
docs/benchmarks.md, "Quantization (issue 18)")."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from kernels.quants import dequantize
from workers.engine.engine import Engine
from workers.engine.quant_calibration import importance_matrix, log_probs, swapped, weight_slots
from workers.engine.quantize_model import load_imatrix, save_imatrix
from workers.model.gguf_file import GGUFFile
from workers.model.quant_recipe import Option, Q, assign, candidates, descend, group_of, static_type

# any text of a few hundred tokens that is no evaluation text: this repo's own code
CALIBRATION = str(Path(__file__).resolve().parents[1] / "kernels" / "quantize.py")


def test_static_recipe_falls_back_as_llama_cpp_on_896_wide_rows():
    # llama.cpp 0.3.36's own fallbacks (its Q3_K_M log: q3_K -> q4_0, q4_K -> q5_0, q5_K -> q5_1)
    assert static_type("blk.0.attn_q.weight", (896, 896), Q.Q3_K, True) == Q.Q4_0
    assert static_type("blk.0.attn_q.weight", (896, 896), Q.Q4_K, True) == Q.Q5_0
    assert static_type("blk.0.attn_q.weight", (896, 896), Q.Q5_K, True) == Q.Q5_1
    assert static_type("blk.0.ffn_up.weight", (4864, 896), Q.Q6_K, True) == Q.Q8_0
    assert static_type("blk.0.ffn_down.weight", (896, 4864), Q.Q6_K, True) == Q.Q6_K
    assert static_type("blk.0.ffn_down.weight", (896, 5120), Q.Q3_K, True) == Q.Q3_K
    # the output head: Q6_K, Q8_0 where rows are not 256-multiples; a tied embedding is the head
    assert static_type("output.weight", (1000, 896), Q.Q4_0, True) == Q.Q8_0
    assert static_type("output.weight", (1000, 1024), Q.Q2_K, True) == Q.Q6_K
    assert static_type("token_embd.weight", (1000, 1024), Q.Q2_K, False) == Q.Q6_K
    assert static_type("token_embd.weight", (1000, 1024), Q.Q2_K, True) == Q.Q2_K
    with pytest.raises(ValueError, match="--type must be one of"):
        static_type("x", (4, 32), Q.F16, True)


def test_candidates_only_go_down_from_the_source():
    assert candidates((896, 896), Q.Q5_0) == [Q.Q5_0, Q.Q4_1, Q.Q4_0]
    assert candidates((896, 4864), Q.Q4_K) == [Q.Q4_K, Q.Q3_K, Q.Q2_K]
    assert candidates((128, 896), Q.Q8_0) == [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0]


def test_group_of():
    assert group_of("blk.3.attn_k.weight") == "blk.3.attn_qkv"
    assert group_of("blk.3.ffn_up.weight") == "blk.3.ffn_gate_up"
    assert group_of("blk.12.ffn_down.weight") == "blk.12.ffn_down"
    assert group_of("output.weight") == "output.weight"


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal_at_the_bytes_it_spends(seed):
    """The descent over convex hulls stops at a point of the Lagrangian relaxation: no choice that
    spends no more bytes has less loss (checked against every combination); filling the room it
    leaves only lowers the loss, within the budget."""
    rng = np.random.default_rng(seed)
    options = {}
    for m in range(5):
        sizes = sorted(rng.choice(np.arange(10, 100), 4, replace=False), reverse=True)
        losses = np.concatenate([[0], np.sort(rng.uniform(0, 10, 3))]) * rng.uniform(0.1, 3)
        options[f"m{m}"] = [Option(Q.Q8_0, int(sizes[0]), 0.0)] + [
            Option(q, int(s), float(loss)) for q, s, loss in zip((Q.Q5_0, Q.Q4_1, Q.Q4_0), sizes[1:], losses[1:])]
    names = list(options)
    floor = sum(min(o.nbytes for o in v) for v in options.values())
    top = sum(v[0].nbytes for v in options.values())
    for budget in np.linspace(floor, top, 7).astype(int):
        stop = descend(options, int(budget))
        spent, loss = sum(o.nbytes for o in stop.values()), sum(o.loss for o in stop.values())
        assert spent <= budget
        best = min(sum(o.loss for o in combo) for combo in itertools.product(*options.values())
                   if sum(o.nbytes for o in combo) <= spent)
        assert loss <= best + 1e-9
        got = assign(options, int(budget))
        filled = [next(o for o in options[n] if o.qtype == got[n]) for n in names]
        assert sum(o.nbytes for o in filled) <= budget and sum(o.loss for o in filled) <= loss + 1e-12
    with pytest.raises(ValueError, match="below the"):
        assign(options, floor - 1)


def test_importance_matrix_is_the_mean_square_of_each_product_input(tiny_model):
    path = tiny_model("qwen2")
    engine = Engine(path, max_context=64)
    ids = list(range(10, 42))
    imatrix = importance_matrix(engine, ids, ctx=16)
    # layer 0's Q/K/V input in closed form: RMSNorm of the embedded tokens times attn_norm
    gguf, c = engine.gguf, engine.config
    x = dequantize(gguf.tensors["token_embd.weight"].data[ids], gguf.tensors["token_embd.weight"].qtype)
    norm = dequantize(gguf.tensors["blk.0.attn_norm.weight"].data, Q.F32)
    h = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + c.rms_eps) * norm
    want = np.mean(h ** 2, axis=0)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        assert np.allclose(imatrix[name], want, rtol=1e-4)
    matrices = {n for n, t in gguf.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"}
    assert set(imatrix) == matrices
    assert all(v.shape == (gguf.tensors[n].shape[1],) and (v > 0).all() for n, v in imatrix.items())


def test_swap_changes_the_output_and_restores_it(tiny_model):
    engine = Engine(tiny_model("llama"), max_context=64)
    ids = list(range(5, 37))
    before = log_probs(engine, ids)
    slots = weight_slots(engine)
    t = engine.gguf.tensors["blk.1.ffn_up.weight"]
    zeros = np.zeros_like(np.asarray(t.data))
    e = engine.gguf.tensors["token_embd.weight"]
    with swapped(engine, slots, {t.name: (zeros, t.qtype), e.name: (np.asarray(e.data)[::-1].copy(), e.qtype)}):
        array, rows = slots[t.name]
        assert not array[rows].any()
        assert not np.allclose(log_probs(engine, ids), before)
    assert np.array_equal(log_probs(engine, ids), before)


def test_imatrix_file_round_trip_and_checks(tiny_model, tmp_path):
    src = GGUFFile(tiny_model("llama"))
    imatrix = {"blk.0.attn_q.weight": np.linspace(0.1, 2, 256).astype(np.float32)}
    save_imatrix(tmp_path / "im.npz", imatrix, 100, "x.txt")
    assert np.array_equal(load_imatrix(tmp_path / "im.npz", src)["blk.0.attn_q.weight"], imatrix["blk.0.attn_q.weight"])
    save_imatrix(tmp_path / "bad.npz", {"blk.0.attn_q.weight": np.ones(100, np.float32)}, 1, "x")
    with pytest.raises(ValueError, match="the matrix takes 256 columns"):
        load_imatrix(tmp_path / "bad.npz", src)
    save_imatrix(tmp_path / "bad2.npz", {"nope.weight": np.ones(256, np.float32)}, 1, "x")
    with pytest.raises(ValueError, match="'nope.weight' is no matrix"):
        load_imatrix(tmp_path / "bad2.npz", src)


def test_cli_static_type_writes_a_file_the_engine_loads(tiny_model, tmp_path, capsys):
    source = tiny_model("qwen2")
    out = tmp_path / "q3.gguf"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--type", "q3_k", "--types"]) == 0
    report = json.loads(capsys.readouterr().out)
    src, got = GGUFFile(source), GGUFFile(out)
    assert {k: v for k, v in got.metadata.items() if k != "general.file_type"} == \
        {k: v for k, v in src.metadata.items() if k != "general.file_type"}
    assert {k: v for k, v in got.metadata_types.items() if k != "general.file_type"} == src.metadata_types
    assert got.metadata["general.file_type"] == 12  # MOSTLY_Q3_K_M
    for name, t in got.tensors.items():
        s = src.tensors[name]
        want = s.qtype if len(s.shape) == 1 else (Q.Q6_K if name == "output.weight" else Q.Q3_K)
        assert t.qtype == want and t.shape == s.shape and report["types"].get(name, want.name) == want.name
        if len(s.shape) == 1:
            assert np.array_equal(t.data, s.data)
    assert report["bytes"] == out.stat().st_size
    engine = Engine(out, max_context=64)
    assert np.isfinite(log_probs(engine, list(range(3, 19)))).all()


def test_cli_budget_fits_the_bytes_and_reuses_sensitivities(tiny_model, tmp_path, capsys):
    source = tiny_model("llama")  # a 32k vocabulary: the head quantizes 5x faster than qwen2's
    size = source.stat().st_size
    target = int(size * 0.8)
    out, sens, im = tmp_path / "b.gguf", tmp_path / "sens.json", tmp_path / "im.npz"
    args = ["quantize", "--model", str(source), "--out", str(out), "--target-bytes", str(target),
            "--calibration-file", CALIBRATION, "--sensitivities", str(sens), "--imatrix-out", str(im)]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert out.stat().st_size == first["bytes"] <= target
    groups = json.loads(sens.read_text())["groups"]
    assert {"output.weight", "blk.0.attn_qkv", "blk.1.ffn_down"} <= set(groups)
    assert all(g["kl"] > 0 and g["err"] > 0 for g in groups.values())
    Engine(out, max_context=64)
    # the second run reads both files back and chooses the same
    assert main(args[:-2] + ["--imatrix-file", str(im)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["bytes"] == first["bytes"] and second["predicted_kl"] == pytest.approx(first["predicted_kl"])


def test_cli_refuses_bad_input(tiny_model, tmp_path, capsys):
    source = str(tiny_model("llama"))
    assert main(["quantize", "--model", source, "--out", str(tmp_path / "x.gguf"), "--type", "Q9_9"]) == 2
    assert "--type: unknown type 'Q9_9'" in capsys.readouterr().err
    assert main(["quantize", "--model", source, "--out", str(tmp_path / "x.gguf"), "--target-bytes", "1000"]) == 2
    assert "give --calibration-file" in capsys.readouterr().err
    assert main(["quantize", "--model", source, "--out", str(tmp_path / "x.gguf"), "--target-bpw", "-1"]) == 2
    assert "--target-bpw must be > 0" in capsys.readouterr().err
