"""Small helpers experiments use to pick numbers out of their unit records."""

from __future__ import annotations

from lnorm.lab import stats as S


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


def paired(recs, key, a: dict, b: dict) -> tuple[list[float], list[float]]:
    """Values of ``key`` for configs ``a`` and ``b`` on the seeds both finished."""
    va, vb = by_seed(recs, key, **a), by_seed(recs, key, **b)
    seeds = sorted(set(va) & set(vb))
    return [va[s] for s in seeds], [vb[s] for s in seeds]


def cell(recs, key, digits=3, **match) -> str:
    """A table cell: mean ± CI of ``key``, or the non-ok status when no run finished."""
    v = values(recs, key, **match)
    if v:
        return S.fmt_ci(v, digits)
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
