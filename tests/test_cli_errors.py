"""Every user mistake at the command line is one clear line on stderr and exit code 2.

An adversarial probe of every subcommand, run in-process: each bad input must give exactly one
line ``npformer <cmd>: <message>`` (argparse's own ``usage: ... error: ...`` for a value its
type refuses) naming the option, file or field, exit code 2, no traceback, and must leave what
was already written in place. A raw exception escaping ``main`` fails the test with its
traceback, which is the point.
"""

import os
import shutil

import numpy as np
import pytest

from npformer.cli import main

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--steps", "2",
        "--batch-size", "2", "--seq-len", "8", "--no-progress", "--sample-tokens", "0",
        "--eval-interval", "1", "--eval-batches", "1", "--checkpoint-interval", "1"]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A data file, a plain file, a non-UTF-8 file, and one trained run to sample from."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "data.txt").write_text(TEXT)
    (root / "a_file").write_text("not a directory")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("abcdefghij\n")  # 11 characters: too short for T = 8
    (root / "one_doc.txt").write_text(TEXT.replace("\n\n", "\n"))  # one document (llama3)
    (root / "empty_dir").mkdir()
    assert main(["train", *TINY, "--data", str(root / "data.txt"), "--out", str(root / "run")]) == 0
    assert main(["train", *TINY, "--seq-len", "1", "--data", str(root / "data.txt"),
                 "--out", str(root / "run_t1")]) == 0
    return root


