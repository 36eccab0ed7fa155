"""E5 CNN (C7): a small 2-D CNN on real MNIST and a 1-D CNN on MNIST-1D with batch, layer, group and
no normalization (published MNIST-1D CNN accuracy without normalization: 94%)."""

from __future__ import annotations

from dataclasses import dataclass

from lnorm.lab import analysis as A
from lnorm.lab import stats as S
from lnorm.lab.data import mnist, mnist1d
from lnorm.lab.models import CNN1d, CNN2d
from lnorm.lab.train import train_classifier

TITLE = "CNNs: real MNIST (2-D) and MNIST-1D (1-D)"
CLAIMS = ("C7",)
PUBLISHED_MNIST1D_CNN = 0.94


@dataclass
class Config:
    datasets: tuple[str, ...] = ("mnist", "mnist1d")
    norms: tuple[str, ...] = ("none", "batch", "layer", "group")
    batch_size: int = 64
    steps_mnist: int = 120  # Adam steps on 28x28 MNIST
    steps_mnist1d: int = 1500  # Adam steps on MNIST-1D (the reference trains 6000)
    lr: float = 3e-3
    channels: int = 8  # first conv's channels (2-D CNN)


SUITES = {"smoke": dict(norms=("none", "batch", "layer"), steps_mnist=10, steps_mnist1d=10, channels=4),
          "quick": {}, "full": dict(steps_mnist=1000, steps_mnist1d=6000, channels=32, lr=1e-2)}
EST_SECONDS = {"smoke": 3, "quick": 70, "full": 1300}


def units(cfg: Config) -> list[dict]:
    return [{"data": d, "norm": n} for d in cfg.datasets for n in cfg.norms]


def run(cfg: Config, params: dict, seed: int, ctx) -> dict:
    if params["data"] == "mnist":
        data, model, steps = mnist(), CNN2d(params["norm"], cfg.channels), cfg.steps_mnist
    else:
        data, model, steps = mnist1d(), CNN1d(params["norm"]), cfg.steps_mnist1d
    return train_classifier(model, data, ctx=ctx, batch_size=cfg.batch_size, steps=steps, lr=cfg.lr,
                            eval_every=max(1, steps // 10), device=ctx.device)


def verdict_c7(bn: list[float], ln: list[float], none: list[float], margin: float = 0.005) -> tuple[str, str]:
    """C7: BN beats LN and LN beats no norm in test accuracy (both Welch 95% intervals > 0)."""
    v1, d1 = S.greater(bn, ln, margin)
    v2, d2 = S.greater(ln, none, margin)
    return S.all_of(v1, v2), f"BN-LN {S.fmt_diff(d1)}; LN-none {S.fmt_diff(d2)}"


def analyze(cfg: Config, results: dict) -> dict:
    recs = results["e5"]
    rows, claims, figs = [], [], []
    for d in cfg.datasets:
        for n in cfg.norms:
            rows.append([d, n, A.cell(recs, "test_acc", data=d, norm=n), A.cell(recs, "final_loss", data=d, norm=n),
                         A.cell(recs, "ms_per_step", data=d, norm=n)])
        if {"batch", "layer", "none"} <= set(cfg.norms):
            v, ev = verdict_c7(*(A.values(recs, "test_acc", data=d, norm=n) for n in ("batch", "layer", "none")))
            claims.append({"claim": "C7", "verdict": v, "evidence": f"{d}: {ev}",
                           "criterion": f"{d}: test accuracy BN > LN > none (Welch 95% CIs of both differences > 0)."})
        figs.append({"name": f"e5_{d}_curves", "title": f"E5: {d} CNN test accuracy during training",
                     "xlabel": "step", "ylabel": "test accuracy",
                     "series": [_curve(cfg, recs, d, n) for n in cfg.norms]})
    none1d = A.values(recs, "test_acc", data="mnist1d", norm="none")
    notes = [f"Published MNIST-1D CNN (Greydanus & Kobak): {PUBLISHED_MNIST1D_CNN:.0%}; ours without norm: "
             f"{S.fmt_ci(none1d)} after {cfg.steps_mnist1d} steps."] if none1d else []
    return {"figures": figs, "claims": claims, "notes": notes,
            "tables": [{"title": "CNN test accuracy (mean ± 95% CI)",
                        "columns": ["data", "norm", "test acc", "final loss", "ms/step"], "rows": rows}]}


def _curve(cfg, recs, d, n):
    return {"label": n, **{k: v for k, v in A.curve_series(recs, "curve_acc", n, "curve_step", data=d, norm=n).items()
                           if k != "label"}}
