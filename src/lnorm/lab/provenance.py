"""Where a run directory's numbers come from, so that a published page can name one commit.

``env.json`` keeps one entry per ``lnorm lab run`` into the directory (``"invocations"``): the
equivalent command, the git commit of the lnorm source it imported, whether that source had
uncommitted changes, how many runs it had to do, and its wall time so far (rewritten after each
finished run, so a killed run keeps what it did). "The source" is the ``lnorm`` package
directory (``src/lnorm``): changes elsewhere in the checkout (README, tests, docs) do not change
a number. :func:`problems` says why a directory's runs do not come from one clean commit.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import time
from pathlib import Path

from lnorm.utils import cpu_model

PACKAGE = Path(__file__).resolve().parents[1]  # the lnorm package directory
MAX_PATHS = 20  # changed paths kept per invocation; the count is kept in full


def _git(*args: str) -> str | None:
    """``git ARGS`` run in the package directory: its stdout, or None (no git, not a checkout, failure)."""
    try:
        p = subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _package_prefix() -> str | None:
    """The package's path in its git checkout (``src/lnorm/``), or None when lnorm is not a tracked
    file of one: an installed wheel inside someone else's repository must not report that repository."""
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    prefix = _git("rev-parse", "--show-prefix")
    return prefix.strip() if prefix is not None else None


def _changed_paths(prefix: str, commit: str | None = None) -> list[str] | None:
    """Paths under the package that differ from ``commit`` (default HEAD) in the working tree,
    untracked files included; None when git cannot tell (e.g. ``commit`` is not in this checkout)."""
    diff = _git("diff", "--name-only", commit or "HEAD", "--", ".")
    untracked = _git("ls-files", "--others", "--exclude-standard", "--full-name", "--", ".")
    if diff is None or untracked is None:
        return None
    return sorted({p for p in (diff + untracked).splitlines() if p.startswith(prefix)})


def source_state() -> dict:
    """``{"git_commit": full sha or None, "git_dirty": bool or None, "git_changes": [paths]}``."""
    prefix = _package_prefix()
    head = _git("rev-parse", "HEAD") if prefix is not None else None
    changed = _changed_paths(prefix) if head else None
    return {"git_commit": head.strip() if head else None,
            "git_dirty": None if changed is None else bool(changed),
            "git_changes": (changed or [])[:MAX_PATHS], "git_changes_count": len(changed or [])}


def differs_from(commit: str) -> list[str] | None:
    """Package paths where this checkout's working tree differs from ``commit``; None if git cannot tell."""
    prefix = _package_prefix()
    return None if prefix is None else _changed_paths(prefix, commit)


def same_source(a: str, b: str) -> bool:
    """Whether commits ``a`` and ``b`` hold the same lnorm package (a commit that changed only docs)."""
    prefix = _package_prefix()
    return a == b or (prefix is not None and _git("diff", "--quiet", a, b, "--", ".") is not None)


def cpu() -> dict:
    """The CPU fields of ``env.json`` (:func:`lnorm.utils.cpu_model`, the reader ``lnorm bench``
    uses): ``cpu_model`` (the model name, e.g. "AMD EPYC 9R14 96-Core Processor", as before),
    ``cpu_vendor``, ``cpu_family`` and ``cpu_model_number`` (the family and model numbers, which tell
    CPU generations sold under one name apart: Zen 3 is family 25 model 1, Zen 4 25/17, Zen 5 26/2).
    The numbers are None where /proc/cpuinfo does not give them; an ``env.json`` written before they
    were recorded lacks the keys (:func:`cpu_text` says which)."""
    info = cpu_model()
    return {"cpu_model": info.get("model_name") or platform.machine() or "unknown",
            "cpu_vendor": info.get("vendor"), "cpu_family": info.get("family"),
            "cpu_model_number": info.get("model")}


def cpu_text(entry: dict, extra: str = "") -> str:
    """``"AMD EPYC 9R14 96-Core Processor (family 25, model 17)"`` for an ``env.json`` entry (an
    invocation or the whole file), ``extra`` added inside the parentheses after "; ". "family/model
    not recorded" for an entry written before they were, "family/model unknown" where
    /proc/cpuinfo did not give them."""
    name = entry.get("cpu_model") or "?"
    fam, model = entry.get("cpu_family"), entry.get("cpu_model_number")
    if "cpu_family" not in entry and "cpu_model_number" not in entry:
        what = "family/model not recorded"
    elif fam is None or model is None:
        what = "family/model unknown"
    else:
        what = f"family {fam}, model {model}"
    return f"{name} ({what}{'; ' + extra if extra else ''})"


def command(names: list[str], all_names: list[str], *, suite: str, seeds: int | None, jobs: int, threads: int,
            out, device: str, backend: str, sets: list[str] | None) -> str:
    """The ``lnorm lab run`` command line equivalent to these arguments (every setting that can
    change a number is spelled out, so the command reruns the same plan at the same commit)."""
    argv = ["lnorm", "lab", "run", *([] if list(names) == list(all_names) else names), "--suite", suite]
    if seeds is not None:
        argv += ["--seeds", str(seeds)]
    argv += ["--jobs", str(jobs), "--threads", str(threads), "--device", device, "--backend", backend]
    for s in sets or []:
        argv += ["--set", s]
    return shlex.join([*argv, "--out", str(out)])


