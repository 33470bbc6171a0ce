"""Writing a model's GGUF anew: another file's metadata (tokenizer, chat template,
hyperparameters, each value with its GGUF type) with new tensors, through gguf-py's GGUFWriter.
What `ntr quantize` writes; llama.cpp loads it as it loads its own files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

from workers.model.gguf_file import GGUFFile

Q = GGMLQuantizationType
# general.file_type by a file's main matrix type (K-quants as llama.cpp's _M recipes name them)
FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1, Q.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_M, Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    Q.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
# keys the writer sets itself
_WRITTEN_BY_WRITER = {"general.architecture", "general.alignment", "general.file_type"}


def file_type(types: Iterable[tuple[GGMLQuantizationType, int]]) -> LlamaFileType:
    """general.file_type for matrices given as (type, element count): the type holding the most
    weights names the file, as llama.cpp names a mixed recipe by its main type."""
    counts = Counter()
    for qtype, n in types:
        counts[qtype] += n
    return FILE_TYPES[counts.most_common(1)[0][0]]


def write_gguf(path: str | Path, source: GGUFFile, tensors: Iterable[tuple[str, np.ndarray, GGMLQuantizationType]],
               ftype: LlamaFileType) -> Path:
    """Write `source`'s metadata (general.file_type replaced by ftype) and `tensors`: (name, data,
    type), data float32 values for F32 and raw blocks uint8 [rows, row_bytes] otherwise."""
    path = Path(path)
    w = GGUFWriter(str(path), source.architecture)
    for key, value in source.metadata.items():
        if key in _WRITTEN_BY_WRITER:
            continue
        vtype, etype = source.metadata_types[key]
        w.add_key_value(key, value, GGUFValueType(vtype), None if etype is None else GGUFValueType(etype))
    w.add_file_type(int(ftype))
    for name, data, qtype in tensors:
        if qtype == Q.F32:
            w.add_tensor(name, np.asarray(data).view(np.float32))
        else:
            w.add_tensor(name, np.asarray(data), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
