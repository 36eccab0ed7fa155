"""Turn a run directory into results.json/csv, plots, report.md and a self-contained report.html.

A pure function of the files on disk (``lnorm lab report RUN_DIR`` rebuilds it). Experiments'
``analyze`` return data in these shapes, and only this module formats them:

* table: ``{"title", "columns": [str], "rows": [[cell]]}``
* figure: ``{"name", "title", "xlabel", "ylabel", "logx"?, "logy"?,
  "series": [{"label", "x": [...], "y": [...], "lo"?: [...], "hi"?: [...], "failed"?: {where: {status: n}}}]}``
  (``failed``: the diverged / cannot-train runs the means leave out, also named in the label)
* claim: ``{"claim": "C3", "verdict", "criterion", "evidence"}``, and on the decision rules
  (``lnorm.lab.analysis.claim_row``) also ``"key", "role", "effect", "caveats"``
* notes: ``[str]`` (published references, caveats)

The report opens with one row per claim (its pre-registered primary test, ``claims.PRIMARY``)
and a forest plot of those effects; each claim's secondary rows are Holm-corrected here.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

from lnorm.lab import experiments
from lnorm.lab.claims import CLAIMS, NOT_RUN, adjust_secondary, claim_key, summary
from lnorm.lab.runner import (
    DamagedRunError,
    load_json,
    load_results,
    load_run_config,
    write_json_atomic,
)
from lnorm.utils import json_safe

VERDICT_MARK = {"supported": "supported", "not supported": "NOT supported", "inconclusive": "inconclusive",
                NOT_RUN: "not run"}
VERDICT_COLOR = {"supported": "#176317", "not supported": "#a11111", "inconclusive": "#8a6d00"}


def analyze(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    conf, cfgs = load_run_config(run_dir)
    env = load_json(run_dir / "env.json") if (run_dir / "env.json").exists() else {}
    results = load_results(run_dir, conf, cfgs)
    sections, claims, ran = [], [], []
    for name in conf["experiments"]:
        mod = experiments.get(name)
        if all(r["status"] == "missing" for r in results[name]):
            # not one run finished yet (a partial run): its claims read "not run", not an
            # inconclusive verdict computed from no data
            sections.append({"name": name, "title": mod.TITLE, "tests_claims": list(mod.CLAIMS),
                             "status": {"missing": len(results[name])}, "wall_s": 0.0,
                             "notes": ["Not run yet: no run of this experiment has finished."]})
            continue
        ran.append(name)
        try:
            a = mod.analyze(cfgs[name], results)
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # records that passed read_record's check
            raise DamagedRunError(f"the records under {run_dir / 'runs' / name} do not have the fields the "
                                  f"{name} analysis reads ({type(exc).__name__}: {exc}); a damaged result.json? "
                                  "delete it and rerun `lnorm lab run` to redo that run") from None
        recs = results[name]
        status = {}
        for r in recs:
            status[r["status"]] = status.get(r["status"], 0) + 1
        sections.append({"name": name, "title": mod.TITLE, "tests_claims": list(mod.CLAIMS), "status": status,
                         "wall_s": sum(r.get("wall_s", 0.0) for r in recs), **a})
    claims = section_claims(sections)
    return {"config": conf, "env": env, "claims": claims, "summary": summary(claims, ran),
            "sections": sections, "results": results}


def section_claims(sections: list[dict]) -> list[dict]:
    """Every section's claim rows, in claim order, secondary rows Holm-corrected
    (:func:`adjust_secondary`); each section's rows are replaced by the corrected ones, so a section
    shows the verdict the claims table shows (it showed the unadjusted one, unlabelled)."""
    claims = []
    for k, sec in enumerate(sections):
        for i, c in enumerate(sec.get("claims", [])):
            claims.append({"experiment": sec["name"], "text": CLAIMS.get(c["claim"], ""), **c, "_at": (k, i)})
    claims.sort(key=lambda c: (claim_key(c["claim"]), c["experiment"]))
    claims = adjust_secondary(claims)
    for c in claims:
        k, i = c.pop("_at")
        sections[k]["claims"][i] = c
    return claims


def effect_cell(e: dict | None) -> str:
    """``+0.031 [+0.012, +0.050] acc points`` for the summary table, or "no effect size"."""
    if not e:
        return "no effect size"
    est, lo, hi = e["estimate"], e["lo"], e["hi"]
    if est is None or math.isnan(est):
        return "n/a"
    bound = "≥ " if e.get("n_censored_a") and not e.get("n_censored_b") else ""
    ci = "(no interval)" if math.isnan(lo) or math.isnan(hi) else f"[{lo:+.3g}, {hi:+.3g}]"
    unit = f" {e['unit']}" if e.get("unit") else ""
    return f"{bound}{est:+.3g} {ci}{unit}"


def threshold_cell(e: dict | None) -> str:
    if not e:
        return "-"
    if e.get("non_inferiority") is not None:  # a non-inferiority row: its margin, not 0 / 0
        return f"non-inferior by {e['non_inferiority']:g}"
    return f"{e['min_effect']:g} / {e['margin']:g}"


def summary_verdict(s: dict) -> str:
    mark = VERDICT_MARK[s["verdict"]]
    return f"{mark} (by construction)" if s["role"] == "by construction" else mark


SUMMARY_COLUMNS = ["claim", "experiment", "primary test", "effect [95% CI]", "min effect / margin", "verdict",
                   "could the data decide?"]


def summary_rows(summ: list[dict]) -> list[list[str]]:
    return [[s["claim"], s["experiment"], s["key"], _summary_effect(s), threshold_cell(s["effect"]),
             summary_verdict(s), s["decides"]] for s in summ]


def _summary_effect(s: dict) -> str:
    if s["verdict"] == NOT_RUN or (s["role"] == "by construction" and not s["effect"]):
        return "-"
    return effect_cell(s["effect"])


def row_verdict(c: dict) -> str:
    """A claim row's verdict as shown: secondary rows say they were Holm-corrected, component rows
    (a part of the primary test) that they were not, being the verdict the primary used."""
    mark = VERDICT_MARK[c["verdict"]]
    if c.get("role") == "component":
        return mark + " (part of the primary; not Holm-corrected)"
    if "holm" not in c:
        return mark
    was = c["verdict_unadjusted"]
    return mark + f" (Holm over {c['holm']['family']}" + (f"; unadjusted {VERDICT_MARK[was]})" if was != c["verdict"]
                                                          else ")")


def claims_table_text(claims: list[dict]) -> str:
    """The per-claim summary, then every claim row, for a terminal."""
    summ = summary(claims, sorted({c["experiment"] for c in claims}))
    lines = ["Claims (one pre-registered primary test each):",
             f"{'claim':<6} {'exp':<10} {'verdict':<31} {'effect [95% CI]':<36} could the data decide?"]
    for s in summ:
        lines.append(f"{s['claim']:<6} {s['experiment']:<10} {summary_verdict(s):<31} {_summary_effect(s):<36} "
                     f"{s['decides']}")
    lines += ["", "All claim rows:", f"{'claim':<6} {'exp':<10} {'role':<16} {'verdict':<28} evidence"]
    for c in claims:
        lines.append(f"{c['claim']:<6} {c['experiment']:<10} {c.get('role', '-'):<16} {row_verdict(c):<28} "
                     f"{c['evidence']}")
    return "\n".join(lines)


# plots

def _save_png(fig, path: Path) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _plot(fig_spec: dict, path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for s in fig_spec["series"]:
        x, y = list(s["x"]), [v if v is not None else math.nan for v in s["y"]]
        line, = ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=4, label=s["label"])
        if s.get("lo") and s.get("hi"):
            lo = [v if v is not None else math.nan for v in s["lo"]]
            hi = [v if v is not None else math.nan for v in s["hi"]]
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
    if any(isinstance(v, str) for s in fig_spec["series"] for v in s["x"]):
        ax.tick_params(axis="x", labelrotation=15)
    if fig_spec.get("logx"):
        ax.set_xscale("log")
    if fig_spec.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(fig_spec.get("xlabel", ""))
    ax.set_ylabel(fig_spec.get("ylabel", ""))
    ax.set_title(fig_spec.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    if fig_spec["series"]:
        ax.legend(fontsize=8)
    return _save_png(fig, path)


FOREST = "plots/claims_forest.png"
FOREST_LIMIT = 10.0  # effects beyond this many minimum effects are drawn at the edge, with their value
SUMMARY_NOTE = ("One pre-registered primary test per claim (lnorm.lab.claims.PRIMARY); the claim's verdict is that "
                "test's. Effect oriented so the claim predicts a positive value, with its 95% interval. Supported: "
                "the interval excludes 0 and the effect is at least the minimum effect; not supported: the interval "
                "rules out an effect as large as the margin; otherwise inconclusive. A 'component' row is one part of "
                "a primary test made of several (supported only if every part is: an intersection-union test, so "
                "not Holm-corrected); the primary's verdict includes it, and its caveats say when it decided. "
                "Other rows are secondary (Holm-corrected per claim) and never change the claim's verdict.")


def _forest_point(s: dict) -> tuple[float, float, float] | None:
    """(effect, lo, hi) in units of the minimum effect, or None when there is nothing to draw."""
    e = s["effect"]
    if not e or not e["min_effect"] or e["estimate"] is None or math.isnan(e["estimate"]):
        return None
    m = e["min_effect"]
    return e["estimate"] / m, e["lo"] / m, e["hi"] / m


def _forest_note(s: dict) -> str:
    if s["verdict"] == NOT_RUN:
        return "not run"
    if s["role"] == "by construction":
        return f"{VERDICT_MARK[s['verdict']]} by construction"
    if not s["effect"]:
        return f"{VERDICT_MARK[s['verdict']]}, no effect size"
    if s["effect"].get("non_inferiority") is not None:
        return f"{VERDICT_MARK[s['verdict']]}, non-inferior by {s['effect']['non_inferiority']:g}: not scaled"
    return f"{VERDICT_MARK[s['verdict']]}, min effect 0: not scaled"


def forest_plot(summ: list[dict], path: Path) -> bytes:
    """One line per claim: the primary effect over its minimum effect with the 95% interval (0 = no
    effect, 1 = the smallest effect that matters), colored by verdict; claims without one are named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [_forest_point(s) for s in summ]
    finite = [abs(v) for p in points if p for v in p if math.isfinite(v)]
    lim = min(FOREST_LIMIT, max([2.0, *finite]) * 1.1)
    fig, ax = plt.subplots(figsize=(7.2, 0.32 * len(summ) + 1.8), dpi=90)
    for i, (s, pt) in enumerate(zip(summ, points, strict=True)):
        y, color = len(summ) - 1 - i, VERDICT_COLOR.get(s["verdict"], "#777777")
        if pt is None:
            ax.text(0.05 * lim, y, _forest_note(s), va="center", fontsize=7, color="#555555")
            continue
        est, lo, hi = (max(-lim, min(lim, v)) if not math.isnan(v) else v for v in pt)
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            for end, raw, mark in ((lo, pt[1], "<"), (hi, pt[2], ">")):
                if abs(raw) > lim:
                    ax.plot([end], [y], marker=mark, color=color, ms=6)
        ax.plot([est], [y], marker="o", color=color, ms=6)
        if abs(pt[0]) > lim:  # drawn at the edge: say where it is
            ax.text(est, y + 0.3, f"{pt[0]:.3g}", ha="right" if est > 0 else "left", fontsize=7, color=color)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(1, color="#888888", lw=0.8, ls="--")
    ax.set_yticks(range(len(summ)))
    ax.set_yticklabels([f"{s['claim']} {s['experiment']}: {s['key']}" for s in reversed(summ)], fontsize=7)
    ax.set_xlim(-lim - 0.5, lim + 0.5)
    ax.set_ylim(-0.7, len(summ) - 0.3)
    ax.set_xlabel("primary effect / minimum effect (95% CI); dashed: the minimum effect", fontsize=8)
    ax.set_title("Claims: effect of each primary test, in minimum effects", fontsize=10)
    for verdict, color in VERDICT_COLOR.items():
        ax.plot([], [], color=color, lw=2, marker="o", label=verdict)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return _save_png(fig, path)


