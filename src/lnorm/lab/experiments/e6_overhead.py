"""E6 overhead (C8): median time per training step of each norm in each architecture, taken from the
runs of E1 (MLP), E3 (recurrent LM), E4 (transformer) and E5 (CNN). No runs of its own.

Times are medians over the steps of a run, then mean ± 95% CI over seeds; all runs in one lab run
share the machine, so other load shows up as noise here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lnorm.lab import analysis as A
from lnorm.lab import stats as S

TITLE = "Overhead: time per training step by norm"
CLAIMS = ("C8",)
REQUIRES = ("e1", "e3", "e4", "e5")


@dataclass
class Config:
    margin: float = 0.0  # ms: an overhead smaller than this does not count


SUITES = {"smoke": {}, "quick": {}, "full": {}}
EST_SECONDS = {"smoke": 0, "quick": 0, "full": 0}


def units(cfg: Config) -> list[dict]:
    return []


def _arch(results) -> list[tuple[str, dict, dict, dict]]:
    """(architecture, {norm: ms values}, ...) from the other experiments' records."""
    out = []
    e1 = results.get("e1", [])
    if e1:
        big = max((r["params"]["batch_size"] for r in e1), default=0)
        out.append((f"MLP (E1, batch {big})", {n: A.values(e1, "ms_per_step", norm=n, batch_size=big)
                                               for n in ("none", "batch", "layer", "rms")}))
    e5 = results.get("e5", [])
    if e5:
        out.append(("2-D CNN (E5, MNIST)", {n: A.values(e5, "ms_per_step", data="mnist", norm=n)
                                            for n in ("none", "batch", "layer", "group")}))
    e4 = results.get("e4", [])
    if e4:
        out.append(("transformer (E4)", {n: A.values(e4, "ms_per_step", variant=v)
                                         for n, v in (("none", "none"), ("batch", "prebn"), ("layer", "preln"),
                                                      ("rms", "prerms"))}))
    e3 = results.get("e3", [])
    if e3:
        out.append(("LSTM LM (E3)", {"none": A.values(e3, "ms_per_step", task="lm", model="lstm"),
                                     "layer": A.values(e3, "ms_per_step", task="lm", model="lnlstm")}))
        out.append(("GRU LM (E3)", {"none": A.values(e3, "ms_per_step", task="lm", model="gru"),
                                    "layer": A.values(e3, "ms_per_step", task="lm", model="lngru")}))
    return [(a, {k: v for k, v in d.items() if v}) for a, d in out]


def verdict_c8(ln_ms: list[float], other_ms: list[float], margin: float = 0.0) -> tuple[str, str]:
    """C8 per architecture: LN's time per step is higher than the other's (Welch 95% CI > 0)."""
    v, d = S.greater(ln_ms, other_ms, margin)
    return v, f"LN {S.fmt_ci(ln_ms)} ms vs {S.fmt_ci(other_ms)} ms; diff {S.fmt_diff(d)}"


def analyze(cfg: Config, results: dict) -> dict:
    archs = _arch(results)
    norms = ("none", "batch", "layer", "rms", "group")
    rows = [[a] + [S.fmt_ci(d[n]) if n in d else "-" for n in norms] for a, d in archs]
    claims = []
    for a, d in archs:
        if "layer" not in d:
            continue
        for other in ("none", "batch"):
            if other in d:
                v, ev = verdict_c8(d["layer"], d[other], cfg.margin)
                claims.append({"claim": "C8", "verdict": v, "evidence": f"{a}, LN vs {other}: {ev}", "criterion":
                               f"{a}: median ms per training step with LN above {other} (Welch 95% CI > 0)."})
    short = [a.split(" (")[0] for a, _ in archs]
    series = [{"label": n, "x": short, "y": [S.mean_ci(d[n])[0] if n in d else float("nan") for _, d in archs]}
              for n in norms]
    return {"claims": claims,
            "tables": [{"title": "Median ms per training step (mean ± 95% CI over seeds)", "columns": ["architecture"] + list(norms),
                        "rows": rows}],
            "figures": [{"name": "e6_overhead", "title": "E6: ms per training step by architecture and norm",
                         "xlabel": "architecture", "ylabel": "ms/step", "logy": True, "series": series}] if archs else [],
            "notes": ["With --jobs 2 (the default on 2 cores) each run shares the machine with another run, "
                      "so these times carry that noise; for overhead alone use `lnorm bench` or --jobs 1.",
                      "The recurrent baselines are torch's fused nn.LSTM/nn.GRU; the LN versions are lnorm's "
                      "(the run's backend, in the report header: lnorm's Numba kernels under auto), so part of that "
                      "gap is implementation."]}
