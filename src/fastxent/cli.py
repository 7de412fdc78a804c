"""The ``fastxent`` command line: ``fastxent check`` and ``fastxent bench``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from fastxent import bench

    parser = argparse.ArgumentParser(
        prog="fastxent", description="Softmax cross-entropy: verify the math, measure the speed."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="prove the gradient with SymPy and compare every backend with float64 and PyTorch",
    )
    check.add_argument("--device", default="cpu", help="device for the numeric checks (cpu, cuda)")
    check.add_argument("--tolerance", type=float, default=1e-10, help="max relative error allowed")
    bench.add_arguments(
        commands.add_parser("bench", help="time and memory of fastxent against its peers")
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
    except ImportError as error:
        print(
            f"fastxent: {error}. The command line needs its extras: pip install 'fastxent[cli]'.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
