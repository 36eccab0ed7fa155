"""``lnorm lab publish RUN_DIR``: a run's report as a page to commit, ``OUT/<suite>/README.md`` with
its PNG plots in ``OUT/<suite>/plots/`` (relative links, so it renders on GitHub).

The page opens with what a reader needs to trust it: the command, the one git commit whose
lnorm source made every run (:mod:`lnorm.lab.provenance`), torch, CPU, threads, jobs, wall time,
how the runs ended, and, at the very top, whether the run is partial (experiments not run, runs
not finished or failed). A directory whose runs do not come from one clean commit that this
checkout holds is refused unless ``allow_dirty``, and then the page says so under its title.
"""

from __future__ import annotations

import time
from pathlib import Path

from lnorm.lab import experiments, provenance, report
from lnorm.lab.runner import lock_run_dir

STATUSES = (("ok", "ok"), ("diverged", "diverged"), ("cannot_train", "cannot train"), ("error", "failed"),
            ("missing", "not run yet"))
PAGE = "README.md"


class NotPublishable(ValueError):
    """A run directory whose page would misstate where its numbers come from."""


def status_counts(results: dict) -> dict[str, int]:
    counts = {k: 0 for k, _ in STATUSES}
    for recs in results.values():
        for r in recs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def gaps(conf: dict, results: dict) -> list[str]:
    """What makes the run partial: registered experiments it did not run, runs not finished or failed."""
    out = []
    missing = [n for n in experiments.names() if n not in conf["experiments"]]
    if missing:
        out.append(f"{len(missing)} of {len(experiments.names())} experiments of the lab were not run: "
                   f"{', '.join(missing)}")
    for name, recs in results.items():
        left = [r for r in recs if r["status"] in ("missing", "error")]
        if left:
            failed = sum(r["status"] == "error" for r in recs)
            out.append(f"{name}: {len(left)} of {len(recs)} runs have no result ({failed} failed, "
                       f"{len(left) - failed} not run yet)")
    return out


def _distinct(invs: list[dict], key: str, env: dict) -> str:
    vals = list(dict.fromkeys(str(i.get(key)) for i in invs if i.get(key) is not None))
    if not vals:
        return str(env.get(key, "?"))
    return vals[0] if len(vals) == 1 else " / ".join(vals) + " (differs between invocations)"


def _wall(invs: list[dict], sections: list[dict]) -> str:
    total = sum(i.get("wall_s", 0.0) for i in invs)
    cut = sum(not i.get("finished") for i in invs)
    text = f"{report.duration(total)} over {len(invs)} invocation{'s' if len(invs) != 1 else ''}"
    if cut:
        text += f" ({cut} interrupted, counted up to its last finished run)"
    compute = sum(s["wall_s"] for s in sections)
    return text + f"; {report.duration(compute)} of compute summed over runs"


def _commit(invs: list[dict], env: dict) -> str:
    commits = list(dict.fromkeys(i["git_commit"] for i in invs if i.get("git_commit")))
    if not commits:
        return report.commit_text(env)
    text = f"`{commits[0]}`"
    if len(commits) > 1:
        text += " (resumed at " + ", ".join(f"`{c[:12]}`" for c in commits[1:]) + ")"
    dirty = any(i.get("git_dirty") for i in invs)
    return text + (" with uncommitted changes in the lnorm source" if dirty else ", lnorm source clean")


def _cpu(invs: list[dict], env: dict) -> str:
    """The CPU line: model name, family and model (which tell CPU generations sold under one name
    apart), logical cores; per invocation, since a resume may run on another machine."""
    cores = f"{_distinct(invs, 'cpu_count', env)} logical cores"
    cpus = list(dict.fromkeys(provenance.cpu_text(i) for i in invs if i.get("cpu_model") is not None))
    if len(cpus) > 1:
        return " / ".join(cpus) + f" (differs between invocations); {cores}"
    return provenance.cpu_text(next((i for i in invs if i.get("cpu_model") is not None), env), cores)


def analysis_banner(invs: list[dict]) -> tuple[list[str], str]:
    """The page's banner and header field when ``--analysis-here`` shows this checkout's analysis of
    runs made at another commit."""
    run = next((i["git_commit"] for i in invs if i.get("git_commit")), None)
    head = provenance.source_state()["git_commit"]
    if run is None or head is None or provenance.same_source(run, head):
        return [], ""
    diff = provenance.differs_from(run) or []
    shown = ", ".join(f"`{p}`" for p in diff[: provenance.MAX_PATHS]) + (", ..." if len(diff) > provenance.MAX_PATHS else "")
    banner = ["> **Analysed at another commit** (`lnorm lab publish --analysis-here`): the runs were made at "
              f"`{run[:12]}`; the verdicts, tables and plots below are the analysis of `{head[:12]}`, whose lnorm "
              f"source differs from the runs' in {len(diff)} files ({shown}). Where those files are code the runs "
              f"executed, rerunning at `{head[:12]}` may move the numbers; the decision rules are `{head[:12]}`'s.", ""]
    return banner, f"`{head}` (this page's verdicts, tables and plots)"