# markdown and html

def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(columns, rows) -> list[str]:
    out = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _html_table(columns, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def duration(seconds: float) -> str:
    """``4.5 h``, ``12.0 min``, ``40 s``."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def commit_text(env: dict) -> str:
    """The commit a run used, and whether its lnorm source had uncommitted changes."""
    commit = env.get("git_commit") or "unknown (lnorm not run from a git checkout)"
    return commit + (" (with uncommitted changes in the lnorm source)" if env.get("git_dirty") else "")


def _header_lines(a: dict) -> list[tuple[str, str]]:
    env, conf = a["env"], a["config"]
    return [("lnorm", env.get("lnorm", "?")), ("git commit", commit_text(env)),
            ("torch", env.get("torch", "?")), ("threads per run", str(env.get("threads_per_run", "?"))),
            ("jobs", str(env.get("jobs", "?"))), ("device", env.get("device", "?")),
            ("lnorm backend", env.get("backend", "?")),
            ("suite", conf["suite"]), ("seeds", str(conf["seeds"])), ("started", env.get("started", "?")),
            ("platform", env.get("platform", "?"))]


CLAIM_COLUMNS = ["claim", "statement", "experiment", "role", "verdict", "criterion", "evidence", "caveats"]


def _claim_rows(claims):
    return [[c["claim"], c["text"], c["experiment"], c.get("role", "-"), row_verdict(c), c["criterion"],
             c["evidence"], "; ".join(c.get("caveats", [])) or "-"] for c in claims]


def write_csv(path: Path, results: dict) -> None:
    rows = []
    for exp, recs in results.items():
        for r in recs:
            row = {"experiment": exp, "uid": r["uid"], "seed": r["seed"], "status": r["status"],
                   "wall_s": r.get("wall_s", ""), "reason": r.get("reason", "")}
            for k, v in r["params"].items():
                row[f"param.{k}"] = v
            for k, v in (r.get("result") or {}).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    row[f"result.{k}"] = v
            rows.append(row)
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}.supported{color:#176317;font-weight:bold}
.notsupported{color:#a11;font-weight:bold}.inconclusive{color:#8a6d00}code{background:#f5f5f5}"""


def _html_verdict_table(columns: list[str], rows: list[list[str]], verdicts: list[str], col: int) -> str:
    """An html table whose column ``col`` is colored by the (raw) verdict of its row."""
    body = "".join(
        "<tr>" + "".join(f"<td class='{v.replace(' ', '')}'>{html.escape(str(x))}</td>" if i == col
                         else f"<td>{html.escape(str(x))}</td>" for i, x in enumerate(r)) + "</tr>"
        for r, v in zip(rows, verdicts, strict=True))
    return "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + f"</tr></thead>{body}</table>"


def _summary_parts(a: dict, out_dir: Path) -> tuple[list[str], list[str]]:
    """The per-claim summary with its forest plot (written under ``out_dir``), then every claim row."""
    summ = a["summary"]
    png = forest_plot(summ, out_dir / FOREST)
    md = ["## Claims summary", "", SUMMARY_NOTE, ""] + _md_table(SUMMARY_COLUMNS, summary_rows(summ))
    md += ["", f"![claims: effect / minimum effect]({FOREST})", "", "## Claims", ""]
    md += _md_table(CLAIM_COLUMNS, _claim_rows(a["claims"]))
    h = ["<h2>Claims summary</h2>", f"<p>{html.escape(SUMMARY_NOTE)}</p>",
         _html_verdict_table(SUMMARY_COLUMNS, summary_rows(summ), [x["verdict"] for x in summ], 5),
         f"<img alt='claims forest plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
         "<h2>Claims</h2>",
         _html_verdict_table(CLAIM_COLUMNS, _claim_rows(a["claims"]), [c["verdict"] for c in a["claims"]], 4)]
    return md, h


def _alt(text: str) -> str:
    return text.replace("[", "(").replace("]", ")")


def _section_parts(a: dict, s: dict, out_dir: Path) -> tuple[list[str], list[str]]:
    """One experiment: its runs, figures (written under ``out_dir/plots``), tables, claim rows, notes."""
    st = ", ".join(f"{v} {k}" for k, v in sorted(s["status"].items()))
    title = f"{s['name']}: {s['title']}"
    claims = ", ".join(s["tests_claims"]) or "none (sanity / shared measurements)"
    md = ["", f"## {title}", "", f"Claims tested: {claims}. Runs: {st}. Compute: {s['wall_s']:.0f} s.", ""]
    h = [f"<h2>{html.escape(title)}</h2><p>Claims tested: {html.escape(claims)}. Runs: {html.escape(st)}. "
         f"Compute: {s['wall_s']:.0f} s.</p>"]
    for fig in s.get("figures", []):
        rel = f"plots/{fig['name']}.png"
        png = _plot(fig, out_dir / rel)
        md += [f"![{_alt(fig.get('title', fig['name']))}]({rel})", ""]
        h.append(f"<img alt='{html.escape(fig.get('title', ''))}' src='data:image/png;base64,"
                 f"{base64.b64encode(png).decode()}'>")
    for t in s.get("tables", []):
        md += [f"**{t['title']}**", ""] + _md_table(t["columns"], t["rows"]) + [""]
        h += [f"<h4>{html.escape(t['title'])}</h4>", _html_table(t["columns"], t["rows"])]
    for c in s.get("claims", []):
        md += [f"- **{c['claim']}** ({row_verdict(c)}): criterion: {c['criterion']} "
               f"Evidence: {c['evidence']}"]
        h.append(f"<p><b>{c['claim']}</b> (<span class='{c['verdict'].replace(' ', '')}'>"
                 f"{html.escape(row_verdict(c))}</span>): criterion: {html.escape(c['criterion'])} "
                 f"Evidence: {html.escape(c['evidence'])}</p>")
    for n in s.get("notes", []):
        md += ["", f"> {n}"]
        h.append(f"<p><i>{html.escape(n)}</i></p>")
    errors = [r for r in a["results"][s["name"]] if r["status"] in ("error",)]
    for r in errors[:5]:
        md += ["", f"> error in {r['uid']}: {r.get('reason', '')}"]
    return md, h


def render(a: dict, out_dir: Path) -> tuple[list[str], list[str]]:
    """The report's body from the claims summary on (markdown lines, html parts); its PNGs go to
    ``out_dir/plots``, where the markdown's relative links point."""
    md, h = _summary_parts(a, Path(out_dir))
    for s in a["sections"]:
        smd, sh = _section_parts(a, s, Path(out_dir))
        md += smd
        h += sh
    return md, h


def build(run_dir: Path) -> dict:
    """Write every report file of ``run_dir``; returns the analysis (with ``report_md`` path)."""
    run_dir = Path(run_dir)
    a = analyze(run_dir)
    write_json_atomic(run_dir / "results.json", json_safe({k: a[k] for k in ("config", "env", "summary", "claims", "sections")}))
    write_csv(run_dir / "results.csv", a["results"])

    body_md, body_h = render(a, run_dir)
    md = ["# lnorm lab report", ""] + [f"- **{k}**: {v}" for k, v in _header_lines(a)] + [""] + body_md
    hd = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in _header_lines(a))
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lnorm lab report</title><style>{CSS}</style>"
         "</head><body><h1>lnorm lab report</h1>", f"<ul>{hd}</ul>", *body_h, "</body></html>"]
    for name, text in (("report.md", "\n".join(md) + "\n"), ("report.html", "\n".join(h))):
        tmp = run_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(run_dir / name)
    a["report_md"] = str(run_dir / "report.md")
    a["report_html"] = str(run_dir / "report.html")
    return a
