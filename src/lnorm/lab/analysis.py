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
    scored, and at what (``.fail_score``); a NaN/inf value is left for ``compare`` to score. Runs
    that crashed (``error``) or have not run (``missing``) say nothing about the method and are
    left out.
    """
    out = S.Scored(fail_score=fail_score)
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


def failed_counts(recs, **match) -> dict[str, int]:
    """``{status: count}`` of the runs of the config ``match`` that failed (:data:`FAILED`:
    diverged, cannot train), in that order; empty when none did."""
    st = statuses(recs, **match)
    return {s: st.count(s) for s in FAILED if st.count(s)}


def failed_text(counts: dict[str, int]) -> str:
    """``+1 diverged, +2 cannot train`` for :func:`failed_counts` ("" for none)."""
    return ", ".join(f"+{k} {s.replace('_', ' ')}" for s, k in counts.items())


def failed_note(recs, **match) -> str:
    """`` (+1 diverged)``: what a cell appends for the failed runs of its config, which the mean
    leaves out (a diverged run has no value to average) while the verdicts score them. Marked as
    :func:`lnorm.lab.stats.fmt_ci` marks non-finite values, so a table never averages the finished
    runs silently; "" when no run failed. Crashed (``error``) and ``missing`` runs say nothing about
    the method and are left to the section's run counts."""
    text = failed_text(failed_counts(recs, **match))
    return f" ({text})" if text else ""


def cell(recs, key, digits=3, *, cap: float | None = None, resolution: float | None = None, **match) -> str:
    """A table cell: mean ± CI of ``key`` over the finished runs, and how many runs of the config
    diverged or could not train (``0.81 ± 0.13 (+1 diverged)``: they are not in the mean, but the
    verdicts score them), or the non-ok status when no run finished. With ``cap``, a value at or
    above it (or infinite: never reached) is censored and shown as such."""
    v = values(recs, key, **match)
    if v and cap is not None:
        v = [x if x is not None and math.isfinite(float(x)) and x < cap else cap for x in v]
    if v:
        return S.fmt_values(v, digits, resolution=resolution, cap=cap) + failed_note(recs, **match)
    st = sorted(set(statuses(recs, **match)))
    return "/".join(s.replace("_", " ") for s in st) or "-"


def _labelled(series: dict, failed: dict) -> dict:
    """``series`` with the failed runs its means leave out: counted under ``failed`` and named in
    the label (the legend), as :func:`cell` names them in a table."""
    notes = [f"{failed_text(c)}{f' at {where}' if where else ''}" for where, c in failed.items() if c]
    if notes:
        series["label"] = f"{series['label']} ({'; '.join(notes)})"
    series["failed"] = {where or "all": c for where, c in failed.items() if c}
    return series


def series(recs, key, label, xs, xparam, **match) -> dict:
    """A figure series of mean and 95% CI of ``key`` over the finished runs against the param
    ``xparam``; runs that diverged or could not train are not in the means, so the label says how
    many there were at which x (``batch (+1 diverged at batch_size=4)``) and ``failed`` counts
    them per x (a point whose runs all failed is not drawn, but still counted)."""
    X, Y, LO, HI = [], [], [], []
    failed = {}
    for x in xs:
        failed[f"{xparam}={x}"] = failed_counts(recs, **{xparam: x}, **match)
        v = values(recs, key, **{xparam: x}, **match)
        if not v:
            continue
        m, lo, hi, _ = S.mean_ci(v)
        X.append(x)
        Y.append(m)
        LO.append(lo if lo == lo else m)
        HI.append(hi if hi == hi else m)
    return _labelled({"label": label, "x": X, "y": Y, "lo": LO, "hi": HI}, failed)


def curve_series(recs, key, label, step_key="step", **match) -> dict:
    """Mean curve of a logged list ``result[key]`` (one value per ``result[step_key]`` entry) over
    the finished runs; the label and ``failed`` say how many runs diverged or could not train."""
    failed = {"": failed_counts(recs, **match)}
    runs = [r["result"] for r in recs if r["status"] == "ok" and key in r["result"]
            and all(r["params"].get(k) == v for k, v in match.items())]
    if not runs:
        return _labelled({"label": label, "x": [], "y": []}, failed)
    n = min(len(r[key]) for r in runs)
    X = runs[0][step_key][:n]
    Y, LO, HI = [], [], []
    for i in range(n):
        m, lo, hi, _ = S.mean_ci([r[key][i] for r in runs])
        Y.append(m)
        LO.append(lo if lo == lo else m)
        HI.append(hi if hi == hi else m)
    return _labelled({"label": label, "x": X, "y": Y, "lo": LO, "hi": HI}, failed)
