"""The ``npformer`` command line.

    npformer gradcheck [NAME ...] [--json] [--list] [--preset NAME|all ...]
    npformer presets [--json]
    npformer explain NAME [--png DIR] [--docs DIR]
    npformer compare (--preset NAME|all ... | --family NAME|all ... | --hf DIR [--prompt TEXT])
                     [--dtype D] [--json]
    npformer train [--preset NAME] [--steps N] [--out DIR] [--resume] ...
    npformer tour [--quick] [--seeds N] [--steps N] [--out DIR] [--only NAME ...] [--workers N]
                  [--scheduler ADDRESS] [--overwrite]
    npformer study softmax [--quick] [--seeds N] [--steps N] [--out DIR] [--workers N]
                           [--scheduler ADDRESS] [--overwrite]
    npformer sample (--ckpt RUN_DIR | --hf DIR [--dtype D]) [--prompt TEXT] [--tokens N]
                    [--temperature T] [--top-k K] [--seed S]

Each subcommand lives in its own function; ``main`` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import numpy as np


# ---- option types: argparse refuses a bad value with "argument --NAME: ...", exit code 2


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def _finite_float(minimum=None):
    """float() accepts 'nan' and 'inf'; an option value must be a finite number."""
    bound = "" if minimum is None else f" ≥ {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    parse.__name__ = f"finite number{bound}"
    return parse


_COUNT, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
_RATE, _FINITE = _finite_float(0.0), _finite_float()


def _check_prompt(tokenizer, prompt: str, source: str) -> None:
    """The prompt must be non-empty and every character in the tokenizer's vocabulary (a
    byte tokenizer has every character; a character tokenizer only those of its corpus)."""
    if not prompt:
        raise ValueError("--prompt is empty; the sample needs at least one character to start from")
    unknown = sorted(set(prompt) - set(getattr(tokenizer, "chars", prompt)))
    if unknown:
        advice = "" if source.startswith("the run") else ", or --sample-tokens 0"
        raise ValueError(f"--prompt {prompt!r} has {len(unknown)} character(s) outside the "
                         f"vocabulary of {source} ({tokenizer.vocab_size} characters): "
                         f"{''.join(unknown[:20])!r}; pass a --prompt made of its "
                         f"characters{advice}")


def _print_reports(reports, as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        from .gradcheck import format_table

        print(format_table(reports))


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401  (the twin is a torch model)
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"npformer compare needs torch and transformers (pip install -e \".[test]\"): "
              f"{error}", file=sys.stderr)
        return 2
    from .interop.compare import compare_example, compare_hf_dir, compare_preset
    from .interop.hf_examples import EXAMPLES
    from .presets import get_preset, preset_names

    if sum(map(bool, (args.preset, args.hf, args.family))) != 1:
        print("npformer compare: give one of --preset NAME, --family NAME (each repeatable, or "
              "'all') and --hf DIR", file=sys.stderr)
        return 2
    if args.prompt is not None and not args.hf:
        print("npformer compare: --prompt needs --hf DIR (a checkpoint with a tokenizer.json)",
              file=sys.stderr)
        return 2
    transformers.utils.logging.disable_progress_bar()  # no bars between the table's lines
    reports = []
    try:
        if args.hf:
            tokens = None if args.prompt is None else _hf_prompt_ids(args.hf, args.prompt)
            reports = compare_hf_dir(args.hf, args.dtype, tokens=tokens)
            if args.dtype == "float64":
                from .interop.hf_float64 import float64_patches_line

                print(float64_patches_line(args.hf), file=sys.stderr if args.json else sys.stdout)
        elif args.family:
            names = list(EXAMPLES) if "all" in args.family else args.family
            unknown = sorted(set(names) - set(EXAMPLES))
            if unknown:
                raise ValueError(f"unknown --family {', '.join(unknown)}; choose among "
                                 f"{list(EXAMPLES)} or 'all'")
            for name in names:
                reports += compare_example(name, args.dtype)
        else:
            names = preset_names() if "all" in args.preset else args.preset
            for name in names:
                get_preset(name)
            for name in names:
                reports += compare_preset(name, args.dtype)
    except (ValueError, ImportError) as error:  # ImportError: the tokenizers package
        print(f"npformer compare: {error}", file=sys.stderr)
        return 2
    _print_reports(reports, args.json)
    return 0 if all(r.passed for r in reports) else 1


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import registered_checks, run_checks

    if args.list:
        for name in registered_checks():
            print(name)
        return 0
    try:
        if args.preset:
            from .checks.models import check_presets
            from .presets import get_preset, preset_names

            names = preset_names() if "all" in args.preset else args.preset
            for name in names:
                get_preset(name)  # unknown names fail before any work
            reports = run_checks(args.names) if args.names else []
            reports += check_presets(names)
        else:
            reports = run_checks(args.names or None)
    except ValueError as error:
        print(f"npformer gradcheck: {error}", file=sys.stderr)
        return 2
    _print_reports(reports, args.json)
    return 0 if all(r.passed for r in reports) else 1


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_command

    try:
        return explain_command(args.name, args.png, args.docs)
    except ValueError as error:
        print(f"npformer explain: {error}", file=sys.stderr)
        return 2


def lineage_rows() -> List[dict]:
    """One row per preset: name, parent, year, what changed, parameter count and forward
    FLOPs per token at the preset's default size."""
    from .models.stats import forward_flops_per_token, parameter_count
    from .presets import LINEAGE, preset_config

    rows = []
    for preset in LINEAGE:
        config = preset_config(preset.name)
        rows.append(dict(name=preset.name, parent=preset.parent, year=preset.year,
                         paper=preset.paper, changes=preset.changes,
                         changed_fields={k: list(v) if isinstance(v, tuple) else v
                                         for k, v in preset.fields.items()},
                         n_params=parameter_count(config),
                         forward_flops_per_token=forward_flops_per_token(config),
                         seq_len=config.max_seq_len, d_model=config.d_model,
                         n_layers=config.n_layers, n_heads=config.n_heads,
                         n_kv_heads=config.kv_heads))
    return rows


