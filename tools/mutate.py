"""Named mutations: break the code on purpose, one bug at a time, and check that the tests notice.

Each mutation is a file, an exact piece of its text, the text that replaces it, and the tests that
should fail. The script copies ``src/``, ``tests/`` and ``pyproject.toml`` into a temporary
directory once, then for each mutation applies it there, runs its tests with that copy first on
the path, and puts the file back. A mutation is

* ``killed`` when its tests fail (the line names the first failing test),
* ``survived`` when they pass (the tests cannot see this bug),
* ``stale`` when the text is no longer in the file exactly once (the code moved on: update it).

Not part of ``make test`` or CI (it takes minutes). Run ``make mutate`` (all) or
``python tools/mutate.py NAME ...``; ``--list`` shows the names. Exit status 1 if any mutation
survived or is stale. A survivor that is not a bug (an equivalent mutation) belongs in
``EQUIVALENT`` with the reason, never deleted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXP = "src/lnorm/lab/experiments"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths, relative to the root
    why: str  # the bug it stands for


MUTATIONS = [
    # --- the seven that survived the hand mutation testing of issue 17
    Mutation("e3-c9-ln-and-base-swapped", f"{EXP}/e3_rnn.py",
             'verdict_c9_lm(g("final_bpc", ln), g("final_bpc", base))',
             'verdict_c9_lm(g("final_bpc", base), g("final_bpc", ln))',
             ("tests/lab/test_analyze.py",), "e3's analyze passes LN and baseline the wrong way round to C9"),
    Mutation("norm-bwd-dw-first-thread-only", "src/lnorm/ops/norm.py",
             "dw_part[0] if chunks == 1 else dw_part.sum(0)", "dw_part[0]",
             ("tests/ops/test_threaded_kernels.py",),
             "the threaded norm backward keeps only the first chunk's share of the weight gradient"),
    Mutation("diff-ci-normal-quantile", "src/lnorm/lab/stats.py",
             "h = _t975(df) * se", "h = 1.96 * se",
             ("tests/lab/test_stats.py",), "diff_ci uses the normal quantile: intervals too narrow"),
    Mutation("decide-margin-moved", "src/lnorm/lab/stats.py",
             "if hi <= margin:", "if hi <= margin + 0.05:",
             ("tests/lab/test_stats.py",), "decide's 'not supported' threshold moved by 0.05"),
    Mutation("convert-skips-weight-features-last", "src/lnorm/convert.py",
             '_copy(getattr(new, "weight", None), getattr(module, "weight", None))',
             '_copy(getattr(new, "weight", None), getattr(module, "weight", None)) '
             'if not isinstance(new, (LayerNorm, RMSNorm, MaskedBatchNorm)) else None',
             ("tests/test_convert.py",), "convert_norms does not copy the weight in the features-last layout"),
    Mutation("fused-gru-no-bias-is-half", "src/lnorm/ops/rnn_fused.py",
             "b_in = torch.zeros(H, dtype=gx_rz.dtype)", "b_in = torch.full((H,), 0.5, dtype=gx_rz.dtype)",
             ("tests/nn/test_rnn.py", "-k", "fused"), "the fused GRU with bias=False adds a bias of 0.5"),
    Mutation("watch-input-dims-no-restore", "src/lnorm/convert.py",
             "        state.restore()\n", "",
             ("tests/test_convert.py",), "probing the example input leaves the model's running stats changed"),
    # --- ops/
    Mutation("layer-norm-mean-scaled", "src/lnorm/ops/norm.py",
             "npdt(eps), npdt(1.0 / H), center, y,", "npdt(eps), npdt(1.01 / H), center, y,",
             ("tests/ops/test_layer_norm.py",), "lnorm's own layer norm divides the row sums by H/1.01"),
    Mutation("norm-bwd-db-first-thread-only", "src/lnorm/ops/norm.py",
             "db_part[0] if chunks == 1 else db_part.sum(0)", "db_part[0]",
             ("tests/ops/test_threaded_kernels.py",),
             "the threaded norm backward keeps only the first chunk's share of the bias gradient"),
    Mutation("rms-torch-path-drops-eps", "src/lnorm/ops/norm.py",
             "rstd = torch.rsqrt(s.square().mean(-1) + eps)", "rstd = torch.rsqrt(s.square().mean(-1))",
             ("tests/ops/test_rms_norm.py",), "the torch backend's RMS norm ignores eps"),
    Mutation("norm-bwd-torch-mean-term-dropped", "src/lnorm/ops/norm.py",
             "d = s - mean[:, None]", "d = s",
             ("tests/ops/test_layer_norm.py",), "the torch launchers' layer-norm backward forgets the mean"),
    # --- the fused recurrences
    Mutation("fused-lstm-skips-cell-ln", "src/lnorm/ops/_rnn_kernels.py",
             "hv = out[n, j] * ftanh(g3[j] * ((cn - muc) * rc) + b3[j])", "hv = out[n, j] * ftanh(cn)",
             ("tests/nn/test_rnn.py::test_fused_path_equals_torch_path",), "the fused LSTM skips its cell LN"),
    Mutation("fused-lstm-bwd-cell-mean-term", "src/lnorm/ops/_rnn_kernels.py",
             "dc = rc * (dcn[j] * g3[j] - s1 - chat[j] * s2) + dcs[b, j]",
             "dc = rc * (dcn[j] * g3[j] - chat[j] * s2) + dcs[b, j]",
             ("tests/nn/test_rnn.py::test_fused_path_equals_torch_path",),
             "the fused LSTM backward drops the cell LN's mean term"),
    Mutation("fused-lstm-no-dh0", "src/lnorm/ops/rnn_fused.py",
             "return (dx, dw_ih, dhs, dcs, dw_hh,", "return (dx, dw_ih, dhs * 0, dcs, dw_hh,",
             ("tests/nn/test_rnn.py::test_fused_equals_torch_property",), "the fused LSTM loses the gradient of h0"),
    Mutation("fused-gru-no-dh0", "src/lnorm/ops/rnn_fused.py",
             "return (dx_rz, dx_n, dhs, dw,", "return (dx_rz, dx_n, dhs * 0, dw,",
             ("tests/nn/test_rnn.py::test_fused_equals_torch_property",), "the fused GRU loses the gradient of h0"),
    # --- nn/rnn.py (the pure-torch path, the spec)
    Mutation("gru-torch-path-drops-b_hh", "src/lnorm/nn/rnn.py",
             "gx = gx + torch.cat([p.b_ih[: 2 * H] + p.b_hh[: 2 * H], p.b_ih[2 * H :]])",
             "gx = gx + torch.cat([p.b_ih[: 2 * H], p.b_ih[2 * H :]])",
             ("tests/nn/test_rnn.py::test_layer_norm_off_equals_torch",), "the GRU's r, z gates lose b_hh"),
    # --- lab/stats.py and the verdict functions
    Mutation("mean-ci-df-n", "src/lnorm/lab/stats.py",
             "h = _t975(n - 1) * sd / math.sqrt(n)", "h = _t975(n) * sd / math.sqrt(n)",
             ("tests/lab/test_stats.py",), "mean_ci's t quantile with n degrees of freedom instead of n - 1"),
    Mutation("decide-zero-is-supported", "src/lnorm/lab/stats.py",
             "if lo > 0:", "if lo >= 0:",
             ("tests/lab/test_stats.py",), "an interval touching 0 counts as supported"),
    Mutation("all-of-ignores-not-supported", "src/lnorm/lab/stats.py",
             "if any(v == NOT_SUPPORTED for v in verdicts):", "if all(v == NOT_SUPPORTED for v in verdicts):",
             ("tests/lab/test_stats.py",), "one failed part no longer sinks a claim"),
    Mutation("exact-claims-min-gap", "src/lnorm/lab/stats.py",
             "if max(ln) >= tol:", "if min(ln) >= tol:",
             ("tests/lab/test_criteria.py",), "C1/C2 pass when one LN run is exact, not every one"),
    Mutation("e5-c7-order", f"{EXP}/e5_cnn.py",
             'for n in ("batch", "layer", "none")))', 'for n in ("layer", "batch", "none")))',
             ("tests/lab/test_analyze.py",), "e5's analyze passes BN and LN the wrong way round"),
    Mutation("e1-c6-wrong-batch", f"{EXP}/e1_batch_size.py",
             'verdict_c6(sel("batch", big), sel("layer", big))', 'verdict_c6(sel("batch", small), sel("layer", big))',
             ("tests/lab/test_analyze.py",), "e1's C6 compares BN at the smallest batch"),
    Mutation("ddp-c3-swapped", f"{EXP}/ddp.py",
             'verdict_c3(drops["batch"], drops["layer"])', 'verdict_c3(drops["layer"], drops["batch"])',
             ("tests/lab/test_analyze.py",), "ddp's analyze passes LN's drops as BN's"),
    Mutation("e8-c13-chance-not-doubled", f"{EXP}/e8_gradient_scale.py",
             "min(acc_ln) > 2 * chance", "min(acc_ln) > chance",
             ("tests/lab/test_criteria.py",), "C13 counts a net at 1.5x chance as trained"),
    Mutation("exact-claims-bn-bar-lowered", "src/lnorm/lab/stats.py",
             "if not bn or min(bn) <= 100 * tol:", "if not bn or min(bn) <= 10 * tol:",
             ("tests/lab/test_criteria.py",), "C1/C2 accept a BN gap 10x smaller as proof the probe can see one"),
    Mutation("zoneout-eval-weights-swapped", "src/lnorm/nn/rnn.py",
             "return torch.lerp(new, old, p)", "return torch.lerp(old, new, p)",
             ("tests/nn/test_rnn.py", "-k", "zoneout"), "zoneout's eval expectation weights old and new the wrong way"),
    Mutation("residual-in-fp32-ignored", "src/lnorm/ops/norm.py",
             "        return torch.float32 if x.dtype != torch.float64 else torch.float64\n",
             "        return residual.dtype if residual is not None else x.dtype\n",
             ("tests/ops/test_add_norm.py",), "residual_in_fp32=True keeps a half residual stream"),
    Mutation("e7-c10-margin-sign", f"{EXP}/e7_practice.py",
             "worse, _ = S.greater(one, vals, 0.0)", "worse, _ = S.greater(vals, one, 0.0)",
             ("tests/lab/test_criteria.py",), "C10's 'an alternative is better' check the wrong way round"),
    # --- the weight gradients and input products chosen per machine (this session's)
    Mutation("weight-grad-onednn-no-accumulate", "src/lnorm/ops/step_gemm.py",
             'lin.binary(a.t(), self.acc, dg.t(), None, "add")', 'lin(a.t(), dg.t(), None, "none", [], "")',
             ("tests/ops/test_step_gemm.py",), "oneDNN's weight gradient keeps only the last run of rows"),
    Mutation("weight-grad-float64-check-dropped", "src/lnorm/ops/step_gemm.py",
             "        if not ok:\n            names.remove(\"onednn\")", "        pass",
             ("tests/ops/test_step_gemm.py",), "a weight-gradient candidate that disagrees with float64 can be chosen"),
    Mutation("gru-input-product-dx-zero", "src/lnorm/ops/rnn_fused.py",
             "dx = input_product(dy, w.t()) if ctx.needs_input_grad[0] else None",
             "dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None",
             ("tests/ops/test_step_gemm.py", "tests/nn/test_rnn.py"), "the GRU's input product drops the input's gradient"),
]

# Mutations that survive because they do not change behaviour, with the reason. Listed so that a
# survivor is never silently dropped from MUTATIONS.
EQUIVALENT: dict[str, str] = {}


def _copy_tree(dst: Path) -> None:
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns(".hypothesis", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _first_failure(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, re.M) or re.search(r"^ERROR (\S+)", output, re.M)
    return m.group(1) if m else "?"


def run_one(mut: Mutation, work: Path, timeout: float) -> tuple[str, str, float]:
    path = work / mut.file
    text = path.read_text()
    if text.count(mut.old) != 1:
        return "stale", f"text found {text.count(mut.old)} times in {mut.file}", 0.0
    path.write_text(text.replace(mut.old, mut.new))
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", *mut.tests, "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-m", "not slow", "--timeout", str(int(timeout))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout + 60)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = "timeout", -1
    finally:
        path.write_text(text)
    dt = time.perf_counter() - t0
    if rc == 0:
        return "survived", EQUIVALENT.get(mut.name, ""), dt
    if rc == 1:
        return "killed", _first_failure(out), dt
    return "error", f"pytest exit {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}", dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:38s} {m.file}: {m.why}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS
    counts: dict[str, list[str]] = {"killed": [], "survived": [], "stale": [], "error": []}
    with tempfile.TemporaryDirectory(prefix="lnorm-mutate-") as tmp:
        work = Path(tmp)
        _copy_tree(work)
        for m in chosen:
            status, detail, dt = run_one(m, work, args.timeout)
            counts[status].append(m.name)
            print(f"{status:8s} {m.name:38s} {dt:6.1f}s  {detail}", flush=True)
    print(f"\n{len(chosen)} mutations: " + ", ".join(f"{len(v)} {k}" for k, v in counts.items()))
    for k in ("survived", "stale", "error"):
        if counts[k]:
            print(f"{k}: {', '.join(counts[k])}")
    return 1 if counts["survived"] or counts["stale"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
