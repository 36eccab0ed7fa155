"""Plan units, run them (optionally in parallel processes), and keep the run directory.

Run directory layout (the contract the report reads)::

    RUN_DIR/config.json                       resolved config of every selected experiment
    RUN_DIR/env.json                          lnorm/torch version, git commit, threads, device
    RUN_DIR/runs/<exp>/<unit-id>/metrics.jsonl  curves of one run
    RUN_DIR/runs/<exp>/<unit-id>/result.json    its outcome; present = done (resume skips it)
    RUN_DIR/results.json, results.csv, plots/*.png, report.md, report.html   (lnorm.lab.report)

A unit's id holds a hash of its experiment config, parameters and seed, so a changed config never
reuses stale results. Files are written to a temporary name and renamed, so an interruption
leaves either a finished unit or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from lnorm.lab import config as C
from lnorm.lab import experiments
from lnorm.ops.backend import choices
from lnorm.utils import json_safe


@dataclass(frozen=True)
class Unit:
    exp: str
    params: dict
    seed: int
    uid: str

    def dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / "runs" / self.exp / self.uid


# files

def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _restore(obj):
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def load_json(path: Path):
    with open(path) as f:
        return _restore(json.load(f))


# planning

def _slug(params: dict) -> str:
    parts = [str(v) for v in params.values()]
    return re.sub(r"[^A-Za-z0-9.]+", "_", "-".join(parts))[:60] or "run"


def plan(exp: str, cfg, seeds: int) -> list[Unit]:
    mod = experiments.get(exp)
    cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=_json_default)
    out = []
    for params in mod.units(cfg):
        for seed in range(seeds):
            h = hashlib.sha1(f"{exp}|{cfg_json}|{json.dumps(params, sort_keys=True)}|{seed}".encode())
            out.append(Unit(exp, params, seed, f"{_slug(params)}-s{seed}-{h.hexdigest()[:8]}"))
    return out


def with_requirements(names: list[str]) -> list[str]:
    """The selected experiments plus those their analyses read, in registry order."""
    want = set()

    def add(n):
        if n in want:
            return
        want.add(n)
        for r in getattr(experiments.get(n), "REQUIRES", ()):
            add(r)

    for n in names:
        add(n)
    return [n for n in experiments.names() if n in want]


def resolve_all(names: list[str], suite: str, sets: list[str] | None) -> dict:
    for n in names:
        experiments.get(n)
    mods = {n: experiments.get(n) for n in names}
    raw = C.parse_sets(sets, mods)
    return {n: C.resolve(mods[n], suite, raw[n]) for n in names}


def load_run_config(run_dir: Path) -> tuple[dict, dict]:
    """``(run config, {exp: Config})`` from RUN_DIR/config.json."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a lab run directory (no config.json)")
    conf = load_json(path)
    cfgs = {n: C.coerce(experiments.get(n).Config, d) for n, d in conf["configs"].items()}
    return conf, cfgs


def load_results(run_dir: Path, conf: dict, cfgs: dict) -> dict[str, list[dict]]:
    """Every planned unit's record: params, seed, status, result ("missing" if not run yet)."""
    out = {}
    for exp, cfg in cfgs.items():
        recs = []
        for u in plan(exp, cfg, conf["seeds"]):
            path = u.dir(run_dir) / "result.json"
            if path.exists():
                rec = load_json(path)
            elif (u.dir(run_dir) / "error.json").exists():
                rec = load_json(u.dir(run_dir) / "error.json")
            else:
                rec = {"status": "missing", "result": {}}
            rec.update(params=u.params, seed=u.seed, uid=u.uid)
            recs.append(rec)
        out[exp] = recs
    return out


# environment

def environment(device: str, threads: int, jobs: int) -> dict:
    import torch

    import lnorm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        if dirty and commit != "unknown":
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "lnorm": lnorm.__version__, "git_commit": commit, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads_per_run": threads, "jobs": jobs, "device": device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# executing one unit

