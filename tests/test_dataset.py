"""dataset: corpus loading, tokenizers, train/val split, batch samplers, document packing."""

import json

import numpy as np
import pytest

from npformer.dataset import (
    BatchSampler,
    ByteTokenizer,
    CharTokenizer,
    PackedBatchSampler,
    load_text,
    split_documents,
    split_train_val,
    tokenizer_from_dict,
)

# measured on the shipped npformer/data/tinyshakespeare.txt
CORPUS_CHARS = 1_115_394
CORPUS_VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CORPUS_DOCUMENTS = 7222


@pytest.fixture(scope="module")
def corpus():
    return load_text()


@pytest.fixture(scope="module")
def corpus_tokenizer(corpus):
    return CharTokenizer(corpus)


# ----------------------------------------------------------------------------- load_text


def test_shipped_corpus_facts(corpus, corpus_tokenizer):
    assert isinstance(corpus, str)
    assert len(corpus) == CORPUS_CHARS
    assert corpus.startswith("First Citizen:\nBefore we proceed any further")
    assert corpus_tokenizer.vocab_size == 65
    assert corpus_tokenizer.chars == CORPUS_VOCAB


def test_load_text_reads_a_utf8_file(tmp_path):
    text = "Ça va?\nüber — 日本語 🙂\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    assert load_text(path) == text  # os.PathLike
    assert load_text(str(path)) == text  # str


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b" \n\t\n  ", "whitespace"),
        (b"text with a \x00 byte", "NUL"),
        (b"caf\xe9 is latin-1, not utf-8", "UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL"),
    ],
)
def test_load_text_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_text(path)


def test_load_text_rejects_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="directory"):
        load_text(tmp_path)
    with pytest.raises(ValueError, match="path must be"):
        load_text(3)


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trips_the_corpus(corpus, corpus_tokenizer):
    ids = corpus_tokenizer.encode(corpus)
    assert ids.dtype == np.int64 and ids.shape == (CORPUS_CHARS,)
    assert ids.min() == 0 and ids.max() == 64
    assert corpus_tokenizer.decode(ids) == corpus


def test_char_tokenizer_ids_follow_sorted_characters():
    tok = CharTokenizer("banana!")
    assert tok.chars == "!abn" and tok.vocab_size == 4
    np.testing.assert_array_equal(tok.encode("nab!"), [3, 1, 2, 0])
    assert tok.decode([3, 1, 2, 0]) == "nab!"  # a list is accepted too
    assert tok.decode(np.array([], dtype=np.int64)) == ""
    assert tok.encode("").dtype == np.int64 and tok.encode("").shape == (0,)


def test_char_tokenizer_non_ascii_round_trip():
    text = "naïve café — 日本 🙂\n"
    tok = CharTokenizer(text)
    assert tok.vocab_size == len(set(text))
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_unknown_characters_are_named(corpus_tokenizer):
    with pytest.raises(ValueError, match=r"2 character\(s\).*'#é'.*first at index 7"):
        corpus_tokenizer.encode("price: #3, café")  # the corpus has the digit 3 but no 5
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")  # beyond the largest code point of the vocabulary


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([0, 4]), r"\[0, 3\]"),
        (np.array([-1]), r"\[0, 3\]"),
        (np.array([0.0, 1.0]), "integer"),
        (np.array([[0, 1]]), "1-D"),
        ("ab", "numpy.ndarray"),
    ],
)
def test_char_tokenizer_decode_rejects_bad_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        CharTokenizer("abcd").decode(ids)


def test_char_tokenizer_rejects_bad_text():
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="must be a str"):
        CharTokenizer(b"bytes")
    with pytest.raises(ValueError, match="must be a str"):
        CharTokenizer("ab").encode(["a"])


def test_byte_tokenizer_on_non_ascii_text():
    tok = ByteTokenizer()
    text = "é日🙂a"  # 2 + 3 + 4 + 1 bytes
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
    assert len(ids) == 10 and tok.vocab_size == 256
    assert tok.decode(ids) == text
    # a sample cut inside a character decodes with a replacement character, not an error
    assert tok.decode(ids[:2]) == "é" and tok.decode(ids[:3]) == "é\ufffd"
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode(np.array([256]))


@pytest.mark.parametrize("tokenizer", [CharTokenizer("hello, world\n"), ByteTokenizer()])
def test_tokenizer_dict_round_trip_through_json(tokenizer):
    d = json.loads(json.dumps(tokenizer.to_dict()))
    rebuilt = tokenizer_from_dict(d)
    assert type(rebuilt) is type(tokenizer) and rebuilt == tokenizer
    assert rebuilt.vocab_size == tokenizer.vocab_size
    text = "hello world"
    np.testing.assert_array_equal(rebuilt.encode(text), tokenizer.encode(text))


