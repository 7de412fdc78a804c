"""The ``fastxent`` command line: ``fastxent check`` and ``fastxent bench``."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def summary(module: ModuleType) -> str | None:
    """The first line of ``module``'s docstring without reST markup (None under ``python -OO``)."""
    doc = (module.__doc__ or "").strip()
    return doc.splitlines()[0].replace("``", "") if doc else None


def build_parser() -> argparse.ArgumentParser:
    import torch

    from fastxent import __version__, bench, check

    parser = argparse.ArgumentParser(
        prog="fastxent", description="Softmax cross-entropy: verify the math, measure the speed."
    )
    parser.add_argument(
        "--version", action="version", version=f"fastxent {__version__} (torch {torch.__version__})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{check,bench}")
    check_parser = commands.add_parser(
        "check",
        help="prove the gradient with SymPy and compare every backend with float64 and PyTorch",
        description=summary(check),
    )
    check_parser.add_argument(
        "--device",
        type=check.device_arg,
        default="cpu",
        help="device for the numeric checks: cpu, cuda or cuda:N (default: %(default)s)",
    )
    check_parser.add_argument(
        "--tolerance",
        type=check.tolerance_arg,
        default=1e-10,
        help="max relative error allowed in the float64 table (the Triton backend's float32 "
        f"table is held to {check.FLOAT32_TOLERANCE:g}), a number > 0 (default: %(default)g)",
    )
    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="time and memory of fastxent against its peers",
            description=summary(bench),
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            from fastxent import check

            return check.run(device=args.device, tolerance=args.tolerance)
        from fastxent import bench

        return bench.run(args)
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever it landed
        print("fastxent: interrupted", file=sys.stderr)
        return 130
    except ImportError as error:
        print(
            f"fastxent: {error}. The command line needs its extras: pip install 'fastxent[cli]' "
            "(from a source checkout: pip install '.[cli]').",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