def header(a: dict, run_dir: Path, refusals: list[str], partial: list[str], analysis_here: bool = False) -> list[str]:
    conf, env = a["config"], a["env"]
    invs = provenance.contributing(env) or env.get("invocations", [])
    counts = status_counts(a["results"])
    commands = list(dict.fromkeys(i["command"] for i in invs)) or [env.get("command", "?")]
    md = [f"# lnorm lab results: {conf['suite']} suite", ""]
    if partial:
        md += ["> **Partial run.** The verdicts below use only the runs that finished; a claim whose "
               "experiment is missing reads \"not run\".", ">"] + [f"> - {g}" for g in partial] + [""]
    if refusals:
        md += ["> **Published with `--allow-dirty`:** these runs do not come from one clean commit, so the "
               "commit below does not reproduce them exactly.", ">"] + [f"> - {r}" for r in refusals] + [""]
    banner, analysed = analysis_banner(invs) if analysis_here else ([], "")
    md += banner
    fields = [
        ("suite", f"{conf['suite']} ({conf['seeds']} seed{'s' if conf['seeds'] != 1 else ''} per configuration)"),
        ("command", "; then ".join(f"`{c}`" for c in commands)),
        ("git commit", _commit(invs, env)),
        *([("analysis at", analysed)] if analysed else []),
        ("lnorm", _distinct(invs, "lnorm", env)), ("torch", _distinct(invs, "torch", env)),
        ("python", _distinct(invs, "python", env)),
        ("CPU", _cpu(invs, env)),
        ("threads per run", _distinct(invs, "threads_per_run", env)), ("jobs", _distinct(invs, "jobs", env)),
        ("device", _distinct(invs, "device", env)), ("lnorm backend", _distinct(invs, "backend", env)),
        ("wall time", _wall(invs, a["sections"])),
        ("runs", f"{sum(counts.values())}: " + ", ".join(f"{counts[k]} {label}" for k, label in STATUSES)),
        ("experiments", f"{len(conf['experiments'])} of {len(experiments.names())}: "
                        f"{', '.join(conf['experiments'])}"),
        ("published", f"{time.strftime('%Y-%m-%d')} by `lnorm lab publish {run_dir}"
                      f"{' --analysis-here' if analysed else ''}`"),
    ]
    md += [f"- **{k}**: {v}" for k, v in fields]
    md += ["", "Rerun: the command above at that commit (it resumes, skipping finished runs), then "
           "`lnorm lab publish RUN_DIR`; `make lab-full` does both for the full suite. Raw numbers: "
           "`results.json` / `results.csv` in the run directory.", ""]
    return md


PALETTE = 128  # colors per published plot: line plots need few, and the PNGs shrink about 3x


def _shrink(png: Path) -> None:
    """Re-save a plot with a palette: the page's PNGs are committed, and every republish adds them again."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=PALETTE, method=Image.Quantize.MEDIANCUT)
    small.save(png, format="PNG", optimize=True)


def _clear(dest: Path) -> None:
    """Remove what an earlier publish wrote here (the page and its plots), and nothing else."""
    (dest / PAGE).unlink(missing_ok=True)
    for p in (dest / "plots").glob("*.png"):
        p.unlink()


def publish(run_dir: Path, out: Path = Path("docs/lab-results"), allow_dirty: bool = False,
            analysis_here: bool = False) -> Path:
    """Write the page of ``run_dir`` under ``out/<suite>/``; returns its path. Raises
    :class:`NotPublishable` (naming ``--allow-dirty``) when the runs are not from one clean commit.
    ``analysis_here``: runs made at one clean commit, analysed by this checkout's clean commit
    (a fix of the decision rules after a long run); the page names both."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a lab run directory (no config.json)")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    with lock_run_dir(run_dir, "RUN_DIR"):  # not while a run still writes into it, and none starts meanwhile
        a = report.analyze(run_dir)
        refusals = provenance.problems(a["env"], analysis_here)
        if refusals and not allow_dirty:
            raise NotPublishable(f"{run_dir} cannot be published as one commit's results: "
                                 + "; ".join(refusals) + ". Rerun it from a clean checkout into a new --out, "
                                 "or pass --allow-dirty to publish anyway (the page then says why)")
        dest = Path(out) / a["config"]["suite"]
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder of the path goes, no permission
            raise ValueError(f"--out {out}: cannot create {dest}: {exc.strerror} ({exc.filename})") from None
        _clear(dest)
        body, _ = report.render(a, dest)
        for png in (dest / "plots").glob("*.png"):
            _shrink(png)
        text = "\n".join(header(a, run_dir, refusals, gaps(a["config"], a["results"]), analysis_here) + body) + "\n"
        tmp = dest / (PAGE + ".tmp")
        tmp.write_text(text)
        tmp.replace(dest / PAGE)
    return dest / PAGE