def test_tokenizer_dicts():
    assert CharTokenizer("ba").to_dict() == {"kind": "char", "chars": "ab"}
    assert ByteTokenizer().to_dict() == {"kind": "byte"}


@pytest.mark.parametrize(
    "d, message",
    [
        ({"kind": "bpe"}, "unknown tokenizer kind 'bpe'"),
        ({}, "unknown tokenizer kind None"),
        ("char", "must be a dict"),
        ({"kind": "char"}, "keys"),
        ({"kind": "char", "chars": ""}, "non-empty"),
        ({"kind": "char", "chars": "ba"}, "sorted"),
        ({"kind": "char", "chars": "aab"}, "sorted"),
        ({"kind": "byte", "chars": "ab"}, "keys"),
    ],
)
def test_tokenizer_from_dict_rejects_bad_dicts(d, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_dict(d)


# ----------------------------------------------------------------------------- split


def test_split_sizes_and_order(corpus, corpus_tokenizer):
    ids = np.arange(100, dtype=np.int64)
    train, val = split_train_val(ids)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(val, np.arange(90, 100))  # the LAST 10 %
    train, val = split_train_val(ids, val_fraction=0.25)
    assert len(train) == 75 and len(val) == 25 and val[0] == 75

    full = corpus_tokenizer.encode(corpus)
    train, val = split_train_val(full)
    assert len(train) == 1_003_854 and len(val) == 111_540  # int(N * 0.9) train tokens
    assert corpus_tokenizer.decode(val) == corpus[1_003_854:]


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_split_rejects_bad_fraction(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(np.arange(100), val_fraction)


def test_split_rejects_bad_ids():
    train, val = split_train_val(np.arange(5), 0.1)  # int(5 * 0.9) = 4 train, 1 val
    assert len(train) == 4 and len(val) == 1
    with pytest.raises(ValueError, match="0 train and 1 validation ids; both must be non-empty"):
        split_train_val(np.arange(1), 0.1)
    with pytest.raises(ValueError, match="10 train and 0 validation ids"):
        split_train_val(np.arange(10), 1e-17)  # 1 - 1e-17 rounds to 1.0
    with pytest.raises(ValueError, match="integer"):
        split_train_val(np.arange(10.0))
    with pytest.raises(ValueError, match="1-D"):
        split_train_val(np.arange(10).reshape(2, 5))


# ----------------------------------------------------------------------------- BatchSampler


def _draw(sampler, n):
    return [sampler.next() for _ in range(n)]


def test_batch_sampler_shapes_and_shift():
    ids = np.arange(1000, dtype=np.int64) * 7 + 3  # distinct values: a window is identifiable
    x, y = BatchSampler(ids, batch_size=5, seq_len=12, seed=0).next()
    assert x.shape == y.shape == (5, 12) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    offsets = (x[:, 0] - 3) // 7
    np.testing.assert_array_equal(x, ids[offsets[:, None] + np.arange(12)])  # consecutive tokens
    np.testing.assert_array_equal(y, ids[offsets[:, None] + np.arange(1, 13)])  # shifted by one


def test_batch_sampler_uses_every_window_including_the_last():
    ids = np.arange(7)
    sampler = BatchSampler(ids, batch_size=64, seq_len=5, seed=1)  # offsets 0 and 1 only
    x, y = sampler.next()
    assert set(x[:, 0].tolist()) == {0, 1}
    assert y.max() == 6  # the last token is a target
    x, y = BatchSampler(np.arange(6), batch_size=3, seq_len=5, seed=1).next()  # N = T + 1
    np.testing.assert_array_equal(x, np.tile(np.arange(5), (3, 1)))


def test_batch_sampler_determinism_per_seed(corpus, corpus_tokenizer):
    ids = corpus_tokenizer.encode(corpus[:50_000])
    a = _draw(BatchSampler(ids, 4, 32, seed=123), 3)
    b = _draw(BatchSampler(ids, 4, 32, seed=123), 3)
    c = _draw(BatchSampler(ids, 4, 32, seed=124), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    assert not np.array_equal(a[0][0], a[1][0])  # successive batches differ


def test_batch_sampler_state_round_trip():
    ids = np.arange(10_000)
    sampler = BatchSampler(ids, 4, 16, seed=5)
    _draw(sampler, 3)
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint would store it
    expected = _draw(sampler, 3)
    resumed = BatchSampler(ids, 4, 16, seed=999)  # the seed is overridden by the state
    resumed.load_state_dict(state)
    for (xe, ye), (xr, yr) in zip(expected, _draw(resumed, 3)):
        np.testing.assert_array_equal(xe, xr)
        np.testing.assert_array_equal(ye, yr)


def _corrupt(state, **changes):
    state = json.loads(json.dumps(state))
    for path, value in changes.items():
        target = state
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return state


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seq_len": 8}, "seq_len=8"),
        ({"batch_size": 2}, "batch_size=2"),
        ({"num_tokens": 99}, "num_tokens=99"),
        ({"kind": "packed"}, "kind='packed'"),
        ({"rng": KeyError}, "keys"),
        ({"rng__bit_generator": "MT19937"}, "PCG64"),
        ({"rng__state__state": -1}, "PCG64"),
        ({"rng__state__inc": "12"}, "PCG64"),
        ({"rng__has_uint32": True}, "PCG64"),
        ({"rng__uinteger": 2**32}, "PCG64"),
        ({"rng__state": KeyError}, "PCG64"),
    ],
)
def test_batch_sampler_rejects_bad_state(changes, message):
    sampler = BatchSampler(np.arange(1000), 4, 16, seed=5)
    good = sampler.state_dict()
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(_corrupt(good, **changes))
    assert sampler.state_dict() == good  # a failed load changes nothing
    with pytest.raises(ValueError, match="must be a dict"):
        sampler.load_state_dict([])


BAD_SIZES = [(name, value) for name in ("batch_size", "seq_len") for value in (0, -1, 2.0, True, "4", None)]
BAD_SIZES += [("seed", value) for value in (-1, 2.0, True, "4", None)]  # seed 0 is valid


@pytest.mark.parametrize("name, value", BAD_SIZES)
@pytest.mark.parametrize("packed", [False, True])
def test_samplers_reject_bad_sizes(name, value, packed):
    kwargs = {"batch_size": 2, "seq_len": 4, "seed": 0, name: value}
    data = [np.arange(10), np.arange(5)] if packed else np.arange(15)
    sampler_class = PackedBatchSampler if packed else BatchSampler
    with pytest.raises(ValueError, match=name):
        sampler_class(data, **kwargs)


def test_batch_sampler_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"10 tokens but seq_len=10 needs at least .* 11"):
        BatchSampler(np.arange(10), 2, 10, seed=0)
    with pytest.raises(ValueError, match="integer"):
        BatchSampler(np.arange(100.0), 2, 10, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        BatchSampler(np.arange(100).reshape(10, 10), 2, 4, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        BatchSampler(np.arange(100) - 1, 2, 4, seed=0)
    with pytest.raises(ValueError, match="numpy.ndarray"):
        BatchSampler(list(range(100)), 2, 4, seed=0)


# ----------------------------------------------------------------------------- documents


def test_split_documents_keeps_blank_lines_with_the_document():
    text = "A:\nhi\n\nB:\nho\n\n\n  \nC:\nend"
    assert split_documents(text) == ["A:\nhi\n\n", "B:\nho\n\n\n  \n", "C:\nend"]
    # leading blank lines join the first document, trailing whitespace the last one
    assert split_documents("\n\nA\n\nB\n\n \n") == ["\n\nA\n\n", "B\n\n \n"]
    assert split_documents("A\n\nB\n\n  ") == ["A\n\n", "B\n\n  "]
    assert split_documents("one line") == ["one line"]
    assert split_documents("a\r\n\r\nb") == ["a\r\n\r\n", "b"]  # CRLF blank lines count too
    for bad in ["", " \n\n "]:
        with pytest.raises(ValueError, match="no document"):
            split_documents(bad)


def test_split_documents_of_the_corpus(corpus):
    documents = split_documents(corpus)
    assert len(documents) == CORPUS_DOCUMENTS
    assert "".join(documents) == corpus
    assert documents[0] == "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    assert all(d.strip() and "\n\n" not in d.rstrip("\n") for d in documents)


def _numbered_documents(seed, n_docs=60):
    """Document i holds only the token i (lengths 1..7), so a token names its document."""
    rng = np.random.default_rng(seed)
    return [np.full(int(rng.integers(1, 8)), i, dtype=np.int64) for i in range(n_docs)]


def test_packing_doc_ids_change_exactly_at_document_boundaries():
    sampler = PackedBatchSampler(_numbered_documents(0), batch_size=16, seq_len=25, seed=3)
    for _ in range(5):
        x, y, doc_ids = sampler.next()
        assert x.shape == y.shape == doc_ids.shape == (16, 25)  # every row has length T
        assert x.dtype == y.dtype == doc_ids.dtype == np.int64
        np.testing.assert_array_equal(doc_ids[:, 0], 0)
        # documents are consecutive and in order, so the token (= document index) minus the
        # row's first token is the document's number within the row
        np.testing.assert_array_equal(doc_ids, x - x[:, :1])
        assert set(np.diff(doc_ids, axis=1).ravel().tolist()) <= {0, 1}
        assert (np.diff(doc_ids, axis=1) == 1).any()  # the rows do cross boundaries
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        assert set((y[:, -1] - x[:, -1]).tolist()) <= {0, 1}  # a crossing target is kept


def test_packing_rows_are_windows_of_the_packed_stream():
    docs = _numbered_documents(1, n_docs=12)
    stream = np.concatenate(docs)
    x, y, doc_ids = PackedBatchSampler(docs, batch_size=200, seq_len=len(stream) - 2, seed=0).next()
    offsets = set()
    for row_x, row_y in zip(x, y):
        matches = [o for o in range(3) if np.array_equal(row_x, stream[o:o + len(row_x)])]
        assert len(matches) >= 1
        assert np.array_equal(row_y, stream[matches[0] + 1:matches[0] + 1 + len(row_y)])
        offsets.add(matches[0])
    assert offsets == {0, 1}  # N - T = 2 start positions, both used


def test_packing_doc_ids_on_the_corpus(corpus, corpus_tokenizer):
    documents = split_documents(corpus[:100_000])
    sampler = PackedBatchSampler([corpus_tokenizer.encode(d) for d in documents], 8, 64, seed=0)
    x, _, doc_ids = sampler.next()
    for row, row_doc in zip(x, doc_ids):
        text = corpus_tokenizer.decode(row)
        # in this corpus a document starts right after "\n\n" (no longer runs of newlines)
        # (position 1 is skipped: whether it starts a document depends on the token before x)
        starts = [t for t in range(2, len(text)) if text[t - 2:t] == "\n\n"]
        increments = np.flatnonzero(np.diff(row_doc)) + 1  # positions t with doc_ids[t] > doc_ids[t-1]
        assert [t for t in increments.tolist() if t >= 2] == starts
        assert row_doc[-1] == len(increments)


def test_packed_sampler_determinism_and_state_round_trip():
    docs = _numbered_documents(2)
    a = _draw(PackedBatchSampler(docs, 4, 10, seed=7), 3)
    b = _draw(PackedBatchSampler(docs, 4, 10, seed=7), 3)
    c = _draw(PackedBatchSampler(docs, 4, 10, seed=8), 3)
    for batch_a, batch_b in zip(a, b):
        for u, v in zip(batch_a, batch_b):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0][0], c[0][0])

    sampler = PackedBatchSampler(docs, 4, 10, seed=7)
    _draw(sampler, 3)
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["kind"] == "packed" and state["num_documents"] == 60
    expected = _draw(sampler, 3)
    resumed = PackedBatchSampler(docs, 4, 10, seed=0)
    resumed.load_state_dict(state)
    for batch_e, batch_r in zip(expected, _draw(resumed, 3)):
        for u, v in zip(batch_e, batch_r):
            np.testing.assert_array_equal(u, v)
    # the same tokens cut into one document fewer: not the same data
    regrouped = [np.concatenate(docs[:2])] + docs[2:]
    with pytest.raises(ValueError, match="num_documents=60 but this sampler has num_documents=59"):
        PackedBatchSampler(regrouped, 4, 10, seed=0).load_state_dict(state)


