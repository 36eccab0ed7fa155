"""E1 batch size (C1, C3, C6): an MLP on real MNIST with no/batch/layer/RMS norm at batch sizes 1..128.

Every run sees the same ``examples`` training digits, whatever its batch size (so batch 1 takes
``examples`` steps and batch 128 ``examples / 128``); ``examples`` must be a multiple of every
batch size. Batch norm cannot train on one sample: that run is recorded as "cannot train" with
torch's reason. Runs of one seed share the initialisation and data order where shapes match, so
the comparisons between norms and batch sizes are paired by seed. After training, each model's
outputs on test digits are computed in training mode (where a norm uses the statistics of the
batch it is given) once as one batch and once in pairs: a per-sample norm gives the same
outputs (C1). The paper used a 784-1000-1000-10 permutation-invariant MLP at batch sizes 128
and 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist
from lnorm.lab.models import MLP
from lnorm.lab.train import train_classifier
from lnorm.nn.factory import NORM_KINDS

TITLE = "Batch size: MLP on real MNIST"
CHANCE = 0.1  # accuracy of a diverged run (10 classes)
ACC_RESOLUTION = 1e-3  # one of the 1000 test digits
CLAIMS = ("C1", "C3", "C6")


@dataclass
class Config:
    norms: tuple[str, ...] = ("none", "batch", "layer")  # rms joins in the full suite (no claim reads it)
    batch_sizes: tuple[int, ...] = (1, 4, 32, 128)
    hidden: int = 128  # units per hidden layer
    depth: int = 2  # hidden layers
    examples: int = 3200  # training digits every run sees (0.8 passes over the 4000), any batch size
    lr: float = 1e-3  # Adam learning rate
    max_steps: int = 0  # cap on steps per run for debugging (0: none); a binding cap breaks equal budgets
    c1_samples: int = 256  # test digits used for the batch-independence check


SUITES = {
    "smoke": dict(batch_sizes=(1, 32), hidden=64, examples=320, c1_samples=32),
    "quick": {},
    # 3.2 passes: 100 steps at batch 128, 12,800 at batch 1
    "full": dict(norms=("none", "batch", "layer", "rms"), hidden=1000, batch_sizes=(1, 2, 4, 8, 32, 128),
                 examples=12_800),
}
# quick: 38 s CPU, --jobs 1, 2-core EPYC. full: the 120 runs summed to 4520 s (--jobs 2, same EPYC,
# commit 70bf14f); 12800 examples at every batch size make 12800 steps at batch 1 (~150 s a run)
EST_SECONDS = {"smoke": 3, "quick": 40, "full": 4500}
# the names each string field takes, checked before a run starts (lnorm.lab.config.resolve)
CHOICES = {"norms": NORM_KINDS}


def units(cfg: Config) -> list[dict]:
    uneven = [b for b in cfg.batch_sizes if cfg.examples % b]
    if uneven:
        raise ValueError(f"e1.examples must be a multiple of every batch size (the same examples at each), got "
                         f"examples={cfg.examples} and batch sizes {', '.join(map(str, uneven))}")
    return [{"norm": n, "batch_size": b} for n in cfg.norms for b in cfg.batch_sizes]


def steps_for(cfg: Config, batch_size: int) -> int:
    """Optimizer steps of a run: ``examples / batch_size``, at most ``max_steps`` (when set)."""
    steps = max(1, cfg.examples // batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def budget_label(cfg: Config) -> str:
    """The examples each batch size sees, for titles: one number when they are all equal."""
    seen = {b: steps_for(cfg, b) * b for b in sorted(cfg.batch_sizes)}
    k = lambda n: f"{n / 1000:.3g}k" if n >= 1000 else str(n)  # noqa: E731
    if len(set(seen.values())) == 1:
        return f"same examples seen: {k(next(iter(seen.values())))}"
    return "examples seen: " + ", ".join(f"{k(n)} at batch {b}" for b, n in seen.items())


@torch.no_grad()
def batch_dependence(model, X: torch.Tensor) -> float:
    """Largest |output in one batch - output in batches of 2|, both in training mode."""
    model.train()
    whole = model(X)
    pairs = torch.cat([model(X[i:i + 2]) for i in range(0, len(X) - len(X) % 2, 2)])
    return float((whole[:len(pairs)] - pairs).abs().max())


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    data = mnist()
    bs = params["batch_size"]
    steps = steps_for(cfg, bs)
    model = MLP(784, cfg.hidden, cfg.depth, 10, params["norm"])
    out = train_classifier(model, data, ctx=ctx, batch_size=bs, steps=steps, lr=cfg.lr,
                           eval_every=max(1, steps // 5), device=ctx.device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the check must not move BN's running stats
    out["batch_dependence"] = batch_dependence(model, data[2][:cfg.c1_samples].to(ctx.device))
    model.load_state_dict(state)
    out["steps"] = steps
    return out


# criteria (pure functions of numbers)

def verdict_c1(ln_dependence: list[float], bn_dependence: list[float], tol: float = 1e-4) -> tuple[str, str]:
    """C1: every layer-norm model gives the same outputs whatever the batch (max diff < tol), and
    the check detects batch norm's dependence (> 100 tol) so it could have failed."""
    v = S.exact_vs_batch_norm(ln_dependence, bn_dependence, tol)
    if not ln_dependence:
        return v, "no layer-norm runs"
    # the extremes of the finite values, and how many were not (a NaN is a failed measurement)
    ln_max, bad = S.fmt_extreme(ln_dependence), S.exact_nonfinite_note(ln_dependence, bn_dependence)
    if v == S.NOT_SUPPORTED:
        return v, f"LN outputs change with the batch by up to {ln_max} (tolerance {tol:g})" + (f"; {bad}" if bad else "")
    ev = f"LN max |Δoutput| one batch vs pairs = {ln_max} over {len(ln_dependence)} models"
    if v == S.INCONCLUSIVE:
        return v, ev + "; " + (bad or "the check did not detect BN's dependence, so it may be blind")
    return v, ev + f"; BN: {S.fmt_extreme(bn_dependence, largest=False)} or more"


