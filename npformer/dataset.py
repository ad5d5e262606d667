"""Text, tokenizers, train/validation split and batch samplers.

(The module is ``dataset`` rather than ``data`` because ``npformer/data/`` is the folder
that ships the corpus as package data.)

From text to batches
--------------------
    text  --tokenizer.encode-->  ids (N,) int64  --split_train_val-->  train, val
    train --BatchSampler.next()-->  x, y (B, T) int64,   y[b, t] = x[b, t + 1] in the stream

A language model predicts token t + 1 from tokens 0..t, so a batch row is a window of
T + 1 consecutive tokens: the first T are the input ``x``, the last T the targets ``y``.
Windows start at uniformly random offsets o in [0, N - T - 1], so the last token used is
ids[o + T] with o + T <= N - 1.

Document packing (Llama 3)
--------------------------
``split_documents`` cuts a text at blank lines (the shipped corpus separates speeches by
blank lines). Each document KEEPS its trailing blank line(s), so ``"".join(documents) ==
text``: the packed stream is exactly the original text, and a model trained on it still
learns to end a speech with a blank line. ``PackedBatchSampler`` draws the same windows
over the concatenation of all documents and also returns ``doc_ids`` (B, T): for each
input position, which document of its row it belongs to (0, 1, 2, ... in row order). The
attention then lets a token attend only to earlier tokens with the same ``doc_ids`` (the
Llama 3 document mask); nothing crosses a document boundary inside the model.

Targets that cross a boundary are kept (standard packing): the last token of a document
(its blank line "\\n") has the first token of the next document as its target. It is the
true next character of the text; only the context used to predict it is restricted.

Resuming
--------
A sampler's randomness is one ``np.random.Generator`` (PCG64) seeded once.
``state_dict()`` returns the generator's state (``rng.bit_generator.state``, plain Python
ints and strings, JSON-serialisable) together with the sampler's sizes;
``load_state_dict()`` checks the sizes and restores it, so a resumed run draws exactly the
batches the uninterrupted run would have drawn.

Checkpoints store a tokenizer as ``to_dict()`` (JSON) and rebuild it with
``tokenizer_from_dict``; nothing is pickled.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ._validate import check_ids, check_int

CORPUS_NAME = "tinyshakespeare.txt"

# The most a corpus file may hold: 256 MiB (the shipped corpus is 1.1 MB). Tokenised, each
# byte becomes up to 8 bytes of int64 id plus 4 of code point, so a corpus at the bound needs
# about 3 GB on the way to batches. ``load_text`` reads at most this many bytes plus one, so an
# endless stream (/dev/zero, a pipe) is refused at the bound instead of filling the memory.
MAX_TEXT_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- text


def load_text(path: Optional[Union[str, os.PathLike]] = None,
              max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a UTF-8 file; the shipped Tiny Shakespeare corpus when ``path`` is None.

    The shipped copy is read through ``importlib.resources`` (``npformer/data/`` is package
    data, see setup.cfg), so an installed npformer needs neither network nor a checkout.
    Raises ValueError for a missing file, a directory, a binary file (NUL bytes or invalid
    UTF-8), an empty or whitespace-only file, and a file (or stream) longer than
    ``max_bytes``: at most ``max_bytes + 1`` bytes are ever read.
    """
    max_bytes = check_int(max_bytes, "max_bytes", 1)
    if path is None:
        resource = importlib.resources.files("npformer") / "data" / CORPUS_NAME
        name = f"the shipped corpus npformer/data/{CORPUS_NAME}"
        try:
            raw = resource.read_bytes()
        except OSError as error:  # a broken installation
            raise ValueError(f"cannot read {name}: {error}") from error
    else:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        name = f"path {os.fspath(path)!r}"
        if os.path.isdir(path):
            raise ValueError(f"{name} is a directory; pass a UTF-8 text file")
        if not os.path.exists(path):
            raise ValueError(f"{name} does not exist; pass an existing UTF-8 text file")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # 0 for a device or a pipe: read and see
                if size > max_bytes:
                    raw = b""
                else:
                    raw = f.read(max_bytes + 1)
                    size = len(raw)
        except OSError as error:
            raise ValueError(f"cannot read {name}: {error.strerror or error}") from error
        if size > max_bytes:
            raise ValueError(
                f"{name} holds more than {max_bytes:,} bytes, the most a corpus may hold "
                f"(npformer.dataset.MAX_TEXT_BYTES); pass a shorter file, not a stream"
            )
    return _decode_text(raw, name)


