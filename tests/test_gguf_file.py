"""GGUF parsing against gguf-py's reader, and malformed files that must fail cleanly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFError, GGUFFile
from workers.model.synthetic import rewrite_model


def test_matches_gguf_reader(tiny_model):
    path = tiny_model("qwen2")
    ours, ref = GGUFFile(path), GGUFReader(path)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value, key


def test_config_from_real_shapes(tiny_model):
    cfg = ModelConfig.from_gguf(GGUFFile(tiny_model("qwen2")))
    assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == ("qwen2", 2, 256, 4, 1, 64)
    assert cfg.rope_neox and cfg.qkv_bias and not cfg.tied_embeddings
    assert cfg.inv_freq[1] == pytest.approx(1_000_000.0 ** (-2 / 64))
    llama = ModelConfig.from_gguf(GGUFFile(tiny_model("llama", tied=True)))
    assert not llama.rope_neox and not llama.qkv_bias and llama.tied_embeddings
    assert llama.attn_scale == pytest.approx(64 ** -0.5) and llama.embed_scale == 1.0
    assert [llama.window(i) for i in range(2)] == [0, 0]


def test_gemma3_config_carries_what_llama_cpp_hard_codes(tiny_model, tmp_path):
    """The window from the file, the every-sixth-layer-global pattern, the local RoPE base
    10000 (the file's base on global layers), the scale 1/sqrt(head_dim) (64 here, where
    d_model / n_heads is 128: the 27B's rule would differ), embeddings times sqrt(d_model)."""
    path = tiny_model("gemma3", tied=True)
    cfg = ModelConfig.from_gguf(GGUFFile(path))
    assert (cfg.arch, cfg.n_layers, cfg.head_dim, cfg.sliding_window) == ("gemma3", 7, 64, 8)
    assert [cfg.window(i) for i in range(7)] == [8, 8, 8, 8, 8, 0, 8]
    assert cfg.rope_neox and cfg.tied_embeddings and not cfg.qkv_bias
    assert cfg.embed_scale == pytest.approx(16.0) and cfg.attn_scale == pytest.approx(64 ** -0.5)
    assert cfg.layer_inv_freq(0)[1] == pytest.approx(10000.0 ** (-2 / 64))
    assert cfg.layer_inv_freq(5)[1] == pytest.approx(1_000_000.0 ** (-2 / 64))
    src = GGUFFile(path)
    md = {k: v for k, v in src.metadata.items() if k != "gemma3.attention.sliding_window"}
    missing = rewrite_model(tmp_path / "m.gguf", md, dict(src.tensors))
    with pytest.raises(GGUFError, match="metadata key gemma3.attention.sliding_window is missing"):
        ModelConfig.from_gguf(GGUFFile(missing))


def _header_end(path) -> int:
    g = GGUFFile(path)
    return min(int(t.data.ctypes.data - np.frombuffer(g._mmap, np.uint8).ctypes.data) for t in g.tensors.values())


def test_truncated_files_fail_cleanly(tiny_model, tmp_path):
    data = tiny_model("llama", "Q8_0").read_bytes()
    end = _header_end(tiny_model("llama", "Q8_0"))
    cuts = sorted(set(np.linspace(0, end, 60, dtype=int).tolist() + [len(data) - 1, len(data) - 1000]))
    for cut in cuts:
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=str(bad)):
            GGUFFile(bad)


def test_corrupted_headers_never_crash(tiny_model, tmp_path):
    """Random byte flips in the header: a GGUFError naming the file, or a file that still parses."""
    path = tiny_model("llama", "Q4_0")
    data = bytearray(path.read_bytes())
    end = _header_end(path)
    rng = np.random.default_rng(1234)
    failures = 0
    for trial in range(300):
        bad = bytearray(data)
        for pos in rng.integers(0, min(end, 4096), size=rng.integers(1, 4)):
            bad[pos] = rng.integers(0, 256)
        target = tmp_path / f"flip{trial}.gguf"
        target.write_bytes(bad)
        try:
            g = GGUFFile(target)
            ModelConfig.from_gguf(g)
        except GGUFError as e:
            assert str(target) in str(e)
            failures += 1
    assert failures > 0  # the corruption did hit fields that matter