def verdict_c3(bn_b1_status: list[str], ln_b1: dict[int, float], none_b1: dict[int, float],
               bn_drop: dict[int, float], ln_drop: dict[int, float], tol: float = 0.02, min_effect: float = 0.01,
               margin: float = 0.005) -> tuple[str, str, S.Effect | None]:
    """C3 has three parts, all needed, each on the seeds both sides have (paired):

    * BN cannot train at batch 1 (every seed);
    * LN works at batch 1: the 95% interval of LN minus the unnormalized net, both at batch 1 with
      the same examples, lies above ``-tol`` (non-inferior); not supported when it lies below;
    * BN loses more accuracy than LN going from the largest batch to the smallest batch BN can
      train with (per-seed drops): ``S.compare`` with ``min_effect`` and ``margin``. This part
      is the row's effect.

    Accuracies are scored (a diverged run is chance), so a drop is never dropped."""
    parts, ev = [], []
    unknown = [s for s in bn_b1_status if s not in ("ok", "diverged", "cannot_train")]
    if not bn_b1_status or unknown:
        # a run not run yet or crashed says nothing about whether BN can train at batch 1
        parts.append(S.INCONCLUSIVE)
        ev.append(f"BN@1: {len(unknown)} of {len(bn_b1_status)} runs missing or crashed" if unknown
                  else "no BN run at batch 1")
    else:
        ok = all(s == "cannot_train" for s in bn_b1_status)
        parts.append(S.SUPPORTED if ok else S.NOT_SUPPORTED)
        ev.append(f"BN@1: {'cannot train' if ok else 'trained'} ({len(bn_b1_status)} seeds)")
    works = S.as_non_inferiority(S.compare(ln_b1, none_b1, paired=True, min_effect=0.0, unit="acc",
                                           fail_score=CHANCE, resolution=ACC_RESOLUTION), tol)
    parts.append(works.verdict)
    ev.append(f"LN@1 - none@1 {works.text()} ({parts[-1]} at non-inferiority margin {tol:g})")
    # each drop is two rounded accuracies (largest batch minus small batch): four per paired difference
    eff = S.compare(bn_drop, ln_drop, paired=True, min_effect=min_effect, margin=margin, unit="acc",
                    fail_score=None, resolution=S.difference_resolution(ACC_RESOLUTION))
    parts.append(eff.verdict)
    ev.append("the deciding part: accuracy drop from the largest to BN's smallest trainable batch, BN minus LN")
    return S.all_of(*parts), "; ".join(ev), eff