def _decode_text(raw: bytes, name: str) -> str:
    """Strict UTF-8 text with no NUL byte, not empty, not only whitespace."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"{name} contains NUL bytes (first at byte {nul}); "
            "it looks binary, pass a UTF-8 text file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{name} is not valid UTF-8 (byte {error.start}: {error.reason}); "
            "pass a UTF-8 text file"
        ) from error
    if not text.strip():
        what = "empty" if not text else f"only whitespace ({len(text)} characters)"
        raise ValueError(f"{name} is {what}; a corpus needs some text")
    return text


def _check_text(text, name: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")
    return text


def _code_points(text: str) -> np.ndarray:
    """The Unicode code points of ``text`` as a (N,) uint32 array (vectorised ``ord``)."""
    # surrogatepass: a lone surrogate (possible in a Python str) is a code point like any other.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _as_id_array(ids, name: str, upper: int) -> np.ndarray:
    """A 1-D integer array (a list or tuple is converted) with 0 <= id < upper."""
    if isinstance(ids, (list, tuple)):
        ids = np.asarray(ids, dtype=np.int64) if len(ids) == 0 else np.asarray(ids)
    ids = check_ids(ids, name, upper)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D (T,), got shape {ids.shape}; decode one row at a time")
    return ids


# ----------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One id per character: the vocabulary is the sorted set of characters of ``text``.

    ``CharTokenizer(text)`` builds it from a corpus; ``CharTokenizer(tokenizer.chars)`` gives
    the same tokenizer back (the sorted set of a sorted set is itself), which is what
    ``from_dict`` does.
    """

    kind = "char"

    def __init__(self, text: str):
        text = _check_text(text)
        if not text:
            raise ValueError("text must contain at least one character to build a vocabulary")
        self.chars = "".join(sorted(set(text)))  # the vocabulary, id i <-> chars[i]
        self._codes = _code_points(self.chars)  # (V,) uint32, sorted ascending

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, name: str = "text") -> np.ndarray:
        """(N,) int64 ids of the characters of ``text``; ValueError names unknown characters
        (and ``name``, what the text is: "text", "--prompt", ...)."""
        text = _check_text(text, name)
        points = _code_points(text)  # (N,)
        # the codes are sorted, so the id of a character is its position among them
        ids = np.searchsorted(self._codes, points)  # (N,)
        found = self._codes[np.minimum(ids, self.vocab_size - 1)] == points
        if not found.all():
            unknown = sorted(set(text[i] for i in np.flatnonzero(~found)[:10_000]))
            raise ValueError(
                f"{name} contains {int((~found).sum())} character(s) outside the vocabulary of "
                f"{self.vocab_size}: {''.join(unknown[:20])!r}"
                f"{' ...' if len(unknown) > 20 else ''} (first at index "
                f"{int(np.argmin(found))}); build the tokenizer from a text that contains "
                "them, or use ByteTokenizer"
            )
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        """The text of (T,) ids in [0, vocab_size)."""
        ids = _as_id_array(ids, "ids", self.vocab_size)
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        _check_tokenizer_dict(d, cls.kind, ("kind", "chars"))
        chars = d["chars"]
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"tokenizer dict 'chars' must be a non-empty str, got {chars!r:.60}")
        if "".join(sorted(set(chars))) != chars:
            raise ValueError(
                "tokenizer dict 'chars' must be sorted and without repeats (it is the "
                f"vocabulary, id i <-> chars[i]), got {chars!r:.60}"
            )
        return cls(chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """One id per UTF-8 byte: 256 ids, every text encodes, no vocabulary to store.

    A non-ASCII character becomes 2-4 ids. Decoding ids that are not valid UTF-8 (a model's
    sample can cut a character in half) gives U+FFFD replacement characters, not an error.
    """

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str, name: str = "text") -> np.ndarray:
        """(N,) int64 ids of the UTF-8 bytes of ``text``."""
        text = _check_text(text, name)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = _as_id_array(ids, "ids", self.vocab_size)
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        _check_tokenizer_dict(d, cls.kind, ("kind",))
        return cls()

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