@pytest.mark.parametrize("mutate, message", [
    (lambda md, t: md.__setitem__("general.architecture", "gpt-j"), "unsupported architecture 'gpt-j'"),
    (lambda md, t: t.pop("blk.1.ffn_up.weight"), "'blk.1.ffn_up.weight' is missing"),
    (lambda md, t: md.pop("llama.block_count"), "llama.block_count is missing"),
    (lambda md, t: md.__setitem__("llama.attention.head_count", 3), "not a multiple"),
])
def test_semantic_errors_name_the_problem(tmp_path, tiny_model, mutate, message):
    src = GGUFFile(tiny_model("llama", "Q8_0"))
    md, tensors = dict(src.metadata), dict(src.tensors)
    mutate(md, tensors)
    path = rewrite_model(tmp_path / "m.gguf", md, tensors)
    with pytest.raises(GGUFError, match=message):
        ModelConfig.from_gguf(GGUFFile(path))


def test_unsupported_quant_type_names_tensor(tmp_path, tiny_model):
    src = GGUFFile(tiny_model("llama", "Q8_0"))
    tensors = dict(src.tensors)
    t = tensors["blk.0.attn_q.weight"]
    iq = np.zeros((t.shape[0], t.shape[1] // 256 * 136), np.uint8)
    tensors[t.name] = (iq, GGMLQuantizationType.IQ4_XS)
    path = rewrite_model(tmp_path / "iq.gguf", dict(src.metadata), tensors)
    with pytest.raises(GGUFError, match="'blk.0.attn_q.weight' has unsupported quantization type IQ4_XS"):
        ModelConfig.from_gguf(GGUFFile(path))


def test_not_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "absent.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        GGUFFile(tmp_path / "empty.gguf")


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _raw_gguf(*entries: tuple[str, int, bytes]) -> bytes:
    """A GGUF v3 header with no tensors: (key, value type, value bytes) entries written as given,
    which GGUFWriter would refuse (duplicates, deep nesting)."""
    body = b"".join(_gguf_string(key) + struct.pack("<I", vtype) + value for key, vtype, value in entries)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + body


_UINT32, _ARRAY = 4, 9


@pytest.mark.parametrize("entries, message", [
    ([("a.x", _UINT32, struct.pack("<I", 1))] * 2, "metadata key 'a.x' appears twice"),
    # 3,000 arrays each holding the next: the parser must not recurse that deep
    ([("a.deep", _ARRAY, struct.pack("<IQ", _ARRAY, 1) * 3000 + struct.pack("<IQ", _UINT32, 0))],
     "'a.deep' nests arrays"),
    # an array longer than any vocabulary, whose bytes the file does hold
    ([("a.big", _ARRAY, struct.pack("<IQ", 0, (1 << 22) + 1) + bytes((1 << 22) + 1))],
     "'a.big' has 4194305 elements"),
])
def test_header_counts_are_bounded_before_use(tmp_path, entries, message):
    path = tmp_path / "h.gguf"
    path.write_bytes(_raw_gguf(*entries))
    with pytest.raises(GGUFError, match=f"{path}: .*{message}"):
        GGUFFile(path)


@pytest.mark.parametrize("key, value, message", [
    # 4 bytes changed in a real file: must not walk 4 billion layers' tensor names
    ("llama.block_count", 0xFFFFFFFF, "llama.block_count = 4294967295 is more layers than"),
    ("llama.block_count", float("inf"), "llama.block_count = inf is not an integer"),
    ("llama.block_count", 2.5, "llama.block_count = 2.5 is not an integer"),
    ("llama.block_count", "2", "llama.block_count = '2' is not a single number"),
    # checked against the embedding before the RoPE table is built from it
    ("llama.embedding_length", 1 << 24, "llama.embedding_length = 16777216 does not match"),
    ("llama.attention.key_length", 1 << 30, "llama.attention.key_length = 1073741824 does not match"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "llama.attention.layer_norm_rms_epsilon = nan is not a finite"),
    ("llama.rope.freq_base", float("inf"), "llama.rope.freq_base = inf is not a finite"),
    ("llama.rope.scaling.type", 7, "llama.rope.scaling.type = 7 is not a string"),
])
def test_hyperparameters_are_checked_where_read(tmp_path, tiny_model, key, value, message):
    src = GGUFFile(tiny_model("llama", "Q8_0"))
    path = rewrite_model(tmp_path / "m.gguf", {**src.metadata, key: value}, dict(src.tensors))
    with pytest.raises(GGUFError, match=f"{path}: metadata {message}"):
        ModelConfig.from_gguf(GGUFFile(path))
