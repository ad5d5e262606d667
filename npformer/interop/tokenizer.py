"""A Hugging Face checkpoint's tokenizer: ``tokenizer.json`` read with the ``tokenizers`` library.

    tokenizer = load_tokenizer("path/to/llama-dir", model_vocab_size=model.config.vocab_size)
    ids = tokenizer.encode("ROMEO:")        # (N,) int64, with the BOS the checkpoint adds
    text = tokenizer.decode(ids, skip_special_tokens=True)

What is read, and what is refused
---------------------------------
Only ``tokenizer.json`` (the ``tokenizers`` library's own format: JSON, never a pickle and
never code). A directory that has only a sentencepiece ``tokenizer.model``, only GPT-2 style
``vocab.json`` + ``merges.txt``, or no tokenizer at all is refused with a ValueError naming
the directory and the files found; ``transformers`` converts the first two into a
``tokenizer.json`` (``AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)``). The
``tokenizers`` package is imported when a tokenizer is loaded, not when this module is: without
it, :func:`load_tokenizer` raises an ImportError that says how to install it.

Special tokens: what ``encode`` adds
------------------------------------
``encode(text)`` adds what transformers' ``AutoTokenizer`` adds with
``add_special_tokens=True`` (its default, and what a model was trained with: Llama, Mistral
and Gemma put a BOS token first; GPT-2 and Qwen2 add nothing): the post-processor stored in
``tokenizer.json`` (e.g. a ``TemplateProcessing`` ``"<|begin_of_text|> $A"``) decides. That
is transformers 5's rule too: when a ``tokenizer.json`` exists, ``from_pretrained`` drops
``add_bos_token`` / ``add_eos_token`` of ``tokenizer_config.json`` and keeps the file's
post-processor (``tokenization_utils_base`` ``_from_pretrained``), for the generic class and
the model-specific ones alike; without a post-processor it adds nothing. (transformers 4
rebuilt the template from those flags, but its ``save_pretrained`` wrote the rebuilt template
into ``tokenizer.json``, so the two agree for the files it wrote.) ``tokenizer_config.json``
is therefore not read. ``encode(text, add_special_tokens=False)`` gives the bare ids.

Not reproduced: where ``tokenizer_config.json`` names a model-specific class
(``LlamaTokenizer``, ``GemmaTokenizer``, ...), transformers 5 rebuilds the normalizer,
pre-tokenizer and decoder from that class's code around the stored vocabulary; npformer uses
the pipeline stored in ``tokenizer.json`` (the one those classes were converted from), which
``PreTrainedTokenizerFast(tokenizer_file=...)`` and Llama 3's own configuration use too.

Checks
------
- every id that ``encode`` returns lies below the model's ``vocab_size`` (an added token
  beyond the embedding table is refused by id and token, never looked up out of range);
- an encoding with no ids (an empty text without a BOS) is refused: a model needs at least one;
- characters the tokenizer drops without a trace (a BPE with neither byte fallback nor an
  unknown token: ``tokenizers`` then skips them) are refused by name, so the model never
  continues a different text than the one given;
- ``decode`` refuses ids that name no token (negative, beyond the vocabulary, or in a gap of
  it: ``tokenizers`` would silently decode them to nothing) and ids outside the model's
  vocabulary when one is given.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np

from .._validate import check_int

INSTALL_HINT = ('pip install "tokenizers>=0.15" (it comes with transformers; npformer\'s "hf" '
                "extra lists it)")

# files that hold a tokenizer in a format npformer does not read, and what they are
_OTHER_FORMATS = {
    "tokenizer.model": "a sentencepiece model",
    "spiece.model": "a sentencepiece model",
    "vocab.json": "a GPT-2 style vocabulary (with merges.txt)",
    "merges.txt": "GPT-2 style BPE merges",
    "vocab.txt": "a WordPiece vocabulary",
    "tokenizer_config.json": "transformers' tokenizer settings, not the tokenizer itself",
}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(f"reading a tokenizer.json needs the tokenizers package ({error}); "
                          f"{INSTALL_HINT}") from None
    return tokenizers


def _read_json(path: str):
    from ..checkpoint import read_json  # one-line ValueError naming the file

    return read_json(path)


class HFTokenizer:
    """A checkpoint directory's ``tokenizer.json``; build it with :func:`load_tokenizer`."""

    def __init__(self, backend, path: str, model_vocab_size: Optional[int] = None):
        self._backend = backend  # a tokenizers.Tokenizer
        self.path = path
        self.model_vocab_size = model_vocab_size

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows: its vocabulary plus its added (special) tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def ids_without_a_token(self, ids) -> List[int]:
        """The ids of ``ids`` (N,) that name no token of this tokenizer: negative, beyond its
        vocabulary, or in a gap of a non-contiguous one (tokenizers decodes them to nothing)."""
        return [int(i) for i in ids if i < 0 or self._backend.id_to_token(int(i)) is None]

    def special_tokens_added(self) -> List[int]:
        """The ids that ``encode`` puts around a text (e.g. ``[bos_id]``)."""
        ids, special, _ = self._encode_raw("", True)
        return [int(i) for i, is_special in zip(ids, special) if is_special]

    def _encode_raw(self, text: str, add_special_tokens: bool):
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.special_tokens_mask, encoding.offsets

    def encode(self, text: str, add_special_tokens: bool = True, name: str = "text") -> np.ndarray:
        """(N,) int64 ids of ``text``; ``add_special_tokens`` as transformers (see the module
        docstring). ``name`` says what the text is in error messages (``--prompt``, ...)."""
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a str, got {type(text).__name__}")
        ids, special, offsets = self._encode_raw(text, add_special_tokens)
        self._check_nothing_dropped(text, [o for o, s in zip(offsets, special) if not s], name)
        if not ids:
            raise ValueError(f"{name} {text!r:.60} encodes to no token ids with the tokenizer of "
                             f"{self.path} (it adds no BOS token); give a text with at least "
                             "one token")
        ids = np.asarray(ids, dtype=np.int64)  # (N,)
        if self.model_vocab_size is not None and ids.max() >= self.model_vocab_size:
            bad = sorted(set(int(i) for i in ids[ids >= self.model_vocab_size]))
            tokens = [self._backend.id_to_token(i) for i in bad[:5]]
            raise ValueError(
                f"{name} {text!r:.60} encodes to id(s) {bad[:5]} (token(s) {tokens}) but the "
                f"model of {self.path} has vocab_size {self.model_vocab_size} (config.json): "
                f"tokenizer.json ({self.vocab_size} ids) does not belong to this model")
        return ids

    def _check_nothing_dropped(self, text: str, offsets, name: str) -> None:
        """Every non-space character of ``text`` lies in the span of some token. A BPE
        without byte fallback or unknown token skips characters it has no token for."""
        # +1 at each span's start, −1 past its end: the running sum counts the covering spans
        covered = np.zeros(len(text) + 1, dtype=np.int64)
        for start, end in offsets:
            covered[start] += 1
            covered[end] -= 1
        covered = np.cumsum(covered)[:-1] > 0  # (len(text),)
        lost = sorted({ch for ch, c in zip(text, covered) if not c and not ch.isspace()})
        if lost:
            raise ValueError(
                f"{name} {text!r:.60} has character(s) {''.join(lost[:20])!r} that the tokenizer "
                f"of {self.path} has no token for and drops without an unknown token; "
                "remove them from the text")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of (N,) ids (transformers' default keeps special tokens; sampling skips
        them). Ids outside the tokenizer's vocabulary, or the model's, are refused."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        unknown = self.ids_without_a_token(ids)
        if unknown:
            raise ValueError(f"ids {unknown[:5]} name no token of the tokenizer of {self.path} "
                             f"({self.vocab_size} tokens)")
        if self.model_vocab_size is not None and ids.size and ids.max() >= self.model_vocab_size:
            raise ValueError(f"ids must lie in [0, {self.model_vocab_size - 1}] (the model of "
                             f"{self.path} has vocab_size {self.model_vocab_size}), got "
                             f"{ids[ids >= self.model_vocab_size][:5].tolist()}")
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _found_instead(path: str) -> str:
    present = sorted(os.listdir(path))
    other = [f"{name} ({_OTHER_FORMATS[name]})" for name in present if name in _OTHER_FORMATS]
    if other:
        return "found " + ", ".join(other)
    return f"found no tokenizer file at all (the directory holds {present[:12]})"