def verdict_c6(bn_acc: dict[int, float], ln_acc: dict[int, float], margin: float = 0.01) -> tuple[str, str, S.Effect]:
    """C6 (non-inferiority at the largest batch): supported if the paired 95% interval of BN - LN
    accuracy lies above ``-margin``; not supported if it lies below ``-margin`` (BN worse by more)."""
    eff = S.compare(bn_acc, ln_acc, paired=True, min_effect=0.0, unit="acc", fail_score=CHANCE,
                    resolution=ACC_RESOLUTION)
    ni = S.as_non_inferiority(eff, margin)
    return ni.verdict, f"BN - LN test accuracy (non-inferiority margin {margin:g})", ni


def still_improving(recs: list[dict], rise: float = 0.01, **match) -> bool:
    """True when the mean test accuracy over seeds rose by more than ``rise`` between the last two
    evaluations of a config's runs (its learning curve had not flattened at the end)."""
    curves = [c for c in A.values(recs, "curve_acc", **match) if len(c) >= 2]
    return bool(curves) and sum(c[-1] - c[-2] for c in curves) / len(curves) > rise


def _c3_row(cfg: Config, recs: list[dict], bss: list[int]) -> dict:
    big = bss[-1]

    def bn_trains(b):  # BN ran at batch b (a diverged run counts: it trained, and scores chance)
        st = A.statuses(recs, norm="batch", batch_size=b)
        return bool(st) and not all(x == "cannot_train" for x in st)

    trainable = [b for b in bss if bn_trains(b)]
    bn_small = trainable[0] if trainable else bss[0]
    drops = {}
    for n in ("batch", "layer"):
        at_big = A.scored(recs, "test_acc", CHANCE, norm=n, batch_size=big)
        at_small = A.scored(recs, "test_acc", CHANCE, norm=n, batch_size=bn_small)
        both = sorted(set(at_big) & set(at_small))
        # failed runs: counted by compare, which names the accuracy they were scored (chance), not
        # the drop computed from it
        drops[n] = S.Scored({s: at_big[s] - at_small[s] for s in both},
                            failed=(at_big.failed | at_small.failed) & set(both), fail_score=CHANCE,
                            fail_note="chance")
    v, ev, eff = verdict_c3(A.statuses(recs, norm="batch", batch_size=1),
                            A.scored(recs, "test_acc", CHANCE, norm="layer", batch_size=1),
                            A.scored(recs, "test_acc", CHANCE, norm="none", batch_size=1),
                            drops["batch"] if bn_small != big else {}, drops["layer"])
    caveats = [f"every run saw the same {cfg.examples} training digits: {steps_for(cfg, big)} steps at batch {big}, "
               f"{steps_for(cfg, bss[0])} at batch {bss[0]}"]
    return A.claim_row("e1", "C3", "C3-small-batch-drop", eff, evidence=ev, role="primary", caveats=caveats, verdict=v,
                       criterion=f"BN cannot train at batch 1; LN at batch 1 is non-inferior to the unnormalized net at "
                                 f"batch 1 (paired 95% CI of LN - none above -2 points); BN's accuracy drop from batch "
                                 f"{big} to batch {bn_small} exceeds LN's (paired 95% CI > 0, estimate >= 1 point; not "
                                 "supported when the CI is below 0.5 point).")