_TOKENIZERS = {CharTokenizer.kind: CharTokenizer, ByteTokenizer.kind: ByteTokenizer}


def _check_tokenizer_dict(d, kind: str, keys: Tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer dict must be a dict, got {type(d).__name__}")
    if d.get("kind") != kind:
        raise ValueError(f"tokenizer dict has kind {d.get('kind')!r}, expected {kind!r}")
    if set(d) != set(keys):
        raise ValueError(
            f"a {kind!r} tokenizer dict has exactly the keys {sorted(keys)}, got {sorted(d)}"
        )


def tokenizer_from_dict(d: dict) -> Union[CharTokenizer, ByteTokenizer]:
    """Rebuild a tokenizer from its ``to_dict()`` (e.g. a checkpoint's tokenizer.json)."""
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer dict must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[kind].from_dict(d)


# ----------------------------------------------------------------------------- split


def _check_id_stream(ids, name: str) -> np.ndarray:
    """A 1-D array of non-negative integer token ids, as int64."""
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of integer ids, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} must be non-negative token ids, got minimum {int(ids.min())}")
    return ids.astype(np.int64, copy=False)


def split_train_val(ids: np.ndarray, val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """(train, val): the first ``int(N * (1 - val_fraction))`` ids, and the rest.

    The LAST part is validation (as in nanoGPT), so validation text is never seen in
    training, not even as a window overlapping it. Both parts are views of ``ids``.
    """
    ids = _check_id_stream(ids, "ids")
    if (
        isinstance(val_fraction, (bool, np.bool_))
        or not isinstance(val_fraction, (int, float, np.integer, np.floating))
        or not 0.0 < float(val_fraction) < 1.0
    ):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_train = int(len(ids) * (1.0 - float(val_fraction)))
    if n_train == 0 or n_train == len(ids):
        raise ValueError(
            f"splitting {len(ids)} ids with val_fraction={val_fraction} leaves "
            f"{n_train} train and {len(ids) - n_train} validation ids; both must be non-empty"
        )
    return ids[:n_train], ids[n_train:]


# ----------------------------------------------------------------------------- batches


def _rng_state_is_valid(state) -> bool:
    """The shape of ``np.random.PCG64().state``: plain ints (not bools) and strings."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    return (
        isinstance(state, dict)
        and set(state) == {"bit_generator", "state", "has_uint32", "uinteger"}
        and state["bit_generator"] == "PCG64"
        and isinstance(state["state"], dict)
        and set(state["state"]) == {"state", "inc"}
        and all(is_int(v) and 0 <= v < 2**128 for v in state["state"].values())
        and state["has_uint32"] in (0, 1) and is_int(state["has_uint32"])
        and is_int(state["uinteger"]) and 0 <= state["uinteger"] < 2**32
    )


class BatchSampler:
    """Random windows of a token stream: ``x, y = sampler.next()``, both (B, T) int64.

    ids: (N,) integer token ids with N >= seq_len + 1; batch_size B >= 1; seq_len T >= 1;
    seed: an integer >= 0 (same seed -> same batches).
    """

    kind = "batch"

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.ids = _check_id_stream(ids, "ids")  # (N,)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.seq_len = check_int(seq_len, "seq_len", 1)
        seed = check_int(seed, "seed", 0)
        if len(self.ids) < self.seq_len + 1:
            raise ValueError(
                f"ids has {len(self.ids)} tokens but seq_len={self.seq_len} needs at least "
                f"seq_len + 1 = {self.seq_len + 1} (T inputs and one more target); "
                "use a shorter seq_len or more text"
            )
        self.rng = np.random.default_rng(seed)

    def _positions(self) -> np.ndarray:
        """(B, T + 1) stream positions of windows starting at random o in [0, N - T - 1]."""
        B, T, N = self.batch_size, self.seq_len, len(self.ids)
        offsets = self.rng.integers(0, N - T, size=B)  # (B,), high is exclusive
        return offsets[:, None] + np.arange(T + 1)  # (B, T + 1)

    def next(self) -> Tuple[np.ndarray, np.ndarray]:
        """(x, y), each (B, T) int64, with y[:, t] the token after x[:, t]."""
        window = self.ids[self._positions()]  # (B, T + 1)
        return window[:, :-1].copy(), window[:, 1:].copy()

    def _sizes(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "num_tokens": len(self.ids)}

    def state_dict(self) -> dict:
        """JSON-serialisable: the sampler's kind and sizes, and the generator state."""
        return {"kind": self.kind, **self._sizes(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the sizes must match this sampler's (same data, B, T)."""
        if not isinstance(state, dict):
            raise ValueError(f"sampler state must be a dict, got {type(state).__name__}")
        expected = {"kind": self.kind, **self._sizes()}
        if set(state) != set(expected) | {"rng"}:
            raise ValueError(
                f"sampler state must have the keys {sorted(set(expected) | {'rng'})}, "
                f"got {sorted(state)}"
            )
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={value!r}; "
                    "a resumed run must sample the same data with the same batch_size and seq_len"
                )
        if not _rng_state_is_valid(state["rng"]):
            raise ValueError(
                "sampler state 'rng' is not a PCG64 state dict (keys bit_generator='PCG64', "
                f"state={{state, inc}}, has_uint32, uinteger), got {state['rng']!r:.200}"
            )
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self.rng = rng


def split_documents(text: str) -> List[str]:
    """Cut ``text`` after each run of blank lines; every document keeps its trailing blank lines.

    A blank line is an empty or whitespace-only line. Pieces that are only whitespace (blank
    lines at the very start, whitespace at the end) are merged into their neighbour instead
    of becoming documents, so ``"".join(split_documents(text)) == text`` always holds.
    """
    text = _check_text(text)
    if not text.strip():
        raise ValueError("text has no document: it is empty or only whitespace")
    # a newline, then one or more lines holding only spaces/tabs/CR/..., each ending in "\n"
    cuts = [m.end() for m in _BLANK_LINES.finditer(text)]
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]) if b > a]
    documents: List[str] = []
    pending = ""  # leading whitespace-only pieces, prepended to the first real document
    for piece in pieces:
        if not piece.strip():
            if documents:
                documents[-1] += piece
            else:
                pending += piece
        else:
            documents.append(pending + piece)
            pending = ""
    return documents


