"""The lab's experiments: one module per experiment, registered in ``EXPERIMENTS`` below.

How to add an experiment
------------------------
1. Write ``src/lnorm/lab/experiments/<name>.py`` exposing:

   * ``TITLE`` (str) and ``CLAIMS`` (tuple of claim ids from ``lnorm.lab.claims``, may be empty);
   * ``Config``: a dataclass whose defaults are the *quick* suite (fields of type int, float,
     str, bool or tuples of those, so ``--set name.field=value`` can parse them);
   * ``SUITES``: ``{"smoke": {...}, "quick": {}, "full": {...}}`` overrides of ``Config``; smoke
     must run in a few seconds;
   * ``EST_SECONDS``: ``{"smoke": s, "quick": s, "full": s}`` measured wall time on 2 cores;
   * ``units(cfg) -> list[dict]``: the independent runs, as JSON-able parameter dicts (the
     runner crosses each with the seeds ``0..seeds-1``);
   * ``run(cfg, params, seed, ctx) -> dict``: one run; the runner has seeded torch/numpy/random
     and set the thread count. Log curves with ``ctx.log(step=..., **metrics)`` (metrics.jsonl),
     wrap the training loop in ``ctx.steps(n)`` (progress bar), raise
     ``lnorm.lab.train.Diverged`` / ``CannotTrain`` for those outcomes; return JSON-able numbers;
   * ``analyze(cfg, results) -> dict``: ``results`` maps experiment name to its list of unit
     records (``params``, ``seed``, ``status``, ``result``); return ``{"tables": [...],
     "figures": [...], "claims": [...], "notes": [...]}`` (see ``lnorm.lab.report``). Claim
     verdicts come from pure functions of numbers in the same file (``lnorm.lab.stats``).
   * optional ``REQUIRES``: names of experiments whose results ``analyze`` also reads (they are
     run too).
   * ``CHOICES``: ``{field: valid names}`` for every ``str`` / ``tuple[str, ...]`` field
     (import the names from where the code that uses them defines them), so ``--set`` is checked
     before anything runs; optional ``MAY_BE_EMPTY``: tuple fields that may be set empty
     (``--set e7.gains=``) because empty means something (others are refused).
2. Add one line ``"<name>": "lnorm.lab.experiments.<name>"`` to ``EXPERIMENTS``.
3. Add it to the smoke test's expectations if it needs any (``tests/lab/test_cli.py`` runs every
   registered experiment's smoke config through the CLI).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; the order is the report's order. New experiments join with one line.
EXPERIMENTS: dict[str, str] = {
    "e1": "lnorm.lab.experiments.e1_batch_size",
    "e2": "lnorm.lab.experiments.e2_train_eval",
    "e3": "lnorm.lab.experiments.e3_rnn",
    "e4": "lnorm.lab.experiments.e4_transformer",
    "e5": "lnorm.lab.experiments.e5_cnn",
    "e6": "lnorm.lab.experiments.e6_overhead",
    "e7": "lnorm.lab.experiments.e7_practice",
    "e8": "lnorm.lab.experiments.e8_gradient_scale",
    "e9": "lnorm.lab.experiments.e9_recurrent_bn",
    "sanity": "lnorm.lab.experiments.sanity",
    "ddp": "lnorm.lab.experiments.ddp",
    "retrieval": "lnorm.lab.experiments.retrieval",
}


def get(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def names() -> list[str]:
    return list(EXPERIMENTS)
