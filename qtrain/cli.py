"""The ``qtrain`` command.

Subcommands available so far::

    qtrain ops 128x6x24x24 128x16x8x8 [--json]   # BN op counts and Table IV ASIC estimate
    qtrain --version

Training (``qtrain --bits 8 --norm l1``) and the other subcommands of DESIGN.md arrive with the
training step.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exits with status 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        self.exit(2, f"qtrain: error: {message} (see qtrain --help)\n")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not like 128x6x24x24 or 128x120")
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be NxC or NxCxHxW, positive")
    return shape


def _ops(args: argparse.Namespace) -> int:
    from qkernels.opcount import bn_report, markdown_tables

    reports = [bn_report(shape, eps_log2=args.eps_log2) for shape in args.shapes]
    print(json.dumps(reports, indent=1) if args.json else markdown_tables(reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qtrain", description="Integer-only training with L1-norm batch norm.")
    p.add_argument("--version", action="version", version=f"qtrain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    ops = sub.add_parser(
        "ops", help="operation counts of L1BN vs L2BN and the Table IV ASIC estimate",
        description="Per BN input shape: operations the int8 L1BN kernels perform (counted), a "
                    "counted reference L2BN and Table IV's formulas, with time/energy/area "
                    "estimates from Table IV's int8 and float32 per-operation costs.")
    ops.add_argument("shapes", nargs="+", type=_parse_shape, metavar="SHAPE",
                     help="BN input shape NxCxHxW or NxC, e.g. 128x6x24x24")
    ops.add_argument("--eps-log2", type=int, default=None,
                     help="int8 L1BN epsilon = 2**EPS_LOG2 (default: none)")
    ops.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ops.set_defaults(run=_ops)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError) as err:
        print(f"qtrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