# what each invocation records of its environment (a resume may run on another machine or torch)
ENTRY_FIELDS = ("git_commit", "git_dirty", "git_changes", "git_changes_count", "started", "lnorm", "torch",
                "python", "cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number", "cpu_count",
                "threads_per_run", "jobs", "device", "backend")


class Invocation:
    """This ``lnorm lab run``'s entry in ``env.json``, rewritten after every finished run."""

    def __init__(self, write, env: dict, previous: list[dict], cmd: str, to_run: int):
        self._write, self._env, self._previous = write, env, previous
        self._t0 = time.monotonic()
        self.entry = {"command": cmd, **{k: env.get(k) for k in ENTRY_FIELDS},
                      "to_run": to_run, "done": {}, "wall_s": 0.0, "finished": False}
        self.save()

    def save(self) -> None:
        self.entry["wall_s"] = round(time.monotonic() - self._t0, 3)
        self._write({**self._env, "command": self.entry["command"],
                     "invocations": [*self._previous, self.entry]})

    def unit_done(self, status: str) -> None:
        self.entry["done"][status] = self.entry["done"].get(status, 0) + 1
        self.save()

    def finish(self) -> None:
        self.entry["finished"] = True
        self.save()


UNRECORDED = {"command": "unknown (an earlier `lnorm lab run` that recorded no commit)", "git_commit": None,
              "git_dirty": None, "unrecorded": True, "to_run": 1, "done": {}, "wall_s": 0.0, "finished": False}


def previous_invocations(env_path: Path, finished_before: int) -> list[dict]:
    """The invocations recorded in an existing ``env.json``. Runs finished before with none recorded
    (an older lnorm, a deleted env.json) stand as one invocation of unknown commit, so that a
    resume cannot pass them off as its own commit's."""
    try:
        with open(env_path) as f:
            inv = json.load(f).get("invocations", [])
    except (OSError, ValueError, AttributeError):
        inv = []
    inv = inv if isinstance(inv, list) else []
    return inv if inv or not finished_before else [dict(UNRECORDED)]


def contributing(env: dict) -> list[dict]:
    """The invocations that had runs to do: their code made the directory's results."""
    return [i for i in env.get("invocations", []) if i.get("to_run", 0) > 0]


def problems(env: dict, analysis_here: bool = False) -> list[str]:
    """Why this run directory does not come from one clean commit that this checkout holds; [] if it does.

    ``analysis_here``: the runs may come from another commit than this checkout's, whose analysis
    (verdicts, tables, plots) the page then shows; the checkout must itself be a clean commit, and
    the runs still one clean commit's."""
    inv = contributing(env)
    if not env.get("invocations"):
        return ["env.json records no commit per invocation (a run made before `lnorm lab run` recorded them); "
                "rerun it into a new --out"]
    if not inv:
        return []
    out = []
    if any(i.get("unrecorded") for i in inv):
        out.append("some runs were made by an earlier `lnorm lab run` that recorded no commit")
    unknown = [i for i in inv if not i.get("git_commit") and not i.get("unrecorded")]
    if unknown:
        out.append(f"{len(unknown)} invocation(s) ran lnorm from outside a git checkout: no commit to name")
    for i in inv:
        if i.get("git_dirty"):
            paths = ", ".join(i.get("git_changes", [])) or "?"
            out.append(f"`{i['command']}` ran with uncommitted changes in the lnorm source ({paths})")
    commits = list(dict.fromkeys(i["git_commit"] for i in inv if i.get("git_commit")))
    for c in commits[1:]:
        if not same_source(commits[0], c):
            out.append(f"mixed commits: runs were made at {commits[0][:12]} and at {c[:12]} (resumed after a "
                       "commit that changed the lnorm source)")
    if commits and analysis_here:
        state = source_state()
        if not state["git_commit"] or state["git_dirty"] is not False:
            out.append("--analysis-here needs this checkout's lnorm source to be a clean commit, to name it on the "
                       "page (it has uncommitted changes, or git cannot tell)")
        elif differs_from(commits[0]) is None:
            out.append(f"this checkout cannot compare its lnorm source with the run's commit {commits[0][:12]} "
                       "(not a git checkout, or the commit is not in it)")
    elif commits:
        here = differs_from(commits[0])
        if here is None:
            out.append(f"this checkout cannot compare its lnorm source with the run's commit {commits[0][:12]} "
                       "(not a git checkout, or the commit is not in it)")
        elif here:
            out.append(f"this checkout's lnorm source differs from the run's commit {commits[0][:12]} "
                       f"({', '.join(here[:MAX_PATHS])}), so the analysis would not be that commit's; "
                       f"check out {commits[0][:12]} to publish")
    return out
