"""``fused-attn`` command line (also ``python -m fused_attn``)."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from . import info

    if args.json:
        import json

        print(json.dumps(info.collect(), indent=2, default=str))
    else:
        print(info.render(info.collect()))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import cli as bench_cli

    return bench_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-attn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="how the package was built and what this machine offers")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=_info)

    from .bench import cli as bench_cli

    bench = commands.add_parser("bench", help="time fused ops against PyTorch, side by side")
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
