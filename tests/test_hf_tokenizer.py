"""A checkpoint's tokenizer.json: encode/decode as transformers, ``npformer sample --hf`` and
``npformer compare --hf --prompt`` from text, and every broken tokenizer directory refused.

The checkpoint is built here, no hub: a byte-level BPE (Llama 3 / GPT-2 style, a BOS added by
its TemplateProcessing post-processor) trained with ``tokenizers`` on a slice of the shipped
corpus, saved beside a tiny random-weight ``LlamaForCausalLM`` whose vocab_size is the
tokenizer's.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from npformer.cli import main, sample_hf
from npformer.interop import load_hf
from npformer.interop.hf_examples import EXAMPLES, write_example
from npformer.interop.tokenizer import load_tokenizer, stop_token_ids

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CORPUS = os.path.join(os.path.dirname(__file__), "..", "npformer", "data", "tinyshakespeare.txt")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # ids 0 and 1
PROMPT = "ROMEO:\nWhat light"
N_NEW = 8
TEXTS = [PROMPT, "First Citizen:\nBefore we proceed any further, hear me speak.",
         "  two spaces, a tab\tand wörld ¿ 你好 — unseen characters", "x", ""]


def _corpus_slice(n_chars=20_000):
    with open(CORPUS, encoding="utf-8") as f:
        return f.read(n_chars)


def _byte_level_bpe(vocab_size=300):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_corpus_slice()], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    return tokenizer


def _llama(vocab_size, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    hf = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # off-centre random weights, norm gains around 1
        for name, p in hf.named_parameters():
            z = rng.standard_normal(tuple(p.shape))
            p.copy_(torch.from_numpy(1.0 + 0.25 * z if "norm" in name else 0.35 * z + 0.05))
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A save_pretrained directory with a tokenizer.json of the same vocabulary size."""
    path = tmp_path_factory.mktemp("hf_tokenizer") / "llama-bpe"
    tokenizer = _byte_level_bpe()
    _llama(tokenizer.get_vocab_size()).save_pretrained(str(path))
    tokenizer.save(str(path / "tokenizer.json"))
    return str(path)


def _copy(checkpoint, tmp_path, name="ckpt"):
    target = tmp_path / name
    shutil.copytree(checkpoint, target)
    return target


def _hf_tokenizer(path):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


# ---- encode / decode ------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_equal_transformers(checkpoint, text):
    ours, theirs = load_tokenizer(checkpoint), _hf_tokenizer(checkpoint)
    with_bos = ours.encode(text)
    assert with_bos.dtype == np.int64 and with_bos[0] == 0  # the post-processor's BOS
    assert with_bos.tolist() == theirs.encode(text)
    if text:
        bare = ours.encode(text, add_special_tokens=False)
        assert bare.tolist() == theirs.encode(text, add_special_tokens=False)
        assert bare.tolist() == with_bos[1:].tolist()
        assert ours.decode(bare) == text  # byte-level BPE: a lossless round trip
    for skip in (False, True):
        assert ours.decode(with_bos, skip_special_tokens=skip) == theirs.decode(
            with_bos.tolist(), skip_special_tokens=skip)
    assert ours.decode(with_bos).startswith(BOS)  # transformers' default keeps special tokens


def _no_post_processor(path):
    contents = json.loads((path / "tokenizer.json").read_text())
    contents["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(contents))


FLAGS = dict(bos_token=BOS, eos_token=EOS, tokenizer_class="PreTrainedTokenizerFast")
# (tokenizer_config.json, post-processor kept) → the special ids before a text
SPECIAL_TOKEN_CASES = {
    "tokenizer.json's template": (None, True, [0]),
    "no add_* flags": (FLAGS, True, [0]),
    # transformers 5 drops these flags when a tokenizer.json exists
    "add_bos_token false": (dict(FLAGS, add_bos_token=False), True, [0]),
    "add_eos_token true": (dict(FLAGS, add_bos_token=True, add_eos_token=True), True, [0]),
    "no post-processor": (dict(FLAGS, add_bos_token=True), False, []),
}


@pytest.mark.parametrize("settings, keep_post_processor, before", SPECIAL_TOKEN_CASES.values(),
                         ids=SPECIAL_TOKEN_CASES.keys())
def test_special_tokens_are_those_auto_tokenizer_adds(checkpoint, tmp_path, settings,
                                                      keep_post_processor, before):
    path = _copy(checkpoint, tmp_path)
    if settings is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(settings))
    if not keep_post_processor:
        _no_post_processor(path)
    ours = load_tokenizer(str(path))
    bare = ours.encode(PROMPT, add_special_tokens=False).tolist()
    assert ours.encode(PROMPT).tolist() == before + bare
    assert ours.special_tokens_added() == before
    theirs = (_hf_tokenizer(str(path)) if settings is None
              else transformers.AutoTokenizer.from_pretrained(str(path)))
    assert ours.encode(PROMPT).tolist() == theirs.encode(PROMPT)


