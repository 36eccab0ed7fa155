"""``lnorm lab``: ``list`` the experiments, ``run`` them, rebuild a ``report`` from disk, ``publish`` it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lnorm.lab import config as C
from lnorm.lab import experiments
from lnorm.ops.backend import choices as backend_choices


def register(subparsers) -> None:
    parser = subparsers.add_parser("lab", help="experiments that test the claims of the layer norm paper",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")

    p = sub.add_parser("list", help="the experiments, the claims each tests, estimated seconds per suite")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run experiments, print the claims table, write the report",
                       description="Run experiments (all by default) into a run directory and write its report. "
                                   "Rerunning the same command resumes, skipping finished runs.")
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="names from `lnorm lab list` (default: all)")
    p.add_argument("--suite", default="quick", help="smoke (seconds, CI), quick (~10 min), full (hours); default quick")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: smoke 1, quick 3, full 5)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel worker processes for independent runs (default: cores, at most 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: the lab's models are small, and on a shared 2-core "
                        "machine two threads per step were measured 7x slower than one; use --jobs for parallelism)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/lab-SUITE)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device (default cpu)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field: EXP.FIELD=VALUE or FIELD=VALUE (all selected "
                        "experiments with it); tuples comma-separated; repeatable")
    p.add_argument("--backend", default="auto", choices=backend_choices(),
                   help="lnorm CPU kernel backend inside the runs (default auto: lnorm's Numba "
                        "kernels where installed, as users get them; torch: pure-PyTorch paths)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes per data-parallel run (torch.distributed, e.g. ddp); same as --set nproc=N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild report.md/report.html/plots from a run directory")
    p.add_argument("run_dir", type=Path, help="a directory written by `lnorm lab run`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("publish", help="write a run's report as a page to commit (OUT/SUITE/README.md and plots)",
                       description="Write RUN_DIR's report as OUT/SUITE/README.md with its PNG plots, headed by "
                                   "the command, git commit, torch, CPU, threads, jobs, wall time and run statuses; "
                                   "a partial run says so at the top. Refused for runs made with uncommitted "
                                   "changes to the lnorm source or at more than one commit, unless --allow-dirty.")
    p.add_argument("run_dir", type=Path, help="a directory written by `lnorm lab run`")
    p.add_argument("--out", type=Path, default=Path("docs/lab-results"),
                   help="where the page goes, in a folder named after the suite (default docs/lab-results)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="publish runs that do not come from one clean commit; the page states why")
    p.add_argument("--analysis-here", action="store_true",
                   help="runs made at one clean commit, verdicts from this checkout's (clean) commit: for a fix of "
                        "the decision rules after a long run; the page names both commits and the files between")
    p.set_defaults(func=cmd_publish)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def cmd_list(args) -> int:
    from lnorm.lab.claims import CLAIMS
    from lnorm.lab.report import duration

    print(f"{'name':<10} {'claims':<16} {'smoke s':>8} {'quick s':>8} {'full s':>8}  title")
    tot = dict.fromkeys(C.SUITES, 0)
    for name in experiments.names():
        mod = experiments.get(name)
        est = getattr(mod, "EST_SECONDS", {})
        for s in C.SUITES:
            tot[s] += est.get(s, 0)
        print(f"{name:<10} {','.join(mod.CLAIMS) or '-':<16} " + " ".join(f"{est.get(s, 0):>8.0f}" for s in C.SUITES)
              + f"  {mod.TITLE}")
    print(f"{'total':<27} " + " ".join(f"{tot[s]:>8.0f}" for s in C.SUITES)
          + "  (estimated seconds of one CPU core, idle machine; --jobs 2 about halves the wall time)")
    print("        " + "; ".join(f"{s}: {duration(tot[s])}" for s in C.SUITES))
    print("\nclaims:")
    for cid, text in CLAIMS.items():
        by = [n for n in experiments.names() if cid in experiments.get(n).CLAIMS]
        print(f"  {cid:<4} {text}  [{', '.join(by) or 'no experiment yet'}]")
    return 0


def cmd_run(args) -> int:
    from lnorm.lab import report, runner

    names = args.experiments or experiments.names()
    try:
        C.check_suite(args.suite)
        for n in names:
            experiments.get(n)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available in this torch build/machine")
        out = args.out or Path("runs") / f"lab-{args.suite}"
        t0 = time.perf_counter()
        jobs = runner.default_jobs() if args.jobs is None else args.jobs
        out, counts = runner.run(names, suite=args.suite, seeds=args.seeds, jobs=jobs, out=out,
                                 device=args.device, sets=args.sets + ([f"nproc={args.nproc}"] if args.nproc is not None else []),
                                 progress=not args.no_progress,
                                 backend=args.backend, threads=args.threads)
        wall = time.perf_counter() - t0
        a = report.build(out)
    except ValueError as exc:  # usage errors, a run directory in use, damaged run files
        print(f"lnorm lab run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlnorm lab run: interrupted; the finished runs are kept: run the same command again to go on",
              file=sys.stderr)
        return 130
    print()
    print(report.claims_table_text(a["claims"]))
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "total" and v)
    print(f"\n{counts['total']} runs ({done}) in {wall:.0f} s wall")
    print(f"report: {a['report_md']}\n        {a['report_html']}")
    return 1 if counts.get("error") else 0


def cmd_report(args) -> int:
    from lnorm.lab import report

    try:
        a = report.build(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"lnorm lab report: error: {exc}", file=sys.stderr)
        return 2
    print(report.claims_table_text(a["claims"]))
    print(f"report: {a['report_md']}\n        {a['report_html']}")
    return 0


def cmd_publish(args) -> int:
    from lnorm.lab import publish

    try:
        page = publish.publish(args.run_dir, args.out, allow_dirty=args.allow_dirty, analysis_here=args.analysis_here)
    except (FileNotFoundError, ValueError) as exc:  # not a run dir, bad --out, damaged files, in use, not publishable
        print(f"lnorm lab publish: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the page: a full disk, no permission
        print(f"lnorm lab publish: error: cannot write the page under {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"page: {page}")
    return 0


def main(argv=None) -> int:  # ``python -m lnorm.lab.cli``
    ap = argparse.ArgumentParser(prog="lnorm")
    register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)
