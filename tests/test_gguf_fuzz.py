"""GGUF fuzzer: every mutant of a model file loads or ends in one clean error.

Mutations: truncations; byte flips in the header, metadata and tensor-info regions; absurd
counts and lengths written over the file's own u64 fields (tensor and metadata counts,
string and array lengths, dimensions, offsets); wrong or unknown type codes over its u32
fields (value types, array element types, dimension counts, quantization types); duplicate
metadata keys and tensor names (one name copied over another of the same length).

Targets: every mutant of a tiny synthetic model through the whole load path (`Engine` on the
NumPy backend, then a prompt through its chat template), and every header mutant of the
default model through parsing and the tensor checks (GGUFFile, ModelConfig.from_gguf,
Tokenizer.from_metadata; its tensor data is left as a hole: nothing before weight
preparation reads it). Each mutant runs in a forked child limited to 1 GiB of memory beyond
what the test process holds and to 10 s; its outcome must be success or a ValueError,
LookupError or OSError whose message names the file.

Fixed seed (derandomize) and 50 mutants per target in CI (~25 s); a longer run, with the outcome
counts printed (docs/reliability.md):  NTR_FUZZ_EXAMPLES=5000 pytest -s tests/test_gguf_fuzz.py
"""

from __future__ import annotations

import collections
import mmap
import os
import resource
import signal
import struct
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.model.gguf_file import _ARRAY, _NUMPY_DTYPES, _SCALAR_FORMATS, _STRING, _Cursor
from workers.model.synthetic import Shape, uniform_mix, write_model

EXAMPLES = int(os.environ.get("NTR_FUZZ_EXAMPLES", "50"))
TIME_LIMIT_S = 10
MEMORY_LIMIT = 1 << 30
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
# The tiniest model that still has every tensor role, GQA and an SPM vocabulary (32k tokens).
TINY = Shape("llama", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=128, context_length=64)
ABSURD_U64 = (0, 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63, 2**64 - 1)
ODD_U32 = (*range(14), 30, 31, 39, 255, 2**31, 2**32 - 1)

OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@dataclass(frozen=True)
class Layout:
    """Where a file's header parts lie, and the offsets of its count and type fields."""
    size: int
    metadata_start: int
    tensor_info_start: int
    header_end: int
    u64_fields: tuple[int, ...]  # counts, string and array lengths, dimensions, tensor offsets
    u32_fields: tuple[int, ...]  # value, element and quantization types, dimension counts
    names: tuple[tuple[int, int], ...]  # (offset, length) of every key and tensor name


def layout(path: Path) -> Layout:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        c.pos = 8
        u64, u32, names = [8, 16], [], []
        n_tensors, n_kv = c.unpack("<Q", ""), c.unpack("<Q", "")

        def string() -> None:
            u64.append(c.pos)
            names.append((c.pos + 8, struct.unpack_from("<Q", buf, c.pos)[0]))
            c.string("")

        def value(vtype: int) -> None:
            if vtype in _SCALAR_FORMATS:
                c.unpack(_SCALAR_FORMATS[vtype], "")
            elif vtype == _STRING:
                u64.append(c.pos)
                c.string("")
            else:
                assert vtype == _ARRAY
                u32.append(c.pos)
                etype = c.unpack("<I", "")
                u64.append(c.pos)
                count = c.unpack("<Q", "")
                if etype in _NUMPY_DTYPES:
                    c.pos += count * struct.calcsize(_SCALAR_FORMATS[etype])
                else:
                    for i in range(count):
                        if i < 4:  # a few element lengths are enough targets
                            value(etype)
                        else:
                            c.pos += 8 + struct.unpack_from("<Q", buf, c.pos)[0] if etype == _STRING else 0
        for _ in range(n_kv):
            string()
            u32.append(c.pos)
            value(c.unpack("<I", ""))
        tensor_info_start = c.pos
        for _ in range(n_tensors):
            string()
            u32.append(c.pos)
            n_dims = c.unpack("<I", "")
            u64.extend(c.pos + 8 * i for i in range(n_dims))
            c.pos += 8 * n_dims
            u32.append(c.pos)
            c.pos += 4
            u64.append(c.pos)
            c.pos += 8
        return Layout(len(buf), 24, tensor_info_start, c.pos, tuple(u64), tuple(u32), tuple(names))


