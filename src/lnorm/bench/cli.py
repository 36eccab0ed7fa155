"""``lnorm bench``: subcommands ``ops`` (norm ops) and ``rnn`` (recurrent layers).

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import importlib

BENCHES = [
    ("ops", "lnorm.bench.ops", "norm ops (LayerNorm, RMSNorm, add+norm) against torch"),
    ("rnn", "lnorm.bench.rnn", "LayerNormLSTM/GRU against torch's nn.LSTM/GRU and a naive LN cell"),
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="speed against PyTorch, as ratios measured in one run")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, module, help_text in BENCHES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module + ".").startswith(exc.name + "."):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
