"""``fused-attn`` command line (also ``python -m fused_attn``).

    fused-attn info              how the package was built, what this machine offers
    fused-attn bench ...         fused ops and models against PyTorch, side by side
    fused-attn profile-memory    peak and per-module memory of a model, plain vs optimize()d
"""

from __future__ import annotations

import argparse
import sys
import textwrap


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage dump, no traceback)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help lines wrapped at spaces only: a name such as ``nn-transformer`` or ``bert-tiny`` is never
    split at its hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


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


def _profile_memory(args: argparse.Namespace) -> int:
    from .profiling import cli as profile_cli

    return profile_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fused-attn", description=__doc__, formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="how the package was built and what this machine offers")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func=_info)

    from .bench import cli as bench_cli
    from .profiling import cli as profile_cli

    bench = commands.add_parser("bench", help="time fused ops and models against PyTorch, side by side",
                                description=bench_cli.__doc__, formatter_class=_Formatter)
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=_bench)

    profile = commands.add_parser("profile-memory", help="peak and per-module memory, plain vs optimize()d",
                                  description=profile_cli.__doc__, formatter_class=_Formatter)
    profile_cli.add_arguments(profile)
    profile.set_defaults(func=_profile_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .bench.cli import RunError, UsageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fused-attn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RunError, OSError) as exc:  # nothing measured; writing an output (disk full, a path removed meanwhile)
        print(f"fused-attn {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing to report yet (bench reports its records)
        print(f"\nfused-attn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