# ---- npformer sample --hf -------------------------------------------------------------------


def _hf_generate(path, prompt_ids, n_new):
    """transformers' greedy generate in float64 (float32 islands patched out), new ids."""
    from npformer.interop.hf_float64 import exact_float64

    with exact_float64():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        out = hf.generate(torch.as_tensor(prompt_ids)[None], do_sample=False,
                          max_new_tokens=n_new, attention_mask=torch.ones(1, len(prompt_ids),
                                                                          dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def _greedy_margins(path, prompt_ids, new_ids):
    """At each step, the gap between the largest and second largest logit relative to the
    largest |logit|: a gap above the float64 parity tolerance means argmax cannot flip."""
    model = load_hf(path)
    ids = np.concatenate([prompt_ids, new_ids[:-1]])[None]
    logits = model.forward(ids)[0, len(prompt_ids) - 1:]  # (n_new, V)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / np.abs(logits).max()


def test_sample_hf_greedy_equals_transformers_generate(checkpoint, capsys):
    argv = ["sample", "--hf", checkpoint, "--prompt", PROMPT, "--tokens", str(N_NEW),
            "--temperature", "0", "--dtype", "float64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    text, prompt_ids, new = sample_hf(checkpoint, PROMPT, N_NEW, temperature=0.0, dtype="float64")
    assert prompt_ids.tolist() == _hf_tokenizer(checkpoint).encode(PROMPT)
    theirs = _hf_generate(checkpoint, prompt_ids, N_NEW)
    assert 1 not in new, "the greedy run hit the EOS id early; pick another prompt or seed"
    assert new == theirs and len(new) == N_NEW and len(set(new)) > 2
    assert _greedy_margins(checkpoint, prompt_ids, np.asarray(new)).min() > 1e-6
    # the printed text: the prompt as given, then the decoded continuation
    whole = _hf_tokenizer(checkpoint).decode(prompt_ids.tolist() + theirs, skip_special_tokens=True)
    assert printed == text + "\n" and text == whole and text.startswith(PROMPT)
    # without the KV cache, the same tokens (and float32 greedy agrees on this prompt)
    assert main(argv + ["--no-cache"]) == 0
    assert capsys.readouterr().out == printed
    assert sample_hf(checkpoint, PROMPT, N_NEW, 0.0, dtype="float64", use_cache=False)[2] == new


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_family_samples_from_a_prompt_as_transformers(tmp_path, name):
    """Each issue-16 family example (npformer.interop.hf_examples: Mistral, Qwen2/3, Phi-3,
    Gemma/Gemma 2, the scaled-RoPE llamas), given this tokenizer.json: greedy ``sample --hf``
    with the KV cache gives transformers' greedy ``generate`` ids in float64."""
    tokenizer = _byte_level_bpe()
    path = str(tmp_path / name)
    write_example(name, path, "float64", vocab_size=tokenizer.get_vocab_size(), bos_token_id=0,
                  eos_token_id=1, pad_token_id=0)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    prompt, n_new = "ROMEO:", 6  # within the examples' 16 positions, past their windows
    _, prompt_ids, new = sample_hf(path, prompt, n_new, temperature=0.0, dtype="float64")
    assert len(prompt_ids) + n_new > 4  # past the windows and the scaled RoPEs' original 4
    assert new == _hf_generate(path, prompt_ids, n_new) and len(new) == n_new
    assert _greedy_margins(path, prompt_ids, np.asarray(new)).min() > 1e-9


def test_sample_hf_stops_at_the_checkpoints_eos(checkpoint, tmp_path):
    """generation_config.json's eos_token_id ends the sample, as in transformers' generate:
    make the third greedy token the end-of-sequence id."""
    _, prompt_ids, new = sample_hf(checkpoint, PROMPT, N_NEW, temperature=0.0, dtype="float64")
    path = _copy(checkpoint, tmp_path)
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = new[2]
    (path / "generation_config.json").write_text(json.dumps(generation))
    assert stop_token_ids(str(path)) == [new[2]] and stop_token_ids(checkpoint) == [1]
    stopped = sample_hf(str(path), PROMPT, N_NEW, temperature=0.0, dtype="float64")[2]
    assert stopped == new[:3] == _hf_generate(str(path), prompt_ids, N_NEW)


def test_sample_hf_with_temperature_and_top_k_is_seeded(checkpoint, capsys):
    argv = ["sample", "--hf", checkpoint, "--prompt", PROMPT, "--tokens", "6", "--top-k", "5",
            "--temperature", "1.5", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0 and capsys.readouterr().out == first and first.startswith(PROMPT)
    # an empty prompt is the BOS alone, as with transformers: an unconditional sample
    assert sample_hf(checkpoint, "", 3, 0.0)[1].tolist() == [0]


# ---- npformer compare --hf --prompt ---------------------------------------------------------


def test_compare_hf_on_the_prompts_tokens(checkpoint, capsys):
    prompt = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert main(["compare", "--hf", checkpoint, "--prompt", prompt, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports and all(r["passed"] for r in reports)
    n_tokens = len(load_tokenizer(checkpoint).encode(prompt))
    assert n_tokens - 1 != 2 * 7  # not the shape of the random batch
    vocab = json.loads(open(os.path.join(checkpoint, "config.json")).read())["vocab_size"]
    logits = next(r for r in reports if r["tensor"] == "logits")
    assert logits["n_checked"] == (n_tokens - 1) * vocab  # one row: the prompt minus its last id


# ---- errors ---------------------------------------------------------------------------------


def _expect_error(argv, capsys, command, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"npformer {command}: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def _only(files):
    def make(path):
        for name in os.listdir(path):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json",):
                os.remove(path / name)
        for name, text in files.items():
            (path / name).write_text(text)
    return make


def _edit_json(name, change):
    def make(path):
        contents = json.loads((path / name).read_text()) if (path / name).exists() else {}
        change(contents)
        (path / name).write_text(json.dumps(contents))
    return make


def _whitespace_bpe(path):
    """A BPE with a whitespace pre-tokenizer, no byte fallback and no unknown token, of the
    model's vocabulary size: tokenizers silently drops the characters it has no token for."""
    vocab_size = load_tokenizer(str(path)).vocab_size
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([_corpus_slice()], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False))
    assert tokenizer.encode("ROMEO 你").ids == tokenizer.encode("ROMEO").ids  # dropped silently
    tokenizer.save(str(path / "tokenizer.json"))


def _add_token_beyond_the_model(path):
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|extra|>"])
    tokenizer.save(str(path / "tokenizer.json"))


# (name, how to break a copy of the checkpoint, --prompt, words the one-line error must hold)
BROKEN = {
    "sentencepiece only": (_only({"tokenizer.model": "\x0a\x0b"}), PROMPT,
                           ["no tokenizer.json", "tokenizer.model (a sentencepiece model)",
                            "ckpt"]),
    "vocab.json and merges.txt only": (_only({"vocab.json": "{}", "merges.txt": ""}), PROMPT,
                                       ["no tokenizer.json", "vocab.json", "merges.txt"]),
    "no tokenizer": (_only({}), PROMPT, ["no tokenizer.json", "found no tokenizer file",
                                         "config.json"]),
    "malformed JSON": (_only({"tokenizer.json": '{"model": {'}), PROMPT,
                       ["tokenizer.json is not valid JSON"]),
    "JSON without a model": (_only({"tokenizer.json": '{"version": "1.0"}'}), PROMPT,
                             ["tokenizer.json is not a tokenizers file", "'model'"]),
    "unknown model type": (_edit_json("tokenizer.json", lambda t: t["model"].update(type="Nope")),
                           PROMPT, ["is not a tokenizer.json the tokenizers library"]),
    "id beyond the model's vocab_size": (_add_token_beyond_the_model, "ROMEO <|extra|>",
                                         ["vocab_size 300", "<|extra|>", "[300]"]),
    "empty encoding": (_no_post_processor, "", ["--prompt ''", "no token ids"]),
    "characters the tokenizer drops": (_whitespace_bpe, "ROMEO 你", ["'你'", "drops"]),
    "bad eos_token_id": (_edit_json("generation_config.json", lambda c: c.update(eos_token_id="x")),
                         PROMPT, ["generation_config.json", "'eos_token_id'"]),
}


READS_ONLY_WHEN_SAMPLING = {"bad eos_token_id"}  # compare does not generate: no stop ids
BROKEN_CASES = [(command, *BROKEN[name]) for name in BROKEN for command in ("sample", "compare")
                if command == "sample" or name not in READS_ONLY_WHEN_SAMPLING]


@pytest.mark.parametrize("command, break_it, prompt, needles", BROKEN_CASES,
                         ids=[f"{c}-{n}" for n in BROKEN for c in ("sample", "compare")
                              if c == "sample" or n not in READS_ONLY_WHEN_SAMPLING])
def test_broken_tokenizers_are_one_clear_line(checkpoint, tmp_path, capsys, command, break_it,
                                              prompt, needles):
    path = _copy(checkpoint, tmp_path)
    break_it(path)
    tokens = ["--tokens", "2"] if command == "sample" else []
    _expect_error([command, "--hf", str(path), "--prompt", prompt, *tokens], capsys, command,
                  *needles)


def test_compare_needs_two_tokens_a_checkpoint_and_a_prompt_that_fits(checkpoint, capsys):
    # the BOS alone: nothing to predict
    _expect_error(["compare", "--hf", checkpoint, "--prompt", ""], capsys, "compare",
                  "at least 2 token ids", "[0]")
    _expect_error(["compare", "--preset", "gpt2", "--prompt", "hi"], capsys, "compare",
                  "--prompt needs --hf")
    # BOS + 64 × " the": 64 positions (max_position_embeddings) compare; one more is too many
    assert len(load_tokenizer(checkpoint).encode(" the", add_special_tokens=False)) == 1
    assert main(["compare", "--hf", checkpoint, "--prompt", " the" * 64]) == 0
    capsys.readouterr()
    _expect_error(["compare", "--hf", checkpoint, "--prompt", " the" * 65], capsys, "compare",
                  "66 tokens, 65 positions", "at most 64", "shorter --prompt")


def test_sample_option_combinations(checkpoint, tmp_path, capsys):
    _expect_error(["sample", "--prompt", "hi"], capsys, "sample", "--ckpt", "--hf")
    _expect_error(["sample", "--hf", checkpoint, "--ckpt", checkpoint], capsys, "sample", "--ckpt")
    _expect_error(["sample", "--ckpt", str(tmp_path), "--dtype", "float64"], capsys, "sample",
                  "--dtype")
    _expect_error(["sample", "--hf", str(tmp_path / "missing")], capsys, "sample", "missing",
                  "config.json")


def test_decode_refuses_ids_that_name_no_token(checkpoint):
    tokenizer = load_tokenizer(checkpoint, model_vocab_size=200)
    assert tokenizer.decode([5, 199]) == load_tokenizer(checkpoint).decode([5, 199])
    for ids, needle in (([5, 300], "ids [300] name no token"), ([-1], "ids [-1] name no token"),
                        ([250], "the model of")):
        with pytest.raises(ValueError, match=r"ids") as error:
            tokenizer.decode(ids)
        assert needle in str(error.value)
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        tokenizer.decode([[1, 2]])
    with pytest.raises(ValueError, match="model_vocab_size"):
        load_tokenizer(checkpoint, model_vocab_size=0)


def test_without_the_tokenizers_package_the_module_imports_and_use_says_how_to_install(checkpoint):
    code = f"""
import sys
sys.modules["tokenizers"] = None  # import tokenizers now raises ImportError
import npformer.interop.tokenizer
from npformer.cli import main
sys.exit(main(["sample", "--hf", {checkpoint!r}, "--tokens", "2"]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("npformer sample: reading a tokenizer.json needs the "
                                    "tokenizers package")
    assert 'pip install "tokenizers>=0.15"' in result.stderr and "Traceback" not in result.stderr


def test_a_sampled_id_beyond_the_tokenizer_is_named(tmp_path, capsys):
    """A model whose table is padded past its tokenizer (vocab_size 310, 300 tokens) and whose
    final norm gain is 0, so every logit is 0 and a draw is uniform: the draws reach the ten
    rows no token decodes from, which must be an error naming them, not text missing a piece."""
    tokenizer = _byte_level_bpe()
    hf = _llama(tokenizer.get_vocab_size() + 10)
    with torch.no_grad():
        hf.model.norm.weight.zero_()
    hf.generation_config.eos_token_id = None  # no early stop at the EOS id 1
    hf.config.eos_token_id = None
    hf.save_pretrained(str(tmp_path))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert stop_token_ids(str(tmp_path)) == []
    _expect_error(["sample", "--hf", str(tmp_path), "--prompt", PROMPT, "--tokens", "40",
                   "--temperature", "1"], capsys, "sample", "generated id(s) [30", "300 tokens",
                  "vocab_size 310")
