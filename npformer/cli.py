"""The ``npformer`` command line.

    npformer gradcheck [NAME ...] [--json] [--list]

Each subcommand lives in its own function; ``main`` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import format_table, registered_checks, run_checks

    if args.list:
        for name in registered_checks():
            print(name)
        return 0
    try:
        reports = run_checks(args.names or None)
    except ValueError as error:
        print(f"npformer gradcheck: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([
            {
                "name": r.name,
                "tensor": r.tensor,
                "max_abs_err": r.max_abs_err,
                "max_rel_err": r.max_rel_err,
                "passed": r.passed,
                "n_checked": r.n_checked,
                "n_total": r.n_total,
            }
            for r in reports
        ], indent=1))
    else:
        print(format_table(reports))
    return 0 if all(r.passed for r in reports) else 1


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
    gradcheck.set_defaults(run=_cmd_gradcheck)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
