"""The safetensors file format, read and written through Hugging Face's ``safetensors``
package (its Rust parser, fuzzed and security-audited), with the two things it lacks:

* **bf16 → float32 on read.** NumPy has no bfloat16 and ``safetensors.numpy`` raises a
  ``TypeError`` on such a tensor; we read its raw bytes at the offsets the parser validated
  and widen them (bf16 is the upper half of a float32).
* **Atomic writes.** The package writes in place; a killed process would leave half a file.
  We let it write a temporary file beside the target, fsync it, then rename over the target.

A ``.safetensors`` file is

    8 bytes    N, the header length (unsigned little-endian 64-bit integer)
    N bytes    a JSON object: {"__metadata__": {str: str}, name: {"dtype": "F32",
               "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
               (padded with spaces so the data starts 8-byte aligned)
    the rest   the raw little-endian bytes of every tensor, C order; offsets count from
               the start of this buffer, and must tile it exactly (no gaps, no overlaps)

Nothing in the file is executed. The package decides whether a file is valid; when it
refuses one, its error (a ``SafetensorError``) becomes a ``ValueError`` naming the file, and
our own reading of the header adds which tensor is at fault when it can tell.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

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


def dtype_name(dtype) -> str:
    """The safetensors name of a NumPy dtype ('F32' for float32, ...); ValueError if none."""
    dtype = np.dtype(dtype)
    dtype = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors; supported: "
                         f"{sorted(str(d) for d in _NAMES)}")
    return _NAMES[dtype]


def read_header(path: str) -> Tuple[dict, int]:
    """The parsed JSON header and the byte offset where the data buffer starts (our own
    reading, no validation of the entries: ``load_file`` is where a file is validated)."""
    size = _size(path)
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


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None


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


def _diagnose(path: str) -> None:
    """Raise a ValueError naming the tensor at fault in a file the parser refused, if our own
    reading of the header can tell which (it only explains; the parser decides)."""
    header, start = read_header(path)
    buffer_size = _size(path) - start
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


def load_file_with_metadata(path: str, names: Optional[set] = None
                            ) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, the header's ``__metadata__`` or {}) of a safetensors file: every tensor, or
    those in ``names``, as writable NumPy arrays (BF16 → float32)."""
    _size(path)  # a missing file is a ValueError naming it
    tensors: Dict[str, np.ndarray] = {}
    bf16 = []
    try:
        with safe_open(path, framework="np") as f:  # parses and validates the whole header
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                if names is not None and name not in names:
                    continue
                kind = f.get_slice(name).get_dtype()
                if kind == "BF16":
                    bf16.append(name)
                elif kind not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {kind!r}; supported: "
                                     f"{sorted(_DTYPES) + ['BF16']}")
                else:
                    array = f.get_tensor(name)
                    tensors[name] = array if array.flags.writeable and array.flags.owndata \
                        else array.copy()
    except SafetensorError as error:
        _diagnose(path)  # raises naming the tensor when it can tell which
        raise ValueError(f"{path} is not a valid safetensors file ({error})") from None
    if bf16:  # the offsets were validated by the parser above
        header, start = read_header(path)
        for name in bf16:
            begin, end = header[name]["data_offsets"]
            raw = np.fromfile(path, np.dtype("<u2"), (end - begin) // 2, offset=start + begin)
            tensors[name] = _bf16_to_float32(raw).reshape(header[name]["shape"])
    return tensors, metadata


def load_file(path: str, names: Optional[set] = None) -> Dict[str, np.ndarray]:
    """Every tensor of the file (or those in ``names``) as NumPy arrays (BF16 → float32)."""
    return load_file_with_metadata(path, names)[0]


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` atomically (a temporary file in the same folder, then a
    rename: a killed process leaves either the old file or the new one, never half of one).

    Every array is made C-contiguous and little-endian first: the package writes an array's
    memory as it lies (``ctypes.data``, ``nbytes``), which for a transposed view would be the
    wrong bytes.
    """
    if "__metadata__" in tensors:
        raise ValueError("a tensor cannot be named '__metadata__' (the name of the header's "
                         "metadata entry)")
    arrays = {}
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        try:
            kind = dtype_name(array.dtype)
        except ValueError:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                             f"store; supported: {sorted(str(d) for d in _NAMES)}") from None
        # (np.asarray, not np.ascontiguousarray, which turns a 0-d array into shape (1,))
        arrays[name] = np.asarray(array, dtype=_DTYPES[kind], order="C")
    text = None if not metadata else {str(k): str(v) for k, v in metadata.items()}
    _replace_atomically(path, lambda temporary: safetensors.numpy.save_file(arrays, temporary, text))


def write_atomically(path: str, chunks) -> None:
    """Write bytes to a temporary file beside ``path``, fsync, then rename over ``path``."""
    def write(temporary: str) -> None:
        with open(temporary, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    _replace_atomically(path, write)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary)`` a file beside ``path``, fsync it, then rename it over ``path``;
    on any failure (or KeyboardInterrupt) the temporary file is removed and ``path`` is
    untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