def _cmd_presets(args: argparse.Namespace) -> int:
    rows = lineage_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = ("preset", "parent", "year", "params", "MFLOP/token", "what changed")
    table = [(r["name"], r["parent"] or "-", str(r["year"]), f"{r['n_params']:,}",
              f"{r['forward_flops_per_token'] / 1e6:.2f}", r["changes"]) for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *table)]
    widths[-1] = 0  # the last column is not padded
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * (w or len(h)) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    print(f"default size: C = {rows[0]['d_model']}, {rows[0]['n_layers']} layers, "
          f"{rows[0]['n_heads']} heads; FLOPs: forward matrix products per token at "
          f"T = {rows[0]['seq_len']}")
    return 0


_MODEL_SIZE_FLAGS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "dropout", "layer_impl",
                     "attention_impl")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, TrainingDiverged, TrainOptions

    overrides = {name: getattr(args, name) for name in _MODEL_SIZE_FLAGS
                 if getattr(args, name) is not None}
    options = TrainOptions(
        preset=args.preset, out=args.out, data=args.data, tokenizer=args.tokenizer,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        seed=args.seed, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        checkpoint_interval=args.checkpoint_interval, dtype=args.dtype,
        model_overrides=overrides, stop_after=args.stop_after)
    try:
        if args.sample_tokens:
            # the final sample's prompt, checked before training (and before --overwrite or
            # --resume writes anything), against the vocabulary the run will have
            from .dataset import ByteTokenizer, CharTokenizer, load_text, tokenizer_from_dict

            if args.resume:
                from .checkpoint import read_json

                try:  # an unreadable run is Trainer's to report, with its own message
                    saved = tokenizer_from_dict(read_json(os.path.join(options.run_dir(),
                                                                       "tokenizer.json")))
                except (OSError, ValueError):
                    saved = None
                if saved is not None:
                    _check_prompt(saved, args.prompt, f"the run in {options.run_dir()}")
            else:
                text = load_text(args.data)
                tokenizer = CharTokenizer(text) if args.tokenizer == "char" else ByteTokenizer()
                _check_prompt(tokenizer, args.prompt, "the shipped corpus" if args.data is None
                              else f"--data {args.data!r}")
        trainer = Trainer(options, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
        config = trainer.config
        print(f"npformer train: {options.preset}, {trainer.model.num_parameters():,} parameters "
              f"(C={config.d_model}, {config.n_layers} layers, {config.n_heads} heads), "
              f"{options.tokenizer} tokens (V={config.vocab_size}), {options.dtype}, "
              f"step {trainer.step} -> {options.steps}, writing to {trainer.run_dir}")
        summary = trainer.run()
    except TrainingDiverged as error:
        print(f"npformer train: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"npformer train: {error}", file=sys.stderr)
        return 2
    loss, val = summary["loss"], summary["val_loss"]
    speed = (f", {summary['seconds'] / 60:.1f} min, {summary['tokens_per_s']:.0f} tokens/s"
             if summary["steps_trained"] else "")  # a finished run resumed trains nothing
    print(f"step {summary['step']}: train loss {'-' if loss is None else f'{loss:.4f}'}, "
          f"validation loss {'-' if val is None else f'{val:.4f}'}{speed}; checkpoint, log.csv "
          f"and loss.png in {summary['run_dir']}")
    if args.sample_tokens:
        print("sample:")
        print(_sample_text(summary["run_dir"], args.prompt, args.sample_tokens, 0.8, None, args.seed))
    return 0


def _sample_text(run_dir, prompt, tokens, temperature, top_k, seed, use_cache=True) -> str:
    from .generate import generate, generate_seq2seq
    from .train import load_trained

    model, tokenizer = load_trained(run_dir)
    _check_prompt(tokenizer, prompt, f"the run in {run_dir}")
    prompt_ids = tokenizer.encode(prompt)
    if model.config.architecture == "encoder-decoder":
        new = generate_seq2seq(model, prompt_ids, tokens, temperature=temperature, top_k=top_k, seed=seed)
    else:
        new = generate(model, prompt_ids, tokens, temperature=temperature, top_k=top_k, seed=seed,
                       use_cache=use_cache)
    return prompt + tokenizer.decode(np.asarray(new, dtype=np.int64))


def _hf_prompt_ids(path, prompt):
    """The ids of ``prompt`` by the tokenizer.json of checkpoint ``path``, checked against
    the vocabulary and context length of its config.json (read, not the weights)."""
    from .checkpoint import read_json
    from .interop.hf_config import config_from_hf
    from .interop.tokenizer import load_tokenizer

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = config_from_hf(read_json(config_path))
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    ids = load_tokenizer(path, config.vocab_size).encode(prompt, name="--prompt")
    if len(ids) - 1 > config.max_seq_len:  # the last id is only a target
        raise ValueError(f"--prompt encodes to {len(ids)} tokens, {len(ids) - 1} positions to "
                         f"compare, but the model of {path} reads at most {config.max_seq_len} "
                         "(config.json); give a shorter --prompt")
    return ids


def sample_hf(path, prompt, tokens, temperature=0.8, top_k=None, seed=0, dtype="float32",
              use_cache=True):
    """``npformer sample --hf``: (text, prompt ids, new ids) from checkpoint directory ``path``.

    The prompt is encoded with the checkpoint's special tokens (a BOS where the checkpoint
    adds one, as transformers' tokenizer does); generation stops after ``tokens`` new ids or
    at an end-of-sequence id of the checkpoint (generation_config.json, else config.json), as
    transformers' ``generate`` does. The text is the prompt as given plus the continuation:
    the decoded whole sequence minus the decoded prompt (special tokens skipped), so that a
    word split across the boundary, or a space a tokenizer attaches to the next token, comes
    out as it would in the whole text."""
    from .generate import generate
    from .interop.hf_checkpoint import load_hf
    from .interop.tokenizer import load_tokenizer, stop_token_ids

    model = load_hf(path, np.dtype(dtype))
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    prompt_ids = tokenizer.encode(prompt, name="--prompt")
    new = generate(model, prompt_ids, tokens, temperature=temperature, top_k=top_k, seed=seed,
                   use_cache=use_cache, stop_ids=stop_token_ids(path))
    unknown = tokenizer.ids_without_a_token(new)
    if unknown:  # the embedding table is padded past the tokenizer (Qwen2 pads to 151936)
        raise ValueError(f"the model of {path} generated id(s) {unknown[:5]}, which name no token "
                         f"of its tokenizer.json ({tokenizer.vocab_size} tokens; the model's "
                         f"vocab_size {model.config.vocab_size} includes unused rows): no text "
                         "to print; try a lower --temperature or a --top-k")
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(np.concatenate([prompt_ids, np.asarray(new, dtype=np.int64)]),
                             skip_special_tokens=True)
    continuation = (whole[len(before):] if whole.startswith(before)
                    else tokenizer.decode(np.asarray(new, dtype=np.int64), skip_special_tokens=True))
    return prompt + continuation, prompt_ids, new


def _cmd_tour(args: argparse.Namespace) -> int:
    from .tour.plan import DEFAULT, QUICK
    from .tour.runner import JobFailed, run_tour

    budget = QUICK if args.quick else DEFAULT
    budget = budget.replace(**{name: getattr(args, name) for name in ("seeds", "steps")
                               if getattr(args, name) is not None})
    # the command that reproduces the report (the executor and --overwrite do not change it)
    command = ["npformer tour"] + (["--quick"] if args.quick else [])
    command += [f"--{name} {getattr(args, name)}" for name in ("seeds", "steps")
                if getattr(args, name) is not None]
    command += ([f"--only {' '.join(args.only)}"] if args.only else []) + [f"--out {args.out}"]
    try:
        path = run_tour(budget, args.out, only=args.only, workers=args.workers,
                        scheduler=args.scheduler, overwrite=args.overwrite,
                        command=" ".join(command))
    except (ValueError, JobFailed) as error:
        print(f"npformer tour: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study.plan import DEFAULT, QUICK
    from .study.runner import run_study
    from .tour.runner import JobFailed

    budget = QUICK if args.quick else DEFAULT
    if args.seeds is not None:
        budget = budget.replace(seeds=args.seeds)
    if args.steps is not None:
        budget = budget.with_steps(args.steps)
    out = args.out or os.path.join("runs", "study", args.name)
    command = [f"npformer study {args.name}"] + (["--quick"] if args.quick else [])
    command += [f"--{name} {getattr(args, name)}" for name in ("seeds", "steps")
                if getattr(args, name) is not None] + [f"--out {out}"]
    try:
        path = run_study(budget, out, workers=args.workers, scheduler=args.scheduler,
                         overwrite=args.overwrite, command=" ".join(command))
    except (ValueError, JobFailed) as error:
        print(f"npformer study: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if bool(args.ckpt) == bool(args.hf):
        print("npformer sample: give --ckpt RUN_DIR (a run of npformer train) or --hf DIR (a "
              "Hugging Face checkpoint directory with a tokenizer.json)", file=sys.stderr)
        return 2
    if args.dtype is not None and not args.hf:
        print("npformer sample: --dtype applies to --hf checkpoints (a run samples in the dtype "
              "it was trained in)", file=sys.stderr)
        return 2
    try:
        if args.hf:
            text, _, _ = sample_hf(args.hf, args.prompt, args.tokens, args.temperature, args.top_k,
                                   args.seed, args.dtype or "float32", use_cache=not args.no_cache)
            print(text)
        else:
            print(_sample_text(args.ckpt, args.prompt, args.tokens, args.temperature, args.top_k,
                               args.seed, use_cache=not args.no_cache))
    except (ValueError, ImportError) as error:  # ImportError: the tokenizers package
        print(f"npformer sample: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npformer",
        description="A transformer laboratory in NumPy with hand-derived backward passes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    gradcheck = commands.add_parser(
        "gradcheck",
        help="run the registered finite-difference gradient checks (float64)",
        description="Central finite differences in float64 against every hand-derived "
        "backward; prints per tensor the max absolute and max relative error "
        "(relative to the tensor's largest gradient entry). Pass bar: max rel err <= 1e-6. "
        "Exit code 1 if any check fails.",
    )
    gradcheck.add_argument("names", nargs="*", metavar="NAME", help="checks to run (default: all)")
    gradcheck.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    gradcheck.add_argument("--list", action="store_true", help="list the registered check names")
    gradcheck.add_argument(
        "--preset", action="append", metavar="NAME",
        help="check every parameter of a tiny instance of this preset end to end (repeatable; "
        "'all' for every preset); layer checks run only if named as well",
    )
    gradcheck.set_defaults(run=_cmd_gradcheck)

    explain = commands.add_parser(
        "explain", help="a layer's derivation (from docs/), its gradient check live, pictures",
        description="Prints the Forward and Derivation sections of the layer's docs page "
        "(LaTeX made readable), runs its gradient check and shows analytic and "
        "finite-difference gradients side by side. NAME: a registered check (npformer "
        "gradcheck --list) or a docs page (rmsnorm, attention, llama3, ...). Exit code 1 if "
        "the check fails.")
    explain.add_argument("name", metavar="NAME")
    explain.add_argument("--png", metavar="DIR", help="also draw pictures into DIR (PNG)")
    explain.add_argument("--docs", metavar="DIR", help="the docs directory (default: docs/ "
                         "beside the package, or $NPFORMER_DOCS)")
    explain.set_defaults(run=_cmd_explain)

    compare = commands.add_parser(
        "compare", help="npformer vs its PyTorch / Hugging Face twin: logits, loss, every gradient",
        description="Builds the npformer model and its torch twin with the same weights (the "
        "Hugging Face class of the family; torch.nn.Transformer for transformer-2017; the "
        "lineage written in torch for gpt3 and palm), runs forward and backward on a fixed "
        "batch and prints max abs / max rel error per tensor. Pass: float64 rtol 1e-10, "
        "float32 rtol 1e-4 + atol 1e-5. Exit code 1 on a mismatch. Needs torch and transformers.")
    compare.add_argument("--preset", action="append", metavar="NAME",
                         help="a tiny instance of this preset with random weights (repeatable; 'all')")
    compare.add_argument("--hf", metavar="DIR", help="a local Hugging Face checkpoint directory")
    compare.add_argument("--family", action="append", metavar="NAME",
                         help="a tiny random-weight checkpoint of this Hugging Face family "
                         "(mistral, qwen2, qwen3, phi3, gemma, gemma2, llama-rope-linear|"
                         "dynamic|yarn|llama3) written by transformers' save_pretrained, "
                         "compared as --hf DIR (repeatable; 'all')")
    compare.add_argument("--prompt", metavar="TEXT",
                         help="with --hf: compare on this text's tokens (encoded by the "
                         "checkpoint's tokenizer.json, special tokens included; each token "
                         "predicts the next) instead of a random batch")
    compare.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    compare.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    compare.set_defaults(run=_cmd_compare)

    presets = commands.add_parser(
        "presets",
        help="print the lineage: preset, parent, year, what changed, parameters, FLOPs",
        description="The presets from the 2017 Transformer to Llama 3, each its parent plus "
        "what changed, with the parameter count and forward FLOPs per token at default size.",
    )
    presets.add_argument("--json", action="store_true", help="print a JSON list of objects")
    presets.set_defaults(run=_cmd_presets)

    train = commands.add_parser(
        "train", help="train a preset on the shipped Shakespeare corpus (or --data FILE)",
        description="Train any preset with hand-written AdamW (warm-up + cosine decay, "
        "gradient clipping). Writes config, tokenizer, checkpoints (safetensors, atomic), "
        "log.csv/log.json and loss.png to --out; --resume continues exactly.")
    add = train.add_argument
    add("--preset", default="gpt2", help="preset name (npformer presets lists them); default gpt2")
    add("--out", default=None, help="run directory (default runs/PRESET)")
    add("--data", default=None, help="a UTF-8 text file (default: the shipped tinyshakespeare.txt)")
    add("--tokenizer", default="char", choices=["char", "byte"])
    add("--steps", type=_COUNT, default=1000, help="total optimizer steps (the schedule's length)")
    add("--batch-size", type=_COUNT, default=16)
    add("--seq-len", type=_COUNT, default=128)
    add("--lr", type=_RATE, default=3e-3, help="peak learning rate")
    add("--min-lr", type=_RATE, default=None, help="final learning rate (default lr/10)")
    add("--warmup-steps", type=_NON_NEGATIVE, default=50)
    add("--weight-decay", type=_RATE, default=0.1)
    add("--grad-clip", type=_RATE, default=1.0, help="global-norm clip (0 = off)")
    add("--seed", type=_NON_NEGATIVE, default=0)
    add("--eval-interval", type=_COUNT, default=100)
    add("--eval-batches", type=_COUNT, default=8)
    add("--checkpoint-interval", type=_COUNT, default=100)
    add("--dtype", default="float32", choices=["float32", "float64"])
    add("--d-model", dest="d_model", type=_COUNT, default=None, help="override the preset's width")
    add("--n-layers", dest="n_layers", type=_COUNT, default=None)
    add("--n-heads", dest="n_heads", type=_COUNT, default=None)
    add("--n-kv-heads", dest="n_kv_heads", type=_COUNT, default=None)
    add("--dropout", type=_RATE, default=None, help="default 0 for these short runs")
    add("--layer-impl", dest="layer_impl", default=None, choices=["numba", "numpy"],
        help="numba: the fused kernels (default); numpy: the readable functional pairs")
    add("--attention-impl", dest="attention_impl", default=None, choices=["numba", "numpy"],
        help="numba: the attention kernels (default); numpy: the readable reference")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--overwrite", action="store_true", help="replace an existing run in --out")
    add("--stop-after", type=_COUNT, default=None, help="stop (and checkpoint) after this step")
    add("--sample-tokens", type=_NON_NEGATIVE, default=300, help="print a sample of this length at the end (0: none)")
    add("--prompt", default="ROMEO:", help="prompt of the final sample")
    add("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_cmd_train)

    tour = commands.add_parser(
        "tour", help="train the lineage's steps side by side and report what each one bought",
        description="Equal-budget, multi-seed training of each step of the lineage against its "
        "parent (post-LN vs pre-LN with warm-up sensitivity, ReLU/GeLU/SwiGLU, positions with 2x "
        "length extrapolation, MHA/GQA/MQA, sequential vs parallel, LayerNorm vs RMSNorm, dense "
        "vs banded, the document mask). Writes report.md, figures/ and results.json to --out; "
        "started again with the same options it resumes, running only the unfinished jobs.")
    add = tour.add_argument
    add("--quick", action="store_true",
        help="tiny models, few steps, 2 seeds: checks the machinery in ~2 min (not the science)")
    add("--seeds", type=_int_at_least(2), default=None,
        help="paired seeds per variant (default: 4; --quick: 2)")
    add("--steps", type=_COUNT, default=None, help="training steps per run (default: 600; --quick: 30)")
    add("--out", default=os.path.join("runs", "tour"), help="output directory (default runs/tour)")
    add("--only", nargs="+", metavar="NAME", default=None,
        help="run only these comparisons: norm-placement ffn positions kv-heads block norm "
        "attention-pattern document-mask")
    add("--workers", type=_COUNT, default=None, help="local worker processes (default: the cores)")
    add("--scheduler", default=None, metavar="ADDRESS",
        help="run the jobs on a Dask distributed cluster (tcp://HOST:8786; the cluster extra)")
    add("--overwrite", action="store_true", help="discard a previous tour in --out and start afresh")
    tour.set_defaults(run=_cmd_tour)

    study = commands.add_parser(
        "study", help="the softmax study: do softmax₁, a learned sink, clipping or gating tame "
        "activation outliers and int8 error?",
        description="Trains the same GPT-2-style decoder with softmax, softmax₁, a learned sink, "
        "length-aware clipped softmax and gated attention over paired seeds, measures activation "
        "outliers (∞-norm, kurtosis, first-token attention) and simulated int8 (W8A8, W8, A8) "
        "loss during training, checks a positive control and applies a pre-registered verdict "
        "rule. Writes report.md, figures/ and results.json to --out; started again with the same "
        "options it resumes.")
    add = study.add_argument
    add("name", choices=["softmax"], help="the study to run")
    add("--quick", action="store_true",
        help="tiny models, few steps, 2 seeds: checks the machinery in under a minute")
    add("--seeds", type=_int_at_least(2), default=None,
        help="paired seeds per variant (default: 5; --quick: 2)")
    add("--steps", type=_COUNT, default=None,
        help="training steps per run (default: 1000; --quick: 40); the measured steps scale along")
    add("--out", default=None, help="output directory (default runs/study/NAME)")
    add("--workers", type=_COUNT, default=None, help="local worker processes (default: the cores)")
    add("--scheduler", default=None, metavar="ADDRESS",
        help="run the jobs on a Dask distributed cluster (tcp://HOST:8786; the cluster extra)")
    add("--overwrite", action="store_true", help="discard a previous study in --out and start afresh")
    study.set_defaults(run=_cmd_study)

    sample = commands.add_parser(
        "sample", help="generate text from a trained run or a Hugging Face checkpoint (KV-cached)",
        description="Continue --prompt from a run of npformer train (--ckpt) or from a Hugging "
        "Face checkpoint directory (--hf: config.json, safetensors weights and tokenizer.json; "
        "the prompt gets the checkpoint's BOS token as with transformers' tokenizer, and "
        "sampling stops at its end-of-sequence token).")
    sample.add_argument("--ckpt", help="a run directory written by npformer train")
    sample.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory")
    sample.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="with --hf: the dtype to run the model in (default float32)")
    sample.add_argument("--prompt", default="ROMEO:")
    sample.add_argument("--tokens", type=_NON_NEGATIVE, default=300)
    sample.add_argument("--temperature", type=_RATE, default=0.8, help="0 = greedy")
    sample.add_argument("--top-k", type=_COUNT, default=None)
    sample.add_argument("--seed", type=_NON_NEGATIVE, default=0)
    sample.add_argument("--no-cache", action="store_true", help="recompute the context every step")
    sample.set_defaults(run=_cmd_sample)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, dispatch, and turn what the file system or the machine refuses into one line.

    Each command reports a bad input as ``npformer CMD: message`` and exit code 2 itself (a
    ValueError raised at the input's source). The net here catches only what no check can
    foresee: a file-system error (OSError: the path and the reason), memory running out, and
    Ctrl-C. Any other exception is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `npformer presets | head`: the reader has gone, nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"npformer {args.command}: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except MemoryError as error:
        print(f"npformer {args.command}: out of memory ({error or 'MemoryError'}); use smaller "
              "sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
