"""The ``npformer`` command line.

    npformer gradcheck [NAME ...] [--json] [--list] [--preset NAME|all ...]
    npformer presets [--json]
    npformer compare (--preset NAME|all ... | --hf DIR) [--dtype float64|float32] [--json]

Each subcommand lives in its own function; ``main`` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


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
    from .interop.compare import compare_hf_dir, compare_preset
    from .presets import get_preset, preset_names

    if bool(args.preset) == bool(args.hf):
        print("npformer compare: give --preset NAME (repeatable, or 'all') or --hf DIR",
              file=sys.stderr)
        return 2
    reports = []
    try:
        if args.hf:
            reports = compare_hf_dir(args.hf, args.dtype)
        else:
            names = preset_names() if "all" in args.preset else args.preset
            for name in names:
                get_preset(name)
            for name in names:
                reports += compare_preset(name, args.dtype)
    except ValueError as error:
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
