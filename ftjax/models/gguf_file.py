"""A GGUF file's metadata and tensor table, read fast; the tensor bytes stay memory-mapped.

`gguf.GGUFReader` builds one numpy view per metadata item, so a 262k-token vocabulary with its
scores and token types (Gemma 3) takes it 15-25 s. This reads the same format (GGUF v2 / v3,
little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) with one `struct` call per
value and numpy for number arrays, in about a second:

    header = read("gemma-3-270m-q4_k_m.gguf")
    header.metadata['gemma3.block_count']            # 18 (values as gguf's `ReaderField.contents()`)
    t = header.tensors[0]; t.name, t.tensor_type.name, t.shape   # numpy order: [out, in]
    gguf.quants.dequantize(t.data, t.tensor_type)    # t.data: the raw bytes (uint8, memory-mapped)

Every fault of the file itself (bad magic, truncation, a tensor past the end) is one `ModelError`.
"""
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from ftjax.errors import MissingFileError, ModelError

VERSIONS = (2, 3)  # v1 counted in 32 bits and is gone from the wild
# GGUF metadata value types: the fixed-size ones (struct format), 8 = string, 9 = array
_SCALAR = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class Tensor(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple  # numpy / PyTorch order: ggml's [in, out] is (out, in)
    n_bytes: int
    data: np.ndarray  # uint8 [n_bytes], a read-only view of the mapped file


class Header(NamedTuple):
    metadata: dict  # key -> int / float / bool / str, or a list of them
    tensors: list  # [Tensor] in file order


def read(path) -> Header:
    """The metadata and tensor table of the GGUF file at `path` (tensor data mapped, not read)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"GGUF file {path!r} " + ('is a directory, not a file.' if os.path.isdir(path) else
                                                         'does not exist.'))
    if os.path.getsize(path) < 24:
        raise ModelError(f"{path}: not a valid GGUF file (only {os.path.getsize(path)} bytes).")
    blob = np.memmap(path, mode='r', dtype=np.uint8)
    try:
        return _parse(blob, path)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e}).") from e


def _parse(blob, path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(blob[:4]) != b'GGUF':
        raise ModelError(f"{path}: not a valid GGUF file (it does not start with the bytes 'GGUF').")
    version, n_tensors, n_kv = struct.unpack_from('<IQQ', blob, 4)
    if version not in VERSIONS:
        what = 'big-endian, which is not supported' if version >> 16 else f'not one of v{VERSIONS}'
        raise ModelError(f"{path}: not a valid GGUF file (GGUF version {version}: {what}).")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _string(blob, pos)
        (kind,), pos = struct.unpack_from('<I', blob, pos), pos + 4
        metadata[key], pos = _value(blob, pos, kind)
    table = []
    for _ in range(n_tensors):
        name, pos = _string(blob, pos)
        (n_dims,), pos = struct.unpack_from('<I', blob, pos), pos + 4
        dims, pos = struct.unpack_from(f'<{n_dims}Q', blob, pos), pos + 8 * n_dims
        (kind, offset), pos = struct.unpack_from('<IQ', blob, pos), pos + 12
        table.append((name, dims, kind, offset))
    align = int(metadata.get('general.alignment', 32))
    start = (pos + align - 1) // align * align
    tensors, seen = [], set()
    for name, dims, kind, offset in table:
        if name in seen:
            raise ModelError(f"{path}: not a valid GGUF file (tensor {name!r} is listed twice).")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise ModelError(f"{path}: tensor {name!r} has ggml type {kind}, which the installed gguf package "
                             f"does not know (pip install -U gguf).") from None
        block, size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * size
        begin = start + offset
        if begin + n_bytes > blob.shape[0]:
            raise ModelError(f"{path}: not a valid GGUF file (tensor {name!r} runs past the end of the file: "
                             f"truncated?).")
        tensors.append(Tensor(name, qtype, tuple(int(d) for d in reversed(dims)), n_bytes,
                              blob[begin:begin + n_bytes]))
    return Header(metadata, tensors)


def _string(blob, pos):
    (n,) = struct.unpack_from('<Q', blob, pos)
    end = pos + 8 + n
    if end > blob.shape[0]:
        raise ValueError(f'a string at byte {pos} runs past the end of the file')
    return bytes(blob[pos + 8:end]).decode('utf-8'), end


def _value(blob, pos, kind):
    if kind in _SCALAR:
        fmt = '<' + _SCALAR[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == STRING:
        return _string(blob, pos)
    if kind != ARRAY:
        raise ValueError(f'unknown metadata value type {kind} at byte {pos}')
    sub, count = struct.unpack_from('<IQ', blob, pos)
    pos += 12
    if sub in _NUMPY:
        dtype = np.dtype(_NUMPY[sub]).newbyteorder('<')
        end = pos + count * dtype.itemsize
        if end > blob.shape[0]:
            raise ValueError(f'an array at byte {pos} runs past the end of the file')
        return np.frombuffer(blob, dtype, count, pos).tolist(), end
    values = []
    for _ in range(count):  # strings (a vocabulary, merges) or nested arrays
        v, pos = _value(blob, pos, sub)
        values.append(v)
    return values, pos