@st.composite
def mutations(draw, lay: Layout) -> list[tuple[int, bytes]] | int:
    """A list of (offset, bytes) writes, or an int: the length to truncate the file to."""
    kind = draw(st.sampled_from(["truncate", "flip", "count", "type", "duplicate"]))
    if kind == "truncate":
        return draw(st.one_of(st.integers(0, lay.header_end), st.integers(0, lay.size - 1)))
    if kind == "flip":
        start, end = draw(st.sampled_from([(0, lay.metadata_start), (lay.metadata_start, lay.tensor_info_start),
                                           (lay.tensor_info_start, lay.header_end)]))
        at = st.integers(start, end - 1)
        return [(draw(at), bytes([draw(st.integers(0, 255))])) for _ in range(draw(st.integers(1, 4)))]
    if kind == "count":
        value = draw(st.one_of(st.sampled_from(ABSURD_U64 + (lay.size,)), st.integers(0, 2**64 - 1)))
        return [(draw(st.sampled_from(lay.u64_fields)), struct.pack("<Q", value))]
    if kind == "type":
        return [(draw(st.sampled_from(lay.u32_fields)), struct.pack("<I", draw(st.sampled_from(ODD_U32))))]
    # duplicate: a key or tensor name copied over another of the same length
    source = draw(st.sampled_from([n for n in lay.names if any(m[1] == n[1] and m != n for m in lay.names)]))
    target = draw(st.sampled_from([m for m in lay.names if m[1] == source[1] and m != source]))
    return [(target[0], ("copy", source[0], source[1]))]


def write_mutant(original: Path, lay: Layout, mutation, out: Path, header_only: bool) -> None:
    """The mutant file; with header_only, past the header a hole of the original size."""
    with open(original, "rb") as f:
        data = bytearray(f.read(lay.header_end + 64 if header_only else lay.size))
    size = mutation if isinstance(mutation, int) else lay.size
    if isinstance(mutation, int):
        del data[mutation:]
    else:
        for at, patch in mutation:
            if isinstance(patch, tuple):
                _, src, n = patch
                data[at:at + n] = data[src:src + n]
            else:
                data[at:at + len(patch)] = patch
    with open(out, "wb") as f:
        f.write(data)
        f.truncate(size)


def run_limited(target, path: Path) -> str:
    """Run target(path) in a forked child under the memory and time limits; its outcome:
    'ok', 'clean <Type>', or a failure description."""
    with open("/proc/self/status") as f:
        held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            resource.setrlimit(resource.RLIMIT_DATA, (held + MEMORY_LIMIT, held + MEMORY_LIMIT))
            target(path)
            outcome = "ok"
        except (ValueError, LookupError, OSError) as e:
            message = str(e)
            outcome = (f"clean {type(e).__name__}" if str(path) in message and "\n" not in message
                       else f"unnamed {type(e).__name__}: {message[:300]!r}")
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            outcome = f"crash {type(e).__name__}: {''.join(traceback.format_exception(e))[-1500:]}"
        os.write(write, outcome.encode()[:4000])
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + TIME_LIMIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return f"timeout after {TIME_LIMIT_S} s"
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode()
    return outcome or f"child died (status {status})"


def check(name: str, outcome: str) -> None:
    OUTCOMES[name][outcome if outcome == "ok" or outcome.startswith("clean") else "FAILED"] += 1
    assert outcome == "ok" or outcome.startswith("clean "), outcome


def load_engine(path: Path) -> None:
    from workers.engine.engine import Engine

    engine = Engine(path, backend="numpy")
    engine.chat_prompt_ids([{"role": "user", "content": "hi"}])


def parse_and_check(path: Path) -> None:
    from workers.model.config import ModelConfig
    from workers.model.gguf_file import GGUFFile
    from workers.model.tokenizer import Tokenizer

    gguf = GGUFFile(path)
    ModelConfig.from_gguf(gguf)
    Tokenizer.from_metadata(gguf.metadata, source=str(gguf.path))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, vocab_dir) -> Path:
    from gguf import GGMLQuantizationType

    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    return write_model(path, TINY, vocab_dir / "ggml-vocab-llama-spm.gguf", mix=uniform_mix(GGMLQuantizationType.Q8_0))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, counts in OUTCOMES.items():
        print(f"\n{name}: {sum(counts.values())} mutants: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


@pytest.mark.parametrize("name, model, load, header_only", [
    ("synthetic model, Engine", "tiny_path", load_engine, False),
    ("default model header, parse + checks", "real_model_path", parse_and_check, True),
], ids=["synthetic-model", "default-model-header"])
def test_mutants_load_or_fail_cleanly(request, tmp_path, name, model, load, header_only):
    path = request.getfixturevalue(model)
    lay = layout(path)
    assert run_limited(load, path) == "ok"

    @FUZZ
    @given(mutations(lay))
    def one(mutation):
        out = tmp_path / "mutant.gguf"
        write_mutant(path, lay, mutation, out, header_only=header_only)
        check(name, run_limited(load, out))

    one()
