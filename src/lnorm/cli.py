"""The ``lnorm`` command line: ``lnorm bench ...``, ``lnorm lab ...``, ``lnorm audit ...``.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the module adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit status). Modules are
imported lazily so ``lnorm --help`` stays fast and one broken part cannot take down the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that registers it)
SUBCOMMANDS = [
    ("bench", "lnorm.bench.cli"),
    ("lab", "lnorm.lab.cli"),
    ("audit", "lnorm.audit"),
]


def build_parser() -> argparse.ArgumentParser:
    from lnorm import __version__

    parser = argparse.ArgumentParser(
        prog="lnorm",
        description="Layer normalization for PyTorch: benchmarks, the lab, model audits.",
    )
    parser.add_argument("--version", action="version", version=f"lnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module + ".").startswith(exc.name + "."):  # part not in this build
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
