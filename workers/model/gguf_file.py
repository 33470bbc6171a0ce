"""GGUF container: header, metadata and memory-mapped tensor views.

Parsed with `struct` over an `mmap` instead of `gguf.GGUFReader`: the reader builds a
numpy view per metadata element and takes ~10 s on a 150k-token vocabulary; this takes
well under a second and lets every malformed-file error name the file and the field.
Tensor bytes are never copied: each tensor is a read-only numpy view into the mapping.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Bounds on what a header may make the parser build, checked before anything is built from a
# count: every byte of metadata becomes a Python object several times its size, so a count
# that fits a multi-GB file must still not turn into gigabytes of lists. Real models stay far
# below them (a 256k-token vocabulary with its merges is ~15 MB and ~800k values).
MAX_HEADER_BYTES = 64 << 20  # metadata and tensor infos together
MAX_ARRAY_LENGTH = 1 << 22
MAX_ARRAY_DEPTH = 4  # arrays of arrays: none in practice; bounds the parser's recursion

# GGUF metadata value type codes -> struct format (None: variable length).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")  # a string's length
_NUMPY_DTYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and the part."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores the innermost dim first)
    data: np.ndarray  # uint8 view of the raw (possibly quantized) bytes, rows first

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return self.data.nbytes


class _Cursor:
    """Reads the header: never past the end of the file, nor past MAX_HEADER_BYTES."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)
        self.limit = min(self.size, MAX_HEADER_BYTES)

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what}")
        if self.pos + n > self.limit:
            raise self.fail(f"{what} would take the header past {MAX_HEADER_BYTES >> 20} MiB")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str]:
        """count strings one after another (a u64 length, then UTF-8 bytes), in one loop: a
        vocabulary is ~150k of them (opening the default model: 0.19 s with a call per
        string, 0.12 s so)."""
        buf, pos, limit = self.buf, self.pos, self.limit
        out = []
        for _ in range(count):
            if pos + 8 > limit:
                self.pos = pos
                self.need(8, what)  # raises: truncated, or past the header's limit
            (n,) = _U64.unpack_from(buf, pos)
            pos += 8
            if pos + n > limit:
                self.pos = pos
                self.need(n, what)
            raw = buf[pos:pos + n]
            pos += n
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:  # some vocabularies' byte tokens are not UTF-8 on their own
                out.append(raw.decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth == MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            etype = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if count > MAX_ARRAY_LENGTH:
                raise self.fail(f"{what} has {count} elements, more than {MAX_ARRAY_LENGTH}")
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype])
                self.need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if etype == _STRING:
                # Every string takes at least its 8-byte length: bounds the count up front.
                self.need(count * 8, what)
                return self.strings(count, what)
            if etype == _ARRAY:
                self.need(count * 12, what)
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise self.fail(f"unknown array element type {etype} in {what}")
        raise self.fail(f"unknown value type {vtype} in {what}")


def shown_value(value: Any) -> str:
    """A metadata value in an error line: its repr, cut short (it may be a whole array)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def tensor_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


class GGUFFile:
    """An opened GGUF file: `metadata` (plain Python values) and `tensors` by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            self._file.close()
            raise GGUFError(f"{self.path}: empty file, not GGUF") from None
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise

    def _parse(self) -> None:
        c = _Cursor(self._mmap, self.path)
        c.need(4, "magic")
        if self._mmap[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {self._mmap[:4]!r})")
        c.pos = 4
        self.version = c.unpack("<I", "version")
        if self.version not in (2, 3):
            raise c.fail(f"unsupported GGUF version {self.version}")
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "metadata count")
        # Each entry takes at least a few bytes: reject absurd counts before looping.
        c.need(n_kv * 12 + n_tensors * 24, "header entries")

        self.metadata: dict[str, Any] = {}
        # each key's GGUF value type code and, for arrays, the elements' (what a writer copying
        # the metadata needs: plain Python values lose int widths and signedness)
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            vtype = c.unpack("<I", f"type of {key!r}")
            if vtype == _ARRAY:
                c.need(4, f"metadata {key!r}")
                etype = struct.unpack_from("<I", self._mmap, c.pos)[0]
            self.metadata_types[key] = (vtype, etype if vtype == _ARRAY else None)
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")

        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            n_dims = c.unpack("<I", f"dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [c.unpack("<Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
            code = c.unpack("<I", f"type of tensor {name!r}")
            offset = c.unpack("<Q", f"offset of tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(code)
            except ValueError:
                raise c.fail(f"tensor {name!r} has unknown type code {code}") from None
            if any(d == 0 for d in dims) or np.prod(dims, dtype=np.float64) > 2**48:
                raise c.fail(f"tensor {name!r} has invalid shape {dims}")
            infos.append((name, qtype, tuple(reversed(dims)), offset))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: invalid general.alignment {alignment!r}")
        data_start = -(-c.pos // alignment) * alignment

        self.tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            try:
                nbytes = tensor_nbytes(qtype, shape)
            except ValueError as e:
                raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None
            start = data_start + offset
            if offset % alignment or start + nbytes > len(self._mmap):
                raise GGUFError(
                    f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies outside "
                    f"the file ({len(self._mmap)} bytes) or is misaligned: file truncated?"
                )
            raw = np.frombuffer(self._mmap, dtype=np.uint8, count=nbytes, offset=start)
            row_bytes = nbytes // int(np.prod(shape[:-1], dtype=np.int64))
            self.tensors[name] = TensorInfo(name, qtype, shape, raw.reshape(*shape[:-1], row_bytes))

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no general.architecture")
        return arch

    def close(self) -> None:
        # Views into the mapping may still be alive (cached weights); let GC unmap then.
        self._file.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