def _c6_row(cfg: Config, recs: list[dict], big: int) -> dict:
    v, ev, eff = verdict_c6(A.scored(recs, "test_acc", CHANCE, norm="batch", batch_size=big),
                            A.scored(recs, "test_acc", CHANCE, norm="layer", batch_size=big))
    rising = {n for n in ("batch", "layer") if still_improving(recs, norm=n, batch_size=big)}
    caveats = [f"{steps_for(cfg, big)} steps at batch {big}: {n} still improving at the end" for n in sorted(rising)]
    # a side still improving could overturn the verdict it lost: LN catching up undoes "BN as
    # good", BN catching up undoes "BN worse"
    if (v == S.SUPPORTED and "layer" in rising) or (v == S.NOT_SUPPORTED and "batch" in rising):
        ev += f"; {v} held back: the side that lost was still improving"
        v = S.INCONCLUSIVE
    return A.claim_row("e1", "C6", "C6-bn-vs-ln-large-batch", eff, evidence=f"batch {big}: {ev}", role="primary",
                       caveats=caveats, verdict=v,
                       criterion=f"at batch {big}, the paired 95% CI of BN minus LN test accuracy lies above -1 point "
                                 "(not supported when it lies below -1 point).")


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e1"]

    bss = sorted(cfg.batch_sizes)
    # A.cell, not fmt_ci of the finished runs: a cell says how many runs diverged or could not train
    rows = [[n, b, steps_for(cfg, b), *(A.cell(recs, k, norm=n, batch_size=b) for k in ("test_acc", "final_loss",
                                                                                          "ms_per_step"))]
            for n in cfg.norms for b in bss]
    series = [A.series(recs, "test_acc", n, bss, "batch_size", norm=n) for n in cfg.norms]
    claims = []
    if "layer" in cfg.norms:
        v, ev = verdict_c1(A.values(recs, "batch_dependence", norm="layer"),
                           A.values(recs, "batch_dependence", norm="batch"))
        claims.append(A.claim_row("e1", "C1", "C1-trained-mlp", None, evidence=ev, role="by construction", verdict=v,
                                  criterion="trained LN models give outputs that differ by < 1e-4 between one batch "
                                            "and batches of 2 (training mode), and the same check detects BN (> 1e-2)."))
    if {"batch", "layer", "none"} <= set(cfg.norms) and len(bss) >= 2:
        claims.append(_c3_row(cfg, recs, bss))
    if {"batch", "layer"} <= set(cfg.norms):
        claims.append(_c6_row(cfg, recs, bss[-1]))
    return {
        "figures": [{"name": "e1_accuracy_vs_batch", "title": f"E1: MNIST test accuracy vs batch size ({budget_label(cfg)})",
                     "xlabel": "batch size", "ylabel": "test accuracy", "logx": True, "series": series}],
        "tables": [{"title": "Test accuracy, final training loss and time per step (mean ± 95% CI half-width over the "
                             "finished runs; '+k diverged': runs not in the mean, which the verdicts score)",
                    "columns": ["norm", "batch", "steps", "test acc", "final loss", "ms/step"], "rows": rows}],
        "claims": claims,
        "notes": ["Paper (Ba et al. 2016, fig. 3): 784-1000-1000-10 MLP; LN is robust to batch size while BN "
                  f"degrades at batch 4. Ours: smaller MLP, 4000 real MNIST digits, Adam; every run sees the same "
                  f"{cfg.examples} digits (steps = {cfg.examples} / batch size), so small batches take more, "
                  "noisier steps. Comparisons are paired by seed (runs of a seed share the data order)."],
    }
