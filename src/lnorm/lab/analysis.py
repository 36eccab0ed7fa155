"""Small helpers experiments use to pick numbers out of their unit records."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lnorm.lab import stats as S
from lnorm.lab.claims import PRIMARY, ROLES


def values(recs: list[dict], key: str, status: str | None = "ok", **match) -> list[float]:
    """``result[key]`` of every record whose params include ``match`` (and whose status is ``status``)."""
    out = []
    for r in recs:
        if status is not None and r["status"] != status:
            continue
        if all(r["params"].get(k) == v for k, v in match.items()) and key in r.get("result", {}):
            out.append(r["result"][key])
    return out


def statuses(recs: list[dict], **match) -> list[str]:
    return [r["status"] for r in recs if all(r["params"].get(k) == v for k, v in match.items())]


def by_seed(recs: list[dict], key: str, **match) -> dict[int, float]:
    return {r["seed"]: r["result"][key] for r in recs if r["status"] == "ok" and key in r["result"]
            and all(r["params"].get(k) == v for k, v in match.items())}


FAILED = ("diverged", "cannot_train")  # outcomes of the method: scored, never dropped


def scored(recs: list[dict], key: str, fail_score: float | None, **match) -> S.Scored:
    """``{seed: result[key]}`` of every run of the config ``match``, for :func:`lnorm.lab.stats.compare`.

    A diverged or cannot-train run gets ``fail_score`` (None when it is None, which ``compare``
    reports as undecidable) and is listed in ``.failed``, so the comparison can say how many it
    scored; a NaN/inf value is left for ``compare`` to score. Runs that crashed (``error``) or have
    not run (``missing``) say nothing about the method and are left out.
    """
    out = S.Scored()
    for r in recs:
        if not all(r["params"].get(k) == v for k, v in match.items()):
            continue
        if r["status"] in FAILED:
            out[r["seed"]] = fail_score
            out.failed.add(r["seed"])
        elif r["status"] == "ok" and key in r.get("result", {}):
            out[r["seed"]] = r["result"][key]
    return out


def claim_row(exp: str, claim: str, key: str, effect: S.Effect | None, criterion: str, *, evidence: str = "",
              role: str = "secondary", caveats: Sequence[str] = (), verdict: str | None = None) -> dict:
    """A claim row of ``analyze``: the verdict is ``effect``'s unless a composite rule or a caveat
    that leaves the test unable to decide gives another (``verdict``; required without an effect,
    as in a ``by construction`` check). The row registered in :data:`lnorm.lab.claims.PRIMARY`
    for ``claim`` is the primary one (or keeps ``by construction``), whatever ``role`` says."""
    if effect is None and verdict is None:
        raise ValueError(f"claim_row: {exp}/{key} has neither an effect nor a verdict")
    if role not in ROLES:
        raise ValueError(f"claim_row: role must be one of {', '.join(ROLES)}, got {role!r}")
    if PRIMARY.get(claim) == (exp, key):
        role = "by construction" if role == "by construction" else "primary"
    elif role == "primary":
        raise ValueError(f"claim_row: {exp}/{key} is not the registered primary test of {claim} "
                         f"(claims.PRIMARY has {PRIMARY.get(claim)})")
    row = {"claim": claim, "key": key, "role": role, "verdict": verdict or effect.verdict,
           "criterion": criterion, "evidence": evidence, "caveats": list(caveats)}
    if effect is not None:
        row["effect"] = effect.as_dict()
        row["evidence"] = f"{evidence}; {effect.text()}" if evidence else effect.text()
    return row


def paired(recs, key, a: dict, b: dict) -> tuple[list[float], list[float]]:
    """Values of ``key`` for configs ``a`` and ``b`` on the seeds both finished."""
    va, vb = by_seed(recs, key, **a), by_seed(recs, key, **b)
    seeds = sorted(set(va) & set(vb))
    return [va[s] for s in seeds], [vb[s] for s in seeds]


def cell(recs, key, digits=3, *, cap: float | None = None, resolution: float | None = None, **match) -> str:
    """A table cell: mean ± CI of ``key``, or the non-ok status when no run finished. With ``cap``,
    a value at or above it (or infinite: never reached) is censored and shown as such."""
    v = values(recs, key, **match)
    if v and cap is not None:
        v = [x if x is not None and math.isfinite(float(x)) and x < cap else cap for x in v]
    if v:
        return S.fmt_values(v, digits, resolution=resolution, cap=cap)
    st = sorted(set(statuses(recs, **match)))
    return "/".join(s.replace("_", " ") for s in st) or "-"


def series(recs, key, label, xs, xparam, **match) -> dict:
    """A figure series of mean and 95% CI of ``key`` against the param ``xparam``."""
    X, Y, LO, HI = [], [], [], []
    for x in xs:
        v = values(recs, key, **{xparam: x}, **match)
        if not v:
            continue
        m, lo, hi, _ = S.mean_ci(v)
        X.append(x)
        Y.append(m)
        LO.append(lo if lo == lo else m)
        HI.append(hi if hi == hi else m)
    return {"label": label, "x": X, "y": Y, "lo": LO, "hi": HI}


def curve_series(recs, key, label, step_key="step", **match) -> dict:
    """Mean curve of a logged list ``result[key]`` (one value per ``result[step_key]`` entry)."""
    runs = [r["result"] for r in recs if r["status"] == "ok" and key in r["result"]
            and all(r["params"].get(k) == v for k, v in match.items())]
    if not runs:
        return {"label": label, "x": [], "y": []}
    n = min(len(r[key]) for r in runs)
    X = runs[0][step_key][:n]
    Y, LO, HI = [], [], []
    for i in range(n):
        m, lo, hi, _ = S.mean_ci([r[key][i] for r in runs])
        Y.append(m)
        LO.append(lo if lo == lo else m)
        HI.append(hi if hi == hi else m)
    return {"label": label, "x": X, "y": Y, "lo": LO, "hi": HI}