class UnitContext:
    """What a run sees: ``log`` appends to metrics.jsonl, ``steps`` drives its progress bar."""

    def __init__(self, metrics_path: Path, device: str, desc: str, progress: bool):
        self.device = device
        self._f = open(metrics_path, "w")
        self._desc, self._progress = desc, progress

    def log(self, **metrics) -> None:
        self._f.write(json.dumps(json_safe(metrics), default=_json_default) + "\n")

    def steps(self, n: int):
        if not self._progress:
            return range(n)
        if self._progress is not True:  # a queue: a worker process reports to the parent's bars
            return self._report(n, self._progress)
        from tqdm import tqdm

        return tqdm(range(n), desc=f"  {self._desc}", leave=False, position=1, unit="step",
                    dynamic_ncols=True, mininterval=0.5)

    def _report(self, n: int, queue):
        every = max(1, n // 50)
        queue.put((self._desc, 0, n))
        for i in range(n):
            yield i
            if (i + 1) % every == 0 or i + 1 == n:
                queue.put((self._desc, i + 1, n))

    def close(self):
        self._f.close()


def execute(unit: Unit, cfg_dict: dict, run_dir: str, device: str, threads: int, progress,
            backend: str = "auto") -> dict:
    """Run one unit and write its files; returns its record. Top-level so processes can pickle it.

    ``progress``: False, True (a step bar here) or a queue that receives ``(desc, step, total)``.
    """
    import torch

    import lnorm
    from lnorm.lab.train import CannotTrain, Diverged, seed_everything

    torch.set_num_threads(threads)
    lnorm.set_backend(backend)
    if lnorm.get_backend() == "numba":  # Numba's kernels keep their own thread pool
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    mod = experiments.get(unit.exp)
    cfg = C.coerce(mod.Config, cfg_dict)
    d = unit.dir(Path(run_dir))
    d.mkdir(parents=True, exist_ok=True)
    metrics_tmp = d / "metrics.jsonl.tmp"
    ctx = UnitContext(metrics_tmp, device, f"{unit.exp} {unit.uid}", progress)
    seed_everything(unit.seed)
    t0 = time.perf_counter()
    try:
        try:
            result = mod.run(cfg, dict(unit.params), unit.seed, ctx)
        finally:
            if progress not in (True, False):
                progress.put((ctx._desc, None, None))
        rec = {"status": "ok", "result": result}
    except Diverged as exc:
        rec = {"status": "diverged", "reason": str(exc), "result": {"diverged_step": exc.step, **exc.partial}}
    except CannotTrain as exc:
        rec = {"status": "cannot_train", "reason": str(exc), "result": {}}
    except Exception as exc:  # a crash: kept on disk for the report, retried by a resume
        ctx.close()
        rec = {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
               "result": {}}
        write_json_atomic(d / "error.json", json_safe(rec))
        return {**rec, "wall_s": time.perf_counter() - t0}
    ctx.close()
    rec["wall_s"] = time.perf_counter() - t0
    rec["threads"] = threads
    os.replace(metrics_tmp, d / "metrics.jsonl")
    write_json_atomic(d / "result.json", json_safe(rec))  # last: its presence marks the unit done
    err = d / "error.json"
    if err.exists():
        err.unlink()
    return rec


# the whole run

def default_jobs() -> int:
    """Parallel runs by default: one per core, at most 2 (each run uses one torch thread)."""
    return max(1, min(2, os.cpu_count() or 1))


def run(names: list[str], *, suite: str, seeds: int | None, jobs: int, out: Path, device: str,
        sets: list[str] | None, progress: bool = True, backend: str = "auto", threads: int = 1, log=print) -> tuple[Path, dict]:
    """Run the selected experiments into ``out``, skipping finished units. Returns (out, counts)."""
    C.check_suite(suite)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if backend not in choices():
        raise ValueError(f"--backend must be one of {choices()}, got {backend!r}")
    names = with_requirements(names)
    cfgs = resolve_all(names, suite, sets)
    seeds = seeds or C.DEFAULT_SEEDS[suite]
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    conf = {"suite": suite, "seeds": seeds, "experiments": names, "device": device, "jobs": jobs, "backend": backend,
            "sets": list(sets or []), "configs": {n: dataclasses.asdict(c) for n, c in cfgs.items()}}
    write_json_atomic(out / "config.json", json_safe(conf))
    write_json_atomic(out / "env.json", {**environment(device, threads, jobs), "backend": backend})

    units = {n: plan(n, cfgs[n], seeds) for n in names}
    todo = {n: [u for u in us if not (u.dir(out) / "result.json").exists()] for n, us in units.items()}
    counts = {"total": sum(map(len, units.values())), "skipped": sum(len(units[n]) - len(todo[n]) for n in names),
              "ok": 0, "diverged": 0, "cannot_train": 0, "error": 0}
    if counts["skipped"]:
        log(f"resuming {out}: {counts['skipped']} of {counts['total']} runs already done")
    bar_mod = None
    if progress:
        from tqdm import tqdm as bar_mod
    cfg_dicts = {n: dataclasses.asdict(c) for n, c in cfgs.items()}

    def note(rec, unit):
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        if rec["status"] == "error":
            log(f"\nerror in {unit.exp}/{unit.uid}: {rec['reason']}")

    if jobs == 1:
        for n in names:
            if not units[n]:
                continue
            bar = bar_mod(total=len(units[n]), initial=len(units[n]) - len(todo[n]), position=0, unit="run",
                          desc=f"{n:>10}", dynamic_ncols=True) if bar_mod else None
            for u in todo[n]:
                note(execute(u, cfg_dicts[n], str(out), device, threads, progress, backend), u)
                if bar:
                    bar.update(1)
            if bar:
                bar.close()
    else:  # every pending unit of every experiment goes to the pool at once; one bar per experiment
        import multiprocessing

        bars, overall = {}, None
        if bar_mod:  # runs of several experiments overlap: the time left is the overall bar's
            n_todo = sum(map(len, todo.values()))
            overall = bar_mod(total=n_todo, position=0, unit="run", desc=f"{'all':>10}", dynamic_ncols=True)
            for i, n in enumerate(x for x in names if units[x]):
                bars[n] = bar_mod(total=len(units[n]), initial=len(units[n]) - len(todo[n]), position=i + 1,
                                  desc=f"{n:>10}", dynamic_ncols=True,
                                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs")
        ctx = multiprocessing.get_context("spawn")
        manager = ctx.Manager() if bar_mod else None
        queue = manager.Queue() if manager else False
        run_bars: dict[str, object] = {}  # one step bar per run in flight, below the experiment bars
        first_free = len(bars) + 1

        def drain():
            while queue is not False and not queue.empty():
                desc, i, total = queue.get()
                if i is None:  # the run ended (also early: cannot train, diverged, error)
                    if desc in run_bars:
                        run_bars.pop(desc).close()
                    continue
                if desc not in run_bars:
                    used = {b.pos for b in run_bars.values()}
                    pos = next(p for p in range(first_free, first_free + jobs + 8) if p not in used and -p not in used)
                    run_bars[desc] = bar_mod(total=total, desc=f"  {desc}", position=pos, leave=False, unit="step",
                                             dynamic_ncols=True)
                b = run_bars[desc]
                b.update(i - b.n)
                if i >= total:
                    b.close()
                    del run_bars[desc]

        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futs = {pool.submit(execute, u, cfg_dicts[n], str(out), device, threads, queue, backend): u
                    for n in names for u in todo[n]}
            pending = set(futs)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    drain()
                    for f in done:
                        u = futs[f]
                        note(f.result(), u)
                        if u.exp in bars:
                            bars[u.exp].update(1)
                            overall.update(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            finally:
                for b in run_bars.values():
                    b.close()
                if manager is not None:
                    manager.shutdown()
        for b in [*bars.values(), overall]:
            if b is not None:
                b.close()
    sys.stdout.flush()
    return out, counts
