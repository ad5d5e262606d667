"""The safetensors file format, read and written with NumPy alone (no torch, no pickle).

A ``.safetensors`` file is

    8 bytes    N, the header length (unsigned little-endian 64-bit integer)
    N bytes    a JSON object: {"__metadata__": {str: str}, name: {"dtype": "F32",
               "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
               (padded with spaces so the data starts 8-byte aligned)
    the rest   the raw little-endian bytes of every tensor, C order; offsets count from
               the start of this buffer

Nothing in the file is executed: loading is JSON parsing plus ``np.frombuffer``. Every
inconsistency (a truncated file, offsets outside the buffer, a byte length that does not
match dtype × shape, an unknown dtype) raises a ``ValueError`` naming the tensor.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

# safetensors dtype names ↔ NumPy dtypes (all little-endian). BF16 has no NumPy dtype: it is
# read as the upper 16 bits of a float32 and widened.
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def _bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) → float32: the same sign, exponent and top mantissa bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> Tuple[dict, int]:
    """The parsed JSON header and the byte offset where the data buffer starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than the "
                             "8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file: its first 8 bytes announce a "
                             f"{n}-byte header in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, 8 + n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: str, name: str, info) -> tuple:
    """(dtype name, shape list, (begin, end)) of a header entry, every field validated."""
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or \
            not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r} "
                         "(needs exactly dtype, shape, data_offsets)")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or (dtype_name != "BF16" and dtype_name not in _DTYPES):
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name!r}; supported: "
                         f"{sorted(_DTYPES) + ['BF16']}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry: shape "
                         f"{shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry: data_offsets "
                         f"{offsets!r} is not [begin, end] with non-negative integers")
    return dtype_name, shape, tuple(offsets)


def load_file(path: str, names: Optional[set] = None) -> Dict[str, np.ndarray]:
    """Every tensor of the file (or those in ``names``) as NumPy arrays (BF16 → float32)."""
    header, start = read_header(path)
    buffer_size = os.path.getsize(path) - start
    tensors = {}
    with open(path, "rb") as f:
        data = f.read()[start:]
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name, shape, (begin, end) = _check_entry(path, name, info)
        itemsize = 2 if dtype_name == "BF16" else _DTYPES[dtype_name].itemsize
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not 0 <= begin <= end <= buffer_size or end - begin != expected:
            raise ValueError(f"{path}: tensor {name!r} ({dtype_name}, shape {shape}) needs "
                             f"{expected} bytes but its data_offsets are [{begin}, {end}] in a "
                             f"{buffer_size}-byte buffer")
        spans.append((begin, end, name))
        if names is not None and name not in names:
            continue
        if dtype_name == "BF16":
            array = _bf16_to_float32(np.frombuffer(data, np.dtype("<u2"), expected // 2, begin))
        else:
            array = np.frombuffer(data, _DTYPES[dtype_name], expected // itemsize, begin).copy()
        tensors[name] = array.reshape(shape)
    # the format requires the buffer to be covered exactly: no overlaps, no holes
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data buffer, "
                             f"expected {position} (tensors must tile the buffer without gaps "
                             "or overlaps)")
        position = end
    if position != buffer_size:
        raise ValueError(f"{path}: the tensors cover {position} bytes of a {buffer_size}-byte "
                         "data buffer (trailing bytes)")
    return tensors


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` atomically (a temporary file in the same folder, then a
    rename: a killed process leaves either the old file or the new one, never half of one).

    Tensors are laid out sorted by name; the header is padded to 8 bytes like the reference
    writer's.
    """
    if "__metadata__" in tensors:
        raise ValueError("a tensor cannot be named '__metadata__' (the name of the header's "
                         "metadata entry)")
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if np.dtype(dtype) not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                             f"store; supported: {sorted(str(d) for d in _NAMES)}")
        raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    write_atomically(path, [struct.pack("<Q", len(encoded)), encoded, *chunks])


def write_atomically(path: str, chunks) -> None:
    """Write bytes to a temporary file beside ``path``, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
