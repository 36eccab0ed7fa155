"""Plan units, run them (optionally in parallel processes), and keep the run directory.

Run directory layout (the contract the report reads)::

    RUN_DIR/config.json                       resolved config of every experiment in the directory
    RUN_DIR/.lock                             flock held by the run in progress (holds its pid)
    RUN_DIR/env.json                          lnorm/torch version, CPU, threads, device; git commit and
                                              command of every run into it (lnorm.lab.provenance)
    RUN_DIR/runs/<exp>/<unit-id>/metrics.jsonl  curves of one run
    RUN_DIR/runs/<exp>/<unit-id>/result.json    its outcome; present and intact = done (resume skips it)
    RUN_DIR/results.json, results.csv, plots/*.png, report.md, report.html   (lnorm.lab.report)

A unit's id holds a hash of its experiment config, parameters and seed, so a changed config never
reuses stale results. Files are written to a temporary name and renamed, so an interruption
leaves either a finished unit or none. A later run into the same directory adds its experiments
(:func:`merge_config`) and is refused if it would drop finished ones from the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from lnorm.lab import config as C
from lnorm.lab import experiments, provenance
from lnorm.ops.backend import backend_that_runs, choices
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
    return {n: C.resolve(mods[n], suite, raw[n], n) for n in names}


class DamagedRunError(ValueError):
    """A run file that cannot be trusted: truncated, not JSON, or not a run record."""


def load_run_config(run_dir: Path) -> tuple[dict, dict]:
    """``(run config, {exp: Config})`` from RUN_DIR/config.json."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a lab run directory (no config.json)")
    try:
        conf = load_json(path)
        missing = [k for k in ("suite", "seeds", "experiments", "configs") if k not in conf]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        cfgs = {n: C.coerce(experiments.get(n).Config, d) for n, d in conf["configs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedRunError(f"damaged run file {path}: {type(exc).__name__}: {exc}") from None
    return conf, cfgs


_DONE = ("ok", "diverged", "cannot_train")


def read_record(path: Path, statuses=_DONE) -> dict:
    """A unit's ``result.json`` (or ``error.json``), checked; :class:`DamagedRunError` names the file."""
    try:
        rec = load_json(path)
    except (OSError, ValueError) as exc:
        raise DamagedRunError(f"damaged run file {path}: {exc}") from None
    if not (isinstance(rec, dict) and rec.get("status") in statuses and isinstance(rec.get("result", {}), dict)):
        raise DamagedRunError(f"damaged run file {path}: not a run record (a dict with a status in "
                              f"{', '.join(statuses)} and a result dict)")
    return rec


def finished_record(unit_dir: Path) -> dict | None:
    """The unit's record if it finished and its files are intact; None if it has not run yet."""
    path = unit_dir / "result.json"
    if not path.exists():
        return None
    rec = read_record(path)
    if not (unit_dir / "metrics.jsonl").exists():
        raise DamagedRunError(f"damaged run {unit_dir}: result.json without its metrics.jsonl")
    return rec


def load_results(run_dir: Path, conf: dict, cfgs: dict) -> dict[str, list[dict]]:
    """Every planned unit's record: params, seed, status, result ("missing" if not run yet)."""
    out = {}
    for exp, cfg in cfgs.items():
        recs = []
        for u in plan(exp, cfg, conf["seeds"]):
            path = u.dir(run_dir) / "result.json"
            if path.exists():
                rec = read_record(path)
            elif (u.dir(run_dir) / "error.json").exists():
                rec = read_record(u.dir(run_dir) / "error.json", ("error",))
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

    return {
        "lnorm": lnorm.__version__, **provenance.source_state(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), **provenance.cpu(),
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


# the run directory: one run at a time, merged with what earlier runs finished

def make_run_dir(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the run directory: {exc.strerror} ({exc.filename})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the run directory is not writable")
    return out


@contextlib.contextmanager
def lock_run_dir(out: Path, name: str = "--out"):
    """Hold ``out/.lock`` for the block; a second run on the same directory is refused (ValueError).
    ``name``: how messages name the directory (``--out`` for a run, ``RUN_DIR`` for publish).

    An flock ends with the process that holds it, so a killed run never leaves a stale lock."""
    path = Path(out) / ".lock"
    try:
        f = open(path, "a+")
    except OSError as exc:
        raise ValueError(f"{name} {out}: cannot write there: {exc.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            then = "wait for it to end or use another --out" if name == "--out" else "wait for it to end"
            raise ValueError(f"{name} {out} is in use by another `lnorm lab run` (pid {holder}); {then}") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _changes(old: dict, new: dict, most: int = 3) -> str:
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diff[:most]) + (", ..." if len(diff) > most else "")


def merge_config(out: Path, conf: dict) -> dict:
    """``conf`` plus the experiments that an earlier run finished in ``out`` and this one does not select.

    Refuses (ValueError) a run whose plan leaves out finished units (another config, fewer seeds)
    or that would relabel kept experiments (another suite or seed count): their results would
    silently drop out of the report or be misreported."""
    if not (out / "config.json").exists():
        return conf
    old, old_cfgs = load_run_config(out)
    kept, clashes, any_done = {}, [], False
    for n, cfg in old_cfgs.items():
        done = {u.uid for u in plan(n, cfg, old["seeds"]) if (u.dir(out) / "result.json").exists()}
        before, now = dataclasses.asdict(cfg), conf["configs"].get(n)
        if not done:
            continue  # nothing finished under that config: nothing to lose
        any_done = True
        if now is None:
            kept[n] = before
        elif now != before:
            clashes.append(f"{n}: {_changes(before, now)}")
        elif done - {u.uid for u in plan(n, cfg, conf["seeds"])}:
            clashes.append(f"{n}: seeds {old['seeds']} -> {conf['seeds']}")
    if kept:
        clashes += [f"{k} {old[k]!r} -> {conf[k]!r}" for k in ("suite", "seeds") if old[k] != conf[k]]
    # the report's header names one backend and device for the directory: a resume on another
    # would relabel the finished runs (or mix two under one name)
    if any_done:
        clashes += [f"--{k} {old.get(k, d)!r} -> {conf.get(k, d)!r}" for k, d in (("backend", "auto"), ("device", "cpu"))
                    if old.get(k, d) != conf.get(k, d)]
    if clashes:
        raise ValueError(f"--out {out} holds finished runs made with other settings ({'; '.join(clashes)}); "
                         f"this run would drop them from the report: use another --out, or the settings "
                         f"recorded in {out / 'config.json'}")
    names = set(conf["experiments"]) | set(kept)
    return {**conf, "experiments": [n for n in experiments.names() if n in names],
            "configs": {**kept, **conf["configs"]}}


def pending(units: list[Unit], out: Path, log=print) -> list[Unit]:
    """The units still to run. A damaged finished unit runs again, and the log names its files."""
    todo = []
    for u in units:
        try:
            if finished_record(u.dir(out)) is not None:
                continue
        except DamagedRunError as exc:
            log(f"{exc}: running it again")
            (u.dir(out) / "result.json").unlink(missing_ok=True)
        todo.append(u)
    return todo


def finished_before(out: Path) -> int:
    """Finished runs of any experiment in ``out`` (before this run starts)."""
    return sum(1 for _ in Path(out).glob("runs/*/*/result.json"))


# worker processes

_worker_progress = None  # in a pool worker: the queue its runs report their steps to


def _init_worker(parent: int, progress) -> None:
    """Pool initializer: the worker ends with the run that started it, even a ``kill -9``-ed one,
    so no orphan trains on and writes into a run directory that a new run has taken over."""
    global _worker_progress
    _worker_progress = progress
    # Ctrl-C reaches the whole process group: the parent stops the pool (_stop_pool); a worker
    # that raised KeyboardInterrupt itself would only print a traceback and leave its unit half done
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="lnorm-lab-exit-with-parent",
                     daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """The fallback where there is no PR_SET_PDEATHSIG: wait on the parent's sentinel pipe."""
    import multiprocessing

    watch = multiprocessing.parent_process()
    if watch is not None:
        watch.join()  # returns when the parent's end of the pipe closes: the parent is gone
    else:
        while os.getppid() == parent:
            time.sleep(0.5)
    os._exit(1)


def _execute_in_worker(unit: Unit, cfg_dict: dict, run_dir: str, device: str, threads: int, backend: str) -> dict:
    return execute(unit, cfg_dict, run_dir, device, threads, _worker_progress or False, backend)


# the whole run

def default_jobs() -> int:
    """Parallel runs by default: one per core, at most 2 (each run uses one torch thread)."""
    return max(1, min(2, os.cpu_count() or 1))


def _check_run_options(suite: str, jobs: int, seeds: int | None, backend: str, threads: int,
                       device: str = "cpu") -> str:
    """Usage errors as ValueError; returns the lnorm backend the runs' tensors (on ``device``) use."""
    C.check_suite(suite)
    for flag, value in (("--jobs", jobs), ("--seeds", seeds), ("--threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if backend not in choices():
        raise ValueError(f"--backend must be one of {choices()}, got {backend!r}")
    return runs_on(backend, device)


def runs_on(backend: str, device: str) -> str:
    """The backend that runs for ``--backend backend --device device``; ValueError for one that is
    not available here or does not run tensors on ``device`` (lnorm would quietly use another)."""
    try:
        ran = backend_that_runs(backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {backend}: {exc}") from None
    if backend != "auto" and ran != backend:
        ok = []
        for b in choices():
            try:
                if b == "auto" or backend_that_runs(b, device) == b:
                    ok.append(b)
            except RuntimeError:
                pass
        raise ValueError(f"--backend {backend} does not run on --device {device} here (lnorm would run {ran} "
                         f"instead); valid for --device {device}: {', '.join(ok)}")
    return ran


def run(names: list[str], *, suite: str, seeds: int | None, jobs: int, out: Path, device: str,
        sets: list[str] | None, progress: bool = True, backend: str = "auto", threads: int = 1, log=print) -> tuple[Path, dict]:
    """Run the selected experiments into ``out``, skipping finished units. Returns (out, counts).

    ``out`` is locked while the run lasts; experiments finished there earlier stay in its
    config and report. Usage problems (options, ``--set`` values, ``out``) raise ValueError."""
    backend_run = _check_run_options(suite, jobs, seeds, backend, threads, device)
    cmd = provenance.command(names, experiments.names(), suite=suite, seeds=seeds, jobs=jobs, threads=threads,
                             out=out, device=device, backend=backend, sets=sets)
    names = with_requirements(names)
    cfgs = resolve_all(names, suite, sets)
    seeds = seeds or C.DEFAULT_SEEDS[suite]
    units = {n: plan(n, cfgs[n], seeds) for n in names}  # before the run directory: units() checks too
    empty = [n for n in names if not units[n]]
    if empty:
        raise ValueError(f"{', '.join(empty)}: no runs to do with these settings "
                         f"(--set {', '.join(sets or []) or 'nothing'})")
    out = make_run_dir(out)
    with lock_run_dir(out):
        conf = {"suite": suite, "seeds": seeds, "experiments": names, "device": device, "jobs": jobs,
                "backend": backend, "sets": list(sets or []),
                "configs": {n: dataclasses.asdict(c) for n, c in cfgs.items()}}
        write_json_atomic(out / "config.json", json_safe(merge_config(out, conf)))
        todo = {n: pending(us, out, log) for n, us in units.items()}
        invocation = provenance.Invocation(lambda env: write_json_atomic(out / "env.json", json_safe(env)),
                                           {**environment(device, threads, jobs), "backend": backend_run},
                                           provenance.previous_invocations(out / "env.json", finished_before(out)),
                                           cmd, to_run=sum(map(len, todo.values())))
        counts = {"total": sum(map(len, units.values())), "skipped": sum(len(units[n]) - len(todo[n]) for n in names),
                  "ok": 0, "diverged": 0, "cannot_train": 0, "error": 0}
        if counts["skipped"]:
            log(f"resuming {out}: {counts['skipped']} of {counts['total']} runs already done")

        def note(rec, unit):
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            invocation.unit_done(rec["status"])
            if rec["status"] == "error":
                log(f"\nerror in {unit.exp}/{unit.uid}: {rec['reason']}")

        call = {n: (conf["configs"][n], str(out), device, threads) for n in names}
        if jobs == 1:
            _run_here(units, todo, call, progress, backend, note)
        else:
            _run_in_pool(units, todo, call, jobs, progress, backend, note)
        invocation.finish()
    sys.stdout.flush()
    return out, counts


def _bar(**kw):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, **kw)


def _run_here(units, todo, call, progress, backend, note) -> None:
    """One unit after another in this process, one bar per experiment."""
    for n, us in units.items():
        if not us:
            continue
        bar = _bar(total=len(us), initial=len(us) - len(todo[n]), position=0, unit="run", desc=f"{n:>10}") \
            if progress else None
        for u in todo[n]:
            note(execute(u, *call[n], progress, backend), u)
            if bar:
                bar.update(1)
        if bar:
            bar.close()


class _PoolBars:
    """The bars of a pool run: overall (its time left is the run's), one per experiment, and one
    step bar per run in flight below them, fed by the workers' ``(desc, step, total)`` messages."""

    def __init__(self, units, todo, jobs: int) -> None:
        self.overall = _bar(total=sum(map(len, todo.values())), position=0, unit="run", desc=f"{'all':>10}")
        self.exp = {n: _bar(total=len(units[n]), initial=len(units[n]) - len(todo[n]), position=i + 1,
                            desc=f"{n:>10}", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs")
                    for i, n in enumerate(x for x in units if units[x])}
        self.runs: dict[str, object] = {}
        self.first_free, self.jobs = len(self.exp) + 1, jobs

    def unit_done(self, unit: Unit) -> None:
        self.exp[unit.exp].update(1)
        self.overall.update(1)

    def step(self, desc: str, i: int | None, total: int | None) -> None:
        if i is None:  # the run ended (also early: cannot train, diverged, error)
            if desc in self.runs:
                self.runs.pop(desc).close()
            return
        if desc not in self.runs:
            used = {b.pos for b in self.runs.values()}
            pos = next(p for p in range(self.first_free, self.first_free + self.jobs + 8)
                       if p not in used and -p not in used)
            self.runs[desc] = _bar(total=total, desc=f"  {desc}", position=pos, leave=False, unit="step")
        b = self.runs[desc]
        b.update(i - b.n)
        if i >= total:
            self.runs.pop(desc).close()

    def close(self) -> None:
        for b in [*self.runs.values(), *self.exp.values(), self.overall]:
            b.close()


def _run_in_pool(units, todo, call, jobs: int, progress, backend, note) -> None:
    """Every pending unit of every experiment goes to a pool of ``jobs`` spawned workers at once."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    steps = ctx.Queue() if progress else None
    bars = _PoolBars(units, todo, jobs) if progress else None
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), steps)) as pool:
        futs = {pool.submit(_execute_in_worker, u, *call[n], backend): u for n in units for u in todo[n]}
        pending_futs = set(futs)
        try:
            while pending_futs:
                done, pending_futs = wait(pending_futs, timeout=0.25, return_when=FIRST_COMPLETED)
                while bars is not None:
                    try:
                        bars.step(*steps.get_nowait())
                    except queue.Empty:
                        break
                for f in done:
                    note(f.result(), futs[f])
                    if bars is not None:
                        bars.unit_done(futs[f])
        except BaseException:
            _stop_pool(pool, pending_futs)
            raise
        finally:
            if bars is not None:
                bars.close()


def _stop_pool(pool, pending) -> None:
    """Stop at once (Ctrl-C, an error): no queued unit starts, the running ones end now (they stay
    unfinished and run again on resume; finished runs are kept), and only then does the caller
    release the run directory's lock. ``shutdown(wait=False, cancel_futures=True)`` alone let the
    queued units run on after the lock was released (the ``with`` block's own shutdown undid the
    cancel), so a second run could take the directory while they still wrote to it."""
    for f in pending:
        f.cancel()
    procs = [p for p in (getattr(pool, "_processes", None) or {}).values() if p is not None]
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    pool.shutdown(wait=True, cancel_futures=True)