def test_packed_sampler_rejects_bad_documents():
    with pytest.raises(ValueError, match="non-empty list"):
        PackedBatchSampler([], 2, 4, seed=0)
    with pytest.raises(ValueError, match="non-empty list"):
        PackedBatchSampler(np.arange(10), 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"documents_ids\[1\] is empty"):
        PackedBatchSampler([np.arange(5), np.arange(0), np.arange(5)], 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"documents_ids\[0\] must be an integer array"):
        PackedBatchSampler([np.arange(5.0)], 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"documents_ids\[0\] must be 1-D"):
        PackedBatchSampler([np.arange(6).reshape(2, 3)], 2, 4, seed=0)
    with pytest.raises(ValueError, match="ids has 5 tokens but seq_len=5"):
        PackedBatchSampler([np.arange(2), np.arange(3)], 2, 5, seed=0)
    with pytest.raises(ValueError, match="kind='batch'"):
        PackedBatchSampler([np.arange(20)], 2, 5, seed=0).load_state_dict(
            _corrupt(PackedBatchSampler([np.arange(20)], 2, 5, seed=0).state_dict(), kind="batch")
        )


def test_load_text_reads_at_most_its_bound(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("a" * 101)
    with pytest.raises(ValueError, match="more than 100 bytes"):
        load_text(path, max_bytes=100)
    assert load_text(path, max_bytes=101) == "a" * 101


@pytest.mark.skipif(not __import__("os").path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_stream_is_refused_at_the_bound():
    # /dev/zero reports size 0 and never ends: only max_bytes + 1 bytes are read
    with pytest.raises(ValueError, match="/dev/zero.*more than 1,000 bytes"):
        load_text("/dev/zero", max_bytes=1000)


def test_encode_names_the_text_it_refuses():
    with pytest.raises(ValueError, match="--prompt contains 1 character"):
        CharTokenizer("abc").encode("abz", "--prompt")