def load_tokenizer(path: str, model_vocab_size: Optional[int] = None) -> HFTokenizer:
    """The tokenizer of checkpoint directory ``path`` (its ``tokenizer.json``). With
    ``model_vocab_size``, encoded and decoded ids are checked against the model too."""
    if model_vocab_size is not None:
        check_int(model_vocab_size, "model_vocab_size", 1)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (a Hugging Face checkpoint directory "
                         "with a tokenizer.json)")
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no tokenizer.json ({_found_instead(path)}); npformer "
                         "reads tokenizer.json only — transformers writes one with "
                         "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    contents = _read_json(file)  # malformed JSON: a one-line error naming the file
    if not isinstance(contents, dict) or not isinstance(contents.get("model"), dict):
        raise ValueError(f"{file} is not a tokenizers file: it must hold a JSON object with a "
                         f"'model' object, got {json.dumps(contents)[:80]}")
    tokenizers = _import_tokenizers()
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(contents))
    except Exception as error:  # the library raises a bare Exception with serde's message
        raise ValueError(f"{file} is not a tokenizer.json the tokenizers library "
                         f"{tokenizers.__version__} can read: {error}") from None
    return HFTokenizer(backend, path, None if model_vocab_size is None else int(model_vocab_size))


def stop_token_ids(path: str) -> List[int]:
    """The end-of-sequence ids transformers' ``generate`` stops at: ``eos_token_id`` (an int
    or a list) of ``generation_config.json``, else of ``config.json``; [] when neither has one."""
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        contents = _read_json(file)
        value = contents.get("eos_token_id") if isinstance(contents, dict) else None
        if value is None:
            continue
        values: Sequence = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"{file}: 'eos_token_id' must be an id ≥ 0 or a list of them, "
                             f"got {value!r:.80}")
        return [int(v) for v in values]
    return []