def _expect_error(argv, capsys, command, *needles, argparse_error=False):
    """main(argv) must exit 2 with one message naming ``needles`` and no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refusing a value
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    prefix = "npformer" + (f" {command}" if command else "")
    if argparse_error:
        assert lines[0].startswith("usage: npformer"), err
        message = lines[-1]
        assert message.startswith(f"{prefix}: error: "), err
    else:
        assert len(lines) == 1, err
        message = lines[0]
        assert message.startswith(f"{prefix}: "), err
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------- train

# (extra arguments, words the message must contain, is it argparse's own error)
TRAIN_CASES = [
    # numbers the option's type refuses
    (["--steps", "0"], ["--steps", "≥ 1"], True),
    (["--steps", "-5"], ["--steps"], True),
    (["--batch-size", "0"], ["--batch-size"], True),
    (["--seq-len", "-1"], ["--seq-len"], True),
    (["--eval-interval", "0"], ["--eval-interval"], True),
    (["--eval-batches", "0"], ["--eval-batches"], True),
    (["--checkpoint-interval", "0"], ["--checkpoint-interval"], True),
    (["--warmup-steps", "-1"], ["--warmup-steps", "≥ 0"], True),
    (["--seed", "-1"], ["--seed", "≥ 0"], True),
    (["--stop-after", "0"], ["--stop-after", "≥ 1"], True),
    (["--sample-tokens", "-1"], ["--sample-tokens", "≥ 0"], True),
    (["--lr", "nan"], ["--lr", "finite"], True),
    (["--lr", "inf"], ["--lr", "finite"], True),
    (["--lr", "-1e-3"], ["--lr"], True),
    (["--min-lr", "nan"], ["--min-lr"], True),
    (["--weight-decay", "-inf"], ["--weight-decay"], True),
    (["--grad-clip", "nan"], ["--grad-clip"], True),
    (["--dropout", "nan"], ["--dropout"], True),
    (["--dropout", "1"], ["dropout", "[0, 1)"], False),
    (["--d-model", "0"], ["--d-model"], True),
    (["--n-layers", "-2"], ["--n-layers"], True),
    (["--n-heads", "0"], ["--n-heads"], True),
    (["--n-kv-heads", "0"], ["--n-kv-heads"], True),
    (["--steps", "two"], ["--steps", "integer"], True),
    # values each fine alone that do not fit together
    (["--min-lr", "1"], ["--min-lr", "--lr"], False),
    (["--n-heads", "3"], ["n_heads=3", "d_model=16"], False),
    (["--n-kv-heads", "3"], ["n_kv_heads=3"], False),
    (["--preset", "gpt5"], ["unknown preset 'gpt5'", "llama3"], False),
    # sizes that could never be allocated: refused before allocating, with the size needed
    (["--batch-size", str(10**12)], ["--batch-size", "memory", "PB"], False),
    (["--batch-size", str(10**9), "--seq-len", "100"], ["--batch-size", "memory", "TB"], False),
    (["--n-layers", str(10**8)], ["memory", "parameters"], False),
    (["--d-model", str(2**20), "--n-heads", "1"], ["memory", "parameters"], False),
    (["--n-layers", str(10**12)], ["n_layers", "parameters"], False),
    # data: the split must hold a window of --seq-len, named
    (["--seq-len", str(10**6)], ["--seq-len", "training split"], False),
    (["--seq-len", "130"], ["--seq-len", "validation split"], False),
    (["--preset", "transformer-2017", "--seq-len", "70"], ["--seq-len", "validation split"], False),
    # the final sample's prompt is checked before training, not after
    (["--sample-tokens", "5", "--prompt", "Zebra ¿"], ["--prompt 'Zebra ¿'", "'Zb¿'", "outside the vocabulary", "--sample-tokens 0"], False),
    (["--sample-tokens", "5", "--prompt", ""], ["--prompt", "empty"], False),
]


@pytest.mark.parametrize("extra, needles, argparse_error", TRAIN_CASES,
                         ids=[" ".join(c[0])[:40] for c in TRAIN_CASES])
def test_train_bad_options(workdir, tmp_path, capsys, extra, needles, argparse_error):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data", str(workdir / "data.txt"), "--out", str(out), *extra]
    _expect_error(argv, capsys, "train", *needles, argparse_error=argparse_error)
    assert not out.exists() or not os.listdir(out)  # nothing half-written


def test_the_document_mask_needs_two_documents(workdir, tmp_path, capsys):
    argv = ["train", *TINY, "--preset", "llama3", "--n-kv-heads", "1",
            "--data", str(workdir / "one_doc.txt"), "--out", str(tmp_path / "run")]
    _expect_error(argv, capsys, "train", "one_doc.txt", "training split", "no document")


DATA_CASES = [
    ("missing.txt", ["missing.txt", "does not exist"]),
    ("empty_dir", ["empty_dir", "is a directory"]),
    ("latin1.txt", ["latin1.txt", "not valid UTF-8"]),
    ("empty.txt", ["empty.txt", "empty"]),
    ("short.txt", ["--data", "--seq-len", "validation split", "has 2 tokens"]),
]


@pytest.mark.parametrize("name, needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_train_bad_data(workdir, tmp_path, capsys, name, needles):
    argv = ["train", *TINY, "--data", str(workdir / name), "--out", str(tmp_path / "run")]
    _expect_error(argv, capsys, "train", *needles)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_stream_as_data_is_refused_at_a_bound(tmp_path, capsys):
    from npformer.dataset import MAX_TEXT_BYTES

    argv = ["train", *TINY, "--data", "/dev/zero", "--out", str(tmp_path / "run")]
    _expect_error(argv, capsys, "train", "/dev/zero", f"{MAX_TEXT_BYTES:,} bytes")


def test_train_bad_out(workdir, tmp_path, capsys):
    data = ["--data", str(workdir / "data.txt")]
    _expect_error(["train", *TINY, *data, "--out", str(workdir / "a_file")], capsys, "train",
                  "--out", "a_file", "not a directory")
    _expect_error(["train", *TINY, *data, "--out", str(workdir / "a_file" / "run")], capsys,
                  "train", "--out", "a_file")
    _expect_error(["train", *TINY, *data, "--out", ""], capsys, "train", "--out", "empty")
    if os.path.isdir("/proc/self"):
        _expect_error(["train", *TINY, *data, "--out", "/proc/self/npformer-run"], capsys,
                      "train", "--out", "/proc/self/npformer-run")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK) or os.geteuid() != 0:
            _expect_error(["train", *TINY, *data, "--out", str(locked / "run")], capsys,
                          "train", "--out", "locked")
    finally:
        locked.chmod(0o700)


def test_bad_options_with_overwrite_delete_nothing(workdir, tmp_path, capsys):
    """--overwrite replaces a run only once everything, the final prompt included, is valid."""
    run = tmp_path / "run"
    shutil.copytree(workdir / "run", run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    data = ["--data", str(workdir / "data.txt")]
    for extra in (["--batch-size", str(10**12)], ["--seq-len", "130"], ["--n-heads", "3"],
                  ["--sample-tokens", "5", "--prompt", "Zebra"], ["--data", "/nonexistent"]):
        argv = ["train", *TINY, *data, "--out", str(run), "--overwrite", *extra]
        _expect_error(argv, capsys, "train")
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_resume_checks_the_prompt_against_the_runs_vocabulary(workdir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workdir / "run", run)
    before = {name: (run / name).read_bytes() for name in ("latest.json", "train.json")}
    argv = ["train", *TINY, "--steps", "3", "--data", str(workdir / "data.txt"), "--out", str(run),
            "--resume", "--sample-tokens", "5", "--prompt", "ROMEO:"]
    _expect_error(argv, capsys, "train", "--prompt 'ROMEO:'", "the run in", "'EMOR'")
    # refused before a step was taken or the options were rewritten
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_one_token_context_model_trains_and_samples(workdir, capsys):
    # --seq-len 1 gives max_seq_len 1: generation keeps the last token as its context
    assert main(["sample", "--ckpt", str(workdir / "run_t1"), "--prompt", "First", "--tokens",
                 "20"]) == 0
    assert capsys.readouterr().out.startswith("First")


# ---------------------------------------------------------------------------------------- sample

SAMPLE_CASES = [
    (["--tokens", "-1"], ["--tokens", "≥ 0"], True),
    (["--temperature", "-0.5"], ["--temperature"], True),
    (["--temperature", "nan"], ["--temperature", "finite"], True),
    (["--temperature", "inf"], ["--temperature", "finite"], True),
    (["--top-k", "0"], ["--top-k", "≥ 1"], True),
    (["--top-k", "-3"], ["--top-k"], True),
    (["--seed", "-1"], ["--seed", "≥ 0"], True),
    (["--prompt", "Zebra ¿"], ["--prompt", "outside the vocabulary", "Z"], False),
    (["--prompt", ""], ["--prompt", "empty"], False),
]


@pytest.mark.parametrize("extra, needles, argparse_error", SAMPLE_CASES,
                         ids=[" ".join(c[0])[:40] for c in SAMPLE_CASES])
def test_sample_bad_options(workdir, capsys, extra, needles, argparse_error):
    argv = ["sample", "--ckpt", str(workdir / "run"), "--prompt", "First", "--tokens", "5", *extra]
    _expect_error(argv, capsys, "sample", *needles, argparse_error=argparse_error)


@pytest.mark.parametrize("ckpt, needles", [
    ("missing", ["missing"]), ("a_file", ["a_file"]), ("empty_dir", ["empty_dir", "checkpoint"]),
])
def test_sample_bad_ckpt(workdir, capsys, ckpt, needles):
    _expect_error(["sample", "--ckpt", str(workdir / ckpt)], capsys, "sample", *needles)


@pytest.mark.parametrize("temperature", ["1e-300", "5e-324", "1e300"])
def test_extreme_temperatures_sample_without_overflow(workdir, capsys, temperature):
    # a tiny τ is greedy in the limit (z / τ overflowed to inf and NaN before); a huge τ uniform
    assert main(["sample", "--ckpt", str(workdir / "run"), "--prompt", "First", "--tokens",
                 "12", "--temperature", temperature]) == 0
    text = capsys.readouterr().out
    if float(temperature) < 1:
        assert main(["sample", "--ckpt", str(workdir / "run"), "--prompt", "First",
                     "--tokens", "12", "--temperature", "0"]) == 0
        assert capsys.readouterr().out == text


def test_top_k_above_the_vocabulary_keeps_every_token(workdir, capsys):
    args = ["sample", "--ckpt", str(workdir / "run"), "--prompt", "First", "--tokens", "12"]
    assert main([*args, "--top-k", "100000"]) == 0
    with_top_k = capsys.readouterr().out
    assert main(args) == 0
    assert with_top_k.startswith("First") and with_top_k == capsys.readouterr().out  # same seed


def test_tokens_zero_prints_the_prompt(workdir, capsys):
    assert main(["sample", "--ckpt", str(workdir / "run"), "--prompt", "First", "--tokens", "0"]) == 0
    assert capsys.readouterr().out == "First\n"


def test_a_prompt_longer_than_the_context_is_cropped(workdir, capsys):
    # max_seq_len is 8 (learned positions): the model sees the last 8 characters, as GPT-2's
    # generate does, for the prompt and for every continuation beyond it
    prompt = "Before we proceed any further"
    assert main(["sample", "--ckpt", str(workdir / "run"), "--prompt", prompt, "--tokens", "30"]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_a_model_with_nan_weights_is_named_not_sampled(workdir, tmp_path, capsys):
    """A checkpoint saved with a NaN weight (valid checksums: a diverged run, not a damaged
    file) is refused by name — tensor and file — instead of sampling from NaN logits."""
    from npformer import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(workdir / "run", run)
    config, tokenizer, tensors, optimizer, state = ckpt.load_checkpoint(str(run))
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    ckpt.save_checkpoint(str(run), state["step"], tensors, optimizer, state,
                         config=config.to_dict(), tokenizer=tokenizer)
    _expect_error(["sample", "--ckpt", str(run), "--prompt", "First", "--tokens", "3"], capsys,
                  "sample", "model.safetensors", name, "NaN or infinite")


# ---------------------------------------------------------------------------------------- others

def test_gradcheck_compare_presets_bad_input(capsys):
    _expect_error(["gradcheck", "nope"], capsys, "gradcheck", "unknown gradient check")
    _expect_error(["gradcheck", "--preset", "gpt5"], capsys, "gradcheck", "gpt5")
    _expect_error(["presets", "--bogus"], capsys, "", "--bogus", argparse_error=True)
    _expect_error(["nope"], capsys, "", "nope", argparse_error=True)
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _expect_error(["compare"], capsys, "compare", "--preset", "--hf")
    _expect_error(["compare", "--preset", "gpt5"], capsys, "compare", "gpt5")
    _expect_error(["compare", "--preset", "gpt2", "--hf", "x"], capsys, "compare", "--hf")


def test_an_os_error_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """The safety net: a file-system failure no check foresaw names the path and the reason."""
    from npformer import train

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(train.os, "makedirs", refuse)
    argv = ["train", *TINY, "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "run")]
    (tmp_path / "d.txt").write_text(TEXT)
    _expect_error(argv, capsys, "train", "Permission denied", str(tmp_path / "run"))


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only OSError is caught at the top: a programming error must not be hidden."""
    from npformer import cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_cmd_presets", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["presets"])
