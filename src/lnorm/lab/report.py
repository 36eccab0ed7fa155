"""Turn a run directory into results.json/csv, plots, report.md and a self-contained report.html.

A pure function of the files on disk (``lnorm lab report RUN_DIR`` rebuilds it). Experiments'
``analyze`` return data in these shapes, and only this module formats them:

* table: ``{"title", "columns": [str], "rows": [[cell]]}``
* figure: ``{"name", "title", "xlabel", "ylabel", "logx"?, "logy"?,
  "series": [{"label", "x": [...], "y": [...], "lo"?: [...], "hi"?: [...]}]}``
* claim: ``{"claim": "C3", "verdict", "criterion", "evidence"}``
* notes: ``[str]`` (published references, caveats)
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

from lnorm.lab import experiments
from lnorm.lab.claims import CLAIMS, claim_key
from lnorm.lab.runner import (
    DamagedRunError,
    load_json,
    load_results,
    load_run_config,
    write_json_atomic,
)
from lnorm.utils import json_safe

VERDICT_MARK = {"supported": "supported", "not supported": "NOT supported", "inconclusive": "inconclusive"}


def analyze(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    conf, cfgs = load_run_config(run_dir)
    env = load_json(run_dir / "env.json") if (run_dir / "env.json").exists() else {}
    results = load_results(run_dir, conf, cfgs)
    sections, claims = [], []
    for name in conf["experiments"]:
        mod = experiments.get(name)
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
        for c in a.get("claims", []):
            claims.append({"experiment": name, "text": CLAIMS.get(c["claim"], ""), **c})
    claims.sort(key=lambda c: (claim_key(c["claim"]), c["experiment"]))
    return {"config": conf, "env": env, "claims": claims, "sections": sections, "results": results}


def claims_table_text(claims: list[dict]) -> str:
    """The claims table for a terminal."""
    lines = [f"{'claim':<6} {'exp':<10} {'verdict':<14} evidence"]
    for c in claims:
        lines.append(f"{c['claim']:<6} {c['experiment']:<10} {VERDICT_MARK[c['verdict']]:<14} {c['evidence']}")
    return "\n".join(lines)


# plots

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


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


def _header_lines(a: dict) -> list[tuple[str, str]]:
    env, conf = a["env"], a["config"]
    return [("lnorm", env.get("lnorm", "?")), ("git commit", env.get("git_commit", "?")),
            ("torch", env.get("torch", "?")), ("threads per run", str(env.get("threads_per_run", "?"))),
            ("jobs", str(env.get("jobs", "?"))), ("device", env.get("device", "?")),
            ("lnorm backend", env.get("backend", "?")),
            ("suite", conf["suite"]), ("seeds", str(conf["seeds"])), ("started", env.get("started", "?")),
            ("platform", env.get("platform", "?"))]


CLAIM_COLUMNS = ["claim", "statement", "experiment", "verdict", "criterion", "evidence"]


def _claim_rows(claims):
    return [[c["claim"], c["text"], c["experiment"], VERDICT_MARK[c["verdict"]], c["criterion"], c["evidence"]]
            for c in claims]


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


def build(run_dir: Path) -> dict:
    """Write every report file of ``run_dir``; returns the analysis (with ``report_md`` path)."""
    run_dir = Path(run_dir)
    a = analyze(run_dir)
    write_json_atomic(run_dir / "results.json", json_safe({k: a[k] for k in ("config", "env", "claims", "sections")}))
    write_csv(run_dir / "results.csv", a["results"])

    md = ["# lnorm lab report", ""]
    md += [f"- **{k}**: {v}" for k, v in _header_lines(a)]
    md += ["", "## Claims", ""]
    md += _md_table(CLAIM_COLUMNS, _claim_rows(a["claims"]))
    hd = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in _header_lines(a))
    hrows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r[:3])
        + f"<td class='{r[3].replace(' ', '').lower()}'>{html.escape(r[3])}</td>"
        + "".join(f"<td>{html.escape(str(x))}</td>" for x in r[4:]) + "</tr>"
        for r in _claim_rows(a["claims"]))
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lnorm lab report</title><style>{CSS}</style>"
         "</head><body><h1>lnorm lab report</h1>", f"<ul>{hd}</ul><h2>Claims</h2>",
         "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in CLAIM_COLUMNS) + f"</tr></thead>{hrows}</table>"]
    for s in a["sections"]:
        st = ", ".join(f"{v} {k}" for k, v in sorted(s["status"].items()))
        title = f"{s['name']}: {s['title']}"
        claims = ", ".join(s["tests_claims"]) or "none (sanity / shared measurements)"
        md += ["", f"## {title}", "", f"Claims tested: {claims}. Runs: {st}. Compute: {s['wall_s']:.0f} s.", ""]
        h += [f"<h2>{html.escape(title)}</h2><p>Claims tested: {html.escape(claims)}. Runs: {html.escape(st)}. "
              f"Compute: {s['wall_s']:.0f} s.</p>"]
        for fig in s.get("figures", []):
            rel = f"plots/{fig['name']}.png"
            png = _plot(fig, run_dir / rel)
            md += [f"![{fig.get('title', fig['name'])}]({rel})", ""]
            h.append(f"<img alt='{html.escape(fig.get('title', ''))}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'>")
        for t in s.get("tables", []):
            md += [f"**{t['title']}**", ""] + _md_table(t["columns"], t["rows"]) + [""]
            h += [f"<h4>{html.escape(t['title'])}</h4>", _html_table(t["columns"], t["rows"])]
        for c in s.get("claims", []):
            md += [f"- **{c['claim']}** ({VERDICT_MARK[c['verdict']]}): criterion: {c['criterion']} "
                   f"Evidence: {c['evidence']}"]
            h.append(f"<p><b>{c['claim']}</b> (<span class='{c['verdict'].replace(' ', '')}'>"
                     f"{html.escape(VERDICT_MARK[c['verdict']])}</span>): criterion: {html.escape(c['criterion'])} "
                     f"Evidence: {html.escape(c['evidence'])}</p>")
        for n in s.get("notes", []):
            md += ["", f"> {n}"]
            h.append(f"<p><i>{html.escape(n)}</i></p>")
        errors = [r for r in a["results"][s["name"]] if r["status"] in ("error",)]
        for r in errors[:5]:
            md += ["", f"> error in {r['uid']}: {r.get('reason', '')}"]
    h.append("</body></html>")
    for name, text in (("report.md", "\n".join(md) + "\n"), ("report.html", "\n".join(h))):
        tmp = run_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(run_dir / name)
    a["report_md"] = str(run_dir / "report.md")
    a["report_html"] = str(run_dir / "report.html")
    return a