_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")


class PackedBatchSampler(BatchSampler):
    """Random windows over packed documents: ``x, y, doc_ids = sampler.next()``, all (B, T) int64.

    documents_ids: a list of (L_i,) integer arrays (one per document, each L_i >= 1), packed
    in list order. A window starts at a uniformly random token of the packed stream (so every
    token is used, also the tails of documents longer than T) and covers T + 1 tokens;
    ``doc_ids[b, t]`` numbers the documents met in row b, 0 for the first (possibly partial)
    one, +1 at each document start. Targets crossing a boundary are kept (see module notes).
    """

    kind = "packed"

    def __init__(self, documents_ids: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int):
        if not isinstance(documents_ids, (list, tuple)) or len(documents_ids) == 0:
            raise ValueError(
                "documents_ids must be a non-empty list of 1-D integer arrays, got "
                + (f"an empty {type(documents_ids).__name__}" if isinstance(documents_ids, (list, tuple))
                   else type(documents_ids).__name__)
            )
        docs = []
        for i, doc in enumerate(documents_ids):
            doc = _check_id_stream(doc, f"documents_ids[{i}]")
            if len(doc) == 0:
                raise ValueError(f"documents_ids[{i}] is empty; every document needs at least one token")
            docs.append(doc)
        self.num_documents = len(docs)
        lengths = np.array([len(d) for d in docs])  # (num_documents,)
        is_start = np.zeros(int(lengths.sum()), dtype=np.int64)  # (N,) 1 at a document's first token
        is_start[np.cumsum(lengths) - lengths] = 1
        super().__init__(np.concatenate(docs), batch_size, seq_len, seed)
        self.is_start = is_start

    def next(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, doc_ids), each (B, T) int64; doc_ids belong to the x positions."""
        positions = self._positions()  # (B, T + 1)
        window = self.ids[positions]  # (B, T + 1)
        starts = self.is_start[positions[:, :-1]]  # (B, T)
        # count the document starts seen so far; the row's first token is document 0 whether
        # or not a document starts there
        doc_ids = np.cumsum(starts, axis=1) - starts[:, :1]  # (B, T)
        return window[:, :-1].copy(), window[:, 1:].copy(), doc_ids

    def _sizes(self) -> dict:
        return {**super()._sizes(), "num_documents": self.num_documents}
